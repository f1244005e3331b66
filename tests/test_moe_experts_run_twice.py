"""Experts run twice in one forward of their layer, for every experts layout but the fused one (whose refusal is
tested in test_moe_eager_rows_bound_routing.py): per-expert module lists, JetMoE's sorted rows and shared experts.

A layer's tokens are counted once per forward of the layer. Rows handed twice would count twice against them and
give a mean |C| twice too large: a plausible wrong number. Each case is refused with ExpertsError, the call is left
out, and the same model measures normally once the layer runs its experts once again.
"""
from __future__ import annotations

import functools

import pytest
import torch

import kacq_hooks as kh
from kacq_hooks.errors import LocateError
from kacq_hooks.experts import ExpertsError
from model_zoo import build
from test_moe_layouts_exact import _build
from test_moe_module_list import VOCAB, model as module_list_model


def _refused_then_measured(net, run, undo, layer: int, tokens: int, error=ExpertsError, match="twice"):
    inst = kh.instrument(net)
    with inst, torch.no_grad(), pytest.raises(error, match=match):
        run()
    assert inst.discarded_calls == 1
    assert all(int(stats.tokens) == 0 and float(stats.sum_abs.sum()) == 0 for stats in inst.stats.layers)
    undo()
    with inst, torch.no_grad():
        run()
    assert int(inst.stats.layers[layer].tokens) == tokens
    return inst


def test_a_module_list_block_run_twice_in_one_layer_forward_is_refused():
    """The block is the site's module: called twice, the site fires twice in one forward (as a layer shared
    across depth would)."""
    net = module_list_model()
    block = net.layers[1]
    moe = block.mlp

    def twice(self, x):
        h = self.norm(x)
        return x + (self.mlp(h) + self.mlp(h)) / 2

    block.forward = twice.__get__(block)
    ids = torch.randint(0, VOCAB, (2, 9))
    _refused_then_measured(net, lambda: net(ids), lambda: delattr(block, "forward"), 1, 18,
                           error=LocateError, match="ran 2 times")
    assert moe is block.mlp


def test_a_module_list_expert_run_twice_in_one_block_forward_is_refused():
    """One expert of the list called twice inside one forward of its block (same rows or others): its second C
    would be paired with the first call's routing weight, or counted twice."""
    net = module_list_model()
    moe = net.layers[0].mlp
    once = type(moe).forward

    def expert_twice(self, hidden):
        out = once(self, hidden)
        x = hidden.reshape(-1, hidden.shape[-1])
        extra = self.experts[2](x[torch.arange(3)]) * torch.full((3, 1), 0.5)  # a second run of expert 2, weighted
        return out + torch.zeros_like(out).reshape(-1, out.shape[-1]).index_add(0, torch.arange(3), extra).view_as(out)

    moe.forward = expert_twice.__get__(moe)
    ids = torch.randint(0, VOCAB, (2, 9))
    _refused_then_measured(net, lambda: net(ids), lambda: delattr(moe, "forward"), 0, 18)


def test_sorted_row_experts_run_twice_in_one_layer_forward_are_refused():
    net = build("jetmoe").eval()
    moe = net.model.layers[0].mlp
    once = type(moe).forward

    def twice(self, layer_input):
        return (once(self, layer_input) + once(self, layer_input)) / 2

    moe.forward = twice.__get__(moe)
    ids = torch.randint(0, net.config.vocab_size, (2, 7))
    _refused_then_measured(net, lambda: net(ids), lambda: delattr(moe, "forward"), 0, 14)


