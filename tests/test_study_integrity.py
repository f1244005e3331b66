"""The integrity of kacq_study's numbers and outputs: metrics that are NaN or refused rather than wrong, config
and injection settings refused before slow work, summaries that never average over fewer values, and outputs
(results.json, the experiments' JSON, report.md, figures) never left half-written or stale (CLI values, worker
errors and findings' premises are in test_study_edge_cases.py).

Each test names the promise it checks. All are fast: synthetic trajectories and results dicts, the CLI and
the experiments with their slow parts replaced.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import pathlib

import pytest
import torch

from kacq_hooks import facts
from kacq_hooks.errors import KacqError, MetricError


def _record():
    probes = {f"{k}_{p}": ["a", "b"] for k in ("mem", "gen", "hard_gen") for p in ("input", "target")}
    return facts.FactRecord("A passage.", **probes)


def _store(rows: list[list[float]], scenarios=("once",), kind="mem") -> facts.TrajectoryStore:
    """A store of len(rows[0]) probes of record 0 (steps 0 .. len(rows) - 1)."""
    probes = [facts.ProbeRef(0, kind, i) for i in range(len(rows[0]))]
    store = facts.TrajectoryStore(None, probes, list(scenarios))
    for step, row in enumerate(rows):
        t = torch.tensor(row)
        store.append(step, {"mean": t, "first": t, "sum": t})
    return store


# ------------------------------------------------------------------------------------------------
# Metrics: a number reported is right, or it is NaN / refused


def test_positive_fraction_is_over_measured_effectivities_only():
    """effectivity_positive_fraction ("more than half of all effectivities are > 0") must not count a probe whose
    effectivity could not be measured (NaN score in its window) as a non-positive one: both measured probes
    below gained, one was unmeasured, and the fraction read 0.5, failing the finding's > 0.5 by a NaN."""
    fs = facts.FactSet([_record()], ["once"])
    schedule = facts.InjectionSchedule(fs, interval=10, rounds=1)
    rows = []
    for step in range(30):
        a = -5.0 if step == 0 else -3.0 - 0.01 * step
        b = -5.0 if step == 0 else -3.5 - 0.01 * step
        c = math.nan if step in (1, 2) else (-5.0 if step == 0 else -3.2 - 0.01 * step)
        rows.append([a, b, c])
    (row,) = facts.summarize_acquisition(_store(rows, fs.scenarios), schedule, window=3)
    assert row["effectivity_positive_fraction"] == pytest.approx(1.0)


def test_positive_fraction_of_no_measured_effectivity_is_nan():
    fs = facts.FactSet([_record()], ["once"])
    schedule = facts.InjectionSchedule(fs, interval=10, rounds=1)
    rows = [[-5.0 if step == 0 else (math.nan if step < 3 else -3.0)] for step in range(30)]
    (row,) = facts.summarize_acquisition(_store(rows, fs.scenarios), schedule, window=3)
    assert math.isnan(row["effectivity_positive_fraction"])


def test_retainability_is_undefined_for_a_probe_that_gained_nothing():
    """R(t) = (l(t_LAM + t) - l(t_pre)) / (l(t_LAM) - l(t_pre)) is the share of the gain still held: a probe whose
    log prob only fell (denominator < 0) has no gain to retain, yet its R read 1, 2, 3, 4 (retention "growing"
    to 400% while the fact was being forgotten), which then entered the group's mean curve and its fit."""
    t, r = facts.retainability([0, 1, 2, 3, 4], [-5.0, -6.0, -7.0, -8.0, -9.0], [0], window=1)
    assert torch.isnan(r).all(), r
    # a probe that did gain keeps its R
    t, r = facts.retainability([0, 1, 2, 3, 4], [[-5.0, -3.0, -4.0, -4.5, -5.0], [-5.0, -6.0, -7.0, -8.0, -9.0]],
                               [0], window=1)
    assert r[0].tolist() == pytest.approx([1.0, 0.5, 0.25, 0.0]) and torch.isnan(r[1]).all()


