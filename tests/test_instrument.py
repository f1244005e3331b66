"""instrument(model): capture, statistics and knowledge entropy on real tiny models of every supported family."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kacq_hooks as kh
from tiny_models import DENSE, MOE, random_batch, tiny_model

ARCHS = sorted(set(DENSE) | {"phi3"})


def manual_inputs(model, paths, run):
    """The output projections' inputs, captured by independent hooks, during ``run()``."""
    captured = {p: [] for p in paths}
    modules = dict(model.named_modules())
    handles = [modules[p].register_forward_pre_hook(lambda m, a, p=p: captured[p].append(a[0].detach().clone()))
               for p in paths]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return captured


def manual_mean_abs(tensors, masks):
    """float64 mean |C| over unpadded positions of each call."""
    total, count = 0.0, 0
    for c, mask in zip(tensors, masks):
        c = c.double().reshape(mask.shape[0], -1, c.shape[-1])
        window = mask[:, mask.shape[1] - c.shape[1]:].bool()
        total = total + c.abs()[window].sum(0)
        count += int(window.sum())
    return total / count


def manual_entropy(cbar):
    p = cbar / cbar.sum()
    return float(-(p * p.log()).sum())


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_leaves_logits_bit_identical(arch):
    model = tiny_model(arch)
    ids, mask = random_batch(padding="right")
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        with kh.instrument(model):
            instrumented = model(ids, attention_mask=mask).logits
    assert torch.equal(plain, instrumented)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("arch", ARCHS)
def test_statistics_match_independent_float64_computation(arch, padding):
    model = tiny_model(arch)
    batches = [random_batch(batch=3, seq=10, padding=padding, seed=s) for s in (1, 2)]
    inst = kh.instrument(model)
    paths = [s.path for s in inst.sites]

    def run():
        with torch.no_grad():
            for ids, mask in batches:
                model(ids, attention_mask=mask)

    captured = manual_inputs(model, paths, run)
    inst.remove()
    masks = [mask for _, mask in batches]
    expected = [manual_mean_abs(captured[p], masks) for p in paths]
    got = inst.mean_abs_coefficients()
    for e, g in zip(expected, got):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=0)
    ke = inst.knowledge_entropy()
    for e, h in zip(expected, ke.per_layer):
        assert h == pytest.approx(manual_entropy(e), rel=1e-5)
    assert ke.max_total == pytest.approx(sum(math.log(s.d_ff) for s in inst.sites))
    assert ke.total == pytest.approx(sum(ke.per_layer))
    assert int(inst.stats[0].tokens) == sum(int(m.sum()) for m in masks)


def test_bf16_entropy_matches_fp32():
    fp32 = tiny_model("llama", hidden_size=64, intermediate_size=256)
    bf16 = tiny_model("llama", hidden_size=64, intermediate_size=256)
    bf16.load_state_dict(fp32.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    ids, mask = random_batch(batch=4, seq=24)
    results = []
    for model in (fp32, bf16):
        with kh.instrument(model) as inst, torch.no_grad():
            model(ids, attention_mask=mask)
        assert all(c.dtype == torch.float32 for c in inst.mean_abs_coefficients())
        results.append(inst.knowledge_entropy())
    assert results[1].total == pytest.approx(results[0].total, rel=1e-4)


def test_sites_never_include_attention_projections():
    model = tiny_model("gpt2")
    sites = kh.instrument(model).sites
    assert [s.path for s in sites] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    assert all("attn" not in s.path for s in sites)
    assert [(s.layer, s.d_ff, s.d_model) for s in sites] == [(0, 64, 32), (1, 64, 32)]


class ToyBlock(nn.Module):
    def __init__(self, d, f, names):
        super().__init__()
        self.attn_out = nn.Linear(f, d)  # same shape as the MLP projection: must never be taken
        self.ffn = nn.ModuleDict({names[0]: nn.Linear(d, f), names[1]: nn.Linear(f, d)})

    def forward(self, x):
        return x + self.ffn[self.names[1]](torch.relu(self.ffn[self.names[0]](x)))


class ToyDecoder(nn.Module):
    """A dense decoder no table knows: found by name pattern or by shape, with no per-architecture code."""

    def __init__(self, names=("up", "down"), d=16, f=48, layers=3):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.layers = nn.ModuleList(ToyBlock(d, f, names) for _ in range(layers))
        for block in self.layers:
            block.names = names
            block.attn_out = None  # keep the attention-named module out of the forward, but not out of the search
        self.attn_proj = nn.ModuleList(nn.Linear(f, d) for _ in range(layers))

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x)
        return x


