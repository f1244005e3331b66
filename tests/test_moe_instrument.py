"""instrument(model) on mixture-of-experts models: statistics per memory slot against float64, split entropy."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import kacq_hooks as kh
from kacq_hooks.entropy import experts_entropy
from test_experts import FAMILIES, IMPLS, build, reference_c
from tiny_models import random_batch


@pytest.fixture(scope="module")
def models():
    return {mt: build(mt) for mt in FAMILIES}


def expected_slots(model, inst, ids, mask):
    """Per experts site: float64 mean |effective coefficient| per slot, and routed valid tokens per expert."""
    seen, shared_in = {}, {}
    handles = []
    for i, site in enumerate(inst.sites):
        if site.kind != "experts":
            continue
        layer = site.experts_layer
        handles.append(layer.module.register_forward_pre_hook(
            lambda mod, args, i=i: seen.__setitem__(i, [a.detach() for a in args])))
        for k, shared in enumerate(layer.shared):
            handles.append(shared.down.register_forward_pre_hook(
                lambda mod, args, i=i, k=k: shared_in.__setitem__((i, k), args[0].detach())))
    with inst.pause(), torch.no_grad():
        model(ids, attention_mask=mask)
    for h in handles:
        h.remove()
    valid = mask.reshape(-1).bool()
    out = {}
    for i, (hidden, top_k_index, top_k_weights) in seen.items():
        layer = inst.sites[i].experts_layer
        e_count, m = layer.experts, layer.d_ff
        sums = torch.zeros(inst.sites[i].d_ff, dtype=torch.float64)
        load = [0] * e_count
        for e in range(e_count):
            tokens, pos = (top_k_index == e).nonzero(as_tuple=True)
            keep = valid[tokens]
            tokens, pos = tokens[keep], pos[keep]
            load[e] = len(tokens)
            if len(tokens):
                c = reference_c(layer.module, hidden[tokens], e)
                w = top_k_weights[tokens, pos].double()[:, None]
                sums[e * m:(e + 1) * m] = (w * c).abs().sum(0)
        start = e_count * m
        for k, shared in enumerate(layer.shared):
            c = shared_in[(i, k)].double().reshape(-1, shared.d_ff)[valid]
            if shared.gate is not None:
                x = hidden.double()[valid]
                c = c * torch.sigmoid(x @ shared.gate.weight.double().T)
            sums[start:start + shared.d_ff] = c.abs().sum(0)
            start += shared.d_ff
        out[i] = (sums / int(valid.sum()), load)
    return out


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_slot_statistics_match_float64_and_outputs_are_bit_identical(models, model_type, impl, padding):
    model = models[model_type]
    model.set_experts_implementation(impl)
    ids, mask = random_batch(3, 10, padding, seed=4)
    try:
        with torch.no_grad():
            plain = model(ids, attention_mask=mask).logits
            inst = kh.instrument(model)
            logits = model(ids, attention_mask=mask).logits
        assert torch.equal(plain, logits)
        want = expected_slots(model, inst, ids, mask)
        inst.remove()
    finally:
        model.set_experts_implementation("grouped_mm")
    kinds = [s.kind for s in inst.sites]
    assert "experts" in kinds
    if model_type == "deepseek_v3":
        assert kinds == ["dense", "experts", "experts"]  # first_k_dense_replace
    assert [int(s.tokens) for s in inst.stats] == [int(mask.sum())] * len(inst.sites)
    cbars = inst.mean_abs_coefficients()
    splits = {s.label: s for s in experts_entropy(inst)}
    for i, (cbar, load) in want.items():
        torch.testing.assert_close(cbars[i].double(), cbar, rtol=1e-5, atol=1e-7)
        split = splits[inst.sites[i].label]
        assert split.load == load
        assert split.which_expert + split.within_experts == pytest.approx(split.total, abs=1e-9)
        assert split.total == pytest.approx(inst.knowledge_entropy().per_layer[i], abs=1e-9)


def test_capture_adds_no_flops(models):
    model = models["mixtral"]
    ids, mask = random_batch(2, 8, "right")
    counts = []
    for instrumented in (False, True):
        inst = kh.instrument(model) if instrumented else None
        with FlopCounterMode(display=False) as flops, torch.no_grad():
            model(ids, attention_mask=mask)
        counts.append(flops.get_total_flops())
        if inst is not None:
            inst.remove()
            assert int(inst.stats[0].tokens) == int(mask.sum())
    assert counts[0] == counts[1]


def test_gradients_reach_routed_slots_only(models):
    model = models["qwen2_moe"]
    ids, mask = random_batch(2, 8, "left")
    inst = kh.instrument(model, grads=True)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    model.zero_grad()
    inst.remove()
    split = experts_entropy(inst)[0]
    stats, site = inst.stats[0], inst.sites[0]
    m = site.expert_d_ff
    assert int(stats.grad_tokens) == int(mask.sum())
    for e, load in enumerate(split.load):
        got = stats.grad_sum_abs[e * m:(e + 1) * m]
        assert bool((got > 0).any()) == (load > 0)
    assert bool((stats.grad_sum_abs[site.experts * m:] > 0).all())  # the shared expert sees every token


def test_bf16_entropy_close_to_fp32():
    fp32, bf16 = build("mixtral"), build("mixtral", dtype=torch.bfloat16)
    ids, mask = random_batch(3, 10, "right")
    values = []
    for model in (fp32, bf16):
        with kh.instrument(model) as inst, torch.no_grad():
            model(ids, attention_mask=mask)
        values.append(inst.knowledge_entropy().total)
    assert values[1] == pytest.approx(values[0], rel=1e-3)
