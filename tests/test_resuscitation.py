"""Resuscitation (Kim et al., Algorithm 1): plans, weight and hook edits, exact revert, predicted entropy, CLI."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from tiny_models import DENSE, FF, GATED, random_batch, tiny_model, tiny_tokenizer

import kacq_hooks as kh
from kacq_hooks.cli import main
from kacq_hooks.errors import KacqError, LocateError, ShapeError
from kacq_hooks.interventions import (
    ResuscitationPlan,
    predicted_entropy_after_scaling,
    resuscitate,
    resuscitation_plan,
)

RTOL = 1e-5


def calibrate(model, ids, mask):
    with kh.instrument(model) as inst, torch.no_grad():
        model(ids, attention_mask=mask)
    return inst


def logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_params_equal(model, saved):
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[name]), name


@pytest.fixture(scope="module")
def batch():
    return random_batch(batch=4, seq=16, padding="right")


# -- the plan ------------------------------------------------------------------------------------------------------

def test_plan_selects_bottom_quantile_and_lifts_it_to_factor_times_mean():
    cbar = torch.arange(1.0, 11.0)  # quantile(0.5) = 5.5, mean = 5.5
    plan = resuscitation_plan([cbar], ratio=0.5, factor=2.0)
    edit = plan.edits[0]
    assert edit.indices.tolist() == [0, 1, 2, 3, 4]
    assert edit.threshold == pytest.approx(5.5) and edit.layer_mean == pytest.approx(5.5)
    assert torch.allclose(edit.multipliers, 2 * 5.5 / cbar[:5].double())
    assert plan.capped == 0 and plan.selected == 5 and plan.edited_layers == [0]
    scale = plan.scales()[0]
    assert torch.equal(scale[5:], torch.ones(5, dtype=torch.float64))


def test_ties_at_the_threshold_are_all_selected():
    plan = resuscitation_plan([torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0])], ratio=0.25)
    assert plan.edits[0].indices.tolist() == [0, 1, 2, 3]


def test_dead_neurons_get_the_cap_never_inf_and_the_cap_is_reported(caplog):
    cbar = torch.tensor([0.0, 1e-9, 1.0, 2.0, 3.0, 5.0])
    with caplog.at_level(logging.WARNING, logger="kacq_hooks"):
        plan = resuscitation_plan([cbar], ratio=0.5, factor=2.0, max_multiplier=50.0)
    multipliers = plan.edits[0].multipliers
    assert torch.isfinite(multipliers).all()
    assert multipliers[:2].tolist() == [50.0, 50.0]
    assert plan.capped == 2 and plan.edits[0].capped == 2
    assert "capped" in caplog.text and "2 of 3" in caplog.text
    assert plan.to_dict()["layers"][0]["capped"] == 2
    # the default cap is finite too
    assert math.isfinite(resuscitation_plan([cbar]).edits[0].multipliers.max().item())


def test_layers_option_restricts_the_edit():
    cbars = [torch.rand(8) + 0.1 for _ in range(3)]
    assert resuscitation_plan(cbars, layers=[1]).edited_layers == [1]
    assert resuscitation_plan(cbars, layers=[-1]).edited_layers == [2]
    assert resuscitation_plan(cbars).edited_layers == [0, 1, 2]
    assert resuscitation_plan(cbars, layers=[1]).scales()[0] is None
    with pytest.raises(ValueError, match="not among the measured layers"):
        resuscitation_plan(cbars, layers=[3])


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=0.0), "ratio"), (dict(ratio=1.0), "ratio"), (dict(ratio=-0.2), "ratio"), (dict(ratio=1.5), "ratio"),
    (dict(ratio=float("nan")), "ratio"), (dict(factor=0.0), "factor"), (dict(factor=-2.0), "factor"),
    (dict(factor=float("inf")), "factor"), (dict(max_multiplier=0.0), "max_multiplier"),
    (dict(max_multiplier=float("inf")), "max_multiplier"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resuscitation_plan([torch.rand(8) + 0.1], **kwargs)


def test_bad_sources_are_refused():
    with pytest.raises(KacqError, match="zero"):
        resuscitation_plan([torch.zeros(8)])
    with pytest.raises(KacqError, match="non-negative"):
        resuscitation_plan([torch.tensor([1.0, -1.0, 2.0])])
    with pytest.raises(TypeError, match="Instrumentation"):
        resuscitation_plan("cbar")
    empty = kh.instrument(tiny_model("llama"))
    empty.remove()
    with pytest.raises(KacqError, match="no tokens"):
        resuscitation_plan(empty)


def test_predicted_entropy_is_the_entropy_of_scaled_cbar():
    cbars = [torch.linspace(0.1, 1.0, 16), 0.7 ** torch.arange(16.0)]
    plan = resuscitation_plan(cbars, layers=[1], factor=1.0)
    predicted = plan.predicted_entropy()
    assert predicted.per_layer[0] == pytest.approx(kh.knowledge_entropy(cbars).per_layer[0], rel=1e-12)
    lifted = cbars[1].double().clone()
    lifted[plan.edits[0].indices] = cbars[1].double().mean()
    assert predicted.per_layer[1] == pytest.approx(kh.entropy.entropy(lifted), rel=1e-9)
    # lifting a skewed layer's weak neurons to the mean makes its use more even
    assert predicted.per_layer[1] > kh.knowledge_entropy(cbars).per_layer[1]
    with pytest.raises(ShapeError):
        predicted_entropy_after_scaling(cbars, [None])


# -- weight edits on gated MLPs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", GATED)
@pytest.mark.parametrize("layer", [0, 1])
def test_single_layer_weight_edit_matches_prediction(model_type, layer, batch):
    ids, mask = batch
    model = tiny_model(model_type)
    before = calibrate(model, ids, mask)
    original, original_logits = params(model), logits(model, ids, mask)
    plan = resuscitation_plan(before, layers=[layer])
    predicted = plan.predicted_entropy()

    handle = resuscitate(model, plan, mode="weights")
    after = calibrate(model, ids, mask)
    measured = after.knowledge_entropy()
    assert measured.per_layer[layer] == pytest.approx(predicted.per_layer[layer], rel=RTOL)
    assert measured.per_layer[layer] != pytest.approx(before.knowledge_entropy().per_layer[layer], rel=RTOL)
    for earlier in range(layer):  # layers before the edit see nothing of it
        assert torch.equal(after.mean_abs_coefficients()[earlier], before.mean_abs_coefficients()[earlier])
    edit = plan.edits[0]
    uncapped = edit.indices[edit.multipliers < plan.max_multiplier]
    assert uncapped.numel() == FF // 2
    lifted = after.mean_abs_coefficients()[layer][uncapped]
    assert torch.allclose(lifted, torch.full_like(lifted, plan.factor * edit.layer_mean), rtol=RTOL, atol=0)
    others = torch.ones(FF, dtype=torch.bool)
    others[edit.indices] = False
    assert torch.allclose(after.mean_abs_coefficients()[layer][others], before.mean_abs_coefficients()[layer][others],
                          rtol=RTOL, atol=0)
    weight_logits = logits(model, ids, mask)

    handle.revert()
    assert_params_equal(model, original)
    assert torch.equal(logits(model, ids, mask), original_logits)
    handle.revert()  # a second revert does nothing

    with resuscitate(model, plan, mode="hook"):
        hook_logits = logits(model, ids, mask)
    assert torch.allclose(hook_logits, weight_logits, rtol=RTOL, atol=RTOL)
    assert not torch.allclose(hook_logits, original_logits, rtol=RTOL, atol=RTOL)
    assert torch.equal(logits(model, ids, mask), original_logits)


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_all_layer_edit_first_layer_exact_later_layers_estimated(model_type, batch):
    ids, mask = batch
    model = tiny_model(model_type)
    before = calibrate(model, ids, mask)
    plan = resuscitation_plan(before)
    predicted = plan.predicted_entropy()
    with resuscitate(model, plan):
        measured = calibrate(model, ids, mask).knowledge_entropy()
    assert measured.per_layer[0] == pytest.approx(predicted.per_layer[0], rel=RTOL)
    # the last layer's input changed with layer 0's edit: close, but the prediction is only an estimate there
    assert measured.per_layer[1] == pytest.approx(predicted.per_layer[1], abs=1e-2)
    assert measured.per_layer[1] != pytest.approx(predicted.per_layer[1], rel=RTOL)


def test_phi3_fused_gate_up_edits_only_the_up_half(batch):
    ids, mask = batch
    model = tiny_model("phi3")
    plan = resuscitation_plan(calibrate(model, ids, mask), layers=[0])
    fused = model.model.layers[0].mlp.gate_up_proj.weight
    original = fused.detach().clone()
    with resuscitate(model, plan):
        assert torch.equal(fused[:FF], original[:FF])  # the gate half is untouched
        edit = plan.edits[0]
        expected = (original[FF + edit.indices].double() * edit.multipliers[:, None]).float()
        assert torch.equal(fused[FF + edit.indices], expected)
        rest = torch.ones(FF, dtype=torch.bool)
        rest[edit.indices] = False
        assert torch.equal(fused[FF:][rest], original[FF:][rest])
    assert torch.equal(fused, original)


def test_up_projection_bias_is_scaled_with_its_row(batch):
    ids, mask = batch
    model = tiny_model("llama", mlp_bias=True)
    before = calibrate(model, ids, mask)
    plan = resuscitation_plan(before, layers=[1])
    original = params(model)
    with resuscitate(model, plan):
        measured = calibrate(model, ids, mask).knowledge_entropy()
    assert measured.per_layer[1] == pytest.approx(plan.predicted_entropy().per_layer[1], rel=RTOL)
    assert_params_equal(model, original)


def test_bf16_weight_edit_reverts_bit_exactly(batch):
    ids, mask = batch
    model = tiny_model("qwen2", dtype=torch.bfloat16)
    plan = resuscitation_plan(calibrate(model, ids, mask))
    original = params(model)
    handle = resuscitate(model, plan)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, original["model.layers.0.mlp.up_proj.weight"])
    handle.revert()
    assert_params_equal(model, original)


def test_revert_after_training_warns_and_restores(batch, caplog):
    ids, mask = batch
    model = tiny_model("llama")
    plan = resuscitation_plan(calibrate(model, ids, mask), layers=[0])
    original = params(model)
    handle = resuscitate(model, plan)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.01)  # stands in for an optimizer step
    with caplog.at_level(logging.WARNING, logger="kacq_hooks"):
        handle.revert()
    assert "changed since the edit" in caplog.text
    edited_rows = plan.edits[0].indices
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight[edited_rows],
                       original["model.layers.0.mlp.up_proj.weight"][edited_rows])


def test_weight_mode_refuses_non_gated_mlps_and_points_to_hook_mode(batch):
    ids, mask = batch
    model = tiny_model("gpt2")
    plan = resuscitation_plan(calibrate(model, ids, mask))
    original = params(model)
    with pytest.raises(LocateError, match="not linear") as err:
        resuscitate(model, plan, mode="weights")
    assert "mode='hook'" in str(err.value)
    assert_params_equal(model, original)  # nothing was half-applied


def test_edited_model_saves_and_loads_with_identical_logits(tmp_path, batch):
    from transformers import AutoModelForCausalLM

    ids, mask = batch
    model = tiny_model("llama")
    original_logits = logits(model, ids, mask)
    resuscitate(model, resuscitation_plan(calibrate(model, ids, mask)))
    edited_logits = logits(model, ids, mask)
    assert not torch.allclose(edited_logits, original_logits)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded, ids, mask), edited_logits)


# -- hook mode ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", DENSE)
def test_hook_mode_works_on_every_located_architecture(model_type, batch):
    ids, mask = batch
    model = tiny_model(model_type)
    before = calibrate(model, ids, mask)
    original_logits = logits(model, ids, mask)
    layer = 1
    plan = resuscitation_plan(before, layers=[layer])
    predicted = plan.predicted_entropy().per_layer[layer]
    hooks_before = [len(s.module._forward_pre_hooks) for s in before.sites]

    early = kh.instrument(model)  # attached before the edit: the edit's hook must still run first
    handle = resuscitate(model, plan, mode="hook")
    late = kh.instrument(model)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    early.remove()
    late.remove()
    for inst in (early, late):
        assert inst.knowledge_entropy().per_layer[layer] == pytest.approx(predicted, rel=RTOL)

    handle.revert()
    assert [len(s.module._forward_pre_hooks) for s in before.sites] == hooks_before
    assert torch.equal(logits(model, ids, mask), original_logits)


def test_hook_and_weight_modes_agree_forward_but_not_in_gradients(batch):
    ids, mask = batch
    model = tiny_model("llama")
    plan = resuscitation_plan(calibrate(model, ids, mask), layers=[0])
    mlp = model.model.layers[0].mlp

    def grads():
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        return out.loss.detach(), mlp.up_proj.weight.grad.clone(), mlp.gate_proj.weight.grad.clone()

    with resuscitate(model, plan, mode="weights"):
        loss_w, up_w, gate_w = grads()
    with resuscitate(model, plan, mode="hook"):
        loss_h, up_h, gate_h = grads()
    assert loss_h == pytest.approx(loss_w.item(), rel=RTOL)
    assert torch.allclose(gate_h, gate_w, rtol=1e-4, atol=1e-7)  # gate sees the same C either way
    edit = plan.edits[0]
    u = edit.multipliers.float()[:, None]
    # hook mode: C_i = u_i act(g) (w_i x), so dL/dw_i is u_i times the weight-mode gradient of the scaled row
    assert torch.allclose(up_h[edit.indices], u * up_w[edit.indices], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(up_h[edit.indices], up_w[edit.indices], rtol=1e-2)


# -- plans that do not fit --------------------------------------------------------------------------------------------

def test_a_plan_for_another_model_shape_is_refused(batch):
    ids, mask = batch
    plan = resuscitation_plan(calibrate(tiny_model("llama"), ids, mask))
    for other in (tiny_model("llama", intermediate_size=2 * FF), tiny_model("llama", num_hidden_layers=3)):
        with pytest.raises(ShapeError, match="made for"):
            resuscitate(other, plan)
    with pytest.raises(ShapeError, match="sites"):  # same widths and depth, different sites
        resuscitate(tiny_model("gpt2"), plan, mode="hook")
    with pytest.raises(ValueError, match="mode"):
        resuscitate(tiny_model("llama"), plan, mode="bake")
    with pytest.raises(TypeError, match="ResuscitationPlan"):
        resuscitate(tiny_model("llama"), plan.to_dict())


def test_plan_from_plain_tensors_applies_by_width(batch):
    ids, mask = batch
    model = tiny_model("olmo")
    inst = calibrate(model, ids, mask)
    from_tensors = resuscitation_plan(inst.mean_abs_coefficients(), layers=[0])
    from_stats = resuscitation_plan(inst.stats, layers=[0])
    assert isinstance(from_tensors, ResuscitationPlan) and from_tensors.paths is None
    assert torch.equal(from_tensors.edits[0].multipliers, from_stats.edits[0].multipliers)
    with resuscitate(model, from_tensors):
        measured = calibrate(model, ids, mask).knowledge_entropy()
    assert measured.per_layer[0] == pytest.approx(from_tensors.predicted_entropy().per_layer[0], rel=RTOL)


# -- the CLI --------------------------------------------------------------------------------------------------------

@pytest.fixture
def saved_model(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "calibration.txt"
    data.write_text("The quick brown fox jumps over the lazy dog.\n\n"
                    "Zorgon was founded in 1842 by the council of Calidus.\nIt lies on the northern shore.\n\n"
                    "A small model learns facts one batch at a time.\n")
    return model_dir, data


def test_cli_resuscitate_end_to_end(saved_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model_dir, data = saved_model
    out = tmp_path / "edited"
    code = main(["resuscitate", str(model_dir), "--data", str(data), "--ratio", "0.5", "--factor", "2",
                 "--out", str(out), "--batch-size", "2", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "predicted" in printed and "measured" in printed and "total" in printed
    report = json.loads((out / "resuscitation.json").read_text())
    assert report["documents"] == 3 and report["plan"]["ratio"] == 0.5
    before, predicted, after = (report[k]["per_layer"] for k in
                                ("entropy_before", "entropy_predicted", "entropy_measured_after"))
    assert len(before) == len(predicted) == len(after) == 2
    assert after[0] == pytest.approx(predicted[0], rel=RTOL) and after[0] != pytest.approx(before[0], rel=RTOL)
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    edited = AutoModelForCausalLM.from_pretrained(out)
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(edited.state_dict()[up], original.state_dict()[up])
    assert torch.equal(edited.state_dict()["model.layers.0.mlp.gate_proj.weight"],
                       original.state_dict()["model.layers.0.mlp.gate_proj.weight"])
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--ratio", "1.5"], "ratio"), (["--factor", "0"], "factor"), (["--layers", "7"], "layer 7"),
])
def test_cli_reports_bad_input(saved_model, tmp_path, capsys, args, message):
    model_dir, data = saved_model
    code = main(["resuscitate", str(model_dir), "--data", str(data), "--out", str(tmp_path / "x"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_reports_a_missing_model_dir(tmp_path, capsys, saved_model):
    _, data = saved_model
    assert main(["resuscitate", str(tmp_path / "nowhere"), "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "config.json" in capsys.readouterr().err


# -- a second plan ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["weights", "hook"])
def test_a_second_plan_on_resuscitated_layers_is_refused_unless_stacked(mode, batch):
    import copy

    from kacq_hooks.errors import ResuscitationError

    ids, mask = batch
    model = tiny_model("llama")
    plan = resuscitation_plan(calibrate(model, ids, mask))
    handle = resuscitate(model, plan, mode=mode)
    edited_logits = logits(model, ids, mask)
    for second_mode in ("weights", "hook"):
        with pytest.raises(ResuscitationError, match="already resuscitated"):
            resuscitate(model, plan, mode=second_mode)
    assert torch.equal(logits(model, ids, mask), edited_logits)  # the refused call changed nothing
    twin = copy.deepcopy(model)  # a copy is resuscitated too (weights or hooks copied) and says so
    assert torch.equal(logits(twin, ids, mask), edited_logits)
    with pytest.raises(ResuscitationError, match="already resuscitated"):
        resuscitate(twin, plan, mode=mode)
    stacked = resuscitate(model, plan, mode=mode, stack=True)  # on purpose: the multipliers compound
    assert not torch.allclose(logits(model, ids, mask), edited_logits)
    stacked.revert()
    handle.revert()
    resuscitate(model, plan, mode=mode).revert()  # after revert the model takes a plan again


def test_a_saved_weight_edit_refuses_a_second_plan_after_loading(tmp_path, batch):
    from transformers import AutoModelForCausalLM

    from kacq_hooks.errors import ResuscitationError

    ids, mask = batch
    model = tiny_model("llama")
    plan = resuscitation_plan(calibrate(model, ids, mask), layers=[1])
    resuscitate(model, plan)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with pytest.raises(ResuscitationError, match="saved weight edit of layers \\[1\\]"):
        resuscitate(loaded, resuscitation_plan(calibrate(loaded, ids, mask), layers=[1]))
    resuscitate(loaded, resuscitation_plan(calibrate(loaded, ids, mask), layers=[0])).revert()  # other layers: fine


def test_cli_refuses_a_non_gated_model_before_reading_the_data(tmp_path, capsys):
    model_dir = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    code = main(["resuscitate", str(model_dir), "--data", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "x"),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "non-gated" in err and "kacq resuscitate saves a weight edit" in err
    assert "does not exist" not in err  # refused before the data was looked at
