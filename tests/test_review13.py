"""Review 13 of kacq_study (hostile review): failing tests that pin down defects found by attack.

Each test names the promise it checks. Most are fast (synthetic results, CLI with run_study replaced by a
sentinel so no study runs); the one worker test runs a config that fails at once in a spawned worker.
"""
from __future__ import annotations

import copy

import pytest
import torch

from kacq_hooks.cli import main
from kacq_hooks.errors import KacqError
from kacq_study import cli as study_cli
from kacq_study.demo import DemoConfig, DemoConfigError, build_model
from kacq_study.findings import assess
from kacq_study.study import run_study
from test_demo import _synthetic_results


# ------------------------------------------------------------------------------------------------
# CLI: bad values give a clear error and exit code 2 before slow work


class _SlowWorkStarted(Exception):
    pass


@pytest.fixture
def no_study(monkeypatch):
    """run_study replaced by a sentinel: reaching it means the CLI accepted the values and started slow work."""
    def fake(config, seeds, workers=None, progress=None):
        raise _SlowWorkStarted(f"seeds={seeds} workers={workers} device={config.device} arms={config.arms}")
    monkeypatch.setattr(study_cli, "run_study", fake)


def _file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    return path


BAD_OPTIONS = {
    "duplicate_seeds": ["--seeds", "0,0"],                   # silently deduplicated to one seed today
    "workers_zero": ["--workers", "0"],                      # silently becomes 1
    "workers_negative": ["--workers", "-2"],                 # silently becomes 1
    "device_gpu_typo": ["--device", "gpu"],                  # fails only inside a worker, after data prep
    "duplicate_arms": ["--arms", "late,late"],               # runs the same arm twice per seed
    "scale_inf": ["--scale", "inf"],                         # OverflowError traceback
    "scale_odd_head_dim": ["--scale", "1.2"],                # head_dim 19 (quick) / 29 (default): RoPE fails later
}


@pytest.mark.parametrize("name", sorted(BAD_OPTIONS))
def test_bad_cli_values_exit_2_before_slow_work(name, no_study, tmp_path, capsys):
    argv = ["demo", "--quick", "--out", str(tmp_path / "out"), *BAD_OPTIONS[name]]
    try:
        rc = main(argv)
    except _SlowWorkStarted as started:
        pytest.fail(f"{BAD_OPTIONS[name]} was accepted and the study started ({started})")
    assert rc == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_exits_2_before_slow_work(no_study, tmp_path):
    try:
        rc = main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path / "out")])
    except _SlowWorkStarted:
        pytest.fail("--device cuda on a machine without CUDA started the study (it fails later, in a worker)")
    assert rc == 2


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_out_exits_2_before_slow_work(where, no_study, tmp_path):
    out = _file(tmp_path) / "sub" if where == "under_a_file" else "/proc/kacq_review13"
    try:
        rc = main(["demo", "--quick", "--out", str(out)])
    except _SlowWorkStarted:
        pytest.fail(f"--out {out} cannot be written, yet the whole study would run before write_results fails")
    assert rc == 2


def test_parse_seeds_rejects_duplicates():
    with pytest.raises(DemoConfigError):
        study_cli.parse_seeds("0,0")


def test_duplicate_arms_are_rejected_by_validate():
    with pytest.raises(DemoConfigError):
        DemoConfig.quick(arms=("late", "late")).validate()


# ------------------------------------------------------------------------------------------------
# DemoConfig.scaled(k): a valid config for any k > 0


@pytest.mark.parametrize("k", [1.2, 1.3])
@pytest.mark.parametrize("base", ["default", "quick"])
def test_scaled_config_builds_a_model_that_runs(base, k):
    """d_model is kept a multiple of n_heads, but RoPE needs an even head_dim: scaled(1.2) gives 116/4 = 29
    (default) and 76/4 = 19 (quick); validate() passes and the model fails at construction / first forward."""
    config = (DemoConfig() if base == "default" else DemoConfig.quick()).scaled(k)
    config.validate()
    model = build_model(config, 300, 0, 1)
    model(input_ids=torch.zeros(1, 4, dtype=torch.long))


