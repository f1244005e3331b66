"""The entropy-weight-decay experiment: its decay criterion on synthetic curves, its time-constant arithmetic, its
refusals, and one tiny real run through the registry's plot and summary."""
from __future__ import annotations

import json
import math

import pytest

from kacq_study.config import DemoConfigError
from kacq_study.experiments import EXPERIMENTS
from kacq_study.experiments.weight_decay import (NOISE_MULTIPLE, analyse_run, entropy_weight_decay,
                                                 olmo_time_constants, plot_entropy_weight_decay, summary,
                                                 time_constants)
from kacq_study.output import json_ready


def _run(totals, layer_shift=None):
    """A run dict as pretrain_run returns it, every 100 steps, with two layers: the first follows the total,
    the second is flat (plus ``layer_shift`` at the end)."""
    steps = [100 * i for i in range(len(totals))]
    per_layer = [[t / 2, 5.0 + (layer_shift if layer_shift and i == len(totals) - 1 else 0.0)]
                 for i, t in enumerate(totals)]
    return {"steps": steps, "total": totals, "per_layer": per_layer, "time_constants": [s * 3e-3 for s in steps],
            "held_out_loss": [5.0] * len(totals), "ffn_norm": [10.0 + min(i, 5) for i in range(len(totals))]}


def _wiggle(i):
    return 0.001 * (1 if i % 2 else -1)


def test_a_peak_then_a_fall_beyond_the_noise_decays_and_the_falling_layer_is_named():
    # collapse from 22 to 20 at step 100, climb to 21 at step 1000, then fall by 0.1 with +-0.001 noise
    totals = [22.0, 20.0] + [20.0 + 0.125 * k for k in range(1, 9)] + [21.0 - 0.01 * k + _wiggle(k) for k in range(1, 11)]
    result = analyse_run(_run(totals))
    assert result["early_minimum_step"] == 100 and result["peak_step"] == 900
    assert result["fall_after_peak"] == pytest.approx(totals[9] - totals[-1])
    assert result["decays"] is True
    assert [layer["falls"] for layer in result["layers"]] == [True, False]
    assert result["ffn_norm_change_last_quarter"] == 0.0  # the norm levelled off after five measurements


def test_a_curve_still_climbing_does_not_decay_and_noise_alone_is_no_decay():
    climbing = [22.0, 20.0] + [20.0 + 0.05 * k for k in range(1, 19)]
    assert analyse_run(_run(climbing))["decays"] is None  # the peak is the last point: nothing after it to judge
    # after the peak only noise: a last point below the peak by less than NOISE_MULTIPLE x noise is not a decay
    noisy = [22.0, 20.0] + [21.0] + [21.0 + (0.01 if k % 2 else -0.01) for k in range(1, 12)]
    result = analyse_run(_run(noisy))
    assert result["fall_after_peak"] < NOISE_MULTIPLE * result["noise"] and result["decays"] is False


def test_time_constants_sum_lr_times_weight_decay_and_olmo_spans_many():
    assert time_constants([1e-3, 1e-3, 5e-4], 0.5) == pytest.approx([5e-4, 1e-3, 1.25e-3])
    olmo = olmo_time_constants()
    assert olmo["steps_per_time_constant"] == pytest.approx(1 / (3e-4 * 0.1))
    # linear decay from 3e-4 to 3e-5 after a 5,000-step warmup over 700k steps: (2500*3e-4 + 695000*1.65e-4) * 0.1
    assert olmo["scheduled"] == pytest.approx((2500 * 3e-4 + 695_000 * 1.65e-4) * 0.1)
    assert olmo["scheduled"] < olmo["at_peak_lr"] == pytest.approx(21.0)


@pytest.mark.parametrize("decays", [(), (0.1, 0.1), (0.0,), (-1.0,)])
def test_bad_weight_decays_are_refused_before_any_work(decays):
    with pytest.raises(DemoConfigError, match="weight_decays"):
        entropy_weight_decay(seeds=[0], workers=1, weight_decays=decays, steps=2)


def test_a_tiny_run_is_registered_and_writes_its_figure_and_summary(tmp_path):
    assert "entropy-weight-decay" in EXPERIMENTS
    result = json_ready(entropy_weight_decay(seeds=[0], workers=1, weight_decays=(1.0,), steps=8, every=2,
                                             d_model=32, d_ff=64, n_layers=2, max_docs=300, vocab_size=768,
                                             calibration_sequences=4))
    json.dumps(result)  # JSON-ready
    (run,) = result["runs"]
    assert run["steps"] == [0, 2, 4, 6, 8] and len(run["per_layer"][0]) == 2
    assert run["time_constants"][-1] == pytest.approx(8 * 3e-3 * 1.0)  # 8 steps at the demo's lr (a 1-step warmup)
    assert all(math.isfinite(x) for x in run["held_out_loss"] + run["ffn_norm"] + run["total"])
    row = result["by_weight_decay"]["1.0"]
    assert row["steps_per_time_constant"] == pytest.approx(1 / 3e-3)
    assert plot_entropy_weight_decay(result, tmp_path / "decay.png").stat().st_size > 0
    lines = summary(result)
    assert lines[0].startswith("wd 1.0") and lines[-1].startswith("OLMo 7B")


def test_the_committed_run_agrees_with_todays_rule_and_the_findings_page():
    """docs/findings/entropy_weight_decay.json holds the measured curves; its verdicts must be what today's rule draws
    from them, and the findings page must quote them."""
    from pathlib import Path

    from kacq_study.experiments import weight_decay

    root = Path(__file__).parents[1]
    committed = json.loads((root / "docs" / "findings" / "entropy_weight_decay.json").read_text(encoding="utf-8"))
    again = weight_decay.reanalysed(committed)
    for wd, row in committed["by_weight_decay"].items():
        fresh = again["by_weight_decay"][wd]
        assert row["decays"] == fresh["decays"] and row["peak_step"] == fresh["peak_step"]
        assert row["layers_falling"] == fresh["layers_falling"]
    assert committed["by_weight_decay"]["1.0"]["decays"] == [True, True, True]
    page = (root / "docs" / "findings.md").read_text(encoding="utf-8")
    peaks = ", ".join(f"{s:,}" for s in committed["by_weight_decay"]["1.0"]["peak_step"])
    assert peaks in page  # the table's wd 1.0 peak steps
