"""Acquisition and forgetting metrics on probe trajectories (Chang et al. 2024; Kim et al. 2025; Chang et al.'s retainability; Kim et al.'s K, A and F).

A trajectory is ``values[..., j] = l(q, θ_{steps[j]})``: the probe's target log prob under the model
before update ``steps[j]`` (after ``steps[j]`` updates). Leading dimensions are independent probes that
share the injection steps. Steps need not be contiguous, but the metrics read the model at the
injection steps, so those must be recorded.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kacq_hooks.errors import ArgumentTypeError, MetricError

ArrayLike = torch.Tensor | Sequence
_MAX_LOG10 = math.log10(sys.float_info.max)  # 10 ** this is the largest float


@dataclass(frozen=True)
class PowerLawFit:
    """``R(t) ~ intercept - decay * log10(t)``; the x-intercept is where the fitted R reaches 0.

    Only a curve that decays (``decay > 0``, see :attr:`forgets`) reaches 0. Otherwise the x-intercept
    fields are NaN (``x_intercept_tokens`` None): a number there would mean nothing. The crossing is
    computed in log space (``x_intercept_log10_steps = intercept / decay``), so a tiny decay cannot
    overflow; when ``10 ** x_intercept_log10_steps`` is beyond the float range ``x_intercept_steps``
    is ``inf`` and :attr:`x_intercept_beyond_range` is True.
    """

    decay: float
    intercept: float
    r_squared: float
    x_intercept_steps: float
    x_intercept_tokens: float | None = None
    n_points: int = 0
    x_intercept_log10_steps: float = math.nan

    @property
    def forgets(self) -> bool:
        """True when the fitted retention decreases with t, so that it has an x-intercept."""
        return self.decay > 0

    @property
    def x_intercept_beyond_range(self) -> bool:
        """True when the x-intercept exists but is too large for a float (``x_intercept_steps`` is inf)."""
        return self.forgets and math.isinf(self.x_intercept_steps)


def _as_float64(values: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def _step_index(steps: torch.Tensor) -> dict[int, int]:
    if steps.dim() != 1:
        raise MetricError(f"steps must be 1-D, got shape {tuple(steps.shape)}")
    if steps.numel() > 1 and not bool((steps[1:] > steps[:-1]).all()):
        raise MetricError("steps must be strictly increasing")
    return {int(s): j for j, s in enumerate(steps.tolist())}


def _prepare(steps: ArrayLike, values: ArrayLike, injection_steps: Sequence[int]):
    steps_t = torch.as_tensor(steps, dtype=torch.long)
    index = _step_index(steps_t)
    values_t = _as_float64(values)
    if values_t.shape[-1] != steps_t.numel():
        raise MetricError(f"values have {values_t.shape[-1]} steps in their last dimension, steps has {steps_t.numel()}")
    injections = [int(t) for t in injection_steps]
    if not injections:
        raise MetricError("no injection steps given")
    if any(b <= a for a, b in zip(injections, injections[1:])):
        raise MetricError(f"injection steps {injections} must be strictly increasing")
    missing = [t for t in injections if t not in index]
    if missing:
        raise MetricError(
            f"the trajectory has no value at injection step(s) {missing}; record the model before every injection"
        )
    return steps_t, index, values_t, injections


def local_acquisition_maximum(
    steps: ArrayLike, values: ArrayLike, injection_steps: Sequence[int], window: int = 50
) -> torch.Tensor:
    """t_LAM per injection: the step in ``(t_i, t_i + window]`` with the highest value. Long [..., n_injections].

    The recording must reach ``t_i + window`` (the steps in the window may be sparse): a window cut short by the
    end of the recording raises :class:`MetricError`, as its best step need not be the window's."""
    steps_t, index, values_t, injections = _prepare(steps, values, injection_steps)
    if window < 1:
        raise MetricError(f"window must be >= 1, got {window}")
    result = []
    for t in injections:
        in_window = ((steps_t > t) & (steps_t <= t + window)).nonzero().squeeze(1)
        if in_window.numel() == 0:
            raise MetricError(f"no recorded step in the window ({t}, {t + window}] after injection step {t}")
        if int(steps_t[-1]) < t + window:  # the maximum of the part recorded is not the window's
            raise MetricError(f"the recording ends at step {int(steps_t[-1])}, before the end of the window ({t}, "
                              f"{t + window}] after injection step {t}; record up to step {t + window} or lower window")
        best = values_t[..., in_window].argmax(dim=-1)
        result.append(steps_t[in_window][best])
    return torch.stack(result, dim=-1)