def test_effectivity_refuses_a_window_the_recording_cut_short():
    """The local acquisition maximum is the best step in (t_i, t_i + t_w]. When the recording stops before
    t_i + t_w, the maximum of the part that was recorded is not that: effectivity with t_w = 50 was computed from a
    single step after the injection, a plausible wrong number. It must be refused, saying what to do."""
    steps, values = list(range(6)), [-5.0, -5.0, -5.0, -5.0, -5.0, -4.0]
    with pytest.raises(MetricError, match="window"):
        facts.effectivity(steps, values, [4], window=50)
    with pytest.raises(MetricError, match="window"):
        facts.retainability(steps, values, [4], window=50)
    # a window the recording covers is fine, however sparse the steps in it
    assert facts.effectivity([0, 2, 5], [-5.0, -4.0, -4.5], [0], window=5).tolist() == pytest.approx([1.0])


# ------------------------------------------------------------------------------------------------
# The study's config: bad values refused before slow work


@pytest.mark.parametrize("overrides, match", [
    ({"window": 0}, "window"),
    ({"window": -1}, "window"),
    ({"window": 16, "tail_steps": 14}, "tail_steps"),   # the last window would run past the recording
    ({"tail_steps": -1}, "tail_steps"),
    ({"lead_steps": -1}, "lead_steps"),
])
def test_validate_refuses_windows_and_schedules_the_arm_cannot_measure(overrides, match):
    """These configs passed validate() and failed only at the end of the first arm, after pretraining (window 0
    and a window past the recording in summarize_acquisition, a negative lead in the injection schedule)."""
    from kacq_study.demo import DemoConfig, DemoConfigError

    with pytest.raises(DemoConfigError, match=match):
        DemoConfig(**overrides).validate()
    DemoConfig(window=15, tail_steps=14).validate()  # the last window ends on the last recorded step


# ------------------------------------------------------------------------------------------------
# The summary and report.md: no number the findings refuse


def test_per_kind_effectivity_is_not_a_mean_over_fewer_scenarios():
    """report.md's "mean effectivity per probe kind (mean over scenarios)" came from study.digest, whose mean
    skipped a scenario without a value: with paraphrase/gen unmeasured it printed the mean of the other two
    scenarios as the kind's, the number findings.per_kind refuses ("a mean over the others would not be like for
    like"). It must be n/a, as the finding's value is."""
    from kacq_study.findings import assess
    from kacq_study.study import digest
    from test_demo import _synthetic_results

    results = _synthetic_results()
    results["arms"]["late"]["groups"] = copy.deepcopy(results["arms"]["late"]["groups"])
    results["arms"]["late"]["groups"]["paraphrase/gen"]["effectivity"] = None
    for arm in results["arms"].values():
        arm.update(entropy_start={"total": 2.8})
    order = next(f for f in assess(results) if f["id"] == "mem_gen_hard_gen_order")
    assert order["values"]["effectivity"]["gen"] is None and order["holds"] is None
    row = digest(results)["arms"]["late"]
    assert row["effectivity"]["gen"] is None
    assert row["effectivity"]["mem"] == pytest.approx(0.9)  # the kinds with every scenario keep their mean


def test_experiments_means_are_not_over_fewer_kinds():
    """experiments.common.mean_or_none (a scenario's effectivity and R at the end, over kinds; a checkpoint's effectivity per
    kind, over scenarios) skipped a missing value and averaged the rest, as study.digest did."""
    from kacq_study.experiments.common import mean_or_none

    assert mean_or_none([0.2, None, 0.4]) is None and mean_or_none([0.2, math.nan]) is None
    assert mean_or_none([0.2, 0.4]) == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------------
# Outputs: nothing half-written


