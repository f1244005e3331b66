"""The dedicated experiments behind docs/findings.md (kacq_study.experiments), at a tiny size: the output
structure, and properties that tie each experiment's numbers to the study's own pipeline."""
from __future__ import annotations

import json
import math

import pytest

from kacq_study.config import DemoConfig
from kacq_study.experiments import horizon as forgetting, resuscitation, rows as augmentation, sam, slots, wording as probe_wording
from kacq_study.output import json_ready
from kacq_study.findings import KINDS, POWER_LAW_MIN_R2, SCENARIOS


def tiny(tmp_path, **overrides) -> DemoConfig:
    """A study far smaller than ``DemoConfig.quick``, with "row" injection as the default run has."""
    settings = dict(pretrain_steps=12, early_step=6, max_docs=300, injection="row", seq_len=128, batch_size=8,
                    continue_batch_size=6, injection_rounds=3, injection_every=4, tail_steps=3, window=3,
                    entropy_every=6, cache_dir=str(tmp_path / "cache"))
    return DemoConfig.quick(**{**settings, **overrides})


def test_forgetting_horizon_structure_and_short_refit(tmp_path):
    config = tiny(tmp_path, tail_steps=5, facts_per_scenario=2)
    result = json_ready(forgetting.forgetting_horizon(seeds=(0,), config=config, tail_factor=4, workers=1))
    json.dumps(result, allow_nan=False)
    assert result["tail_steps"] == 4 * config.tail_steps and result["records_per_scenario"] == 2
    assert result["seeds"] == [0] and set(result["per_seed"]) == {"0"}
    long = result["per_seed"]["0"]
    assert set(long["groups"]) == {f"{s}/{k}" for s in SCENARIOS for k in KINDS}
    for horizon in ("long", "short"):
        assert set(result["findings"][horizon]) == set(forgetting.FORGETTING_FINDINGS)
        # combined as the study combines: held for k of n, reproduces only if held for every seed
        for key, found in result["findings"][horizon].items():
            mine = next(f for f in long["findings"][horizon] if f["id"] == key)
            assert found["per_seed"] == [mine["holds"]] and found["reproduces"] == (mine["holds"] is True)
    for group in long["groups"].values():
        assert group["probes"] == 2 * 5
        assert len(group["t"]) - group["horizon_short"] == result["tail_steps"] - config.tail_steps
        for fit in (group["fit_long"], group["fit_short"]):
            # a fit below the R^2 criterion is "no power law": no decay constant comes out of it
            passed = fit["r_squared"] is not None and fit["r_squared"] >= POWER_LAW_MIN_R2
            assert fit["power_law"] == passed and (fit["decay"] is None) == (not passed)
    # the refit over the short horizon covers the t the config's own tail reaches: the same run with tail_factor 1.
    # Its curves agree up to the last window - 1 points, where the short run's mean loses the probes whose last
    # acquisition maximum came later (they run out of recorded steps; the long run still has them).
    short = json_ready(forgetting.forgetting_horizon(seeds=(0,), config=config, tail_factor=1, workers=1))["per_seed"]["0"]
    for key, group in long["groups"].items():
        theirs = short["groups"][key]["R"]
        assert len(theirs) == group["horizon_short"]
        agree = group["horizon_short"] - (config.window - 1)
        assert agree >= 1 and theirs[:agree] == group["R"][:agree]
        assert short["groups"][key]["effectivity"] == group["effectivity"]


def test_resuscitation_dose_compares_each_factor_with_the_plain_arm(tmp_path):
    config = tiny(tmp_path)
    result = json_ready(resuscitation.resuscitation_dose(seeds=(0, 1), factors=(1.0, 3.0), config=config, workers=1))
    json.dumps(result, allow_nan=False)
    assert result["factors"] == [1.0, 3.0] and set(result["findings"]) == {"q=1", "q=3"}
    for seed in ("0", "1"):
        rows = result["per_seed"][seed]
        assert "mean_multiplier" not in rows["late"]
        for label in ("q=1", "q=3"):
            row = rows[label]
            for key, diff in row["minus_plain"].items():
                if row[key] is not None and rows["late"][key] is not None:
                    assert diff == pytest.approx(row[key] - rows["late"][key], abs=1e-6)
            # the edit lifts the selected slots to q x their layer's mean: a larger q, larger multipliers
            assert row["mean_multiplier"] >= 1.0
        assert rows["q=3"]["mean_multiplier"] > rows["q=1"]["mean_multiplier"]
        # the findings are the study's criteria on this factor's arm against the plain one
        for label in ("q=1", "q=3"):
            verdict = result["findings"][label]["resuscitation_improves_acquisition"]["per_seed"][int(seed)]
            assert verdict == (rows[label]["acquisition"] > rows["late"]["acquisition"])
    for label in ("late", "q=1", "q=3"):
        box = result["summary"][label]["acquisition"]
        assert box["min"] <= box["mean"] <= box["max"]
        assert box["values"] == [result["per_seed"][s][label]["acquisition"] for s in ("0", "1")]


