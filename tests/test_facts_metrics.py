"""Acquisition and forgetting metrics on synthetic trajectories with answers known in closed form."""
from __future__ import annotations

import math

import pytest
import torch

from kacq_hooks import facts
from kacq_hooks.errors import ArgumentTypeError, MetricError
from kacq_hooks.facts.metrics import iqr_mask, mean_without_outliers


def test_exact_power_law_gives_back_decay_and_x_intercept():
    decay, intercept = 0.25, 0.75  # R reaches 0 at 10 ** (0.75 / 0.25) = 1000 steps
    t = torch.arange(0, 500)
    r = intercept - decay * torch.log10(t.double().clamp(min=1))
    r[0] = 1.0  # t = 0 is R's definition point and is left out of the fit
    fit = facts.fit_power_law(t, r, tokens_per_step=2048 * 16)
    assert abs(fit.decay - decay) < 1e-6
    assert abs(fit.intercept - intercept) < 1e-6
    assert abs(fit.x_intercept_steps - 1000.0) < 1e-6
    assert abs(fit.x_intercept_tokens - 1000.0 * 2048 * 16) < 1e-6 * 2048 * 16
    assert fit.r_squared == pytest.approx(1.0, abs=1e-12) and fit.n_points == 499


def test_power_law_from_a_trajectory_end_to_end():
    # One injection at step 10, window 1 (no momentum): the maximum is step 11, then R(t) = 0.9 - 0.3 log10 t.
    pre, peak = -6.0, -2.0
    values = [pre] * 11 + [peak] + [pre + (peak - pre) * (0.9 - 0.3 * math.log10(t)) for t in range(1, 300)]
    t, r = facts.retainability(range(len(values)), values, [10], window=1)
    assert r[0] == 1.0
    fit = facts.fit_power_law(t, r)
    assert abs(fit.decay - 0.3) < 1e-6 and abs(fit.x_intercept_steps - 10 ** 3) < 1e-6


HAND_VALUES = [-6.0, -6.0, -6.0, -4.0, -3.5, -4.5, -2.0, -1.5, -3.0, -3.5]  # steps 0..9, injections at 2 and 5


def test_hand_worked_effectivity_and_retainability():
    steps = list(range(10))
    lam = facts.local_acquisition_maximum(steps, HAND_VALUES, [2, 5], window=2)
    assert lam.tolist() == [4, 7]
    gains = facts.effectivity(steps, HAND_VALUES, [2, 5], window=2)
    assert gains.tolist() == pytest.approx([2.5, 3.0])  # -3.5 - (-6); -1.5 - (-4.5)
    t, r = facts.retainability(steps, HAND_VALUES, [2, 5], window=2)
    # t_pre = 2 (l = -6), t_LAM,n = 7 (l = -1.5): R = (l - (-6)) / 4.5
    assert t.tolist() == [0, 1, 2]
    assert r.tolist() == pytest.approx([1.0, 3.0 / 4.5, 2.5 / 4.5])
    # a wider window sees further: the maximum after step 2 within 4 steps is step 6
    assert facts.effectivity(steps, HAND_VALUES, [2], window=4).tolist() == pytest.approx([4.0])


def test_metrics_on_batches_of_probes_and_sparse_steps():
    steps = [0, 2, 3, 5, 8]
    values = torch.tensor([[-5.0, -4.0, -2.0, -3.0, -3.5], [-5.0, -1.0, -4.0, -4.5, -5.0]])
    gains = facts.effectivity(steps, values, [0], window=3)  # recorded steps 2 and 3 are in (0, 3]
    assert gains[:, 0].tolist() == pytest.approx([3.0, 4.0])
    t, r = facts.retainability(steps, values, [0], window=3)
    # probe 0 peaks at step 3 (den 3), probe 1 at step 2 (den 4); unrecorded steps give NaN
    assert r[0, 0] == 1.0 and r[0, 2] == pytest.approx(2.0 / 3.0) and r[0, 5] == pytest.approx(1.5 / 3.0)
    assert torch.isnan(r[0, 1]) and r[1, 1] == pytest.approx(1.0 / 4.0) and r[1, 3] == pytest.approx(0.5 / 4.0)


def test_metric_errors_say_what_is_missing():
    with pytest.raises(ValueError, match=r"no value at injection step\(s\) \[4\]"):
        facts.effectivity([0, 1, 2, 3, 5], [0.0] * 5, [4])
    with pytest.raises(ValueError, match="no recorded step in the window"):
        facts.effectivity([0, 1, 2], [0.0] * 3, [2])
    with pytest.raises(ValueError, match="strictly increasing"):
        facts.effectivity([0, 2, 1], [0.0] * 3, [0])
    with pytest.raises(ValueError, match="at least two distinct"):
        facts.fit_power_law([0, 1], [1.0, 0.9])