def test_scaled_inf_is_a_config_error():
    with pytest.raises(DemoConfigError):
        DemoConfig.quick().scaled(float("inf"))


# ------------------------------------------------------------------------------------------------
# Errors in workers surface with their message as KacqError


@pytest.mark.slow
def test_a_non_kacq_worker_error_surfaces_as_kacq_error(tmp_path):
    """A config that validate() accepts but the model rejects (odd head_dim, as --scale 1.2 makes): the worker's
    transformers error reaches the caller as itself, so `kacq demo` prints a traceback and exits 1."""
    config = DemoConfig.quick(d_model=36, n_heads=4, pretrain_steps=12, early_step=4, injection_rounds=2,
                              injection_every=3, lead_steps=2, tail_steps=4, max_docs=200, window=2,
                              arms=("late",), cache_dir=str(tmp_path / "cache"))
    config.validate()
    with pytest.raises(KacqError, match="RoPE|head"):
        run_study(config, seeds=(0, 1), workers=2)


# ------------------------------------------------------------------------------------------------
# Findings: verdicts follow the claims (no verdict where the claim's premise is absent)


def _verdicts(results) -> dict:
    return {f["id"]: f for f in assess(results)}


def test_last_layer_falls_most_needs_a_fall():
    """Every layer's entropy rises from the early checkpoint on (drops -0.5 and -0.2): no layer fell, yet the
    finding "the last layer's entropy falls most" holds (the least negative drop is the last layer's)."""
    results = _synthetic_results()
    results["pretraining"]["entropy"]["per_layer"] = [[1.0, 1.0], [1.3, 1.1], [1.5, 1.2]]
    assert _verdicts(results)["last_layer_falls_most"]["holds"] is not True


def test_power_law_forgetting_counts_groups_without_a_fit():
    """One group of nine has a power-law fit; eight have none (R^2 None: too few points). The criterion says
    "decay > 0 in most groups", but unfitted groups are dropped from the denominator, so 1 of 1 is "most"."""
    results = _synthetic_results()
    groups = copy.deepcopy(results["arms"]["late"]["groups"])
    results["arms"]["late"]["groups"] = groups
    for i, group in enumerate(groups.values()):
        if i:
            group["retainability"]["fit"].update(decay=None, intercept=None, r_squared=None, x_intercept_steps=None)
    assert _verdicts(results)["power_law_forgetting"]["holds"] is not True


def test_duplication_forgets_faster_needs_forgetting():
    """Both scenarios' retainability rises (decay -0.1 for duplication, -0.9 for paraphrase, both fits R^2 0.8):
    nothing is forgotten, yet "duplication is forgotten faster" holds (-0.1 > -0.9). The tiny study's own
    paraphrase/mem and paraphrase/gen fits had R^2 > 0.8 with negative decays, so this happens in practice."""
    results = _synthetic_results()
    groups = copy.deepcopy(results["arms"]["late"]["groups"])
    results["arms"]["late"]["groups"] = groups
    for key, group in groups.items():
        group["retainability"]["fit"]["decay"] = (-0.1 if key.startswith("duplication")
                                                   else -0.9 if key.startswith("paraphrase") else 0.3)
    assert _verdicts(results)["duplication_forgets_faster"]["holds"] is not True


def test_assess_on_results_with_none_values_does_not_crash():
    """A results.json from a run that diverged holds None for NaN (entropy, positive fractions): assess (used by
    as_study / assemble when a seed has no findings list) must say "not checked", not raise TypeError."""
    results = _synthetic_results()
    results["pretraining"]["entropy"]["total"][-1] = None
    for group in results["arms"]["late"]["groups"].values():
        group["effectivity_positive_fraction"] = None
    verdicts = _verdicts(results)
    assert verdicts["entropy_decays"]["holds"] is None
    assert verdicts["injection_raises_log_prob"]["holds"] is None