def test_landing_structure_and_study_agreement(tmp_path):
    config = tiny(tmp_path)
    result = json_ready(slots.landing(config=config, ks=(10, 50)))
    json.dumps(result, allow_nan=False)
    assert result["low_activity_slots"] == round(result["chance"] * result["slots"])
    assert abs(result["chance"] - config.resuscitation_ratio) < 0.05
    assert result["probes"] == {"injected": 3 * config.facts_per_scenario * 15, "control": config.control_facts * 15}
    for when in ("start", "end"):
        assert set(result[when]) == set(slots.MEASURES)
        for measure in result[when].values():
            for value in (measure["injected"], measure["control"], *measure["injected_by_k"].values()):
                assert 0.0 <= value <= 1.0
    for change in result["value_change"].values():
        assert set(change["by_k"]) == {"10", "50"} and math.isfinite(change["mean_low"])
    # the grad x act share recomputed here is the study's own landing number, at the arm's start and end
    assert result["start"]["grad_x_act/score"]["injected"] == pytest.approx(result["study_share"][0], abs=1e-6)
    assert result["end"]["grad_x_act/score"]["injected"] == pytest.approx(result["study_share"][-1], abs=1e-6)


# ------------------------------------------------------------------------------------------------
# run_variants: several settings of an arm from one pretraining per seed


def test_run_variants_refuses_a_pretraining_setting_before_any_work(tmp_path, monkeypatch):
    from kacq_hooks.errors import KacqError
    from kacq_study import study

    def no_work(*args):
        raise AssertionError("a task ran")

    monkeypatch.setattr(study, "pretrain_task", no_work)
    config = tiny(tmp_path)
    for settings in ({"pretrain_steps": 20}, {"injection_rounds": 4}, {"d_model": 32}):
        with pytest.raises(KacqError, match="pretraining reads"):
            study.run_variants(config, {"v": ("late", settings)}, seeds=(0,), workers=1)
    with pytest.raises(KacqError, match="unknown arm"):
        study.run_variants(config, {"v": ("lately", {})}, seeds=(0,), workers=1)
    with pytest.raises(KacqError, match="at least one variant"):
        study.run_variants(config, {}, seeds=(0,), workers=1)


def test_run_variants_matches_the_study_and_applies_each_setting(tmp_path):
    from kacq_study.study import run_study, run_variants

    config = tiny(tmp_path, arms=("late", "late+resuscitation"))
    variants = {"plain": ("late", {}), "factor 2": ("late+resuscitation", {}),
                "factor 4": ("late+resuscitation", {"resuscitation_factor": 4.0}),
                "long tail": ("late", {"tail_steps": 5})}
    got = run_variants(config, variants, seeds=(1,), workers=1)
    study = run_study(config, seeds=(1,), workers=1)
    seed = got["per_seed"]["1"]
    reference = study["per_seed"][0]
    assert seed["pretraining"] == reference["pretraining"]
    # an unchanged variant is the study's arm, number for number
    assert seed["arms"]["plain"] == reference["arms"]["late"]
    assert seed["arms"]["factor 2"] == reference["arms"]["late+resuscitation"]
    assert seed["arms"]["factor 4"]["edit"]["factor"] == 4.0 != seed["arms"]["factor 2"]["edit"]["factor"]
    assert seed["arms"]["factor 4"]["kim"] != seed["arms"]["factor 2"]["kim"]
    plain, longer = (len(seed["arms"][k]["kim"]["K"]) for k in ("plain", "long tail"))
    assert longer - plain == 5 - config.tail_steps
    assert seed["settings"]["factor 4"] == {"arm": "late+resuscitation", "resuscitation_factor": 4.0}