def test_unknown_dense_decoder_found_by_pattern_and_by_shape():
    by_pattern = ToyDecoder(names=("w1", "fc2"))
    assert [s.path for s in kh.find_sites(by_pattern)] == ["layers.0.ffn.fc2", "layers.1.ffn.fc2", "layers.2.ffn.fc2"]
    by_shape = ToyDecoder(names=("expand", "contract"))
    sites = kh.find_sites(by_shape)
    assert [s.path for s in sites] == [f"layers.{i}.ffn.contract" for i in range(3)]
    inst = kh.instrument(by_shape)
    by_shape(torch.randint(50, (2, 5)))
    assert int(inst.stats[2].tokens) == 10


def test_no_mlp_raises_locate_error_with_the_override():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
    with pytest.raises(kh.LocateError, match=r"mlp_out=") as err:
        kh.instrument(model)
    assert "name patterns" in str(err.value) and "shape check" in str(err.value)


def test_mlp_out_override_and_bad_override():
    model = tiny_model("llama")
    inst = kh.instrument(model, mlp_out="model.layers.{i}.mlp.down_proj")
    assert [s.path for s in inst.sites] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    inst.remove()
    with pytest.raises(kh.LocateError, match="no module path matches"):
        kh.instrument(model, mlp_out="model.blocks.{i}.ffn.out")
    with pytest.raises(kh.LocateError, match=r"\{i\}"):
        kh.instrument(model, mlp_out="model.layers.0.mlp.down_proj")
    with pytest.raises(kh.LocateError, match="not an MLP output projection"):
        kh.instrument(model, mlp_out="model.layers.{i}.mlp.up_proj")


@pytest.mark.parametrize("arch", MOE)
def test_fused_moe_models_get_one_experts_site_per_layer(arch):
    inst = kh.instrument(tiny_model(arch))
    assert [(s.kind, s.layer) for s in inst.sites] == [("experts", 0), ("experts", 1)]
    assert all(s.d_ff >= s.experts * s.expert_d_ff > 0 for s in inst.sites)


def test_an_experts_implementation_that_hides_c_is_refused_by_name():
    model = tiny_model("mixtral")
    model.config._experts_implementation = "some_fused_kernel"
    with pytest.raises(kh.LocateError, match="'some_fused_kernel'.*set_experts_implementation"):
        kh.instrument(model)


def test_wrapper_prefixes_are_seen_through():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = tiny_model("llama")
    expected = [s.path for s in kh.find_sites(model)]
    compiled = torch.compile(model)
    assert [s.path for s in kh.find_sites(compiled)] == expected
    wrapped = tiny_model("llama")
    for i, layer in enumerate(wrapped.model.layers):
        wrapped.model.layers[i] = checkpoint_wrapper(layer)
    assert [s.path for s in kh.find_sites(wrapped)] == expected


