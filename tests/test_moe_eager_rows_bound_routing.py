"""Eager experts' statistics through the routing bound once per layer forward (kernels.experts_cpu.ExpertRows):
the same numbers as accumulate_expert_rows, what it cannot take goes back to that path, and nothing it binds
outlives the forward's graph."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import kacq_hooks as kh
from kacq_hooks.errors import ShapeError
from kacq_hooks.kernels import experts_cpu, native
from kacq_hooks.stats import LayerStats

E, M, TOKENS, K = 6, 16, 50, 2


def _native_or_skip():
    if native.library() is None:
        pytest.skip("no C compiler here: " + str(native.unavailable_reason()))


def _routing(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(TOKENS)])
    weights = torch.rand(TOKENS, K, generator=g).to(dtype)
    weights[::6, 1] = 0
    keep = torch.rand(TOKENS, generator=g) > 0.3
    doc = torch.rand(TOKENS, generator=g)
    return index, weights, keep, doc


def _rows(index, expert: int, seed: int, dtype=torch.float32):
    top_k_pos, token_index = torch.where((index == expert).t())  # as the eager loop finds them
    g = torch.Generator().manual_seed(100 + seed)
    c = torch.randn(token_index.shape[0], M, generator=g)
    c[c.abs() < 0.2] = 0
    return c.to(dtype), token_index, top_k_pos


def _assert_same(got: LayerStats, want: LayerStats):
    for name, buf in want.buffers():
        assert torch.equal(getattr(got, name), buf), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masks", ["none", "keep", "keep_docs"])
def test_bound_routing_gives_the_statistics_of_each_experts_own_call(dtype, masks):
    _native_or_skip()
    index, weights, keep, doc = _routing(0, dtype)
    keep = None if masks == "none" else keep
    doc = doc if masks == "keep_docs" else None
    want, got = LayerStats(E * M), LayerStats(E * M)
    c0 = _rows(index, 0, 0, dtype)[0]
    bound = experts_cpu.ExpertRows.prepare(c0, weights, keep, doc, got, E)
    assert bound is not None
    for expert in (3, 0, 5, 3):  # in any order, one expert twice
        c, token_index, top_k_pos = _rows(index, expert, expert, dtype)
        experts_cpu.accumulate_expert_rows(c, expert, token_index, top_k_pos, weights, keep, doc, want, E)
        assert bound(c, expert, token_index, top_k_pos) is True
    _assert_same(got, want)


def test_rows_the_bound_kernel_cannot_take_are_left_untouched_for_the_general_path():
    """Each case returns False having written nothing; accumulate_expert_rows then converts, counts or refuses."""
    _native_or_skip()
    index, weights, keep, doc = _routing(1)
    out = LayerStats(E * M)
    c, token_index, top_k_pos = _rows(index, 2, 2)
    bound = experts_cpu.ExpertRows.prepare(c, weights, keep, doc, out, E)
    nan = c.clone()
    nan[0, 0] = float("nan")
    keep_first = keep.clone()
    cases = {
        "int32 token index": (c, 2, token_index.int(), top_k_pos),
        "int32 positions": (c, 2, token_index, top_k_pos.int()),
        "strided token index": (c, 2, token_index.repeat_interleave(2)[::2], top_k_pos),
        "fp16 C": (c.half(), 2, token_index, top_k_pos),
        "strided columns": (torch.cat([c, c], 1)[:, ::2], 2, token_index, top_k_pos),
        "expert outside the layer": (c, E, token_index, top_k_pos),
        "negative expert": (c, -1, token_index, top_k_pos),
        "wider than the layer's slots": (torch.cat([c, c], 1), 2, token_index, top_k_pos),
        "rows and tokens differ": (c[:-1], 2, token_index, top_k_pos),
        "a token outside the routing": (c, 2, token_index + TOKENS, top_k_pos),
        "a position outside top-k": (c, 2, token_index, top_k_pos + K),
        "NaN on a row": (nan, 2, token_index, top_k_pos),
    }
    keep_first[token_index[0]] = True  # the NaN row is a valid one
    for what, args in cases.items():
        assert bound(*args) is False, what
        assert all(not bool(b.any()) for _, b in out.buffers()), what
    # the general path counts the NaN and refuses the token outside the routing
    experts_cpu.accumulate_expert_rows(nan, 2, token_index, top_k_pos, weights, keep_first, doc, out, E)
    assert int(out.nonfinite.sum()) == 1
    with pytest.raises(ShapeError, match="token"):
        experts_cpu.accumulate_expert_rows(c, 2, token_index + TOKENS, top_k_pos, weights, keep, doc,
                                           LayerStats(E * M), E)


def test_bound_routing_writes_nothing_into_buffers_that_were_replaced():
    """LayerStats.to() gives a layer new buffers: the kernel bound to the old ones must not write there."""
    _native_or_skip()
    index, weights, keep, doc = _routing(2)
    out = LayerStats(E * M)
    c, token_index, top_k_pos = _rows(index, 1, 1)
    bound = experts_cpu.ExpertRows.prepare(c, weights, keep, doc, out, E)
    out.to("cpu")
    for _, buf in out.buffers():
        buf.zero_()
    out.sum_abs = out.sum_abs.clone()
    assert bound(c, 1, token_index, top_k_pos) is False
    assert all(not bool(b.any()) for _, b in out.buffers())


def test_routing_the_layer_cannot_bind_is_declined():
    _native_or_skip()
    index, weights, keep, doc = _routing(3)
    c = _rows(index, 1, 1)[0]
    out = LayerStats(E * M)
    assert experts_cpu.ExpertRows.prepare(c, weights.double(), keep, doc, out, E) is None
    assert experts_cpu.ExpertRows.prepare(c, weights.reshape(-1), keep, doc, out, E) is None
    assert experts_cpu.ExpertRows.prepare(c, weights, keep.float(), doc, out, E) is None
    assert experts_cpu.ExpertRows.prepare(c, weights, keep[:-1], doc, out, E) is None
    assert experts_cpu.ExpertRows.prepare(c, weights, keep, doc[:-1], out, E) is None
    assert experts_cpu.ExpertRows.prepare(c.half(), weights, keep, doc, out, E) is None


def _mixtral():
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=32, experts_implementation="eager")
    torch.manual_seed(0)
    return MixtralForCausalLM(config)


def test_an_instrumented_forward_keeps_no_routing_weights_alive():
    """The routing bound for the last forward is held weakly: once the forward returns, nothing of kacq_hooks keeps
    the router's weights object (nor what it references), as without it."""
    _native_or_skip()
    model = _mixtral()
    ids = torch.randint(0, 64, (2, 12))
    seen = []
    experts = model.model.layers[0].mlp.experts
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append(weakref.ref(args[2])))
    inst = kh.instrument(model)
    with inst:
        out = model(ids).logits  # grad enabled, no backward: the graph is alive
    handle.remove()
    gc.collect()
    assert len(seen) == 1 and seen[0]() is None
    assert out.requires_grad and int(inst.stats.layers[0].routed_tokens.sum()) > 0


