"""`kacq demo --regime decay`: the checkpoint rule on synthetic entropy curves, the regime check it feeds, the
decay settings (constant rate, continued-training weight decay), the default study's settings left as they were,
and a tiny decay-regime study end to end whose early checkpoint is the snapshot at the entropy peak."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from kacq_hooks.cli import main
from kacq_study import published
from kacq_study.arms import adamw_step
from kacq_study.config import DemoConfig, DemoConfigError
from kacq_study.findings import entropy_decayed_before_late, regime
from kacq_study.output import json_ready
from kacq_study.pipeline import _constant, curve_noise, entropy_peak
from kacq_study.study import run_study

ROOT = Path(__file__).resolve().parents[1]


def _steps(totals):
    return [100 * i for i in range(len(totals))]


def _wiggle(k):
    return 0.002 * (1 if k % 2 else -1)


def test_the_early_checkpoint_is_the_peak_after_the_collapse_and_a_fall_beyond_the_noise_decays():
    # untrained 22, collapse to 19 at step 100, a transient bump at 200 that is not the peak, climb to 21 at 1,100,
    # then a fall of 0.2 with +-0.002 noise
    totals = ([22.0, 19.0, 19.6, 19.5] + [19.5 + 0.2 * k for k in range(1, 8)]
              + [20.9 - 0.02 * k + _wiggle(k) for k in range(1, 11)])
    rule = entropy_peak(_steps(totals), totals)
    assert rule["early_minimum_step"] == 100  # step 0 (the untrained model) is never the minimum nor the peak
    assert rule["peak_step"] == 1000 and rule["peak"] == max(totals[1:])
    assert rule["late_step"] == _steps(totals)[-1] and rule["measurements_after_peak"] == 10
    assert rule["fall_after_peak"] == pytest.approx(totals[10] - totals[-1])
    assert rule["decays"] is True
    check = entropy_decayed_before_late({"pretraining": {"checkpoint_rule": rule}})
    assert check["holds"] is True and check["values"]["peak_step"] == 1000


def test_a_climbing_curve_or_noise_after_the_peak_is_no_decay_and_the_check_says_so():
    climbing = [22.0, 19.0] + [19.0 + 0.1 * k for k in range(1, 15)]
    rule = entropy_peak(_steps(climbing), climbing)
    assert rule["peak_step"] == rule["late_step"] and rule["decays"] is None  # nothing after the peak to judge
    # a peak at the end is not a decay: the regime check fails (it is not left unchecked)
    assert entropy_decayed_before_late({"pretraining": {"checkpoint_rule": rule}})["holds"] is False
    noisy = [22.0, 19.0, 21.02] + [21.0 + (0.01 if k % 2 else -0.01) for k in range(1, 12)]
    rule = entropy_peak(_steps(noisy), noisy)
    assert rule["peak_step"] == 200
    assert 0 < rule["fall_after_peak"] < 3 * rule["noise"] and rule["decays"] is False
    assert entropy_decayed_before_late({"pretraining": {"checkpoint_rule": rule}})["holds"] is False


def test_the_rule_refuses_a_curve_too_short_and_noise_is_the_spread_of_differences():
    with pytest.raises(DemoConfigError, match="at least two"):
        entropy_peak([0], [1.0])
    with pytest.raises(DemoConfigError):
        entropy_peak([0, 100], [1.0])
    assert curve_noise([1.0, 2.0]) is None
    # a straight line has no noise however steep it is; alternation has
    assert curve_noise([1.0, 2.0, 3.0, 4.0]) == pytest.approx(0.0)
    assert curve_noise([0.0, 1.0, 0.0, 1.0, 0.0]) > 0.5


def test_a_run_with_fixed_checkpoints_has_no_decay_check():
    assert entropy_decayed_before_late({"pretraining": {"loss": [1.0, 1.0]}}) is None
    assert [c["id"] for c in regime({"pretraining": {"loss": [1.0] * 20}, "arms": {}})] == ["loss_flattened"]


def test_decay_settings_validate_and_the_default_study_keeps_its_settings():
    decay = DemoConfig.decay()
    decay.validate()
    assert (decay.lr_schedule, decay.checkpoint_rule, decay.weight_decay) == ("constant", "peak", 1.0)
    # well past the latest measured peak (7 weight-decay time constants)
    assert decay.pretrain_steps * decay.lr * decay.weight_decay >= 12
    assert decay.arm_weight_decay == 0.01 and DemoConfig().arm_weight_decay == DemoConfig().weight_decay
    # the published default run's settings are what DemoConfig() gives, key for key: no new setting leaks in
    published = json.loads((ROOT / "docs" / "demo_results.json").read_text())["config"]
    default = json_ready(DemoConfig().to_dict())
    default.pop("seed")
    assert default == published
    assert "checkpoint_rule" in decay.to_dict() and "continue_weight_decay" in decay.to_dict()
    with pytest.raises(DemoConfigError, match="lr_schedule"):
        DemoConfig(lr_schedule="linear").validate()
    with pytest.raises(DemoConfigError, match="checkpoint_rule"):
        DemoConfig(checkpoint_rule="last").validate()
    with pytest.raises(DemoConfigError, match="at least 8 entropy measurements"):
        DemoConfig.decay(pretrain_steps=500).validate()
    with pytest.raises(DemoConfigError, match="continue_weight_decay"):
        DemoConfig.decay(continue_weight_decay=-0.1).validate()


def test_constant_schedule_warms_up_then_holds_the_rate():
    assert [_constant(4)(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert _constant(0)(0) == 1.0


def test_continued_training_uses_its_own_weight_decay():
    """With a zero learning-rate gradient path out of the way, AdamW's decoupled decay is what moves a weight: with
    continue_weight_decay 0 an update on a zero loss leaves the weights alone; with the pretraining's 1.0 it shrinks."""
    class Zero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, input_ids, attention_mask, labels):
            return type("Out", (), {"loss": (self.w * 0).sum()})()

    ids = torch.zeros(1, 2, dtype=torch.long)
    for continue_wd, unchanged in ((0.0, True), (None, False)):
        model = Zero()
        config = DemoConfig.decay(continue_weight_decay=continue_wd, continue_warmup=0)
        adamw_step(model, config)(ids, torch.ones_like(ids))
        assert torch.equal(model.w.detach(), torch.ones(3)) is unchanged