def effectivity(
    steps: ArrayLike, values: ArrayLike, injection_steps: Sequence[int], window: int = 50
) -> torch.Tensor:
    """E(q, i) = l(θ_{t_LAM(q,i)}) - l(θ_{t_i}) for each injection i: float64 [..., n_injections].

    ``window`` is t_w: 50 for AdamW with beta1 = 0.9, 1 for an optimizer without momentum.

    >>> effectivity([0, 1, 2, 3, 4, 5], [-5.0, -3.0, -2.0, -4.0, -4.5, -4.8], [0, 3], window=2).tolist()
    [3.0, -0.5]
    """
    steps_t, index, values_t, injections = _prepare(steps, values, injection_steps)
    lam = local_acquisition_maximum(steps_t, values_t, injections, window)
    before = torch.stack([values_t[..., index[t]] for t in injections], dim=-1)
    lam_columns = torch.tensor([index[int(s)] for s in lam.reshape(-1).tolist()]).reshape(lam.shape)
    at_lam = values_t.gather(-1, lam_columns)
    return at_lam - before


def _check_gained_only(gained_only) -> None:
    # None or 0 would silently pick the released treatment, a string the clean one
    if not isinstance(gained_only, bool):
        raise ArgumentTypeError(f"gained_only must be True (the clean definition) or False (the released analysis), "
                                f"not {gained_only!r}")