def test_ddp_wrapped_model(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = tiny_model("qwen2")
        ddp = nn.parallel.DistributedDataParallel(model)
        inst = kh.instrument(ddp)
        assert [s.path for s in inst.sites] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
        ids, mask = random_batch()
        ddp(input_ids=ids, attention_mask=mask)
        assert int(inst.stats[0].tokens) == int(mask.sum())
        inst.all_reduce()  # a real (one-rank) process group
        assert int(inst.stats[0].tokens) == int(mask.sum())
    finally:
        dist.destroy_process_group()


def test_hooks_are_removed_on_exit_and_on_error():
    model = tiny_model("gpt2")
    counts = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())  # noqa: E731
    before = counts()
    with pytest.raises(RuntimeError, match="boom"):
        with kh.instrument(model) as inst:
            # root (enter, exit) + the decoder stack transformer (enter, exit) + two layers
            assert counts() == before + 6
            assert kh.instrumentations_of(model) == [inst]
            raise RuntimeError("boom")
    assert counts() == before and not inst.attached
    assert kh.instrumentations_of(model) == []


def test_pause_excludes_forwards_and_instrumentations_of_finds_inner_model():
    model = tiny_model("llama")
    ids, mask = random_batch()
    inst = kh.instrument(model)
    with torch.no_grad():
        model(ids, attention_mask=mask)
        with inst.pause():
            assert inst.is_paused
            model(ids, attention_mask=mask)
        with kh.paused(model.model):  # the inner decoder is "inside" the instrumented model
            model(ids, attention_mask=mask)
    assert not inst.is_paused
    assert int(inst.stats[0].tokens) == int(mask.sum())


def test_mask_padding_false_counts_padded_positions():
    model = tiny_model("llama")
    ids, mask = random_batch(padding="right")
    unmasked = kh.instrument(model, mask_padding=False)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert int(unmasked.stats[0].tokens) == ids.numel() > int(mask.sum())
    with pytest.raises(TypeError, match="padding_compat"):  # the 0.2 spelling is gone (CHANGELOG 0.3.0)
        kh.instrument(model, padding_compat=True)


def test_document_weighting_is_the_mean_of_per_row_means():
    model = tiny_model("olmo")
    ids, mask = random_batch(batch=3, seq=10, padding="left")
    inst = kh.instrument(model, weighting="document")
    captured = manual_inputs(model, [inst.sites[0].path], lambda: model(ids, attention_mask=mask))
    c = captured[inst.sites[0].path][0].double().abs()
    rows = [c[b][mask[b].bool()].mean(0) for b in range(3)]
    expected = torch.stack(rows).mean(0)
    torch.testing.assert_close(inst.mean_abs_coefficients()[0].double(), expected, rtol=1e-5, atol=0)
    assert inst.knowledge_entropy().weighting == "document"
    assert inst.knowledge_entropy("token").per_layer != inst.knowledge_entropy().per_layer
    token_only = kh.instrument(model)
    with pytest.raises(kh.KacqError, match="weighting='document'"):
        token_only.knowledge_entropy("document")


def test_opt_flattened_coefficients_are_masked():
    model = tiny_model("opt")
    ids, mask = random_batch(batch=3, seq=9, padding="right")
    inst = kh.instrument(model)
    captured = manual_inputs(model, [inst.sites[1].path], lambda: model(ids, attention_mask=mask))
    c = captured[inst.sites[1].path][0]
    assert c.dim() == 2 and c.shape[0] == ids.numel()  # OPT hands fc2 a (batch*seq, d_ff) tensor
    expected = manual_mean_abs([c], [mask])
    torch.testing.assert_close(inst.mean_abs_coefficients()[1].double(), expected, rtol=1e-5, atol=0)


def test_cached_generation_counts_each_new_position_once():
    model = tiny_model("llama")
    ids, mask = random_batch(batch=2, seq=6, padding="left")
    inst = kh.instrument(model)
    calls = []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(k["attention_mask"].clone()), with_kwargs=True)
    captured = manual_inputs(model, [inst.sites[0].path], lambda: model.generate(
        ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0))
    cs = captured[inst.sites[0].path]
    assert [c.shape[1] for c in cs] == [6, 1, 1, 1]  # the cache: later calls see only the new position
    expected = manual_mean_abs(cs, calls)
    torch.testing.assert_close(inst.mean_abs_coefficients()[0].double(), expected, rtol=1e-5, atol=0)
    assert int(inst.stats[0].tokens) == int(mask.sum()) + 3 * 2