def test_cli_refuses_quick_with_the_decay_regime(capsys):
    assert main(["demo", "--quick", "--regime", "decay", "--out", "unused"]) == 2
    assert "--quick and --regime decay" in capsys.readouterr().err
    from kacq_study.cli import run_demo_command, register
    import argparse
    parser = argparse.ArgumentParser()
    args = register(parser.add_subparsers()).parse_args(["--quick", "--regime", "decay"])
    with pytest.raises(DemoConfigError, match="two different studies"):
        run_demo_command(args)


@pytest.mark.slow
def test_a_tiny_decay_study_starts_its_early_arm_from_the_peak_snapshot(tmp_path):
    config = DemoConfig.decay(pretrain_steps=80, entropy_every=10, warmup_steps=6, max_docs=800, vocab_size=768,
                              calibration_sequences=8, d_model=32, d_ff=64, n_layers=2, injection_rounds=3,
                              injection_every=8, lead_steps=5, tail_steps=16, window=4, lr=1e-2, weight_decay=3.0,
                              cache_dir=str(tmp_path))
    results = run_study(config, seeds=(0,), workers=1)
    seed = results["per_seed"][0]
    pre = seed["pretraining"]
    rule = pre["checkpoint_rule"]
    entropy = pre["entropy"]
    # the rule was taken from the curve before results.json rounded it to 7 digits: from the published curve come
    # the same steps and verdict, and differences of totals (the fall, the noise) equal to that rounding
    again = json_ready(entropy_peak(entropy["steps"], entropy["total"]))
    assert rule.keys() == again.keys()
    # each published total is off by at most half a unit of its 7th digit, so a difference of two totals (the
    # fall, the noise) by at most 1e-6 of the largest total: relative to a small difference that is not 1e-5
    rounding = 1e-6 * max(abs(total) for total in entropy["total"])
    for key, value in rule.items():
        if isinstance(value, float):
            assert value == pytest.approx(again[key], rel=1e-5, abs=rounding), key
        else:
            assert value == again[key], key
    assert pre["checkpoints"] == {"early": rule["peak_step"], "late": 80}
    # the early arm starts from the weights at the peak: its starting entropy is the pretraining's there, exactly
    at_peak = entropy["total"][entropy["steps"].index(rule["peak_step"])]
    assert seed["arms"]["early"]["entropy_start"]["total"] == at_peak
    assert seed["arms"]["late"]["entropy_start"]["total"] == entropy["total"][-1]
    assert seed["arms"]["early"]["checkpoint_step"] == rule["peak_step"]
    # the regime check reports the rule's verdict for the seed, whichever it is
    check = next(c for c in results["regime"] if c["id"] == "entropy_decayed_before_late")
    assert check["per_seed"] == [rule["decays"] is True]
    # "entropy decays" is judged from the chosen early checkpoint on
    decays = next(f for f in results["findings"] if f["id"] == "entropy_decays")
    assert decays["values"]["from_step"]["values"] == [rule["peak_step"]]


