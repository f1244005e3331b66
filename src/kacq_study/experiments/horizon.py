"""``forgetting-horizon``: the study's plain arm from the late checkpoint, for its three seeds, with a tail
after the last injection ten times the study's, so that retainability is fitted over two decades of steps.
The fits, their R^2 gating and the three Chang et al. findings on them are the study's own
(``findings.assess``, combined over seeds as the study does), on the full tail and on the study's short one.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import kacq_hooks as kh
from kacq_hooks import facts as kf
from kacq_hooks.report import pyplot, save_figure

from ..config import DemoConfig, DemoConfigError
from ..findings import KINDS, POWER_LAW_MIN_R2, SCENARIOS, assess, combine_findings, fit_ok, spread
from ..study import DEFAULT_SEEDS, run_variants
from .common import mean_or_none, spread_text
from .registry import Experiment, register

# The Chang et al. findings the forgetting-horizon experiment re-checks with the study's own criteria
FORGETTING_FINDINGS = ("power_law_forgetting", "duplication_forgets_faster", "duplication_more_effective")
TAIL_FACTOR = 10


def forgetting_horizon(seeds: Sequence[int] = DEFAULT_SEEDS, tail_factor: int = TAIL_FACTOR,
                       config: DemoConfig | None = None, workers: int | None = None) -> dict:
    """The study's plain arm from the late checkpoint (``config``, default ``DemoConfig()``) for every seed, with
    ``tail_factor`` times its steps after the last injection. Retainability is fitted per (scenario, kind) by
    the study's pipeline over the whole tail, and refitted over the first steps of the same curves that the
    config's own tail reaches; Chang et al.'s three forgetting findings are judged on both for each seed by
    ``findings.assess`` (criteria unchanged) and combined over seeds as the study combines them."""
    base = config or DemoConfig()
    base.validate()
    if not isinstance(tail_factor, int) or tail_factor < 1:  # the short refit cuts the long tail: it must be longer
        raise DemoConfigError(f"tail_factor={tail_factor!r}: give an integer >= 1")
    long_tail = tail_factor * base.tail_steps
    run = run_variants(base, {"late": ("late", {"tail_steps": long_tail})}, seeds, workers)
    per_seed = {seed: _horizon_seed(results, base.tail_steps, long_tail) for seed, results in run["per_seed"].items()}
    ordered = [per_seed[str(s)] for s in run["seeds"]]
    found = {which: {f["id"]: {k: f[k] for k in ("held", "checked", "seeds", "per_seed", "reproduces")}
                     for f in combine_findings([p["findings"][which] for p in ordered])}
             for which in ("long", "short")}
    scenarios = {}
    for scenario in SCENARIOS:
        rows = [p["scenarios"][scenario] for p in ordered if scenario in p["scenarios"]]
        if rows:
            scenarios[scenario] = {key: spread([r[key] for r in rows]) for key in rows[0]}
    return {"experiment": "forgetting-horizon", "seeds": run["seeds"], "pretrain_steps": base.pretrain_steps,
            "tail_steps": long_tail, "default_tail_steps": base.tail_steps,
            "records_per_scenario": base.facts_per_scenario,
            "continue_batch_size": base.continue_batch_size or base.batch_size,
            "continue_steps": dataclasses.replace(base, tail_steps=long_tail).continue_steps,
            "injection_steps": base.injection_steps(), "min_r_squared": POWER_LAW_MIN_R2,
            "per_seed": per_seed, "scenarios": scenarios, "findings": found, "timings": run["timings"]}


def _horizon_seed(results: dict, short_tail: int, long_tail: int) -> dict:
    """One seed of :func:`forgetting_horizon`: each group's curve, its gated fits over the long and the short
    tail, per-scenario means, and the three findings on each horizon (``findings.assess`` on the seed's arm
    with its curves cut to the short tail)."""
    arm = results["arms"]["late"]
    short_arm = json.loads(json.dumps(arm))
    groups = {}
    for key, group in arm["groups"].items():
        t, r = group["retainability"]["t"], group["retainability"]["R"]
        # the same t the config's own tail reaches for this group (a "once" record's last injection is its first)
        short = max(1, len(t) - (long_tail - short_tail))
        short_fit = _fit(t[:short], r[:short])
        short_arm["groups"][key]["retainability"] = {"t": t[:short], "R": r[:short], "probes": group["retainability"]["probes"],
                                                     "fit": short_fit}
        groups[key] = {"effectivity": group["effectivity"], "effectivity_first_token": group["effectivity_first_token"],
                       "probes": group["retainability"]["probes"], "t": t, "R": r,
                       "horizon_short": short, "fit_long": _gated(group["retainability"]["fit"]),
                       "fit_short": _gated(short_fit)}

    def verdicts(results_arm: dict) -> list[dict]:
        found = assess({"pretraining": results["pretraining"], "arms": {"late": results_arm}})
        return [f for f in found if f["id"] in FORGETTING_FINDINGS]

    scenarios = {}
    for scenario in SCENARIOS:
        keys = [f"{scenario}/{kind}" for kind in KINDS if f"{scenario}/{kind}" in groups]
        if not keys:
            continue
        fits = {which: [groups[k][f"fit_{which}"] for k in keys] for which in ("long", "short")}
        scenarios[scenario] = {
            "effectivity": mean_or_none([groups[k]["effectivity"] for k in keys]),
            # a mean decay only where every kind's fit is a power law (as the study's criterion compares them)
            **{f"decay_{which}": (mean_or_none([f["decay"] for f in fitted]) if all(f["power_law"] for f in fitted) else None)
               for which, fitted in fits.items()},
            "power_law_kinds_long": sum(f["power_law"] for f in fits["long"]),
            "power_law_kinds_short": sum(f["power_law"] for f in fits["short"]),
            "R_end": mean_or_none([groups[k]["R"][-1] for k in keys]),
            "horizon_long": max(len(groups[k]["t"]) for k in keys),
            "horizon_short": max(groups[k]["horizon_short"] for k in keys),
        }
    return {"groups": groups, "scenarios": scenarios, "learning": arm["learning"],
            "acquisition": arm["kim"]["acquisition"],
            "findings": {"long": verdicts(arm), "short": verdicts(short_arm)}}


def _fit(t: Sequence[int], r: Sequence[float | None]) -> dict:
    """The study's power-law fit of one retainability curve (``facts.fit_power_law``), NaN where it cannot fit."""
    points = [(a, b) for a, b in zip(t, r) if b is not None and math.isfinite(b)]
    try:
        fit = kf.fit_power_law([a for a, _ in points], [b for _, b in points])
    except kh.KacqError:
        return {"decay": None, "intercept": None, "r_squared": None, "points": len(points)}
    return {"decay": fit.decay, "intercept": fit.intercept, "r_squared": fit.r_squared, "points": len(points)}


