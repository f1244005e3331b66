"""Hostile checks of instrument() beyond the dense decoder, each against an independent float64
computation (plain hooks on the model's own modules, C from the experts' weights), or a KacqError."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import kacq_hooks as kh
import model_zoo
from b2_ref import moe_reference

torch.set_num_threads(1)


def _batch(vocab=300, batch=3, seq=9, padding="right", seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding == "right":
        mask[1, -4:] = 0
        mask[2, -1:] = 0
    else:
        mask[1, :4] = 0
        mask[2, :1] = 0
    return ids, mask


def _build(model_type, family=None, **overrides):
    cfg = copy.deepcopy(model_zoo.tiny_config(model_type))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_zoo.auto_class(model_type, family).from_config(cfg).eval()


def _entropy(p: torch.Tensor) -> float:
    p = p.double() / p.double().sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def test_laguna_routed_scaling_factor_is_part_of_the_effective_coefficient():
    """Laguna multiplies the experts' output by moe_routed_scaling_factor after the experts (and then adds the
    shared expert): the effective coefficient of a routed slot is factor * w * C."""
    model = _build("laguna", moe_routed_scaling_factor=2.5)
    ids, mask = _batch()
    inst = kh.instrument(model)
    [site] = [s for s in inst.sites if s.kind == "experts"]
    index = inst.sites.index(site)
    shared = site.experts_layer.shared[0]
    seen = {}
    handle = shared.down.register_forward_pre_hook(lambda mod, a: seen.__setitem__("c", a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    inst.remove()
    valid = mask.reshape(-1).bool()
    [(routed_sum, _)] = moe_reference(model, [site.experts_layer.module],
                                      lambda: model(input_ids=ids, attention_mask=mask), valid)
    n = int(mask.sum())
    want = torch.cat([2.5 * routed_sum / n, seen["c"].double().reshape(-1, shared.d_ff)[valid].abs().sum(0) / n])
    torch.testing.assert_close(inst.mean_abs_coefficients()[index].double(), want, rtol=1e-5, atol=1e-7)
    assert inst.knowledge_entropy().per_layer[index] == pytest.approx(_entropy(want), abs=1e-5)


def test_granitemoeshared_shared_mlp_is_a_slot_group_of_its_moe_layer():
    """GraniteMoeShared adds shared_mlp(x) (a sibling of block_sparse_moe) to the routed experts' output: one
    FFN layer whose slots are E x m routed plus the shared MLP's neurons, not two 'layers' with one label."""
    model = _build("granitemoeshared", shared_intermediate_size=48)
    inst = kh.instrument(model)
    inst.remove()
    labels = inst.labels
    assert len(labels) == len(set(labels)), [(s.label, s.path, s.kind) for s in inst.sites]
    assert [s.d_ff for s in inst.sites] == [4 * 64 + 48] * model.config.num_hidden_layers


def test_switch_transformers_is_not_refused_as_a_model_without_ffn():
    """Switch Transformers has a dense FFN (layer.1.mlp.wo) in every other block and per-expert FFNs (a ModuleDict
    of expert_i.wo) in the others. Refusing it is allowed, but the KacqError must say why truly (an experts layout
    kacq_hooks cannot read, naming the module and how to pass a template), not that the model has no FFN."""
    model = model_zoo.build("switch_transformers")
    try:
        inst = kh.instrument(model)
    except kh.KacqError as err:
        message = str(err)
        assert "has no FFN" not in message, message
        assert "experts" in message and "{i}" in message, message
    else:
        inst.remove()
        assert any(s.kind == "dense" for s in inst.sites) and any(s.kind == "experts" for s in inst.sites)