def test_eager_statistics_with_the_bound_routing_equal_the_per_call_path(monkeypatch):
    """A whole instrumented model: the bound kernel and the per-expert path give the same statistics, over two
    calls (the second binds a new routing) with padding and document weighting."""
    _native_or_skip()
    ids = torch.randint(0, 64, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, :3] = 0

    def run():
        model = _mixtral().eval()
        inst = kh.instrument(model, weighting="document")
        with inst, torch.no_grad():
            for _ in range(2):
                model(ids, attention_mask=mask)
        return inst.stats

    bound = run()
    monkeypatch.setattr(experts_cpu.ExpertRows, "prepare", classmethod(lambda cls, *a: None))
    per_call = run()
    for got, want in zip(bound.layers, per_call.layers):
        _assert_same(got, want)
    assert int(bound.layers[0].routed_tokens.sum()) > 0


@pytest.mark.parametrize("path", ["bound", "per call"])
def test_the_same_routing_weights_handed_to_a_second_experts_forward_are_refused(monkeypatch, path):
    """A block that hands the same bf16 routing-weights object to two forwards of its experts, changed in place in
    between: the bound routing (an fp32 copy of the weights) must not serve the second forward, which is refused
    as a second experts forward inside one forward of the layer, on either path."""
    _native_or_skip()
    from kacq_hooks.experts import ExpertsError
    ids = torch.randint(0, 64, (2, 10))

    def block_forward(self, hidden_states):
        batch, seq, width = hidden_states.shape
        h = hidden_states.view(-1, width)
        _, weights, index = self.gate(h)
        weights = weights.to(torch.bfloat16)
        out = self.experts(h, index, weights)
        weights.mul_(0.25)
        out = out + self.experts(h * 0.5, index.flip(-1), weights)
        return out.reshape(batch, seq, width)

    if path == "per call":
        monkeypatch.setattr(experts_cpu.ExpertRows, "prepare", classmethod(lambda cls, *a: None))
    model = _mixtral().eval()
    block = model.model.layers[0].mlp
    monkeypatch.setattr(block, "forward", block_forward.__get__(block))
    inst = kh.instrument(model, weighting="document")
    with inst, torch.no_grad(), pytest.raises(ExpertsError, match="twice"):
        model(ids)
    assert all(int(layer.tokens) == 0 for layer in inst.stats.layers)