def test_iqr_filter_with_both_factors():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 9.0, float("nan")])
    # Q1 = 2, Q3 = 4, IQR = 2: factor 1.5 keeps [-1, 7], factor 2.0 keeps [-2, 8]; 9 is out either way
    assert iqr_mask(values).tolist() == [True, True, True, True, False, False]
    assert iqr_mask(torch.tensor([1.0, 2.0, 3.0, 4.0, 7.5])).tolist() == [True] * 4 + [False]
    assert iqr_mask(torch.tensor([1.0, 2.0, 3.0, 4.0, 7.5]), factor=2.0).tolist() == [True] * 5
    assert float(mean_without_outliers(values)) == pytest.approx(2.5)
    assert float(mean_without_outliers(values, factor=None)) == pytest.approx(19.0 / 5)


def test_kim_et_al_summary_metrics():
    k = facts.knowledge_score({"mem": torch.tensor([[-2.0, -4.0]]), "gen": torch.tensor([[-3.0, float("nan")]])})
    assert k == pytest.approx(-3.0)
    assert facts.acquisition(-4.0, -3.0) == pytest.approx(0.25)
    assert facts.forgetting(0.5, 0.25) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="K_before is 0"):
        facts.acquisition(0.0, -1.0)


def _record():
    probes = {f"{k}_{p}": ["a", "b"] for k in ("mem", "gen", "hard_gen") for p in ("input", "target")}
    return facts.FactRecord("A passage.", **probes)


def test_summary_from_a_store_and_its_schedule():
    fs = facts.FactSet([_record(), _record(), _record()], ["duplication", "once", "unused"])
    schedule = facts.InjectionSchedule(fs, interval=10, rounds=2)
    assert schedule.steps_of(0) == [0, 10] and schedule.steps_of(1) == [0] and schedule.steps_of(2) == []
    n_steps, decay = 60, 0.2

    def decayed(pre, peak, t):
        return pre + (peak - pre) * (1.0 - decay * math.log10(t))

    once = [-5.0, -3.0] + [decayed(-5.0, -3.0, t) for t in range(1, n_steps - 1)]
    dup = [-5.0, -3.0] + [decayed(-5.0, -3.0, t) for t in range(1, 10)]  # steps 0..10
    dup += [-2.0] + [decayed(-5.0, -2.0, t) for t in range(1, n_steps - 11)]
    probes = [facts.ProbeRef(r, "mem", i) for r in range(3) for i in range(2)]
    store = facts.TrajectoryStore(None, probes, fs.scenarios)
    for step in range(n_steps):
        row = torch.tensor([dup[step]] * 2 + [once[step]] * 2 + [-5.0] * 2)
        store.append(step, {"mean": row, "first": row, "sum": row})
    rows = {(r["scenario"], r["kind"]): r for r in facts.summarize_acquisition(store, schedule, window=1)}
    assert set(rows) == {("duplication", "mem"), ("once", "mem")}
    assert rows["once", "mem"]["effectivity"] == pytest.approx(2.0)
    second_gain = -2.0 - dup[10]
    assert rows["duplication", "mem"]["effectivity"] == pytest.approx((2.0 + second_gain) / 2)
    assert rows["duplication", "mem"]["effectivity_per_injection"] == pytest.approx([2.0, second_gain])
    assert rows["once", "mem"]["effectivity_positive_fraction"] == 1.0
    for key in rows:
        curve = rows[key]["retainability"]
        assert len(curve) == rows[key]["horizon"] + 1 and curve[0] == pytest.approx(1.0)  # R(0) = 1 by definition
        assert rows[key]["decay"] == pytest.approx(decay, abs=1e-5)
        assert rows[key]["x_intercept_steps"] == pytest.approx(10 ** (1 / decay), rel=1e-4)


def test_power_law_fit_with_a_tiny_positive_decay_does_not_overflow():
    t = torch.arange(1, 200).double()
    r = 0.9 - 1e-4 * torch.log10(t)  # R reaches 0 at 10 ** 9000 steps: far beyond a float
    fit = facts.fit_power_law(t, r, tokens_per_step=1024)
    assert fit.forgets
    assert fit.x_intercept_log10_steps == pytest.approx(9000.0, rel=1e-6)  # exact in log space
    assert fit.x_intercept_steps == math.inf and fit.x_intercept_tokens == math.inf  # beyond range: inf, said so
    assert fit.x_intercept_beyond_range