def _gated(fit: dict) -> dict:
    """A fit as the study reads it: a decay constant only where R^2 passes the power-law criterion."""
    ok = fit_ok(fit)
    return {"r_squared": fit.get("r_squared"), "power_law": ok, "decay": fit["decay"] if ok else None,
            "intercept": fit["intercept"] if ok else None}


def plot_forgetting_horizon(result: dict, path: Path) -> Path:
    plt = pyplot()
    seeds = [result["per_seed"][str(s)] for s in result["seeds"]]
    scenarios = [s for s in SCENARIOS if s in result["scenarios"]]
    fig, axes = plt.subplots(1, len(scenarios) + 1, figsize=(4.2 * (len(scenarios) + 1), 3.8), constrained_layout=True)
    for ax, scenario in zip(axes, scenarios):
        for i, kind in enumerate(KINDS):
            key = f"{scenario}/{kind}"
            curves = [seed["groups"][key] for seed in seeds if key in seed["groups"]]
            if not curves:
                continue
            t = curves[0]["t"]
            for curve in curves:  # thin: one line per seed
                ax.plot(curve["t"], [math.nan if v is None else v for v in curve["R"]], color=f"C{i}", lw=0.6, alpha=0.4)
            mean = [mean_or_none([c["R"][j] for c in curves if j < len(c["R"])]) for j in range(len(t))]
            fits = [c["fit_long"] for c in curves]
            passed = [f for f in fits if f["power_law"]]
            label = f"{kind}: power law in {len(passed)} of {len(fits)} seeds"
            if passed:
                label += f", mean decay {mean_or_none([f['decay'] for f in passed]):.3f}"
            ax.plot(t, [math.nan if v is None else v for v in mean], color=f"C{i}", lw=2, label=label)
        short = max(s["scenarios"][scenario]["horizon_short"] for s in seeds if scenario in s["scenarios"])
        ax.axvline(short, color="grey", ls=":", lw=1, label=f"the study's horizon (t = {short})")
        ax.axhline(0, color="black", lw=0.5)
        ax.set(xscale="log", xlabel="steps t after the last injection's acquisition maximum",
               ylabel="retainability R(t)",
               title=f"{scenario} ({len(seeds)} seeds: thin per seed, thick mean)")
        ax.legend(fontsize=7)
    ax = axes[-1]
    width = 0.8 / len(scenarios)
    for j, scenario in enumerate(scenarios):
        values = [[seed["groups"].get(f"{scenario}/{kind}", {}).get("effectivity") for seed in seeds] for kind in KINDS]
        box = [spread(v) for v in values]
        mean = [math.nan if b["mean"] is None else b["mean"] for b in box]
        low = [m - b["min"] if b["min"] is not None else 0 for m, b in zip(mean, box)]
        high = [b["max"] - m if b["max"] is not None else 0 for m, b in zip(mean, box)]
        ax.bar([i + j * width for i in range(len(KINDS))], mean, width, yerr=[low, high], capsize=2, label=scenario)
    ax.set_xticks([i + width * (len(scenarios) - 1) / 2 for i in range(len(KINDS))], list(KINDS))
    ax.set(xlabel="probe kind", ylabel="effectivity E (nats/token)", title="effectivity per injection (bars: min-max over seeds)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)



def summary(result: dict) -> list[str]:
    lines = [f"{scenario}: effectivity {spread_text(r['effectivity'])}; power-law kinds over t <= {spread_text(r['horizon_long'])}: "
             f"{spread_text(r['power_law_kinds_long'])} of 3 (over t <= {spread_text(r['horizon_short'])}: "
             f"{spread_text(r['power_law_kinds_short'])}); mean decay {spread_text(r['decay_long'])} ({spread_text(r['decay_short'])}); "
             f"R at the end {spread_text(r['R_end'])}" for scenario, r in result.get("scenarios", {}).items()]
    for horizon, found in result.get("findings", {}).items():
        lines.append(f"{horizon} horizon: " + ", ".join(f"{key} held {f['held']} of {f['seeds']}"
                                                        for key, f in found.items()))
    return lines


register(Experiment("forgetting-horizon", forgetting_horizon, plot_forgetting_horizon, multi_seed=True,
                    summary=summary, about=__doc__))
