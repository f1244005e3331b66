"""Mixture-of-experts taps against an independent float64 computation of every expert's C."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM

from kacq_hooks.errors import KacqError
from kacq_hooks.experts import ExpertsError, ExpertsTap, SharedTap, expert_up_rows, find_experts, scale_up_rows
from tiny_models import VOCAB, random_batch, tiny_model

# Shapes the shared tiny builders do not cover: DeepSeek-V3 (a dense first layer, a shared expert,
# grouped routing) and GPT-OSS (transposed, interleaved gate/up with biases, clamped gate).
_EXTRA = {
    "deepseek_v3": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16,
                        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8,
                        max_position_embeddings=128),
    "gpt_oss": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=8),
}
FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"]
IMPLS = ["eager", "batched_mm", "grouped_mm"]


def build(model_type: str, dtype=torch.float32, seed: int = 0):
    if model_type not in _EXTRA:
        return tiny_model(model_type, seed=seed, dtype=dtype)
    config = AutoConfig.for_model(model_type)
    for key, value in {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1,
                       **_EXTRA[model_type]}.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():  # the default init leaves biases at zero; random ones test that they are handled
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def models():
    return {mt: build(mt) for mt in FAMILIES}


def reference_c(experts: torch.nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """C of expert ``e`` on rows ``x`` in float64, written from the weights' meaning, not the model's code."""
    x = x.double()
    w = experts.gate_up_proj[e].double()
    if experts.is_transposed:  # GPT-OSS: [d, 2m], gate and up interleaved, biased, clamped
        gate_up = x @ w + experts.gate_up_proj_bias[e].double()
        gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
        gate, up = gate.clamp(max=experts.limit), up.clamp(-experts.limit, experts.limit)
        return (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    m = w.shape[0] // 2
    return experts.act_fn(x @ w[:m].T) * (x @ w[m:].T)


def capture(model, layers, ids, mask):
    """Run the model with a tap on every experts layer; also record, by a plain pre-hook, what the
    router handed each experts module (its input rows and top-k routing) for the reference."""
    got = {l.layer: [] for l in layers}
    seen = {}
    handles = []
    for l in layers:
        taps = ExpertsTap(l, lambda e, t, w, c, n=l.layer: got[n].append((e, t, w, c.detach().clone())))
        handles.append(taps.attach())
        handles.append(l.module.register_forward_pre_hook(
            lambda mod, args, n=l.layer: seen.__setitem__(n, [a.detach().clone() for a in args])))
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    for h in handles:
        h.remove()
    cat = {n: tuple(torch.cat(parts) for parts in zip(*rows)) for n, rows in got.items()}
    return out, cat, seen


def by_pair(expert_ids, token_index, values):
    return {(int(e), int(t)): v for e, t, v in zip(expert_ids, token_index, values)}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_find_experts_reports_layers(models, model_type):
    model = models[model_type]
    layers = find_experts(model)
    kinds = [l.kind for l in layers]
    assert [l.layer for l in layers] == list(range(model.config.num_hidden_layers))
    if model_type == "deepseek_v3":
        assert kinds == ["dense", "experts", "experts"]
        assert layers[0].path == "model.layers.0.mlp.down_proj" and layers[0].d_ff == 64
        assert [s.d_ff for s in layers[1].shared] == [16] and layers[1].shared[0].gate is None
        assert (layers[1].experts, layers[1].d_ff) == (8, 16)
    else:
        assert set(kinds) == {"experts"}
    if model_type == "qwen2_moe":
        shared = layers[0].shared[0]
        assert shared.gate is model.model.layers[0].mlp.shared_expert_gate
        assert shared.down is model.model.layers[0].mlp.shared_expert.down_proj
        assert layers[0].slots == 4 * 64 + 64


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_tap_matches_float64_reference(models, model_type, impl, padding):
    model = models[model_type]
    model.set_experts_implementation(impl)
    layers = [l for l in find_experts(model) if l.kind == "experts"]
    ids, mask = random_batch(3, 12, padding)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
    out, got, seen = capture(model, layers, ids, mask)
    assert torch.equal(out, plain)  # capture changes no bit
    for l in layers:
        expert_ids, token_index, weight, c = got[l.layer]
        hidden, top_k_index, top_k_weights = seen[l.layer]
        k = top_k_index.shape[1]
        assert c.shape == (hidden.shape[0] * k, l.d_ff) and c.dtype == torch.float32
        pairs = by_pair(expert_ids, token_index, range(len(c)))
        assert len(pairs) == len(c)  # each routed (expert, token) pair exactly once
        for t in range(hidden.shape[0]):
            for j in range(k):
                e = int(top_k_index[t, j])
                row = pairs[(e, t)]
                assert weight[row] == top_k_weights[t, j]
        for e in range(l.experts):
            rows = (expert_ids == e).nonzero().squeeze(1)
            if len(rows):
                ref = reference_c(l.module, hidden[token_index[rows]], e)
                torch.testing.assert_close(c[rows].double(), ref, atol=1e-5, rtol=1e-5)
        # padding rows are masked through token_index
        valid = mask.reshape(-1).bool()[token_index]
        assert int(valid.sum()) == k * int(mask.sum())
    model.set_experts_implementation("grouped_mm")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_bf16_close_to_fp32(models, model_type, impl):
    ids, mask = random_batch(3, 12, "right")
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build(model_type, dtype=dtype)
        model.set_experts_implementation(impl)
        layers = [l for l in find_experts(model) if l.kind == "experts"][:1]
        with torch.no_grad():
            plain = model(ids, attention_mask=mask).logits
        out, got, _ = capture(model, layers, ids, mask)
        assert torch.equal(out, plain)
        expert_ids, token_index, weight, c = got[layers[0].layer]
        assert c.dtype == dtype
        results[dtype] = by_pair(expert_ids, token_index, (weight[:, None] * c).float())
    fp32, bf16 = results[torch.float32], results[torch.bfloat16]
    common = fp32.keys() & bf16.keys()
    assert len(common) >= 0.8 * len(fp32)  # bf16 may flip a near-tied routing, not most of it
    a = torch.stack([fp32[p] for p in sorted(common)])
    b = torch.stack([bf16[p] for p in sorted(common)])
    torch.testing.assert_close(b, a, atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_extra_flops_and_grads_reach_c(models, impl):
    model = models["olmoe"]
    model.set_experts_implementation(impl)
    [layer, *_] = find_experts(model)
    ids, mask = random_batch(2, 8, "right")

    def flops():
        with FlopCounterMode(display=False) as counter:
            with torch.no_grad():
                model(ids, attention_mask=mask)
        return counter.get_total_flops()

    plain = flops()
    with ExpertsTap(layer, lambda *a: None):
        tapped = flops()
    assert tapped == plain

    grads = []

    def on(e, t, w, c):
        c.register_hook(lambda g: grads.append(g))

    with ExpertsTap(layer, on):
        model(ids, attention_mask=mask).logits.float().sum().backward()
    model.zero_grad()
    assert grads and sum(g.shape[0] for g in grads) == 2 * 8 * model.config.num_experts_per_tok
    assert all(g.shape[1] == layer.d_ff and g.abs().sum() > 0 for g in grads)
    model.set_experts_implementation("grouped_mm")


@pytest.mark.parametrize("impl", ["batched_mm", "grouped_mm"])
def test_batched_taps_intercept_no_op_from_c_on(models, impl):
    """The torch-function mode (a Python call per op) is not over C's consumers nor the rest of the forward;
    a mode the caller entered stays in place and keeps seeing every op."""
    from torch.overrides import TorchFunctionMode

    class Outer(TorchFunctionMode):
        ops = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Outer.ops += 1
            return func(*args, **(kwargs or {}))

    model = models["mixtral"]
    model.set_experts_implementation(impl)
    layers = find_experts(model)
    ids, mask = random_batch(2, 8, "right")
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
    depths = []
    taps = [ExpertsTap(l, lambda *a: depths.append(torch._C._len_torch_function_stack())).attach() for l in layers]
    try:
        with torch.no_grad():
            tapped = model(ids, attention_mask=mask).logits
        assert torch.equal(tapped, plain)
        assert depths == [0] * len(layers)
        depths.clear()
        with Outer() as outer, torch.no_grad():
            inside = model(ids, attention_mask=mask).logits
            assert torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1) is outer
        assert torch.equal(inside, plain) and Outer.ops > 0
        assert len(depths) == len(layers) and torch._C._len_torch_function_stack() == 0
    finally:
        for tap in taps:
            tap.remove()
        model.set_experts_implementation("grouped_mm")


def test_tap_handle_is_idempotent_and_removes_everything(models):
    model = models["mixtral"]
    [layer, *_] = find_experts(model)
    calls = []
    tap = ExpertsTap(layer, lambda *a: calls.append(1))
    assert tap.attach() is tap.attach()
    ids, _ = random_batch(1, 4, None)
    with torch.no_grad():
        model(ids)
    assert calls
    tap.remove()
    tap.remove()
    calls.clear()
    with torch.no_grad():
        model(ids)
    assert not calls and not tap.attached
    assert not layer.module._forward_hooks and not layer.module._forward_pre_hooks
    assert "_apply_gate" not in vars(layer.module)


def test_fused_kernel_implementation_is_refused(models):
    model = models["mixtral"]
    [layer, *_] = find_experts(model)
    model.config._experts_implementation_internal = "sonicmoe"  # a fused kernel: C never leaves it
    try:
        with ExpertsTap(layer, lambda *a: None), pytest.raises(ExpertsError, match="set_experts_implementation"):
            with torch.no_grad():
                model(random_batch(1, 4, None)[0])
    finally:
        model.config._experts_implementation_internal = "grouped_mm"
    assert not layer.module._forward_hooks and not layer.module._forward_pre_hooks


def test_unknown_layouts_are_refused():
    dense = tiny_model("llama")
    with pytest.raises(ExpertsError, match="experts="):
        find_experts(dense)

    class Expert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList(Expert() for _ in range(3))

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(Block() for _ in range(2))
    # a list of expert MLPs ending in a known output projection (w2) is a per-expert layout kacq_hooks reads
    assert [(l.layout, l.experts, l.d_ff) for l in find_experts(model)] == [("module_list", 3, 16)] * 2
    for block in model.layers:
        for expert in block.experts:
            expert.w_out = expert.w2  # an output projection under a name kacq_hooks does not know
            del expert.w2
    with pytest.raises(KacqError, match=r"layers\.0\.experts.*experts=.*mlp_out="):
        find_experts(model)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_scaling_up_rows_scales_c_exactly(models, model_type, impl):
    model = models[model_type]
    model.set_experts_implementation(impl)
    layer = [l for l in find_experts(model) if l.kind == "experts"][0]
    ids, mask = random_batch(3, 12, "right")
    before = capture(model, [layer], ids, mask)[1][layer.layer]
    expert, rows = 1, torch.tensor([0, 3, 5])
    u = torch.tensor([2.0, 0.5, 3.0])
    saved = [p.detach().clone() for p in layer.module.parameters()]
    restore = scale_up_rows(layer, expert, rows, u)
    after = capture(model, [layer], ids, mask)[1][layer.layer]
    restore()
    assert all(torch.equal(p, s) for p, s in zip(layer.module.parameters(), saved))  # exact revert
    b = by_pair(before[0], before[1], before[3])
    a = by_pair(after[0], after[1], after[3])
    pairs = [p for p in b if p[0] == expert]
    assert pairs and a.keys() == b.keys()  # the router is unchanged for the first edited layer
    for p in pairs:
        expected = b[p].clone()
        expected[rows] *= u
        torch.testing.assert_close(a[p], expected, rtol=1e-6, atol=1e-7)
        others = torch.ones(layer.d_ff, dtype=torch.bool)
        others[rows] = False
        assert torch.equal(a[p][others], b[p][others])
    model.set_experts_implementation("grouped_mm")


def test_up_rows_refused_where_c_is_not_linear_in_up(models):
    [layer, *_] = find_experts(models["gpt_oss"])
    with pytest.raises(ExpertsError, match="hook mode"):
        expert_up_rows(layer, 0, torch.tensor([0]))


def llama4():
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    config = Llama4TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, intermediate_size_mlp=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              num_local_experts=4, num_experts_per_tok=2, interleave_moe_layer_step=1,
                              pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    model = Llama4ForCausalLM(config).eval()
    with torch.no_grad():  # its experts start at zero; random weights make C worth checking
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0, 0.2)
    return model


def test_input_scaled_experts_llama4():
    model = llama4()
    layers = find_experts(model)
    assert all(l.input_scaled and l.kind == "experts" and l.experts == 4 and l.d_ff == 16 for l in layers)
    ids, mask = random_batch(2, 7, "left")
    seen = {}
    handles = []
    for l in layers:
        block = model.get_submodule(l.path.rpartition(".")[0])
        handles.append(block.register_forward_pre_hook(
            lambda mod, args, n=l.layer: seen.__setitem__((n, "x"), args[0].detach().reshape(-1, args[0].shape[-1]))))
        handles.append(block.router.register_forward_hook(
            lambda mod, args, out, n=l.layer: seen.__setitem__((n, "scores"), out[0].detach())))
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
    out, got, _ = capture(model, layers, ids, mask)
    for h in handles:
        h.remove()
    assert torch.equal(out, plain)
    for l in layers:
        expert_ids, token_index, weight, c = got[l.layer]
        x, scores = seen[(l.layer, "x")].double(), seen[(l.layer, "scores")].double()  # scores [T, E]
        t = x.shape[0]
        assert c.shape == (l.experts * t, l.d_ff)
        for e in range(l.experts):
            rows = (expert_ids == e).nonzero().squeeze(1)
            assert torch.equal(token_index[rows], torch.arange(t))
            xin = x * scores[:, e:e + 1]  # the routing weight scales the input: C is computed on it
            gate, up = (xin @ l.module.gate_up_proj[e].double()).chunk(2, dim=-1)
            torch.testing.assert_close(c[rows].double(), up * torch.nn.functional.silu(gate), atol=1e-5, rtol=1e-5)
            assert torch.equal(weight[rows] != 0, scores[:, e] != 0)  # routed pairs, 1 each
        assert int((weight != 0).sum()) == 2 * t and set(weight.tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3"])
def test_shared_expert_coefficients_and_gate(models, model_type):
    model = models[model_type]
    layer = [l for l in find_experts(model) if l.kind == "experts"][0]
    [shared] = layer.shared
    ids, mask = random_batch(3, 12, "right")
    got, seen = [], {}
    h = shared.module.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach()))
    with SharedTap(shared, lambda c, g: got.append((c.detach().clone(), g))), torch.no_grad():
        model(ids, attention_mask=mask)
    h.remove()
    [(c, gate)] = got
    x = seen["x"].double()
    mlp = shared.module
    ref = mlp.act_fn(x @ mlp.gate_proj.weight.double().T) * (x @ mlp.up_proj.weight.double().T)
    torch.testing.assert_close(c.double(), ref, atol=1e-5, rtol=1e-5)
    if model_type == "qwen2_moe":
        expected = torch.sigmoid(x @ shared.gate.weight.double().T).squeeze(-1)
        torch.testing.assert_close(gate.double(), expected, atol=1e-6, rtol=1e-6)
    else:
        assert gate is None


def test_scaling_up_rows_scales_c_exactly_llama4():
    model = llama4()
    layer = find_experts(model)[0]
    ids, mask = random_batch(2, 7, None)
    before = capture(model, [layer], ids, mask)[1][layer.layer]
    rows, u = torch.tensor([2, 7]), torch.tensor([2.0, 0.25])
    restore = scale_up_rows(layer, 3, rows, u)
    after = capture(model, [layer], ids, mask)[1][layer.layer]
    restore()
    sel = before[0] == 3
    expected = before[3][sel].clone()
    expected[:, rows] *= u
    torch.testing.assert_close(after[3][sel], expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(after[3][~sel], before[3][~sel])


class _Expert(torch.nn.Module):
    """A gated expert MLP in the per-expert layout of older and custom models (Mixtral's w1/w3/w2)."""

    def __init__(self, d, m):
        super().__init__()
        self.w1, self.w3 = torch.nn.Linear(d, m, bias=False), torch.nn.Linear(d, m, bias=False)
        self.w2 = torch.nn.Linear(m, d, bias=False)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class _ListMoe(torch.nn.Module):
    """Softmax, top-k and a torch.where loop over a ModuleList; ``token_major`` builds the mask the
    other way round ([T, k]) and weights the top-k logits by their own softmax, as some custom code does."""

    def __init__(self, d, m, n_experts=4, k=2, token_major=False):
        super().__init__()
        self.gate = torch.nn.Linear(d, n_experts, bias=False)
        self.experts = torch.nn.ModuleList(_Expert(d, m) for _ in range(n_experts))
        self.k, self.token_major = k, token_major

    def forward(self, h):
        x = h.reshape(-1, h.shape[-1])
        logits = self.gate(x)
        if self.token_major:
            top, index = torch.topk(logits, self.k, dim=-1)
            weights = torch.softmax(top, dim=-1)
        else:
            weights, index = torch.topk(torch.softmax(logits, dim=-1), self.k, dim=-1)
            weights /= weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            if self.token_major:
                token, slot = torch.where(index == e)
            else:
                slot, token = torch.where(index.t() == e)
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return (h + out.reshape(h.shape)), (index, weights)


class _ListModel(torch.nn.Module):
    def __init__(self, token_major):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.layers = torch.nn.ModuleList(_ListMoe(16, 24, token_major=token_major) for _ in range(2))

    def forward(self, ids, routing=None):
        h = self.embed(ids)
        for layer in self.layers:
            h, r = layer(h)
            if routing is not None:
                routing.append((h, r))
        return h


@pytest.mark.parametrize("token_major", [False, True])
def test_per_expert_module_list(token_major):
    model = _ListModel(token_major).eval()
    layers = find_experts(model)
    assert [(l.layer, l.layout, l.experts, l.d_ff, l.d_model) for l in layers] == [(0, "module_list", 4, 24, 16),
                                                                                   (1, "module_list", 4, 24, 16)]
    ids = random_batch(2, 9, None)[0]
    inputs = {}
    pre = [l.block.register_forward_pre_hook(lambda mod, a, n=l.layer: inputs.__setitem__(n, a[0].detach()))
           for l in layers]
    with torch.no_grad():
        routing = []
        plain = model(ids, routing)
    got = {l.layer: [] for l in layers}
    taps = [ExpertsTap(l, lambda e, t, w, c, n=l.layer: got[n].append((e, t, w, c))).attach() for l in layers]
    with torch.no_grad():
        tapped = model(ids)
    for handle in [*taps, *pre]:
        handle.remove()
    assert torch.equal(plain, tapped)
    for l, (_, (index, weights)) in zip(layers, routing):
        expert_ids, token_index, weight, c = (torch.cat(p) for p in zip(*got[l.layer]))
        x = inputs[l.layer].reshape(-1, 16).double()
        assert len(c) == index.numel()
        pairs = by_pair(expert_ids, token_index, range(len(c)))
        for t in range(index.shape[0]):
            for j in range(index.shape[1]):
                e = int(index[t, j])
                row = pairs[(e, t)]
                assert weight[row] == weights[t, j]
                mlp = l.module[e]
                ref = torch.nn.functional.silu(x[t] @ mlp.w1.weight.double().T) * (x[t] @ mlp.w3.weight.double().T)
                torch.testing.assert_close(c[row].double(), ref, atol=1e-5, rtol=1e-5)

    restore = scale_up_rows(layers[0], 2, torch.tensor([1, 4]), torch.tensor([3.0, 0.5]))
    again = []
    with ExpertsTap(layers[0], lambda e, t, w, c: again.append((e, c))), torch.no_grad():
        model(ids)
    restore()
    before = [(e, c) for e, _, _, c in got[0]]
    assert any(int(e[0]) == 2 for e, _ in before) and len(before) == len(again)
    for (e0, c0), (e1, c1) in zip(before, again):
        assert torch.equal(e0, e1)
        expected = c0.clone()
        if int(e0[0]) == 2:
            expected[:, [1, 4]] *= torch.tensor([3.0, 0.5])
        torch.testing.assert_close(c1, expected, rtol=1e-6, atol=1e-7)


def test_ungated_experts_in_a_hybrid_nemotron_h():
    """Nemotron-H: experts without a gate (C = relu(U x)^2), layers that are a mixer, MoE or a dense MLP."""
    config = AutoConfig.for_model("nemotron_h")
    for key, value in dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8, intermediate_size=64, moe_intermediate_size=16,
                           moe_shared_expert_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                           n_group=1, topk_group=1, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
                           n_groups=1, pad_token_id=0, bos_token_id=1, eos_token_id=1).items():
        setattr(config, key, value)
    config.layers_block_type = ["linear_attention", "moe", "full_attention", "mlp"]
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    layers = find_experts(model)
    assert [(l.layer, l.kind, l.path) for l in layers] == [(1, "experts", "model.layers.1.mixer.experts"),
                                                           (3, "dense", "model.layers.3.mixer.down_proj")]
    ids, mask = random_batch(2, 6, "right")
    for impl in IMPLS:
        model.set_experts_implementation(impl)
        with torch.no_grad():
            plain = model(ids, attention_mask=mask).logits
        out, got, seen = capture(model, layers[:1], ids, mask)
        assert torch.equal(out, plain)
        expert_ids, token_index, weight, c = got[1]
        hidden = seen[1][0].double()
        assert len(c) == 2 * hidden.shape[0]
        for e in range(4):
            rows = (expert_ids == e).nonzero().squeeze(1)
            up = layers[0].module.up_proj[e].double()
            ref = torch.relu(hidden[token_index[rows]] @ up.T) ** 2
            torch.testing.assert_close(c[rows].double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ExpertsError, match="no gate"):
        expert_up_rows(layers[0], 0, torch.tensor([0]))