@pytest.mark.parametrize("order", ["both before the gate", "one on each side of the gate"])
def test_a_shared_expert_run_twice_in_one_layer_forward_is_refused(order):
    """Qwen2-MoE computes the shared expert, then its gate once. A second run on other rows before the gate would
    replace the first C (the gate paired with the wrong C); one after it would be dropped or counted twice."""
    net = build("qwen2_moe").eval()
    moe = net.model.layers[1].mlp
    once = type(moe).forward
    shared = moe.shared_expert

    def twice(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        if order == "both before the gate":
            probe = shared(x * 0.5)
            return once(self, hidden_states) + probe.reshape(hidden_states.shape)
        out = once(self, hidden_states)
        return out + shared(x * 0.5).reshape(hidden_states.shape)

    moe.forward = twice.__get__(moe)
    ids = torch.randint(0, net.config.vocab_size, (2, 7))
    _refused_then_measured(net, lambda: net(ids), lambda: delattr(moe, "forward"), 1, 14)


def test_an_ungated_shared_expert_run_twice_in_one_layer_forward_is_refused():
    """A dense FFN beside the experts (GraniteMoeShared) is an ungated shared expert: each run is handed over."""
    net = _build("granitemoeshared", shared_intermediate_size=48)
    layer = net.model.layers[0]
    shared = layer.shared_mlp
    once = type(shared).forward

    def twice(self, x):
        return (once(self, x) + once(self, x * 0.5)) / 2

    shared.forward = twice.__get__(shared)
    ids = torch.randint(0, net.config.vocab_size, (2, 7))
    _refused_then_measured(net, lambda: net(ids), lambda: delattr(shared, "forward"), 0, 14)


@pytest.mark.parametrize("family", ["jetmoe", "qwen2_moe"])
def test_the_model_called_twice_counts_each_forward_once(family):
    """Two forwards of the model are two forwards of every layer: nothing refused, tokens and sums doubled."""
    net = build(family).eval()
    ids = torch.randint(0, net.config.vocab_size, (2, 7))
    once, twice = kh.instrument(net), None
    with once, torch.no_grad():
        net(ids)
    once.remove()
    twice = kh.instrument(net)
    with twice, torch.no_grad():
        net(ids)
        net(ids)
    for a, b in zip(once.stats.layers, twice.stats.layers):
        assert int(b.tokens) == 2 * int(a.tokens)
        torch.testing.assert_close(b.mean_abs(), a.mean_abs())


def test_a_gated_shared_expert_probed_outside_its_block_is_not_refused():
    """The refusal is for two Cs in one forward of the block. Calling the shared expert on its own after a forward
    (a probe inside inst.pause(), or a user's SharedTap on direct calls) runs outside any forward of the block:
    nothing to pair it with there, nothing refused, and the next forward measures as usual."""
    net = build("qwen2_moe").eval()
    moe = net.model.layers[1].mlp
    ids = torch.randint(0, net.config.vocab_size, (2, 7))
    x = torch.randn(3, net.config.hidden_size)
    inst = kh.instrument(net)
    with inst, torch.no_grad():
        net(ids)
        with inst.pause():
            moe.shared_expert(x)
            moe.shared_expert(x * 0.5)
        net(ids)
    assert inst.discarded_calls == 0
    reference = kh.instrument(net)
    with reference, torch.no_grad():
        net(ids)
        net(ids)
    for a, b in zip(inst.stats.layers, reference.stats.layers):
        assert int(a.tokens) == int(b.tokens) == 28
        torch.testing.assert_close(a.sum_abs, b.sum_abs)

    [layer] = [layer for layer in kh.experts.find_experts(net) if layer.path.startswith("model.layers.1.")]
    seen = []
    with kh.experts.SharedTap(layer.shared[0], lambda c, gate: seen.append(c.shape[0])), torch.no_grad():
        net(ids)
        moe.shared_expert(x)
        moe.shared_expert(x)
        net(ids)
    assert seen == [14, 14]


def _chunked(self, hidden, interleave=False):
    """The module-list block, each expert run on two chunks of its rows (weighed chunk by chunk, or both chunks run
    before either is weighed)."""
    b, t, d = hidden.shape
    x = hidden.view(-1, d)
    weights, chosen = torch.topk(torch.softmax(self.gate(x), dim=-1), 2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(chosen, len(self.experts)).permute(2, 1, 0)
    for e, expert in enumerate(self.experts):
        pos, tokens = torch.where(mask[e])
        parts = [(tokens[part], pos[part]) for part in (slice(0, 3), slice(3, None))]
        if interleave:
            ys = [expert(x[None, tk].reshape(-1, d)) for tk, _ in parts]
            for (tk, ps), y in zip(parts, ys):
                out.index_add_(0, tk, y * weights[tk, ps, None])
        else:
            for tk, ps in parts:
                out.index_add_(0, tk, expert(x[None, tk].reshape(-1, d)) * weights[tk, ps, None])
    return out.view(b, t, d)


def _handoffs(net, ids):
    [layer] = kh.experts.find_experts(net)[:1]
    got = []
    with kh.experts.ExpertsTap(layer, lambda e, t, w, c: got.append((e, t, w))), torch.no_grad():
        net(ids)
    return sorted(zip(torch.cat([g[0] for g in got]).tolist(), torch.cat([g[1] for g in got]).tolist(),
                      torch.cat([g[2] for g in got]).tolist()))


def test_a_module_list_expert_run_per_chunk_reaches_an_experts_tap_once_per_row():
    """An ExpertsTap of one's own is a stream of handoffs: an expert run on two chunks of its rows, each weighed,
    hands each chunk with its rows and weights (as the fused layouts hand each forward). instrument(), which counts
    the layer's tokens once a forward, refuses it as it refuses a fused experts module run twice."""
    net = module_list_model()
    moe = net.layers[0].mlp
    ids = torch.randint(0, VOCAB, (2, 9))
    whole = _handoffs(net, ids)
    moe.forward = _chunked.__get__(moe)
    chunked = _handoffs(net, ids)
    assert [(e, t) for e, t, _ in chunked] == [(e, t) for e, t, _ in whole]
    torch.testing.assert_close(torch.tensor([w for *_, w in chunked]), torch.tensor([w for *_, w in whole]))
    _refused_then_measured(net, lambda: net(ids), lambda: delattr(moe, "forward"), 0, 18)


def test_a_module_list_expert_run_again_before_its_output_is_weighed_is_refused():
    """Two Cs of one expert waiting for their weights: which weight goes with which C cannot be told, for any tap."""
    net = module_list_model()
    moe = net.layers[0].mlp
    moe.forward = functools.partial(_chunked, moe, interleave=True)
    ids = torch.randint(0, VOCAB, (2, 9))
    with pytest.raises(ExpertsError, match="before its first output was multiplied"):
        _handoffs(net, ids)
    _refused_then_measured(net, lambda: net(ids), lambda: delattr(moe, "forward"), 0, 18,
                           match="before its first output was multiplied")