@pytest.fixture
def torn_writes(monkeypatch):
    """Every Path.write_text writes half of its text and is then interrupted (Ctrl-C, a full disk, a kill)."""
    def torn(self, data, *args, **kwargs):
        with open(self, "w", encoding="utf-8") as handle:
            handle.write(data[: len(data) // 2])
        raise KeyboardInterrupt("interrupted while writing")
    monkeypatch.setattr(pathlib.Path, "write_text", torn)


def _previous_run(out: pathlib.Path, *names: str) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    old = {name: json.dumps({"previous": name}) + "\n" for name in names}
    for name, text in old.items():
        with open(out / name, "w", encoding="utf-8") as handle:
            handle.write(text)
    return old


def _whole(out: pathlib.Path, old: dict[str, str]) -> None:
    for name, text in old.items():
        assert (out / name).read_text(encoding="utf-8") == text, f"{name} was left half-written"
    assert sorted(p.name for p in out.iterdir()) == sorted(old), "a partial file was left behind"


def test_an_interrupted_write_results_leaves_results_json_whole(tmp_path, torn_writes):
    """write_results wrote results.json in place: interrupted, a previous run's results.json was replaced by half
    of the new one (invalid JSON, and the previous numbers lost)."""
    from kacq_study.demo import write_results

    out = tmp_path / "run"
    old = _previous_run(out, "results.json", "timings.json")
    with pytest.raises(KeyboardInterrupt):
        write_results({"format": "x", "numbers": list(range(500)), "timings": {"wall_s": 1.0}}, out)
    _whole(out, old)


def test_an_interrupted_experiment_leaves_its_json_whole(tmp_path, torn_writes, monkeypatch):
    """python -m kacq_study.experiments wrote its JSON in place (the figure is written after it)."""
    from kacq_study import experiments as ex

    monkeypatch.setitem(ex.EXPERIMENTS, "landing", dataclasses.replace(
        ex.EXPERIMENTS["landing"], run=lambda seed, **kw: {"numbers": list(range(500))}, plot=lambda result, path: path))
    out = tmp_path / "findings"
    old = _previous_run(out, "landing.json")
    with pytest.raises(KeyboardInterrupt):
        ex.main(["landing", "--out", str(out)])
    _whole(out, old)


# ------------------------------------------------------------------------------------------------
# Injection: what does not fit is refused before pretraining, not after


class _PretrainingStarted(KacqError):
    """A KacqError, so run_study passes it on as it is."""


@pytest.fixture
def no_pretraining(monkeypatch):
    from kacq_study import study

    def fake(config, data, report, snapshot_at=()):
        raise _PretrainingStarted("the config was accepted and pretraining started")
    monkeypatch.setattr(study, "pretrain", fake)


def test_span_injection_that_needs_more_rows_than_a_batch_is_refused_before_pretraining(no_pretraining):
    """With injection="span" a passage takes ceil(tokens / seq_len) rows; the quick config's 3 first-round passages
    need 9 rows of 128 tokens. With 4 rows a step, inject_spanning raised only inside the first arm, after the
    whole pretraining had run (validate checks rows for "row" injection only, and cannot know passage lengths)."""
    from kacq_study.demo import DemoConfig, DemoConfigError
    from kacq_study.study import run_study

    with pytest.raises(DemoConfigError, match="rows"):
        run_study(DemoConfig.quick(continue_batch_size=4, arms=("late",)), seeds=(0,), workers=1)
    with pytest.raises(_PretrainingStarted):  # the quick config as it is fits
        run_study(DemoConfig.quick(arms=("late",)), seeds=(0,), workers=1)


@pytest.mark.xfail(strict=True, reason="design question: refusing cut passages changes the default study (seeds 2 "
                   "and 3 of DemoConfig() cut 1-3 tokens off a passage at seq_len 320) and the experiments' tiny "
                   "test configs (row injection at seq_len 128 cuts most of each passage); see the review report")
def test_row_injection_that_cuts_a_probed_fact_is_refused_before_pretraining(no_pretraining):
    """injection="row" cuts a passage to the sequence length, with a log warning inside the worker. When the cut
    part holds a memorization probe's target, that fact is never injected and its effectivity and retainability
    measure continued training alone, reported as acquisition: a plausible wrong number. The quick config with row
    injection (its seq_len 128, passages of up to 390 tokens) is such a case."""
    from kacq_study.demo import DemoConfig, DemoConfigError
    from kacq_study.study import run_study

    with pytest.raises(DemoConfigError, match="seq_len"):
        run_study(DemoConfig.quick(injection="row", continue_batch_size=None, arms=("late",)), seeds=(0,), workers=1)


def test_experiment_summary_lines_print_a_missing_number_as_n_a(tmp_path, monkeypatch, capsys):
    """main() formats its summary with :.3f: a None (an unmeasured group, a mean with a missing kind) raised
    TypeError after the JSON was written, so the command failed with a traceback instead of saying n/a."""
    from kacq_study import experiments as ex

    results = {"forgetting-horizon": {"experiment": "forgetting-horizon",
                                      "scenarios": {"once": {"effectivity": None, "power_law_kinds_long": 0,
                                                             "horizon_long": 3, "power_law_kinds_short": 0,
                                                             "horizon_short": 2, "decay_long": None,
                                                             "decay_short": None, "R_end": None}}},
               "acquisition-vs-entropy": {"experiment": "acquisition-vs-entropy",
                                          "checkpoints": [{"step": 1, "entropy": None, "acquisition": None,
                                                           "injected_rise": None, "effectivity": {},
                                                           "effectivity_first_token": {}}]}}
    for name, result in results.items():  # each experiment prints its own summary lines
        monkeypatch.setitem(ex.EXPERIMENTS, name, dataclasses.replace(
            ex.EXPERIMENTS[name], run=lambda result=result, **kw: result, plot=lambda r, path: path))
        assert ex.main([name, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "once: effectivity n/a" in out and "A n/a" in out


def test_arms_figure_has_labelled_axes(monkeypatch, tmp_path):
    """Figures have labelled axes: arms.png's three panels had a title and arm names as ticks, but no axis labels
    (what unit is "retention" on the y axis?)."""
    from kacq_study import report
    from test_demo import _synthetic_results

    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig) or path)
    report.plot_arms(_synthetic_results(), tmp_path / "arms.png")
    for ax in figures[0].axes:
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_experiment_steps_must_be_positive(steps, tmp_path, monkeypatch):
    """--steps 0 was dropped (`if args.steps`) and the experiment ran its default, many minutes, as if no value
    had been given; --steps -5 reached the experiment, which pretrained zero steps. Both must be refused at once."""
    from kacq_study import experiments as ex

    def started(seed, **kwargs):
        raise AssertionError(f"the experiment started with {kwargs}")
    monkeypatch.setitem(ex.EXPERIMENTS, "landing", dataclasses.replace(ex.EXPERIMENTS["landing"], run=started,
                                                                       plot=lambda r, path: path))
    with pytest.raises(SystemExit) as exit_info:
        ex.main(["landing", "--steps", steps, "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def _fake_study(monkeypatch, write_report):
    from kacq_study import cli as study_cli

    results = {"format": "kacq_hooks.demo", "version": 2, "findings": [], "numbers": list(range(100)),
               "timings": {"wall_s": 1.0, "workers": 1}}
    monkeypatch.setattr(study_cli, "run_study", lambda config, seeds, workers=None, progress=None: results)
    monkeypatch.setattr(study_cli, "write_report", write_report)


def test_an_interrupted_report_leaves_the_previous_run_whole(tmp_path, monkeypatch):
    """`kacq demo` wrote results.json, then report.md and the figures, into --out: interrupted in the report, the
    folder held this run's results.json beside the previous run's report.md (numbers that disagree with it)."""
    from kacq_hooks.cli import main

    out = tmp_path / "demo"
    old = _previous_run(out, "results.json", "timings.json", "report.md", "entropy.png", "attribution.png")

    def interrupted(results, folder):
        (pathlib.Path(folder) / "entropy.png").write_bytes(b"new figure")
        raise KeyboardInterrupt("interrupted while drawing")
    _fake_study(monkeypatch, interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["demo", "--quick", "--seeds", "0,", "--out", str(out)])
    _whole(out, old)


def test_a_new_run_leaves_no_figure_of_the_previous_run(tmp_path, monkeypatch):
    """A run whose arms record no landing writes no attribution.png: the previous run's stayed in --out beside the
    new report, a figure of other numbers."""
    from kacq_hooks.cli import main

    out = tmp_path / "demo"
    _previous_run(out, "results.json", "report.md", "entropy.png", "attribution.png")

    def report(results, folder):
        paths = [pathlib.Path(folder) / "report.md", pathlib.Path(folder) / "entropy.png"]
        for path in paths:
            path.write_bytes(b"new")
        return paths
    _fake_study(monkeypatch, report)
    assert main(["demo", "--quick", "--seeds", "0,", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["entropy.png", "report.md", "results.json", "timings.json"]
    assert (out / "report.md").read_bytes() == b"new" and json.loads((out / "results.json").read_text())["numbers"]


def test_summary_refuses_a_store_and_schedule_of_different_facts():
    """summarize_acquisition grouped records by the store's scenarios and read their injection steps from the
    schedule: a schedule of other facts (another order, another split) gave a group labelled 'once' the steps of a
    duplication record, and numbers under the wrong label, without a word."""
    fs = facts.FactSet([_record(), _record()], ["once", "duplication"])
    other = facts.FactSet([_record(), _record()], ["duplication", "once"])
    schedule = facts.InjectionSchedule(other, interval=5, rounds=2)
    probes = [facts.ProbeRef(r, "mem", 0) for r in range(2)]
    store = facts.TrajectoryStore(None, probes, fs.scenarios)
    for step in range(30):
        row = torch.tensor([-5.0 + 0.01 * step, -4.0 + 0.01 * step])
        store.append(step, {"mean": row, "first": row, "sum": row})
    with pytest.raises(MetricError, match="scenarios"):
        facts.summarize_acquisition(store, schedule, window=2)
    facts.summarize_acquisition(store, facts.InjectionSchedule(fs, interval=5, rounds=2), window=2)


def test_landing_paragraph_counts_every_seed():
    """report.md's landing paragraph judged the finding over the seeds that recorded an attribution only: with
    seed 1 missing it, the paragraph said "held for 1 of 1 seed: reproduced" while the findings list (every
    seed) said "held for 1 of 2 seeds: not reproduced"."""
    from kacq_study.findings import assess
    from kacq_study.report import _landing_section
    from kacq_study.study import assemble
    from test_demo import _reportable, _synthetic_results

    attribution = {"method": "grad_x_act", "k": 50, "slots": 512, "quantile": 0.5, "low_activity_slots": 256,
                   "first_injection": 5, "chance": 0.5, "steps": [0, 6, 30],
                   "share": {"mean": [0.4, 0.5, 0.7]}, "share_by_kind": {"mem": {"mean": [0.4, 0.5, 0.7]}}}
    seeds = []
    for seed in (0, 1):
        results = copy.deepcopy(_reportable(_synthetic_results()))
        results["config"]["seed"] = seed
        if seed == 0:
            results["arms"]["late"]["attribution"] = copy.deepcopy(attribution)
        results["findings"] = assess(results)
        seeds.append(results)
    study = assemble(seeds[0]["config"], [0, 1], seeds)
    listed = next(f for f in study["findings"] if f["id"] == "facts_land_in_low_activity_slots[late]")
    assert (listed["held"], listed["seeds"], listed["reproduces"]) == (1, 2, False)
    text = "\n".join(_landing_section(study))
    assert "held for 1 of 2 seeds" in text and "not reproduced" in text, text
    assert "0.7 [1 of 2 seeds] at the end" in text, text  # its numbers say they cover one seed of two
