"""Experts that take their rows sorted by expert (JetMoE's JetMoeParallelExperts): slot statistics against C
computed by hand in float64 from the weights and the router's own logits, outputs bit-identical, exact edits."""
from __future__ import annotations

import pytest
import torch

import kacq_hooks as kh
from kacq_hooks import locate
from kacq_hooks.experts import ExpertsTap, find_experts, scale_up_rows
from model_zoo import build
from tiny_models import random_batch


@pytest.fixture(scope="module")
def jetmoe():
    model = build("jetmoe")
    with torch.no_grad():  # random expert weights and biases (the default init leaves some at zero)
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.normal_(0, 0.2)
    return model


def reference(model, ids, mask) -> list[torch.Tensor]:
    """Per layer: float64 mean |gate * C| per (expert, neuron) slot over real tokens, C = act(W_g x) * (W_u x)."""
    seen = {}
    handles = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    valid = mask.reshape(-1).bool()
    out = []
    for i, layer in enumerate(model.model.layers):
        moe = layer.mlp
        x = seen[i].double().reshape(-1, seen[i].shape[-1])
        logits = x @ moe.router.layer.weight.double().T
        top, chosen = logits.topk(moe.router.top_k, dim=-1)
        gates = torch.softmax(top, dim=-1)
        w_in = moe.input_linear.weight.double()
        e_count, two_m, _ = w_in.shape
        m = two_m // 2
        sums = torch.zeros(e_count, m, dtype=torch.float64)
        for e in range(e_count):
            tokens, pos = (chosen == e).nonzero(as_tuple=True)
            keep = valid[tokens]
            tokens, pos = tokens[keep], pos[keep]
            h = x[tokens] @ w_in[e].T
            c = moe.activation(h[:, :m]) * h[:, m:]
            sums[e] = (gates[tokens, pos, None] * c).abs().sum(0)
        out.append(sums.reshape(-1) / int(valid.sum()))
    return out


def test_jetmoe_layers_are_found_as_sorted_row_experts(jetmoe):
    sites = locate.find_sites(jetmoe)
    assert [(s.kind, s.label, s.experts, s.expert_d_ff) for s in sites] == [
        ("experts", f"decoder.layer_{i}", 4, jetmoe.config.intermediate_size) for i in range(2)]
    layer = sites[0].experts_layer
    assert layer.layout == "sorted" and layer.module is jetmoe.model.layers[0].mlp.output_linear
    assert [l.layout for l in find_experts(jetmoe)] == ["sorted", "sorted"]


@pytest.mark.parametrize("padding", ["right", "left"])
def test_jetmoe_slot_statistics_match_float64_and_outputs_are_bit_identical(jetmoe, padding):
    ids, mask = random_batch(3, 10, padding, seed=3)
    with torch.no_grad():
        plain = jetmoe(input_ids=ids, attention_mask=mask).logits
        inst = kh.instrument(jetmoe)
        logits = jetmoe(input_ids=ids, attention_mask=mask).logits
    inst.remove()
    assert torch.equal(plain, logits)
    assert [int(s.tokens) for s in inst.stats] == [int(mask.sum())] * 2
    for got, want in zip(inst.mean_abs_coefficients(), reference(jetmoe, ids, mask)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_jetmoe_scaling_up_rows_scales_c_exactly(jetmoe):
    [layer, _] = find_experts(jetmoe)
    ids, mask = random_batch(2, 8, None, seed=5)
    rows = []

    def run():
        got = []
        with ExpertsTap(layer, lambda e, t, w, c: got.append((e.clone(), t.clone(), c.detach().clone()))), \
                torch.no_grad():
            jetmoe(input_ids=ids, attention_mask=mask)
        return {(int(e), int(t)): c for es, ts, cs in got for e, t, c in zip(es, ts, cs)}

    before = run()
    saved = layer.up.weight.detach().clone()
    restore = scale_up_rows(layer, 1, torch.tensor([0, 5]), torch.tensor([2.0, 0.25]))
    after = run()
    restore()
    assert torch.equal(layer.up.weight, saved)
    rows = [k for k in before if k[0] == 1]
    assert rows and after.keys() == before.keys()
    for k in rows:
        want = before[k].clone()
        want[[0, 5]] *= torch.tensor([2.0, 0.25])
        torch.testing.assert_close(after[k], want, rtol=1e-6, atol=1e-7)


def test_jetmoe_resuscitation_in_weights_and_hook_modes(jetmoe):
    from kacq_hooks.interventions import resuscitate, resuscitation_plan

    ids, mask = random_batch(3, 10, "right", seed=6)
    inst = kh.instrument(jetmoe)
    with torch.no_grad():
        jetmoe(input_ids=ids, attention_mask=mask)
    inst.remove()
    plan = resuscitation_plan(inst, 0.5, 2.0)
    saved = {n: p.detach().clone() for n, p in jetmoe.named_parameters()}
    for mode in ("weights", "hook"):
        with resuscitate(jetmoe, plan, mode=mode):
            after = kh.instrument(jetmoe)
            with torch.no_grad():
                jetmoe(input_ids=ids, attention_mask=mask)
            after.remove()
            # the first layer's inputs are unchanged, so its entropy is exactly the plan's prediction
            assert after.knowledge_entropy().per_layer[0] == pytest.approx(plan.predicted_entropy().per_layer[0],
                                                                          rel=1e-5)
        assert all(torch.equal(p, saved[n]) for n, p in jetmoe.named_parameters())
