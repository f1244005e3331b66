"""Edge cases of the decay regime's checkpoint rule (`kacq_study.pipeline.entropy_peak`) and of the findings it
feeds: how many measurements must follow the peak, a non-finite entropy, a peak at the last measurement (the early
checkpoint is then the late one), ties and uneven steps, and how often the rule and "entropy decays" call a curve
that never decays a decay (choosing the early checkpoint at the curve's maximum favours both)."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import re
from pathlib import Path

import pytest

from kacq_hooks.errors import KacqError
from kacq_study.config import DemoConfig, DemoConfigError
from kacq_study.findings import entropy_decayed_before_late, entropy_decays, late_acquires_less, late_forgets_more
from kacq_study.output import json_ready
from kacq_study.pipeline import entropy_peak, prepare

ROOT = Path(__file__).resolve().parents[1]


def _steps(totals):
    return [100 * i for i in range(len(totals))]


def test_two_measurements_after_the_peak_are_not_judged():
    # the rule's docstring and the regime check's criterion: decays needs at least three measurements after the peak
    totals = [22.0, 19.0, 19.5, 20.0, 20.5, 21.0, 21.5, 22.5, 21.0, 20.0]
    rule = entropy_peak(_steps(totals), totals)
    assert rule["peak_step"] == 700 and rule["measurements_after_peak"] == 2
    assert rule["decays"] is None
    assert entropy_decayed_before_late({"pretraining": {"checkpoint_rule": rule}})["holds"] is False
    # three after the peak are judged
    rule = entropy_peak(_steps(totals + [19.0]), totals + [19.0])
    assert rule["measurements_after_peak"] == 3 and rule["decays"] is not None


@pytest.mark.parametrize("where", [1, 2, 5, 9])
def test_a_non_finite_entropy_is_refused_not_chosen_or_skipped(where):
    # a NaN (a diverged model) at the early minimum would otherwise become the "peak" (nothing compares above NaN)
    totals = [22.0, 19.0, 19.5, 20.0, 20.5, 21.0, 21.5, 21.4, 21.3, 21.2, 21.1, 21.0]
    totals[where] = math.nan
    with pytest.raises(KacqError, match="not finite"):
        entropy_peak(_steps(totals), totals)
    totals[where] = math.inf
    with pytest.raises(KacqError, match="not finite"):
        entropy_peak(_steps(totals), totals)


def test_steps_and_totals_must_agree_and_steps_must_increase():
    with pytest.raises(KacqError):
        entropy_peak([0, 100, 200], [1.0, 2.0])
    with pytest.raises(KacqError, match="increas"):
        entropy_peak([0, 200, 100, 300], [22.0, 19.0, 20.0, 19.5])


def test_a_plateau_of_ties_takes_its_first_step_and_uneven_steps_are_read_as_measured():
    totals = [22.0, 19.0, 20.0, 21.0, 21.0, 21.0, 20.5, 20.0, 19.5]
    rule = entropy_peak(_steps(totals), totals)
    assert rule["peak_step"] == 300  # the first of the tied maxima: the earliest candidate for "at or before the peak"
    # a last measurement closer than the others (pretrain_steps not a multiple of entropy_every)
    steps = [0, 100, 200, 300, 400, 500, 600, 650]
    rule = entropy_peak(steps, [22.0, 19.0, 20.0, 21.0, 20.8, 20.6, 20.4, 20.3])
    assert rule["peak_step"] == 300 and rule["late_step"] == 650


def _results_where_early_is_late(acquisition, forgetting):
    kim = {"acquisition": acquisition, "forgetting": forgetting}
    return {"pretraining": {"checkpoints": {"early": 4000, "late": 4000}},
            "arms": {"early": {"kim": dict(kim)}, "late": {"kim": dict(kim)}}}


def test_early_against_late_is_not_checked_when_the_peak_is_the_last_step():
    # a seed whose entropy still climbs at the end: the peak rule's early checkpoint is the last step, the same
    # weights as the late one, and the two arms are the same training; "a later checkpoint acquires less / forgets
    # more" then compares a checkpoint with itself and must not come out "not held"
    results = _results_where_early_is_late(0.2, 0.05)
    assert late_acquires_less(results)["holds"] is None
    assert late_forgets_more(results)["holds"] is None
    # distinct checkpoints are still compared
    results["pretraining"]["checkpoints"]["early"] = 2400
    assert late_acquires_less(results)["holds"] is False and late_forgets_more(results)["holds"] is False


def _null_rates(curve, trials=400, n=41, sd=0.01):
    """How often the rule says "decays", "entropy decays" holds, and both, on curves that never decay."""
    decays = held = both = 0
    for t in range(trials):
        rng = random.Random(t)
        totals = [curve(i) + rng.gauss(0, sd) for i in range(n)]
        totals[0], totals[1] = 25.0, 20.0  # the untrained model and the early collapse
        steps = _steps(totals)
        rule = entropy_peak(steps, totals)
        results = {"pretraining": {"entropy": {"steps": steps, "total": totals, "per_layer": [[x] for x in totals]},
                                   "checkpoints": {"early": rule["peak_step"], "late": steps[-1]}}}
        decayed, holds = rule["decays"] is True, entropy_decays(results)["holds"] is True
        decays, held, both = decays + decayed, held + holds, both + (decayed and holds)
    return decays / trials, held / trials, both / trials


def test_the_rule_is_fooled_by_a_noisy_plateau_as_often_as_measured():
    """Pins what the rule does on curves with no decay at all (the measured false-positive rates that
    docs/findings.md states): a climb to a flat plateau with noise, and a slow steady climb. The early checkpoint
    is the maximum of ~40 noisy measurements, so the fall from it to a random last point often exceeds 3x the
    noise, and the curve after it starts at its highest rank."""
    plateau = _null_rates(lambda i: 21.0 + min(i, 10) * 0.07)
    climbing = _null_rates(lambda i: 21.0 + i * 0.001)
    assert 0.12 < plateau[0] < 0.32 and 0.07 < plateau[1] < 0.22
    assert 0.05 < climbing[0] < 0.18 and 0.12 < climbing[1] < 0.28
    # the decay run's shape (docs/findings.md quotes these): 41 measurements, a climb to step 2,400, then flat
    decays, held, both = _null_rates(lambda i: 21.3 + 0.02 * min(i, 24), trials=1000)
    assert 0.13 < decays < 0.21 and 0.18 < held < 0.27 and 0.07 < both < 0.13


@pytest.mark.xfail(strict=True, reason="the 3x-noise criterion, fixed before the decay run, ignores that the peak "
                   "is the maximum of many noisy measurements: on a flat noisy plateau it reports a decay for about "
                   "1 seed in 5, and 'entropy decays' holds on a steadily climbing curve for about 1 in 5; a "
                   "criterion corrected for the selection would change the published verdicts, which is not a "
                   "reviewer's call")
def test_a_curve_that_never_decays_is_called_a_decay_in_at_most_one_seed_in_twenty():
    for curve in (lambda i: 21.0 + min(i, 10) * 0.07, lambda i: 21.0 + i * 0.001):
        decays, held, _ = _null_rates(curve)
        assert decays <= 0.05 and held <= 0.05


FICTIONAL_KNOWLEDGE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fictional_knowledge" / \
    "fictional_knowledge.json"


@pytest.mark.skipif(not FICTIONAL_KNOWLEDGE.exists(), reason="the shared Fictional Knowledge data is not here")
def test_decay_regime_with_fictional_knowledge_facts_is_refused_with_a_number_that_fits(tmp_path):
    """`kacq demo --regime decay --facts fictional_knowledge.json`: the dataset's passages do not fit the decay
    regime's 12 rows of 128 tokens; the refusal comes before pretraining and gives the batch that does fit, and
    says how to set it (the CLI has no option for it)."""
    config = DemoConfig.decay(facts=str(FICTIONAL_KNOWLEDGE), max_docs=600, vocab_size=512, cache_dir=str(tmp_path))
    config.validate()
    with pytest.raises(DemoConfigError, match=r"from Python .* continue_batch_size=\d+") as refused:
        prepare(config, lambda *a: None)
    rows = int(re.search(r"continue_batch_size=(\d+)", str(refused.value)).group(1))
    assert rows > config.continue_batch_size
    prepare(dataclasses.replace(config, continue_batch_size=rows), lambda *a: None)  # that many rows fit every step


@pytest.mark.parametrize("k", [0.5, 2, 8])
def test_scaling_the_decay_regime_keeps_its_span_in_weight_decay_time_constants(k):
    base = DemoConfig.decay()
    scaled = base.scaled(k)
    span = scaled.pretrain_steps * scaled.lr * scaled.weight_decay
    assert span == pytest.approx(base.pretrain_steps * base.lr * base.weight_decay, rel=1e-3)
    assert scaled.arm_weight_decay == base.arm_weight_decay  # continued training is not clocked by it
    assert DemoConfig().scaled(k).weight_decay == DemoConfig().weight_decay  # the default study keeps its own


def test_a_seed_whose_peak_is_the_last_step_is_reported_as_such(tmp_path):
    """The decay study's results with seed 1 as a seed whose entropy still climbed at the end (the rule's peak at
    the last step, so early and late are one checkpoint): the study assembles and reports it; the regime check
    fails for that seed, and the early-against-late findings leave it unchecked instead of "not held"."""
    from kacq_study.report import write_report
    from kacq_study.study import assemble

    committed = json.loads((ROOT / "docs" / "demo_decay_results.json").read_text(encoding="utf-8"))
    per_seed = copy.deepcopy(committed["per_seed"])
    seed = per_seed[1]
    entropy = seed["pretraining"]["entropy"]
    entropy["total"][-1] = max(entropy["total"]) + 0.01  # still climbing at the end
    rule = json_ready(entropy_peak(entropy["steps"], entropy["total"]))
    assert rule["peak_step"] == rule["late_step"] and rule["decays"] is None
    seed["pretraining"]["checkpoint_rule"] = rule
    seed["pretraining"]["checkpoints"]["early"] = rule["peak_step"]
    # the two arms trained the same weights the same way: the same numbers
    seed["arms"]["early"]["kim"] = copy.deepcopy(seed["arms"]["late"]["kim"])
    for r in per_seed:
        r.pop("findings", None), r.pop("regime", None)
    results = assemble(committed["config"], committed["seeds"], per_seed)
    by_id = {f["id"]: f for f in results["findings"] + results["regime"]}
    assert by_id["entropy_decayed_before_late"]["per_seed"][1] is False
    assert by_id["late_acquires_less"]["per_seed"][1] is None
    assert by_id["late_forgets_more"]["per_seed"][1] is None
    assert by_id["entropy_decays"]["per_seed"][1] is None  # one measurement from the early checkpoint on
    write_report(results, tmp_path)
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "peak (early checkpoint) at step 4000" in report and "not judged" in report


def test_the_decay_report_says_which_weight_decay_continued_training_used():
    """The report's decay section read continue_weight_decay with the pretraining's as the fallback and still called
    it "the default's" and said that value "would shrink" the weights, which, kept, it did."""
    from kacq_study.report import _decay_regime_section

    committed = json.loads((ROOT / "docs" / "demo_decay_results.json").read_text(encoding="utf-8"))
    text = "\n".join(_decay_regime_section(committed, committed["config"]))
    assert "Continued training uses weight decay 0.01" in text and "would shrink every weight by 33%" in text
    config = dict(committed["config"])
    del config["continue_weight_decay"]  # DemoConfig.decay(continue_weight_decay=None): the pretraining's 1.0
    text = "\n".join(_decay_regime_section(committed, config))
    assert "keeps the pretraining's weight decay 1," in text and "would shrink" not in text
    assert "default's weight decay" not in text
    # the model's size is the run's, not a fixed phrase
    assert "a 4-layer model of width 64 trained for 4000 steps" in text


def test_the_decay_study_writes_to_its_own_folder_by_default(monkeypatch):
    """Both studies wrote to runs/demo by default, and a run removes the outputs of the previous one there: the
    hour-long decay study replaced the default study's results.json (or the other way round) when a user ran both
    to compare them, as the docs invite."""
    import argparse

    from kacq_study import cli

    class Reached(Exception):
        pass

    seen = []

    def check_out(out):
        seen.append(out)
        raise Reached

    monkeypatch.setattr(cli, "_check_out", check_out)
    parser = cli.register(argparse.ArgumentParser().add_subparsers())
    for argv, out in ((["--regime", "decay"], "runs/demo-decay"), ([], "runs/demo"), (["--quick"], "runs/demo"),
                      (["--regime", "decay", "--out", "elsewhere"], "elsewhere")):
        with pytest.raises(Reached):
            cli.run_demo_command(parser.parse_args(argv + ["--device", "cpu"]))
        assert seen[-1] == out


def test_too_few_measurements_for_the_peak_rule_says_what_the_cli_can_change():
    # `kacq demo --regime decay --pretrain-steps 700` was told to "lower entropy_every", which no option sets
    with pytest.raises(DemoConfigError, match=r"at least 8 entropy measurements.*--pretrain-steps\) to at least 800"):
        DemoConfig.decay(pretrain_steps=700).validate()