def test_power_law_fit_with_a_negative_decay_has_no_x_intercept():
    t = torch.arange(1, 100).double()
    fit = facts.fit_power_law(t, 0.2 + 0.1 * torch.log10(t), tokens_per_step=1024)  # retention grows
    assert fit.decay == pytest.approx(-0.1) and not fit.forgets
    assert math.isnan(fit.x_intercept_steps) and fit.x_intercept_tokens is None
    assert math.isnan(fit.x_intercept_log10_steps) and not fit.x_intercept_beyond_range
    flat = facts.fit_power_law(t, torch.full_like(t, 0.5))  # no decay at all: never reaches 0 either
    assert flat.decay == 0 and not flat.forgets and math.isnan(flat.x_intercept_steps)


def test_names_moved_in_0_2_are_only_in_their_modules():
    # the one-release aliases are gone (CHANGELOG 0.3.0): the helpers live in their own modules only
    for name in ("iqr_mask", "parse_record", "InjectionCollator"):
        assert not hasattr(facts, name)
    from kacq_hooks import training

    assert not hasattr(training, "format_text")
    assert "iqr_mask" not in facts.__all__ and "parse_record" not in facts.__all__
    with pytest.raises(AttributeError):
        facts.no_such_name  # noqa: B018


def test_summary_fits_over_the_range_every_probe_was_recorded():
    # max_per_step=1 injects record 0 at step 0 and record 1 at step 1: record 0's tail is one step longer
    fs = facts.FactSet([_record(), _record()], ["once", "once"])
    schedule = facts.InjectionSchedule(fs, interval=10, rounds=1, max_per_step=1)
    assert schedule.steps_of(0) == [0] and schedule.steps_of(1) == [1]
    n_steps, decay = 60, 0.2

    def curve(start):
        values = [-5.0] * (start + 1) + [-3.0]
        return values + [-5.0 + 2.0 * (1.0 - decay * math.log10(t)) for t in range(1, n_steps - start - 1)]

    first, second = curve(0), curve(1)
    first[-1] = 40.0  # a point only record 0 has: a shrinking tail would fit it alone
    probes = [facts.ProbeRef(r, "mem", i) for r in range(2) for i in range(2)]
    store = facts.TrajectoryStore(None, probes, fs.scenarios)
    for step in range(n_steps):
        row = torch.tensor([first[step]] * 2 + [second[step]] * 2)
        store.append(step, {"mean": row, "first": row, "sum": row})
    (row,) = facts.summarize_acquisition(store, schedule, window=1)
    assert row["horizon"] == n_steps - 3  # record 1: last step 59, its maximum at step 2
    assert row["decay"] == pytest.approx(decay, abs=1e-6) and row["r_squared"] == pytest.approx(1.0)
    (short,) = facts.summarize_acquisition(store, schedule, window=1, horizon=20)
    assert short["horizon"] == 20 and short["decay"] == pytest.approx(decay, abs=1e-6)
    with pytest.raises(MetricError, match="horizon 58 is beyond"):
        facts.summarize_acquisition(store, schedule, window=1, horizon=58)


def test_summary_fits_only_where_every_probe_of_one_record_was_recorded():
    # one record, two probes whose acquisition maxima after the (only) injection differ: probe 0 peaks one
    # step after it, probe 1 three steps after; window 3 finds both. The curve must stop where probe 1's does.
    fs = facts.FactSet([_record()], ["once"])
    schedule = facts.InjectionSchedule(fs, interval=10, rounds=1)
    n_steps, decay = 40, 0.2

    def curve(peak_at):
        values = [-5.0] * peak_at + [-3.0]
        return values + [-5.0 + 2.0 * (1.0 - decay * math.log10(t)) for t in range(1, n_steps - peak_at)]

    early, late = curve(1), curve(3)
    early[-1] = early[-2] = 40.0  # points only probe 0 has: a shrinking tail would average them alone
    probes = [facts.ProbeRef(0, "mem", i) for i in range(2)]
    store = facts.TrajectoryStore(None, probes, fs.scenarios)
    for step in range(n_steps):
        row = torch.tensor([early[step], late[step]])
        store.append(step, {"mean": row, "first": row, "sum": row})
    (row,) = facts.summarize_acquisition(store, schedule, window=3)
    assert row["horizon"] == n_steps - 1 - 3  # probe 1: last step 39, its maximum at step 3
    assert all(math.isfinite(v) for v in row["retainability"])
    assert row["decay"] == pytest.approx(decay, abs=1e-6) and row["r_squared"] == pytest.approx(1.0)


