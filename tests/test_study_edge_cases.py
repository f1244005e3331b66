"""kacq_study at its edges: bad CLI values exit 2 before slow work, scaled configs stay valid, worker errors
surface as KacqError, findings give no verdict where their claim's premise is absent, the report leaves missing
values out, CUDA determinism settings, and regime checks.

Each test names the promise it checks. Most are fast (synthetic results, CLI with run_study replaced by a
sentinel so no study runs); the one worker test runs a config that fails at once in a spawned worker.
"""
from __future__ import annotations

import copy
import dataclasses
import json

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
    "scale_nan": ["--scale", "nan"],
    "seed_and_seeds": ["--seed", "1", "--seeds", "0,1"],     # two answers to "which seeds"
    "negative_seed": ["--seeds=-1,"],
}
# The review listed "--scale 1.2" here (head_dim 19 / 29: RoPE fails later). With scaled() keeping d_model a
# multiple of 2 * n_heads (item 2) that value is valid, so it now reaches the study with an even head_dim:
# test_scale_1_2_reaches_the_study_with_an_even_head_dim.


@pytest.mark.parametrize("name", sorted(BAD_OPTIONS))
def test_bad_cli_values_exit_2_before_slow_work(name, no_study, tmp_path, capsys):
    argv = ["demo", "--quick", "--out", str(tmp_path / "out"), *BAD_OPTIONS[name]]
    try:
        rc = main(argv)
    except _SlowWorkStarted as started:
        pytest.fail(f"{BAD_OPTIONS[name]} was accepted and the study started ({started})")
    except SystemExit as usage:  # argparse's own usage errors (e.g. --seed with --seeds) exit 2 this way
        rc = usage.code
    assert rc == 2
    assert "Traceback" not in capsys.readouterr().err