def test_probe_wording_rescores_the_same_targets_after_other_prompts(tmp_path):
    from kacq_study.pipeline import prepare

    config = tiny(tmp_path, control_facts=2)
    data = prepare(config, lambda phase, info: None)
    sets = probe_wording.wording_sets(data.facts)
    own, other, neutral = sets["own"], sets["other fact"], sets["neutral"]
    injected = [i for i, s in enumerate(own.scenarios) if s != "unused"]
    for kind in KINDS:
        for i, record in enumerate(own):
            # targets unchanged, prompts replaced
            assert other[i].probes(kind) and [t for _, t in other[i].probes(kind)] == [t for _, t in record.probes(kind)]
            assert all(p == probe_wording.NEUTRAL_PROMPT for p, _ in neutral[i].probes(kind))
            # another record's prompts, from the same group (injected with injected)
            donor = next(j for j in range(len(own)) if j != i and
                         [p for p, _ in own[j].probes(kind)][:1] == [p for p, _ in other[i].probes(kind)][:1])
            assert (i in injected) == (donor in injected)
    result = json_ready(probe_wording.probe_wording(seeds=(0,), config=config, workers=1))
    json.dumps(result, allow_nan=False)
    rise = result["per_seed"]["0"]["rise"]
    assert set(rise) == set(probe_wording.WORDINGS)
    for wording in probe_wording.WORDINGS:
        for group in ("injected", "control"):
            for reduction in ("mean", "first"):
                assert all(math.isfinite(v) for v in rise[wording][group][reduction].values())
    # the own-prompt rise of the injected facts is the study's own learning number, averaged over kinds
    own_rise = sum(rise["own"]["injected"]["mean"].values()) / 3
    assert own_rise == pytest.approx(result["per_seed"]["0"]["study_injected_rise"], abs=0.05)
    # a different prompt gives a different rise (the scores are of other token sequences)
    assert rise["neutral"]["injected"]["mean"] != rise["own"]["injected"]["mean"]


def test_augmentation_rows_counts_the_targets_a_cut_row_loses(tmp_path):
    from kacq_study.findings import experiment_for

    # rows long enough for any layout: nothing is cut, so a target is inside its row exactly when it is in the
    # passage at all (every plain one is; a layout can change how a name tokenizes)
    roomy = json_ready(augmentation.augmentation_rows(seeds=(0,), config=tiny(tmp_path, seq_len=2048)))
    for arm in ("plain", "augment"):
        row = roomy["per_seed"]["0"][arm]
        assert row["share_cut"] == 0.0 and row["targets_inside"] == row["targets_in_passage"]
    assert roomy["per_seed"]["0"]["plain"]["targets_inside"] == 1.0
    # layouts add markup: longer passages than the plain arm's, so a short row cuts more of them and loses targets
    short = json_ready(augmentation.augmentation_rows(seeds=(0,), config=tiny(tmp_path, seq_len=128)))
    plain, augment = short["per_seed"]["0"]["plain"], short["per_seed"]["0"]["augment"]
    assert augment["mean_tokens"] > plain["mean_tokens"] and augment["share_cut"] >= plain["share_cut"] > 0
    assert 0 <= augment["targets_inside"] < augment["targets_in_passage"] and augment["targets_inside"] <= plain["targets_inside"]
    assert roomy["per_seed"]["0"]["augment"]["injections"] == augment["injections"] == plain["injections"]
    assert augmentation.contains([5, 1, 2, 3], [1, 2]) and not augmentation.contains([1, 3, 2], [1, 2]) and not augmentation.contains([1], [])
    assert experiment_for("augment_improves_acquisition") == "augmentation-rows"
    assert experiment_for("sam_improves_acquisition") == "sam-dose"
    assert experiment_for("no_such_finding") is None


def test_sam_dose_judges_each_radius_against_the_plain_arm(tmp_path):
    from kacq_hooks.errors import KacqError

    with pytest.raises(KacqError, match="radius"):
        sam.sam_dose(seeds=(0,), rhos=(0.0,), config=tiny(tmp_path), workers=1)
    result = json_ready(sam.sam_dose(seeds=(0,), rhos=(0.01, 0.5), config=tiny(tmp_path), workers=1))
    json.dumps(result, allow_nan=False)
    rows = result["per_seed"]["0"]
    assert rows["rho=0.5"]["acquisition"] != rows["rho=0.01"]["acquisition"]  # the radius reached the arm
    for label in ("rho=0.01", "rho=0.5"):
        verdict = result["findings"][label]["sam_improves_acquisition"]["per_seed"][0]
        assert verdict == (rows[label]["acquisition"] > rows["late"]["acquisition"])
        assert rows[label]["minus_plain"]["acquisition"] == pytest.approx(
            rows[label]["acquisition"] - rows["late"]["acquisition"], abs=1e-6)