# One injection at step 0, window 2, steps 0..5. Probe "lost" falls after the injection; probe "gained" rises.
LOST = [-3.0, -4.0, -5.0, -6.0, -5.5, -7.0]
GAINED = [-6.0, -4.0, -5.0, -5.0, -5.5, -6.0]


def test_released_analysis_keeps_the_retainability_of_probes_that_gained_nothing():
    # Hand computation. "lost": the best step in (0, 2] is step 1 (-4 > -5), so t_LAM = 1 and the
    # denominator is l(1) - l(0) = -4 - (-3) = -1. R(t) = (l(1 + t) - (-3)) / -1 for t = 0..4:
    #   t=0: (-4 + 3) / -1 = 1.0   t=1: (-5 + 3) / -1 = 2.0   t=2: (-6 + 3) / -1 = 3.0
    #   t=3: (-5.5 + 3) / -1 = 2.5 t=4: (-7 + 3) / -1 = 4.0
    # "gained": t_LAM = 1, denominator -4 - (-6) = 2, R = (l(1 + t) + 6) / 2 = 1.0, 0.5, 0.5, 0.25, 0.0.
    values = torch.tensor([LOST, GAINED])
    t, released = facts.retainability(range(6), values, [0], window=2, gained_only=False)
    assert t.tolist() == [0, 1, 2, 3, 4]
    assert released[0].tolist() == pytest.approx([1.0, 2.0, 3.0, 2.5, 4.0])
    assert released[1].tolist() == pytest.approx([1.0, 0.5, 0.5, 0.25, 0.0])
    # the default (clean definition): a probe that gained nothing has no retainability at all
    _, clean = facts.retainability(range(6), values, [0], window=2)
    assert bool(torch.isnan(clean[0]).all()) and clean[1].tolist() == pytest.approx(released[1].tolist())
    # so the released mean curve averages both probes, (lost + gained) / 2 per t with no IQR filter:
    #   1.0, 1.25, 1.75, 1.375, 2.0; the clean one is the gained probe's alone
    assert mean_without_outliers(released, None).tolist() == pytest.approx([1.0, 1.25, 1.75, 1.375, 2.0])
    # a probe whose score did not move at all (denominator exactly 0) is NaN in both treatments
    _, flat = facts.retainability(range(6), [[-3.0] * 6], [0], window=2, gained_only=False)
    assert bool(torch.isnan(flat).all())


def test_summary_passes_the_released_treatment_through():
    fs = facts.FactSet([_record(), _record()], ["once", "unused"])
    schedule = facts.InjectionSchedule(fs, interval=10, rounds=1)
    probes = [facts.ProbeRef(0, "mem", 0), facts.ProbeRef(0, "mem", 1), facts.ProbeRef(1, "mem", 0),
              facts.ProbeRef(1, "mem", 1)]
    store = facts.TrajectoryStore(None, probes, fs.scenarios)
    for step in range(6):
        row = torch.tensor([LOST[step], GAINED[step], -5.0, -5.0])
        store.append(step, {"mean": row, "first": row, "sum": row})
    released = facts.summarize_acquisition(store, schedule, window=2, iqr_factor=None, gained_only=False)[0]
    clean = facts.summarize_acquisition(store, schedule, window=2, iqr_factor=None)[0]
    # the hand-computed means above, against the gained probe's curve alone
    assert released["retainability"] == pytest.approx([1.0, 1.25, 1.75, 1.375, 2.0])
    assert clean["retainability"] == pytest.approx([1.0, 0.5, 0.5, 0.25, 0.0])
    assert released["decay"] != pytest.approx(clean["decay"])


def test_gained_only_must_be_true_or_false():
    """None, 0 or a string would silently pick one treatment (None and 0 the released one)."""
    fs = facts.FactSet([_record()], ["once"])
    schedule = facts.InjectionSchedule(fs, interval=10, rounds=1)
    store = facts.TrajectoryStore(None, [facts.ProbeRef(0, "mem", 0)], fs.scenarios)
    for step in range(6):
        row = torch.tensor([GAINED[step]])
        store.append(step, {"mean": row, "first": row, "sum": row})
    for bad in (None, 0, "no"):
        with pytest.raises(ArgumentTypeError, match="gained_only"):
            facts.retainability(range(6), [LOST], [0], window=2, gained_only=bad)
        with pytest.raises(ArgumentTypeError, match="gained_only"):
            facts.summarize_acquisition(store, schedule, window=2, gained_only=bad)
