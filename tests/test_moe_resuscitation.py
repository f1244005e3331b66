"""Resuscitation over the memory slots of mixture-of-experts layers: weights and hook modes, exact revert,
exact prediction for the first edited layer, no extra FLOPs, and the CLI on a saved MoE model."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import kacq_hooks as kh
from kacq_hooks.cli import main
from kacq_hooks.experts import ExpertsError, ExpertsTap
from kacq_hooks.interventions import resuscitate, resuscitation_plan
from test_experts import IMPLS, build
from tiny_models import random_batch, tiny_tokenizer

RTOL = 1e-5
FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3"]


@pytest.fixture(scope="module")
def models():
    return {mt: build(mt) for mt in FAMILIES + ["gpt_oss"]}


@pytest.fixture(scope="module")
def batch():
    return random_batch(4, 16, "right")


def measure(model, ids, mask):
    with kh.instrument(model) as inst, torch.no_grad():
        model(ids, attention_mask=mask)
    return inst


def logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def experts_plan(inst):
    """A plan over the layers from the first experts site on: that site's prediction is exact."""
    first = next(i for i, s in enumerate(inst.sites) if s.kind == "experts")
    return resuscitation_plan(inst, 0.5, 2.0, layers=[s.layer for s in inst.sites[first:]]), first


def routed_c(model, layer, ids, mask):
    """{(expert, token): C row} of one experts layer, as the forward computes it."""
    rows = {}

    def keep(e, t, w, c):
        for expert, token, row in zip(e.tolist(), t.tolist(), c.detach().clone()):
            rows[(expert, token)] = row

    with ExpertsTap(layer, keep), torch.no_grad():
        model(ids, attention_mask=mask)
    return rows


@pytest.mark.parametrize("mode", ["weights", "hook"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_slot_edit_matches_prediction_and_reverts_exactly(models, batch, model_type, impl, mode):
    model = models[model_type]
    model.set_experts_implementation(impl)
    ids, mask = batch
    before = measure(model, ids, mask)
    plan, first = experts_plan(before)
    site = before.sites[first]
    edit = plan.edits[0]
    assert plan.cbars[first].numel() == site.d_ff  # one quantile over all E*m (+ shared) slots
    assert edit.selected == pytest.approx(site.d_ff / 2, abs=1)
    saved, plain = params(model), logits(model, ids, mask)
    handle = resuscitate(model, plan, mode=mode)
    after = measure(model, ids, mask)
    predicted = plan.predicted_entropy()
    assert after.knowledge_entropy().per_layer[first] == pytest.approx(predicted.per_layer[first], rel=RTOL)
    assert after.knowledge_entropy().per_layer[first] != pytest.approx(before.knowledge_entropy().per_layer[first],
                                                                       rel=RTOL)
    # every selected slot now has mean |C| = factor x the layer mean on the calibration data (uncapped ones)
    lifted = after.mean_abs_coefficients()[first][edit.indices].double()
    torch.testing.assert_close(lifted, torch.full_like(lifted, 2.0 * edit.layer_mean), rtol=1e-4, atol=0)
    edited = {n for n, p in model.named_parameters() if not torch.equal(p, saved[n])}
    if mode == "weights":
        assert edited and all("gate_up_proj" in n or "shared_expert" in n and "up_proj" in n for n in edited), edited
        assert not any("gate_proj" in n and "gate_up" not in n for n in edited)
    else:
        assert not edited
    handle.revert()
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters())
    assert torch.equal(logits(model, ids, mask), plain)
    model.set_experts_implementation("grouped_mm")


@pytest.mark.parametrize("impl", IMPLS)
def test_hook_mode_scales_only_the_edited_slots_inside_the_experts_forward(models, batch, impl):
    model = models["qwen2_moe"]
    model.set_experts_implementation(impl)
    ids, mask = batch
    inst = measure(model, ids, mask)
    plan, first = experts_plan(inst)
    layer = inst.sites[first].experts_layer
    scale = plan.scales()[first][: layer.experts * layer.d_ff].view(layer.experts, layer.d_ff)
    plain = logits(model, ids, mask)
    before = routed_c(model, layer, ids, mask)
    with resuscitate(model, plan, mode="hook"):
        after = routed_c(model, layer, ids, mask)  # attached after the edit, it still sees the scaled C
        weights_free = logits(model, ids, mask)
    assert after.keys() == before.keys()  # the router of the first edited layer is unchanged
    for (expert, token), row in before.items():
        unedited = scale[expert] == 1
        assert torch.equal(after[(expert, token)][unedited], row[unedited])  # bit-exact: multiplied by 1
        torch.testing.assert_close(after[(expert, token)], row * scale[expert].float(), rtol=1e-6, atol=0)
    with resuscitate(model, plan, mode="weights"):
        torch.testing.assert_close(logits(model, ids, mask), weights_free, rtol=1e-4, atol=1e-5)
    assert torch.equal(logits(model, ids, mask), plain)
    model.set_experts_implementation("grouped_mm")


@pytest.mark.parametrize("impl", IMPLS)
def test_hook_mode_adds_no_matmul(models, batch, impl):
    model = models["mixtral"]
    model.set_experts_implementation(impl)
    ids, mask = batch
    plan, _ = experts_plan(measure(model, ids, mask))

    def flops():
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(ids, attention_mask=mask)
        return counter.get_flop_counts()

    plain = flops()
    with resuscitate(model, plan, mode="hook"):
        edited = flops()
    assert edited == plain
    model.set_experts_implementation("grouped_mm")


def test_custom_gate_refuses_weights_and_takes_hooks(models, batch):
    model = models["gpt_oss"]  # C = (clamp(up) + 1) * glu(gate): not linear in an up row
    ids, mask = batch
    inst = measure(model, ids, mask)
    plan, first = experts_plan(inst)
    saved = params(model)
    with pytest.raises(ExpertsError, match="hook mode"):
        resuscitate(model, plan, mode="weights")
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters())  # refused before any write
    with resuscitate(model, plan, mode="hook"):
        after = measure(model, ids, mask)
    assert after.knowledge_entropy().per_layer[first] == pytest.approx(plan.predicted_entropy().per_layer[first],
                                                                       rel=RTOL)