def test_scale_1_2_reaches_the_study_with_an_even_head_dim(no_study, tmp_path):
    with pytest.raises(_SlowWorkStarted):
        main(["demo", "--quick", "--scale", "1.2", "--out", str(tmp_path / "out")])
    config = DemoConfig.quick().scaled(1.2)
    assert (config.d_model // config.n_heads) % 2 == 0


def test_seeds_reach_the_study_sorted(no_study, tmp_path):
    with pytest.raises(_SlowWorkStarted, match=r"seeds=\(0, 1\)"):
        main(["demo", "--quick", "--seeds", "1,0", "--out", str(tmp_path / "out")])


def test_run_study_rejects_duplicate_seeds_and_zero_workers():
    with pytest.raises(KacqError, match="once"):
        run_study(DemoConfig.quick(), seeds=(0, 0))
    with pytest.raises(KacqError, match="workers"):
        run_study(DemoConfig.quick(), seeds=(0,), workers=0)


def test_validate_rejects_an_odd_head_dim_and_an_unknown_device():
    with pytest.raises(DemoConfigError, match="even"):
        DemoConfig.quick(d_model=36, n_heads=4).validate()
    with pytest.raises(KacqError, match="gpu"):
        DemoConfig.quick(device="gpu").validate()


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
def test_a_non_kacq_worker_error_surfaces_as_kacq_error(tmp_path, monkeypatch):
    """A task error that is no KacqError and cannot be pickled (a custom __init__, as many library errors have)
    reaches the caller as a KacqError with its message and the task's name, so `kacq demo` exits 2 with it.

    (The review's version used d_model=36, n_heads=4, head_dim 9, which validate() now rejects (item 2), so the
    error is raised by a task function instead.)"""
    import study_faults
    from kacq_study import study

    # only seed 0's task fails: with both failing, whichever worker finished first was reported (flaky)
    monkeypatch.setattr(study, "pretrain_task", study_faults.raise_unpicklable_in_seed_0)
    config = DemoConfig.quick(arms=("late",), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(KacqError, match=r"seed 0 pretrain.*RoPE"):
        run_study(config, seeds=(0, 1), workers=2)


def test_a_non_kacq_error_in_process_surfaces_as_kacq_error(tmp_path, monkeypatch):
    import study_faults
    from kacq_study import study

    monkeypatch.setattr(study, "pretrain_task", study_faults.raise_value_error)
    with pytest.raises(KacqError, match=r"seed 0 pretrain.*ValueError: head_dim must be even"):
        run_study(DemoConfig.quick(arms=("late",)), seeds=(0,), workers=1)


@pytest.mark.slow
def test_a_dead_worker_surfaces_as_kacq_error(tmp_path, monkeypatch):
    import study_faults
    from kacq_study import study

    monkeypatch.setattr(study, "pretrain_task", study_faults.die)
    with pytest.raises(KacqError, match=r"seed \d pretrain.*ended abruptly"):
        run_study(DemoConfig.quick(arms=("late",)), seeds=(0, 1), workers=2)


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


def test_late_acquires_less_needs_acquisition():
    """Neither arm acquired anything (both A <= 0): the larger of two losses says nothing about the claim."""
    results = _synthetic_results()
    results["arms"]["early"]["kim"]["acquisition"] = -0.1
    results["arms"]["late"]["kim"]["acquisition"] = -0.3
    assert _verdicts(results)["late_acquires_less"]["holds"] is None
    results["arms"]["early"]["kim"]["acquisition"] = 0.1  # one arm acquired: a comparison again
    assert _verdicts(results)["late_acquires_less"]["holds"] is True


def test_duplication_forgets_faster_is_not_checked_without_forgetting():
    results = _synthetic_results()
    groups = copy.deepcopy(results["arms"]["late"]["groups"])
    results["arms"]["late"]["groups"] = groups
    for key, group in groups.items():
        if key.startswith("paraphrase"):
            group["retainability"]["fit"]["decay"] = -0.2  # one side does not forget
    assert _verdicts(results)["duplication_forgets_faster"]["holds"] is None


def test_last_layer_fall_is_held_when_it_fell_most():
    assert _verdicts(_synthetic_results())["last_layer_falls_most"]["holds"] is True


@pytest.mark.parametrize("bad", [None, float("nan")])
def test_assess_on_none_or_nan_inputs_says_not_checked(bad):
    """Each finding whose inputs hold a None or NaN is not checked (None), neither held nor not held."""
    results = _synthetic_results()
    results["pretraining"]["entropy"]["per_layer"][-1][0] = bad
    results["arms"]["early"]["kim"]["acquisition"] = bad
    results["arms"]["late+resuscitation"]["kim"]["retention"] = bad
    groups = copy.deepcopy(results["arms"]["late"]["groups"])
    results["arms"]["late"]["groups"] = groups
    groups["once/gen"]["effectivity"] = bad
    groups["paraphrase/mem"]["effectivity_positive_fraction"] = bad
    verdicts = _verdicts(results)
    for key in ("last_layer_falls_most", "late_acquires_less", "resuscitation_improves_retention",
                "mem_gen_hard_gen_order", "injection_raises_log_prob"):
        assert verdicts[key]["holds"] is None, key
    results["pretraining"]["entropy"]["total"][1] = bad
    assert _verdicts(results)["entropy_decays"]["holds"] is None
    results["arms"]["late"]["groups"]["duplication/mem"]["effectivity"] = bad
    assert _verdicts(results)["duplication_more_effective"]["holds"] is None


# ------------------------------------------------------------------------------------------------
# Report: a missing value is not drawn as a number


def test_plot_arms_leaves_a_missing_value_out(monkeypatch, tmp_path):
    """An arm whose retention is None for every seed (no gain to retain) had a zero-height bar: zero retention."""
    from matplotlib.patches import Rectangle

    from kacq_study import report

    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig) or path)
    results = _synthetic_results()
    results["arms"]["late"]["kim"]["retention"] = None
    report.plot_arms(results, tmp_path / "arms.png")
    axes = {ax.get_title(): ax for ax in figures[0].axes}
    retention = axes["retention"]
    bars = [p for p in retention.patches if isinstance(p, Rectangle)]
    assert len(bars) == len(results["arms"]) - 1
    labels = [t.get_text() for t in retention.get_xticklabels()]
    assert any("late" in label and "n/a" in label for label in labels)
    assert len([p for p in axes["acquisition A"].patches if isinstance(p, Rectangle)]) == len(results["arms"])


def test_fit_text_counts_failed_seeds_from_every_seed():
    """Decay None for every seed (combine gives None, not a spread) beside a 3-seed R^2 spread: zip stopped at
    one pair, so the text said "in 1 of 3 seeds" though no seed has a decay."""
    from kacq_study.findings import spread
    from kacq_study.report import fit_text, horizon_text

    r2 = spread([0.8, 0.9, 0.7])
    assert fit_text(r2, None) == "no power law in 3 of 3 seeds (R^2 = 0.8 (0.7 to 0.9))"
    assert fit_text(spread([0.8, 0.2, 0.7]), spread([0.3, 0.3, 0.3])).startswith("no power law in 1 of 3 seeds")
    assert fit_text(r2, spread([0.3, 0.3, 0.3])) == "0.3"
    assert horizon_text(spread([900.0, 900.0, 900.0]), spread([20, 20, 20]), r2, None) == "n/a"