def retainability(
    steps: ArrayLike,
    values: ArrayLike,
    injection_steps: Sequence[int],
    window: int = 50,
    horizon: int | None = None,
    *,
    gained_only: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """R(q, t) after the last injection, for t = 0 .. horizon: returns (t [n_t], R float64 [..., n_t]).

    R(q, t) = [l(θ_{t_LAM,n + t}) - l(θ_{t_1})] / [l(θ_{t_LAM,n}) - l(θ_{t_1})], with t_LAM,n the local
    acquisition maximum after the last injection and t_1 the first injection. NaN where the step
    ``t_LAM,n + t`` was not recorded, and for a probe whose denominator is <= 0 (it gained nothing to retain). ``horizon`` defaults to the longest available.

    ``gained_only=False`` reproduces Chang et al.'s released analysis code instead: the ratio is kept for a
    probe whose denominator is negative (its score fell from t_1 to its acquisition maximum, so R is a ratio
    of two losses); only a zero denominator gives NaN. See the compatibility section of docs/science.md.

    >>> t, r = retainability([0, 1, 2, 3, 4], [-5.0, -3.0, -2.0, -4.0, -4.5], [0], window=2)
    >>> t.tolist(), r.tolist()
    ([0, 1, 2], [1.0, 0.3333333333333333, 0.16666666666666666])
    """
    _check_gained_only(gained_only)
    steps_t, index, values_t, injections = _prepare(steps, values, injection_steps)
    if int(steps_t[0]) < 0:
        raise MetricError(f"steps must be >= 0, got {int(steps_t[0])}")
    lam_last = local_acquisition_maximum(steps_t, values_t, injections[-1:], window)[..., 0]
    if horizon is None:
        horizon = int(steps_t[-1] - lam_last.min())
    offsets = torch.arange(horizon + 1)
    lookup = torch.full((int(steps_t[-1]) + 1,), -1, dtype=torch.long)
    lookup[steps_t] = torch.arange(steps_t.numel())
    wanted = lam_last[..., None] + offsets  # [..., n_t] steps
    columns = torch.where(wanted < lookup.numel(), lookup[wanted.clamp(max=lookup.numel() - 1)], -1)
    present = columns >= 0
    after = values_t.gather(-1, columns.clamp(min=0))
    at_lam = values_t.gather(-1, lookup[lam_last][..., None])
    before = values_t[..., index[injections[0]]][..., None]
    denominator = at_lam - before
    # a probe that gained nothing (denominator <= 0) has no gain to retain: a ratio of two losses would read as
    # retention. The released code kept that ratio; gained_only=False does too (a zero denominator stays NaN)
    defined = denominator > 0 if gained_only else denominator != 0
    ratio = (after - before) / denominator.where(defined, torch.nan)
    return offsets, ratio.where(present, torch.nan)


def iqr_mask(values: ArrayLike, factor: float = 1.5, dim: int = 0) -> torch.Tensor:
    """True where a value lies within [Q1 - factor*IQR, Q3 + factor*IQR] along ``dim`` (NaN: False).

    The paper uses factor 1.5; the released code 2.0.

    >>> iqr_mask([1.0, 2.0, 3.0, 4.0, 100.0]).tolist()
    [True, True, True, True, False]
    """
    values_t = _as_float64(values)
    q1 = torch.nanquantile(values_t, 0.25, dim=dim, keepdim=True)
    q3 = torch.nanquantile(values_t, 0.75, dim=dim, keepdim=True)
    spread = factor * (q3 - q1)
    return (values_t >= q1 - spread) & (values_t <= q3 + spread)


def mean_without_outliers(values: ArrayLike, factor: float | None = 1.5, dim: int = 0) -> torch.Tensor:
    """The mean along ``dim`` after the IQR filter (``factor=None``: no filter); NaNs are skipped."""
    values_t = _as_float64(values)
    keep = iqr_mask(values_t, factor, dim) if factor is not None else ~torch.isnan(values_t)
    total = torch.where(keep, values_t, 0.0).sum(dim)
    count = keep.sum(dim)
    return total / count.where(count > 0, torch.nan)


def fit_power_law(t: ArrayLike, r: ArrayLike, tokens_per_step: float | None = None) -> PowerLawFit:
    """Least-squares fit of ``r ~ intercept - decay * log10(t)`` over the points with t >= 1 and finite r.

    ``x_intercept_steps = 10 ** (intercept / decay)``: the step count at which the fitted retention
    reaches 0; times ``tokens_per_step`` (batch size x sequence length) for ``x_intercept_tokens``.
    See :class:`PowerLawFit` for curves that do not decay or cross 0 beyond the float range.

    >>> fit = fit_power_law([1, 10, 100], [0.9, 0.7, 0.5])
    >>> round(fit.decay, 6), round(fit.intercept, 6), round(fit.x_intercept_steps, 3)
    (0.2, 0.9, 31622.777)
    """
    t_all, r_all = _as_float64(t).reshape(-1), _as_float64(r).reshape(-1)
    if t_all.shape != r_all.shape:
        raise MetricError(f"t has {t_all.numel()} points and r {r_all.numel()}; give one r per t")
    usable = (t_all >= 1) & torch.isfinite(r_all)
    x, y = torch.log10(t_all[usable]), r_all[usable]
    if x.numel() < 2 or float(x.max() - x.min()) == 0:
        raise MetricError(f"a power-law fit needs at least two distinct t >= 1 with finite r; got {x.numel()} points")
    x_mean, y_mean = x.mean(), y.mean()
    slope = float(((x - x_mean) * (y - y_mean)).sum() / ((x - x_mean) ** 2).sum())
    intercept = float(y_mean - slope * x_mean)
    residual = float(((y - (intercept + slope * x)) ** 2).sum())
    total = float(((y - y_mean) ** 2).sum())
    r_squared = 1.0 - residual / total if total > 0 else 1.0
    decay = -slope
    if decay > 0:
        log10_steps = intercept / decay
        x_intercept = 10.0 ** log10_steps if log10_steps < _MAX_LOG10 else math.inf
        tokens = x_intercept * tokens_per_step if tokens_per_step is not None else None
        if tokens is not None and math.isfinite(x_intercept) and math.isinf(tokens):
            tokens = math.inf
    else:  # retention that does not fall has no crossing of 0
        log10_steps = x_intercept = math.nan
        tokens = None
    return PowerLawFit(decay, intercept, r_squared, x_intercept, tokens, int(x.numel()), log10_steps)


# Kim et al. 2025's summary metrics


def knowledge_score(scores: torch.Tensor | dict[str, torch.Tensor]) -> float:
    """K: the mean target log prob over all probes (NaN-aware); accepts a tensor or ``{kind: tensor}``."""
    flat = torch.cat([v.reshape(-1) for v in scores.values()]) if isinstance(scores, dict) else _as_float64(scores).reshape(-1)
    flat = flat[~torch.isnan(flat)]
    if flat.numel() == 0:
        raise MetricError("no finite probe scores to average")
    return float(flat.double().mean())


def acquisition(k_before: float, k_after: float) -> float:
    """A = (K_after - K_before) / |K_before|: relative gain of the mean target log prob.

    >>> acquisition(-4.0, -3.0)
    0.25
    """
    if k_before == 0:
        raise MetricError("K_before is 0, so the relative acquisition is undefined")
    return (k_after - k_before) / abs(k_before)


def forgetting(p_before: float, p_after: float) -> float:
    """F = (P_before - P_after) / P_before on a downstream accuracy P.

    >>> forgetting(0.5, 0.25)
    0.5
    """
    if p_before == 0:
        raise MetricError("P_before is 0, so the relative forgetting is undefined")
    return (p_before - p_after) / p_before


def summarize_acquisition(
    store,
    schedule,
    reduction: str = "mean",
    *,
    window: int = 50,
    iqr_factor: float | None = 1.5,
    tokens_per_step: float | None = None,
    horizon: int | None = None,
    gained_only: bool = True,
) -> list[dict]:
    """The paper's summary per (scenario, kind) from a trajectory store and its injection schedule.

    For each group: mean effectivity over probes and injections (IQR-filtered), the retainability
    curve averaged over probes per t (IQR-filtered per t) for t = 0 .. ``horizon``, and its power-law
    fit. ``horizon`` defaults to the longest t every probe of the group was recorded at, so each
    point of the fitted curve averages the same probes (a tail that fewer and fewer probes reach
    would weigh the last ones alone); a larger one raises :class:`~kacq_hooks.errors.MetricError`.
    Records whose injection steps differ (``max_per_step``) are aligned on their own steps.
    ``gained_only=False`` keeps the retainability of probes that gained nothing, as Chang et al.'s released
    analysis code does (see :func:`retainability`); pass ``iqr_factor=2.0`` as well for that code's filter.

    Returns one dict per group with keys scenario, kind, n_probes, effectivity, horizon, decay,
    intercept, r_squared, x_intercept_steps, x_intercept_tokens (fit values NaN where too few points;
    x-intercepts NaN where the curve does not decay, see :class:`PowerLawFit`).
    """
    _check_gained_only(gained_only)
    if horizon is not None and horizon < 0:
        raise MetricError(f"horizon must be >= 0 steps after the last acquisition maximum, got {horizon}")
    steps = torch.tensor(store.steps, dtype=torch.long)
    values = store.values(reduction).double()
    scenarios = store.scenarios or schedule.facts.scenarios
    if list(scenarios) != list(schedule.facts.scenarios):  # the store's groups would get other records' steps
        ours, theirs = list(scenarios), list(schedule.facts.scenarios)
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise MetricError(f"the store's {len(ours)} records and the schedule's {len(theirs)} facts differ in their "
                          f"scenarios (first at record {first}): build the schedule from the facts the store recorded")
    rows = []
    kinds = list(dict.fromkeys(p.kind for p in store.probes))
    for scenario in dict.fromkeys(scenarios):
        if scenario == "unused":
            continue
        for kind in kinds:
            gains, curves, reaches = [], [], []
            records = sorted({p.record for p in store.probes if p.kind == kind and scenarios[p.record] == scenario})
            for record in records:
                injections = schedule.steps_of(record)
                if not injections:
                    continue
                columns = store.columns(record=record, kind=kind)
                trajectories = values[:, columns].T  # [n_probes, n_steps]
                gains.append(effectivity(steps, trajectories, injections, window))  # [n_probes, rounds]
                curves.append(retainability(steps, trajectories, injections, window, gained_only=gained_only)[1])
                # probes of one record peak at different steps after the last injection: the latest one's
                # tail is the shortest, and the curve stops where it does
                lam_last = local_acquisition_maximum(steps, trajectories, injections[-1:], window)[..., 0]
                reaches.append(int(steps[-1] - lam_last.max()))
            if not gains:
                continue
            common = min(reaches)  # the last t every probe of the group reaches
            if horizon is not None and horizon > common:
                raise MetricError(f"{scenario}/{kind}: horizon {horizon} is beyond the {common} steps after the last "
                                  "acquisition maximum that every probe was recorded for; record longer or lower it")
            width = (common if horizon is None else horizon) + 1
            stacked = torch.cat([c[..., :width] for c in curves])
            mean_curve = mean_without_outliers(stacked, iqr_factor, dim=0)
            flat = torch.cat([g.reshape(-1) for g in gains])
            same_rounds = len({g.shape[-1] for g in gains}) == 1
            row = {
                "scenario": scenario,
                "kind": kind,
                "n_probes": int(stacked.shape[0]),
                "effectivity": float(mean_without_outliers(flat, iqr_factor, dim=0)),
                # per injection round (outliers removed per round), when every record had the same rounds
                "effectivity_per_injection": (mean_without_outliers(torch.cat(gains), iqr_factor, dim=0).tolist()
                                              if same_rounds else None),
                # over the measured effectivities: a NaN one (no finite score in its window) is not a loss
                "effectivity_positive_fraction": (float((flat[measured] > 0).double().mean())
                                                  if bool((measured := ~torch.isnan(flat)).any()) else math.nan),
                "horizon": width - 1,
                "retainability": mean_curve.tolist(),  # R at t = 0 .. horizon steps after the last maximum
            }
            try:
                fit = fit_power_law(torch.arange(width), mean_curve, tokens_per_step)
                row.update(decay=fit.decay, intercept=fit.intercept, r_squared=fit.r_squared,
                           x_intercept_steps=fit.x_intercept_steps, x_intercept_tokens=fit.x_intercept_tokens)
            except MetricError:  # too short a trajectory after the last injection to fit
                row.update(decay=math.nan, intercept=math.nan, r_squared=math.nan,
                           x_intercept_steps=math.nan, x_intercept_tokens=None)
            rows.append(row)
    return rows
