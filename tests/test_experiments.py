"""The dedicated experiments behind docs/findings.md (kacq_study.experiments), at a tiny size: the output
structure, and properties that tie each experiment's numbers to the study's own pipeline."""
from __future__ import annotations

import json
import math

import pytest

from kacq_study import experiments as ex
from kacq_study.demo import DemoConfig, _json_ready
from kacq_study.findings import KINDS, POWER_LAW_MIN_R2, SCENARIOS


def tiny(tmp_path, **overrides) -> DemoConfig:
    """A study far smaller than ``DemoConfig.quick``, with "row" injection as the default run has."""
    settings = dict(pretrain_steps=12, early_step=6, max_docs=300, injection="row", seq_len=128, batch_size=8,
                    continue_batch_size=6, injection_rounds=3, injection_every=4, tail_steps=3, window=3,
                    entropy_every=6, cache_dir=str(tmp_path / "cache"))
    return DemoConfig.quick(**{**settings, **overrides})


def test_forgetting_horizon_structure_and_short_refit(tmp_path):
    config = tiny(tmp_path, tail_steps=5)
    long = _json_ready(ex.forgetting_horizon(config=config, tail_factor=4))
    json.dumps(long, allow_nan=False)
    assert long["tail_steps"] == 4 * config.tail_steps and long["records_per_scenario"] == 2  # 6 rows / 3 scenarios
    assert set(long["groups"]) == {f"{s}/{k}" for s in SCENARIOS for k in KINDS}
    assert set(long["findings"]["long"]) == set(ex.FORGETTING_FINDINGS) == set(long["findings"]["short"])
    for group in long["groups"].values():
        assert group["probes"] == 2 * 5
        assert len(group["t"]) - group["horizon_short"] == long["tail_steps"] - config.tail_steps
        for fit in (group["fit_long"], group["fit_short"]):
            # a fit below the R^2 criterion is "no power law": no decay constant comes out of it
            passed = fit["r_squared"] is not None and fit["r_squared"] >= POWER_LAW_MIN_R2
            assert fit["power_law"] == passed and (fit["decay"] is None) == (not passed)
    # the refit over the short horizon covers the t the config's own tail reaches: the same run with tail_factor 1.
    # Its curves agree up to the last window - 1 points, where the short run's mean loses the probes whose last
    # acquisition maximum came later (they run out of recorded steps; the long run still has them).
    short = _json_ready(ex.forgetting_horizon(config=config, tail_factor=1))
    for key, group in long["groups"].items():
        theirs = short["groups"][key]["R"]
        assert len(theirs) == group["horizon_short"]
        agree = group["horizon_short"] - (config.window - 1)
        assert agree >= 1 and theirs[:agree] == group["R"][:agree]
        assert short["groups"][key]["effectivity"] == group["effectivity"]


def test_landing_structure_and_study_agreement(tmp_path):
    config = tiny(tmp_path)
    result = _json_ready(ex.landing(config=config, ks=(10, 50)))
    json.dumps(result, allow_nan=False)
    assert result["low_activity_slots"] == round(result["chance"] * result["slots"])
    assert abs(result["chance"] - config.resuscitation_ratio) < 0.05
    assert result["probes"] == {"injected": 3 * config.facts_per_scenario * 15, "control": config.control_facts * 15}
    for when in ("start", "end"):
        assert set(result[when]) == set(ex.MEASURES)
        for measure in result[when].values():
            for value in (measure["injected"], measure["control"], *measure["injected_by_k"].values()):
                assert 0.0 <= value <= 1.0
    for change in result["value_change"].values():
        assert set(change["by_k"]) == {"10", "50"} and math.isfinite(change["mean_low"])
    # the grad x act share recomputed here is the study's own landing number, at the arm's start and end
    assert result["start"]["grad_x_act/score"]["injected"] == pytest.approx(result["study_share"][0], abs=1e-6)
    assert result["end"]["grad_x_act/score"]["injected"] == pytest.approx(result["study_share"][-1], abs=1e-6)
