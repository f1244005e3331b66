"""Per-expert module lists (older and custom MoE models): C_e from each expert's down projection, routing read
from the block's own forward; statistics against float64, outputs bit-identical, refusals that say why."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kacq_hooks as kh
from kacq_hooks.experts import ExpertsError, find_experts
from kacq_hooks.interventions import resuscitate, resuscitation_plan
from tiny_models import random_batch

D, M, E, K, VOCAB = 16, 8, 4, 2, 64


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, M, bias=False), nn.Linear(D, M, bias=False)
        self.down_proj = nn.Linear(M, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoe(nn.Module):
    """The pre-transformers-5 Mixtral block: a router, top-k, one module per expert, a loop over experts."""

    def __init__(self, weigh=True):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(E))
        self.weigh = weigh

    def forward(self, hidden):
        b, t, d = hidden.shape
        x = hidden.view(-1, d)
        weights, chosen = torch.topk(F.softmax(self.gate(x), dim=-1), K, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        mask = F.one_hot(chosen, E).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            pos, tokens = torch.where(mask[e])
            y = expert(x[None, tokens].reshape(-1, d))
            if self.weigh:
                y = y * weights[tokens, pos, None]
            out.index_add_(0, tokens, y)
        return out.view(b, t, d)


class Block(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.mlp = SparseMoe(**kw)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TinyMoeLM(nn.Module):
    def __init__(self, layers=2, **kw):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Block(**kw) for _ in range(layers))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyMoeLM(**kw).eval()


def reference(net, ids, mask):
    """Float64 mean |w_e C_e| per slot over unpadded tokens, from the weights and the block inputs."""
    inputs = {}
    handles = [layer.mlp.register_forward_pre_hook(lambda mod, a, i=i: inputs.__setitem__(i, a[0].detach()))
               for i, layer in enumerate(net.layers)]
    with torch.no_grad():
        net(ids, mask)
    for h in handles:
        h.remove()
    valid = mask.reshape(-1).bool()
    out = []
    for i, layer in enumerate(net.layers):
        moe = layer.mlp
        x = inputs[i].reshape(-1, D).double()
        probs = F.softmax(x @ moe.gate.weight.double().T, dim=-1)
        w, chosen = torch.topk(probs, K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        sums = torch.zeros(E * M, dtype=torch.float64)
        for e, ex in enumerate(moe.experts):
            tokens, pos = (chosen == e).nonzero(as_tuple=True)
            keep = valid[tokens]
            tokens, pos = tokens[keep], pos[keep]
            xe = x[tokens]
            c = F.silu(xe @ ex.gate_proj.weight.double().T) * (xe @ ex.up_proj.weight.double().T)
            sums[e * M:(e + 1) * M] = (w[tokens, pos, None] * c).abs().sum(0)
        out.append(sums / int(valid.sum()))
    return out


@pytest.mark.parametrize("padding", ["right", "left"])
def test_module_list_slots_match_float64_and_outputs_are_bit_identical(padding):
    net = model()
    ids, mask = random_batch(3, 12, padding)
    ids = ids % VOCAB
    layers = find_experts(net)
    assert [(l.layer, l.layout, l.experts, l.d_ff) for l in layers] == [(0, "module_list", E, M), (1, "module_list", E, M)]
    with torch.no_grad():
        plain = net(ids, mask)
    inst = kh.instrument(net)
    assert [(s.kind, s.d_ff, s.experts) for s in inst.sites] == [("experts", E * M, E)] * 2
    with torch.no_grad():
        captured = net(ids, mask)
    inst.remove()
    assert torch.equal(plain, captured)
    for got, want in zip(inst.mean_abs_coefficients(), reference(net, ids, mask)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_module_list_resuscitation_weights_and_hook_modes():
    net = model()
    ids, mask = random_batch(3, 12, "right")
    ids = ids % VOCAB
    inst = kh.instrument(net)
    with torch.no_grad():
        net(ids, mask)
    inst.remove()
    plan = resuscitation_plan(inst, 0.5, 2.0)
    saved = {n: p.detach().clone() for n, p in net.named_parameters()}
    for mode in ("weights", "hook"):
        with resuscitate(net, plan, mode=mode):
            after = kh.instrument(net)
            with torch.no_grad():
                net(ids, mask)
            after.remove()
            first = after.knowledge_entropy().per_layer[0]
            assert first == pytest.approx(plan.predicted_entropy().per_layer[0], rel=1e-5)
        assert all(torch.equal(p, saved[n]) for n, p in net.named_parameters())


def test_unweighted_expert_outputs_are_refused_not_guessed():
    net = model(weigh=False)  # the block never multiplies expert outputs by a routing weight
    ids, mask = random_batch(2, 8, None)
    with kh.instrument(net), torch.no_grad(), pytest.raises(ExpertsError, match="routing weight"):
        net(ids % VOCAB, mask)


def test_unknown_expert_list_layout_names_the_module_and_the_template():
    net = model()
    for layer in net.layers:
        for ex in layer.mlp.experts:
            ex.out = ex.down_proj  # an output projection under a name kacq_hooks does not know
            del ex.down_proj
    with pytest.raises(ExpertsError, match=r"layers\.0\.mlp\.experts.*experts='model\.layers\.\{i\}\.mlp\.experts'"):
        find_experts(net)


def test_module_list_gradients_reach_the_routed_slots():
    net = model()
    ids, mask = random_batch(2, 8, None)
    ids = ids % VOCAB
    grads = {}

    def capture(e, layer):
        def pre(mod, args):
            args[0].register_hook(lambda g: grads.setdefault((layer, e), []).append(g.detach().abs().sum(0)))
        return pre

    handles = [ex.down_proj.register_forward_pre_hook(capture(e, i))
               for i, block in enumerate(net.layers) for e, ex in enumerate(block.mlp.experts)]
    net(ids, mask).pow(2).mean().backward()  # the independent capture
    for h in handles:
        h.remove()
    net.zero_grad()
    with kh.instrument(net, grads=True) as inst:
        net(ids, mask).pow(2).mean().backward()
    for i, stats in enumerate(inst.stats):
        want = torch.zeros(E * M)
        for e in range(E):
            if (i, e) in grads:
                want[e * M:(e + 1) * M] = sum(grads[(i, e)])
        assert bool((want > 0).any())
        torch.testing.assert_close(stats.grad_sum_abs, want, rtol=1e-5, atol=1e-8)