def test_mask_that_does_not_fit_is_a_clear_error():
    model = tiny_model("llama")
    ids, mask = random_batch(batch=3, seq=8)
    inst = kh.instrument(model)
    with pytest.raises(kh.ShapeError, match=r"does not fit inputs of shape \(3, 8\)"):
        model(ids, attention_mask=mask[:2])
    with pytest.raises(kh.ShapeError, match="2-D padding mask"):
        model(ids, attention_mask=mask[:, None, None, :].float())
    inst.remove()


def test_nonfinite_coefficients_are_counted_and_kept_out_of_the_entropy(caplog):
    model = tiny_model("llama")
    ids, mask = random_batch(batch=2, seq=6, padding=None)
    inst = kh.instrument(model)

    def poison(module, args):
        c = args[0].clone()
        c[0, 1, 3] = float("nan")
        c[1, 2, 3] = float("inf")
        c[1, 4, 5] = float("-inf")
        return (c,)

    # Registered after the instrumentation's hook would run too late: prepend so capture sees the poison.
    handle = inst.sites[1].module.register_forward_pre_hook(poison, prepend=True)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    handle.remove()
    stats = inst.stats[1]
    assert stats.nonfinite.tolist()[3] == 2 and stats.nonfinite.tolist()[5] == 1 and int(stats.nonfinite.sum()) == 3
    assert inst.stats.nonfinite_per_layer() == [0, 3]
    assert all(bool(torch.isfinite(c).all()) for c in inst.mean_abs_coefficients())
    with caplog.at_level("WARNING"):
        ke = inst.knowledge_entropy()
    assert math.isfinite(ke.total) and ke.nonfinite_per_layer == [0, 3]
    assert "non-finite" in caplog.text


def test_state_dict_round_trip_reset_and_merge_of_two_halves():
    model = tiny_model("gemma")
    batches = [random_batch(batch=2, seq=8, seed=s) for s in range(4)]
    whole, first, second = (kh.instrument(model) for _ in range(3))
    whole.remove(), first.remove(), second.remove()
    with torch.no_grad():
        for i, (ids, mask) in enumerate(batches):
            with whole:
                model(ids, attention_mask=mask)
            with first if i < 2 else second:
                model(ids, attention_mask=mask)
    merged = first.merge(second)
    for a, b in zip(merged.mean_abs_coefficients(), whole.mean_abs_coefficients()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for a, b in zip(merged.stats, whole.stats):
        assert torch.equal(a.max_abs, b.max_abs) and torch.equal(a.active, b.active) and torch.equal(a.tokens, b.tokens)
    state = whole.state_dict()
    restored = kh.instrument(model)
    restored.remove()
    restored.load_state_dict(state)
    assert restored.knowledge_entropy().per_layer == whole.knowledge_entropy().per_layer
    restored.reset()
    with pytest.raises(kh.KacqError, match="no tokens"):
        restored.knowledge_entropy()
    other = kh.instrument(tiny_model("gpt2"))
    with pytest.raises(kh.ShapeError, match="sites"):
        other.load_state_dict(state)


def _all_reduce_worker(rank, world, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = tiny_model("llama")
    ids, mask = random_batch(batch=2, seq=8, seed=10 + rank)
    inst = kh.instrument(model)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    inst.all_reduce()
    results[rank] = {k: v for k, v in inst.state_dict()["stats"].items()}
    dist.destroy_process_group()


def test_all_reduce_over_two_gloo_ranks_equals_one_pass(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "pg"), results), nprocs=2, join=True)
    model = tiny_model("llama")
    inst = kh.instrument(model)
    with torch.no_grad():
        for rank in range(2):
            ids, mask = random_batch(batch=2, seq=8, seed=10 + rank)
            model(ids, attention_mask=mask)
    expected = inst.state_dict()["stats"]
    for rank in range(2):
        for key, value in expected.items():
            torch.testing.assert_close(results[rank][key], value, rtol=1e-6, atol=0)