def test_second_plan_on_an_experts_layer_is_refused(models, batch):
    model = models["mixtral"]
    ids, mask = batch
    plan, _ = experts_plan(measure(model, ids, mask))
    with resuscitate(model, plan, mode="hook"):
        with pytest.raises(kh.errors.ResuscitationError, match="already resuscitated"):
            resuscitate(model, plan, mode="weights")


DOCS = ["The quick brown fox jumps over the lazy dog.", "Zorgon was founded in 1842 by the council of Calidus.",
        "A small model learns facts one batch at a time."]


def test_cli_resuscitate_and_entropy_accept_moe_models(models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "moe"
    models["mixtral"].save_pretrained(model_dir)  # a tiny Qwen2-MoE's saved config does not load again (layer_types)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "calibration.txt"
    data.write_text("\n\n".join(DOCS) + "\n")
    out = tmp_path / "edited"
    assert main(["resuscitate", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "2",
                 "--device", "cpu"]) == 0
    report = json.loads((out / "resuscitation.json").read_text())
    before, predicted, after = (report[k]["per_layer"] for k in
                                ("entropy_before", "entropy_predicted", "entropy_measured_after"))
    assert after[0] == pytest.approx(predicted[0], rel=RTOL) and after[0] != pytest.approx(before[0], rel=RTOL)
    original, edited = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (model_dir, out))
    changed = {n for n in original if not torch.equal(original[n], edited[n])}
    assert changed and all("experts.gate_up_proj" in n for n in changed), changed
    capsys.readouterr()
    assert main(["entropy", str(out), "--data", str(data), "--out", str(tmp_path / "sweep"), "--device", "cpu"]) == 0
    assert "Traceback" not in capsys.readouterr().err