# ------------------------------------------------------------------------------------------------
# results.json


def _two_seeds():
    from test_demo import _reportable

    first = copy.deepcopy(_reportable(_synthetic_results()))
    second = copy.deepcopy(first)
    first["config"]["seed"], second["config"]["seed"] = 0, 1
    return first, second


def test_summary_fit_means_only_over_seeds_whose_fit_passed():
    """A failed fit's decay is never printed or compared; its mean with the passing seeds' was in the summary."""
    from kacq_study.study import assemble

    first, second = _two_seeds()
    fit = second["arms"]["late"]["groups"]["once/mem"]["retainability"]["fit"]
    fit.update(r_squared=0.1, decay=5.0, intercept=9.0, x_intercept_steps=7.0)
    study = assemble(first["config"], [0, 1], [first, second])
    group = study["summary"]["arms"]["late"]["groups"]["once/mem"]
    assert group["decay"]["mean"] == 0.3 and group["decay"]["values"] == [0.3, None]
    assert group["intercept"]["mean"] == 0.9 and group["x_intercept_steps"]["mean"] == 1000.0
    assert group["r_squared"]["values"] == [0.8, 0.1]  # R^2 itself is kept: it says why
    assert group["seeds_with_fit"] == 1
    assert study["summary"]["arms"]["late"]["groups"]["once/gen"]["seeds_with_fit"] == 2


def test_results_config_claims_no_single_seed_and_no_machine_path():
    from kacq_study.study import assemble

    first, second = _two_seeds()
    config = DemoConfig.quick(seed=7, cache_dir="/home/someone/.cache/kacq")
    assert "cache_dir" not in config.to_dict()
    for per_seed in (first, second):
        per_seed["config"] = dataclasses.replace(config, seed=per_seed["config"]["seed"]).to_dict()
    study = assemble(config, [0, 1], [first, second])
    assert "seed" not in study["config"] and "cache_dir" not in study["config"] and study["seeds"] == [0, 1]
    assert [r["config"]["seed"] for r in study["per_seed"]] == [0, 1]
    assert "/home/someone" not in json.dumps(study)


def test_run_study_sorts_its_seeds(monkeypatch):
    from kacq_study import study

    monkeypatch.setattr(study, "pretrain_task", lambda config, workdir, progress=None:
                        {"seed": config.seed, "task_s": 0.0})
    monkeypatch.setattr(study, "arm_task", lambda config, arm, workdir, progress=None:
                        {"seed": config.seed, "arm": arm, "task_s": 0.0})
    monkeypatch.setattr(study, "_seed_results", lambda config, pretrained, arms: ({"seed": config.seed}, {}))
    monkeypatch.setattr(study, "assemble", lambda config, seeds, per_seed: {"seeds": list(seeds), "per_seed": per_seed})
    results = study.run_study(DemoConfig.quick(arms=("late",)), seeds=(1, 0), workers=1)
    assert results["seeds"] == [0, 1] and results["per_seed"] == [{"seed": 0}, {"seed": 1}]


# ------------------------------------------------------------------------------------------------
# CUDA determinism


def test_deterministic_sets_the_cublas_workspace_for_cuda(monkeypatch):
    from kacq_study.demo import deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with deterministic(1, "cpu"):
        assert "CUBLAS_WORKSPACE_CONFIG" not in __import__("os").environ
    with deterministic(1, "cuda:0"):
        assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own choice is kept
    with deterministic(1, "cuda"):
        assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


# ------------------------------------------------------------------------------------------------
# Regime checks are passed or failed, not reproduced


def test_regime_checks_say_passed_or_failed():
    from test_demo import _reportable

    from kacq_study.findings import regime
    from kacq_study.report import render_markdown

    results = _reportable(_synthetic_results())
    results["pretraining"]["loss"] = [9.0] * 80 + [3.0] * 20  # flat
    results["arms"]["late"]["learning"] = {"injected": {"rise": 0.1}, "control": {"rise": 0.0}}  # not learned
    results["regime"] = regime(results)
    text = render_markdown(results)
    section = text[text.index("## Regime checks"):text.index("## Knowledge entropy during pretraining")]
    assert "reproduced" not in section
    assert "pretraining ran until its loss curve flattened**: passed for 1 of 1 seed: passed" in section
    assert "learned in arm 'late'**: passed for 0 of 1 seed: failed" in section
    assert "(Kim et al. 2025): held for 1 of 1 seed: reproduced" in text  # the papers' findings keep their words