def test_a_failed_forward_leaves_nothing_of_its_inputs_alive():
    """A forward that raises after an eager layer ran is discarded; what the bound routing keeps for its layer
    must not hold the call (whose inputs hold the embeddings and the graph that made them) past it."""
    _native_or_skip()
    model = _mixtral()
    ids = torch.randint(0, 64, (2, 12))

    def fail(module, args):
        raise RuntimeError("a layer fails")

    handle = model.model.layers[1].register_forward_pre_hook(fail)
    inst = kh.instrument(model)
    with inst:
        embeddings = model.model.embed_tokens(ids) * 1.0  # part of a graph, as a multimodal model's would be
        alive = weakref.ref(embeddings)
        with pytest.raises(RuntimeError, match="a layer fails"):
            model(inputs_embeds=embeddings)
        del embeddings
        gc.collect()
        assert alive() is None
        handle.remove()
        model(ids)  # the layer binds again, for the new call
    assert inst.discarded_calls == 1 and int(inst.stats.layers[0].routed_tokens.sum()) > 0


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_experts_run_twice_in_one_forward_of_their_layer_are_refused_not_counted_twice(impl):
    """The layer's tokens are counted once per forward of the MoE block; experts run twice inside it would add
    every routed row twice against them (a mean |C| twice too large). Refused, and the call is left out."""
    from kacq_hooks.experts import ExpertsError
    model = _mixtral().eval()
    model.set_experts_implementation(impl)
    block = model.model.layers[1].mlp
    once = type(block).forward

    def twice(self, hidden_states):
        return (once(self, hidden_states) + once(self, hidden_states)) / 2

    block.forward = twice.__get__(block)
    ids = torch.randint(0, 64, (2, 10))
    inst = kh.instrument(model)
    with inst, torch.no_grad():
        with pytest.raises(ExpertsError, match="twice"):
            model(ids)
    assert all(int(layer.tokens) == 0 and not bool(layer.routed_tokens.any()) for layer in inst.stats.layers)
    del block.forward  # the block as it was: measured
    with inst, torch.no_grad():
        model(ids)
    assert int(inst.stats.layers[1].tokens) == 20


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_experts_run_inside_pause_within_their_layers_forward_do_not_refuse_the_counted_forward(impl):
    """inst.pause() is the documented way to run the experts apart from a measured forward: a block that runs its
    experts once under pause (a probe) and once for real is counted once, as if the probe were not there. Only
    the forwards that are counted may be called twice; the refusal of a second one must not count paused ones."""
    model = _mixtral().eval()
    model.set_experts_implementation(impl)
    ids = torch.randint(0, 64, (2, 10))
    plain = kh.instrument(model)
    with plain, torch.no_grad():
        model(ids)
    plain.remove()
    want = [layer.mean_abs().clone() for layer in plain.stats.layers]
    block = model.model.layers[1].mlp
    once = type(block).forward
    inst = kh.instrument(model)

    def with_probe(self, hidden_states):
        with inst.pause():  # a probe of the experts on other rows, not measured
            h = hidden_states.reshape(-1, hidden_states.shape[-1]) * 0.5
            _, weights, index = self.gate(h)
            self.experts(h, index, weights)
        return once(self, hidden_states)

    block.forward = with_probe.__get__(block)
    with inst, torch.no_grad():
        model(ids)
    assert int(inst.stats.layers[1].tokens) == 20
    for got, expected in zip(inst.stats.layers, want):
        torch.testing.assert_close(got.mean_abs(), expected, rtol=1e-6, atol=0)