def test_the_decay_study_publishes_into_its_own_blocks_and_leaves_the_default_ones(tmp_path):
    default = json.loads((ROOT / published.COPY).read_text(encoding="utf-8"))
    decay = json.loads((ROOT / published.DECAY_COPY).read_text(encoding="utf-8"))
    assert (published.study_of(default), published.study_of(decay)) == ("default", "decay")
    (tmp_path / "docs").mkdir()
    for name in published.FILES:
        shutil.copyfile(ROOT / name, tmp_path / name)
    fresh = copy.deepcopy(decay)  # a rerun of the decay study where one seed's entropy did not decay
    check = next(c for c in fresh["regime"] if c["id"] == "entropy_decayed_before_late")
    check["per_seed"][1] = False
    check["held"] = sum(v is True for v in check["per_seed"])
    check["reproduces"] = False
    assert published.differences(fresh, tmp_path) == ["docs/findings.md: findings-table, readme-findings differ"]
    assert published.differences(default, tmp_path) == []  # the default's blocks do not see the decay ones
    path = tmp_path / "decay.json"
    path.write_text(json.dumps(fresh), encoding="utf-8")
    assert published.main([str(path), "--write", "--root", str(tmp_path)]) == 0
    text = (tmp_path / "docs" / "findings.md").read_text()
    assert "entropy_decayed_before_late 2 of 3" in text and "passed for 2 of 3 seeds; peak" in text
    assert published.differences(fresh, tmp_path) == [] and published.differences(default, tmp_path) == []
    assert json.loads((tmp_path / published.DECAY_COPY).read_text()) == fresh
    # a repository with no decay block fails the decay check instead of passing on nothing
    shutil.copyfile(ROOT / "README.md", tmp_path / "docs" / "findings.md")
    assert published.differences(fresh, tmp_path) == ["docs/findings.md: no published block"]


def test_the_published_decay_verdicts_agree_with_the_committed_decay_results():
    committed = json.loads((ROOT / published.DECAY_COPY).read_text(encoding="utf-8"))
    assert published.study_of(committed) == "decay"
    assert published.differences(committed, ROOT) == []
    # every seed's checkpoints are the rule's, applied to that seed's own curve
    for seed in committed["per_seed"]:
        entropy = seed["pretraining"]["entropy"]
        rule = entropy_peak(entropy["steps"], entropy["total"])
        assert seed["pretraining"]["checkpoints"] == {"early": rule["peak_step"], "late": rule["late_step"]}
        assert seed["pretraining"]["checkpoint_rule"]["decays"] == rule["decays"]