def test_grads_stream_dl_dc_statistics():
    model = tiny_model("llama").train()
    ids, mask = random_batch(batch=3, seq=8)
    inst = kh.instrument(model, grads=True)
    seen = {}

    def keep(module, args):  # an independent view of C and, after backward, of dL/dC
        args[0].retain_grad()
        seen["c"] = args[0]

    handle = inst.sites[0].module.register_forward_pre_hook(keep)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    handle.remove()
    c, g, rows = seen["c"].detach().double(), seen["c"].grad.double(), mask.bool()
    stats = inst.stats[0]
    torch.testing.assert_close(stats.grad_sum_abs.double(), g.abs()[rows].sum(0), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(stats.grad_sum_cg.double(), (c * g)[rows].sum(0), rtol=1e-4, atol=1e-8)
    assert int(stats.grad_tokens) == int(stats.tokens) == int(mask.sum())


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_is_not_counted_twice(reentrant):
    reference = tiny_model("llama").train()
    checkpointed = tiny_model("llama").train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids, mask = random_batch(batch=3, seq=8)
    results = []
    for model in (reference, checkpointed):
        inst = kh.instrument(model, grads=True)
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        results.append(inst.stats)
    for a, b in zip(*results):
        assert int(a.tokens) == int(b.tokens) == int(mask.sum())
        assert int(a.grad_tokens) == int(b.grad_tokens) == int(mask.sum())
        torch.testing.assert_close(a.sum_abs, b.sum_abs, rtol=1e-5, atol=0)
        torch.testing.assert_close(a.grad_sum_abs, b.grad_sum_abs, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("mode", ["auto", "eager"])
def test_cpu_fast_path_equals_reference(mode, monkeypatch):
    """The CPU kernels and the torch specification agree, NaN and padding included (in both KACQ_KERNELS modes)."""
    monkeypatch.setenv("KACQ_KERNELS", mode)
    from kacq_hooks import kernels
    from kacq_hooks.stats import LayerStats

    g = torch.Generator().manual_seed(0)
    for n, d, dtype in [(1, 5, torch.float32), (700, 33, torch.float32), (300, 2000, torch.bfloat16)]:
        c = torch.randn(n, d, generator=g).to(dtype)
        c[c.abs() < 0.3] = 0
        if n > 10:
            c[5, 3], c[7, 1], c[9, 1] = float("nan"), float("inf"), float("-inf")
        rows = torch.rand(n, generator=g) > 0.3
        weights = torch.rand(n, generator=g)
        results = []
        for module in (kernels.reference, kernels.cpu):
            out = LayerStats(d)
            module.accumulate_forward(c, rows, weights, out)
            module.accumulate_forward(c.t().contiguous().t(), None, None, out)  # a non-contiguous view
            module.accumulate_backward(c, c * 0.5, rows, out)
            results.append(out)
        for (name, a), (_, b) in zip(results[0].buffers(), results[1].buffers()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_instrumented_compiled_model_matches_eager():
    model = tiny_model("llama")
    ids, mask = random_batch()
    eager = kh.instrument(model)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    eager.remove()
    compiled = torch.compile(model)
    inst = kh.instrument(compiled)
    with torch.no_grad():
        compiled(ids, attention_mask=mask)
    assert int(inst.stats[0].tokens) == int(mask.sum())
    for a, b in zip(inst.knowledge_entropy().per_layer, eager.knowledge_entropy().per_layer):
        assert a == pytest.approx(b, rel=1e-6)


def test_fullgraph_compile_of_an_instrumented_model_says_why_it_cannot_be_one_graph():
    model = tiny_model("llama")
    kh.instrument(model)
    ids, mask = random_batch()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="without fullgraph=True") as caught, torch.no_grad():
        compiled(ids, attention_mask=mask)
    assert "kacq_hooks" in str(caught.value)
