"""Dedicated experiments behind ``docs/findings.md``: small studies of why a finding does or does not
reproduce at the demo's scale, each one command that writes a figure and a JSON of its numbers.

    python -m kacq_study.experiments entropy-widths --out docs/findings
    python -m kacq_study.experiments acquisition-vs-entropy --out docs/findings
    python -m kacq_study.experiments forgetting-horizon --out docs/findings
    python -m kacq_study.experiments landing --out docs/findings
    python -m kacq_study.experiments resuscitation-dose --out docs/findings
    python -m kacq_study.experiments probe-wording --out docs/findings

``entropy-widths``: knowledge entropy against pretraining step for three model widths, far past the
demo's pretraining, with the loss beside it. Kim et al. measured OLMo checkpoints long after the start
of training, where entropy falls; a model trained from scratch first passes through a transient (the
entropy drops within tens of steps, then climbs back as the model starts to use its slots), and the
question is whether, and when, the climb turns into the papers' decay.

``acquisition-vs-entropy``: the demo's pretraining with checkpoints at several steps, and the demo's
plain continued-training arm with fact injection from each. Kim et al.'s account is that acquisition
follows knowledge entropy (r = 0.94 over OLMo checkpoints), and that later checkpoints acquire less
*because* their entropy has decayed: where entropy still climbs, the account predicts the opposite order.

``forgetting-horizon``: the study's plain arm from the late checkpoint, for its three seeds, with a tail
after the last injection ten times the study's, so that retainability is fitted over two decades of steps.
The fits, their R^2 gating and the three Chang et al. findings on them are the study's own
(``findings.assess``, combined over seeds as the study does), on the full tail and on the study's short one.

``landing``: whether the injected facts avoid the low-activity slots, or only grad x act does. The share of
each probe's top-k slots that were low-activity at the checkpoint, at the arm's start and end, under grad
x act (which scales with |C|) and under the gradient alone (d logp / dC, which does not), for injected and
never-injected facts, and the slots whose FFN value vectors the injected facts changed most (against an
arm that injects corpus documents in the same rows instead).

``resuscitation-dose``: the study's late arm without resuscitation and with it at q = 1, 2 (the study's) and
4, for its three seeds from one pretraining each: whether resuscitation's effect on acquisition and
retention grows with the dose and stands out from the differences between seeds, and how far below their
layer's mean the resuscitated slots were (Kim et al. resuscitate a checkpoint whose entropy has decayed).

``probe-wording``: whether continued training teaches the injected facts or only their invented names. Each
target is scored at the plain arm's start and end after its own prompt, another fact's prompt of the same
kind, and a neutral prompt; if the targets rise as much after prompts that do not ask for them, probe kinds
cannot differ (Chang et al.'s memorization > semantic > compositional order needs fact-specific learning).

The multi-seed experiments take ``--seeds`` and ``--workers`` and run their tasks in parallel processes
(:func:`kacq_study.study.run_variants`), as the study does.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

import kacq_hooks as kh
from kacq_hooks.errors import KacqError
from kacq_hooks import facts as kf
from kacq_hooks.attribution import attribute
from kacq_hooks.report import pyplot, save_figure
from kacq_hooks.training.attribution import low_activity_mask

from .demo import (ATTRIBUTION_K, Arm, DemoConfig, _augmented_passage, _json_ready, _prepare, _pretrain, _run_arm,
                   corpus_texts, deterministic, write_text_atomic)
from .findings import KINDS, POWER_LAW_MIN_R2, SCENARIOS, _spearman, assess, combine_findings, fit_ok, spread
from .study import DEFAULT_SEEDS, _checked_seeds, run_variants

WIDTHS = (32, 64, 128)


def entropy_widths(widths: Sequence[int] = WIDTHS, steps: int = 1500, seq_len: int = 128, seed: int = 0,
                   every: int = 25) -> dict:
    """Pretrain the demo's model at each width (d_ff = 4 d_model, 4 layers, cosine schedule over ``steps``)
    and record total knowledge entropy on the calibration set every ``every`` steps, with the loss."""
    runs = {}
    for width in widths:
        config = DemoConfig(seed=seed, d_model=width, d_ff=4 * width, n_heads=4, seq_len=seq_len,
                            pretrain_steps=steps, early_step=steps // 2, entropy_every=every,
                            warmup_steps=max(10, steps // 40), max_docs=None, batch_size=8)
        started = time.perf_counter()
        with deterministic(config.threads, config.device):
            data = _prepare(config, lambda phase, info: None)
            pretraining, _ = _pretrain(config, data, lambda phase, info: None)
        entropy = pretraining["entropy"]
        totals, at = entropy["total"], entropy["steps"]
        low = min(range(len(totals)), key=totals.__getitem__)
        runs[str(width)] = {
            "d_model": width, "d_ff": 4 * width, "max_total": entropy["max_total"],
            "steps": at, "total": totals, "loss": pretraining["loss"],
            "minimum_step": at[low], "minimum": totals[low], "last": totals[-1],
            # the trend after the transient: negative would be the papers' decay
            "spearman_after_minimum": _spearman([float(s) for s in at[low:]], totals[low:]),
            "seconds": time.perf_counter() - started,
        }
    return {"experiment": "entropy-widths", "steps": steps, "seq_len": seq_len, "seed": seed, "runs": runs}


def plot_entropy_widths(result: dict, path: Path) -> Path:
    plt = pyplot()
    fig, (loss_ax, entropy_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, run in result["runs"].items():
        loss = run["loss"]
        window = max(1, len(loss) // 50)
        smooth = [sum(loss[i:i + window]) / len(loss[i:i + window]) for i in range(0, len(loss), window)]
        loss_ax.plot([1 + i for i in range(0, len(loss), window)], smooth, label=f"d_model {name}")
        gap = [run["max_total"] - h for h in run["total"]]
        entropy_ax.plot(run["steps"], gap, label=f"d_model {name} (max {run['max_total']:.1f} nats)")
        entropy_ax.axvline(run["minimum_step"], ls=":", lw=0.8, color=entropy_ax.lines[-1].get_color())
    loss_ax.set(xlabel="pretraining step", ylabel="training loss (nats/token)", title="loss")
    entropy_ax.set(xlabel="pretraining step", ylabel="max entropy - knowledge entropy H (nats)",
                   title="distance below the maximum L ln(d_ff) (dotted: entropy minimum)", yscale="log")
    loss_ax.legend(fontsize=8)
    entropy_ax.legend(fontsize=8)
    return save_figure(fig, path)


def acquisition_vs_entropy(steps: int | None = None, seed: int = 0, points: int = 5) -> dict:
    """Acquisition A and knowledge entropy H of ``points`` checkpoints spread over the demo's pretraining
    (the demo's default config; ``steps`` pretraining steps if given), each continued with the demo's plain
    AdamW arm and the same injected facts."""
    config = DemoConfig(seed=seed, **({"pretrain_steps": steps} if steps else {}))
    at = sorted({max(1, round(config.pretrain_steps * (i + 1) / points)) for i in range(points)})
    quiet = lambda phase, info: None  # noqa: E731
    with deterministic(config.threads, config.device):
        data = _prepare(config, quiet)
        pretraining, checkpoints = _pretrain(config, data, quiet, snapshot_at=at)
        rows = []
        for step in at:
            arm = _run_arm(Arm(f"step{step}", f"step{step}"), config, data, checkpoints, quiet)
            rows.append({"step": step, "entropy": arm["entropy_start"]["total"],
                         "acquisition": arm["kim"]["acquisition"], "K_before": arm["kim"]["K_before"],
                         "K_after": arm["kim"]["K_after"], "forgetting": arm["kim"]["forgetting"],
                         "injected_rise": arm["learning"]["injected"]["rise"],
                         # Chang et al.'s order of probe kinds, on the per-token mean and on the first token
                         **{key: {kind: _mean([g[key] for name, g in arm["groups"].items()
                                              if name.endswith("/" + kind)]) for kind in ("mem", "gen", "hard_gen")}
                            for key in ("effectivity", "effectivity_first_token")}})
    entropy = [r["entropy"] for r in rows]
    acquisition = [r["acquisition"] for r in rows]
    return {"experiment": "acquisition-vs-entropy", "seed": seed, "pretrain_steps": config.pretrain_steps,
            "checkpoints": rows, "pearson": _pearson(entropy, acquisition),
            "spearman_step_acquisition": _spearman([float(r["step"]) for r in rows], acquisition),
            "spearman_step_entropy": _spearman([float(r["step"]) for r in rows], entropy),
            "pretraining_entropy": {"steps": pretraining["entropy"]["steps"], "total": pretraining["entropy"]["total"]}}


def _mean(values: Sequence[float]) -> float | None:
    """The mean, None when a value is missing (None or NaN): a mean over the others would not be like for like."""
    kept = [v for v in values if v is not None and v == v]
    return sum(kept) / len(kept) if kept and len(kept) == len(values) else None


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    n = len(x)
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx = sum((a - mx) ** 2 for a in x) ** 0.5
    sy = sum((b - my) ** 2 for b in y) ** 0.5
    return sxy / (sx * sy) if sx and sy else None


def plot_acquisition_vs_entropy(result: dict, path: Path) -> Path:
    plt = pyplot()
    rows = result["checkpoints"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    pre = result["pretraining_entropy"]
    left.plot(pre["steps"], pre["total"], color="grey", lw=1, label="knowledge entropy H")
    left.scatter([r["step"] for r in rows], [r["entropy"] for r in rows], color="C0", zorder=3, label="checkpoints")
    left.set(xlabel="pretraining step", ylabel="knowledge entropy H (nats)", title="checkpoints on the entropy curve")
    twin = left.twinx()
    twin.plot([r["step"] for r in rows], [r["acquisition"] for r in rows], color="C1", marker="s", label="acquisition A")
    twin.set_ylabel("acquisition A")
    left.legend(fontsize=8, loc="lower right")
    twin.legend(fontsize=8, loc="upper left")
    right.scatter([r["entropy"] for r in rows], [r["acquisition"] for r in rows], color="C1")
    for r in rows:
        right.annotate(f"step {r['step']}", (r["entropy"], r["acquisition"]), fontsize=8)
    pearson = result["pearson"]
    right.set(xlabel="knowledge entropy H at the checkpoint (nats)", ylabel="acquisition A = (K_after - K_before)/|K_before|",
              title=f"acquisition against entropy (Pearson r = {pearson:.2f})" if pearson is not None else "")
    return save_figure(fig, path)


def _text(value) -> str:
    """A spread over seeds as "mean (min to max)"; a plain number as itself."""
    if isinstance(value, dict) and "mean" in value:
        if value["mean"] is None:
            return "n/a"
        return f"{value['mean']:.4g} ({value['min']:.4g} to {value['max']:.4g})"
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _quiet(phase: str, info: dict) -> None:
    return None


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
        raise KacqError(f"tail_factor={tail_factor!r}: give an integer >= 1")
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
            "effectivity": _mean([groups[k]["effectivity"] for k in keys]),
            # a mean decay only where every kind's fit is a power law (as the study's criterion compares them)
            **{f"decay_{which}": (_mean([f["decay"] for f in fitted]) if all(f["power_law"] for f in fitted) else None)
               for which, fitted in fits.items()},
            "power_law_kinds_long": sum(f["power_law"] for f in fits["long"]),
            "power_law_kinds_short": sum(f["power_law"] for f in fits["short"]),
            "R_end": _mean([groups[k]["R"][-1] for k in keys]),
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
            mean = [_mean([c["R"][j] for c in curves if j < len(c["R"])]) for j in range(len(t))]
            fits = [c["fit_long"] for c in curves]
            passed = [f for f in fits if f["power_law"]]
            label = f"{kind}: power law in {len(passed)} of {len(fits)} seeds"
            if passed:
                label += f", mean decay {_mean([f['decay'] for f in passed]):.3f}"
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


# Resuscitation's multiplier q (a selected slot's mean |C| becomes q times its layer's mean): the study's 2, and
# half and twice that, beside the arm without resuscitation
RESUSCITATION_FACTORS = (1.0, 2.0, 4.0)
RESUSCITATION_FINDINGS = ("resuscitation_improves_acquisition", "resuscitation_improves_retention")


def _against_plain(base: DemoConfig, variants: dict[str, tuple[str, dict]], study_arm: str,
                   finding_ids: Sequence[str], seeds: Sequence[int], workers: int | None) -> tuple:
    """Run ``variants`` (one of them "late", the plain arm) with :func:`run_variants`; per seed and variant, the
    :func:`_dose_row` numbers and their difference from the same seed's plain arm, and ``finding_ids`` judged by
    ``findings.assess`` with each variant in the place of the study's ``study_arm``, combined over seeds."""
    run = run_variants(base, variants, seeds, workers)
    per_seed, verdicts = {}, {label: [] for label in variants if label != "late"}
    for seed in run["seeds"]:
        results = run["per_seed"][str(seed)]
        plain = _dose_row(results["arms"]["late"])
        rows = {"late": plain}
        for label in verdicts:
            arm = results["arms"][label]
            row = _dose_row(arm)
            row["minus_plain"] = {k: (row[k] - plain[k]) if row[k] is not None and plain[k] is not None else None
                                  for k in ("acquisition", "retention", "forgetting", "injected_rise", "control_rise")}
            rows[label] = row
            found = assess({"pretraining": results["pretraining"],
                            "arms": {"late": results["arms"]["late"], study_arm: arm}})
            verdicts[label].append([f for f in found if f["id"] in finding_ids])
        per_seed[str(seed)] = rows
    ordered = [per_seed[str(s)] for s in run["seeds"]]
    summary = {label: {key: (spread([r[label][key] for r in ordered]) if key != "minus_plain" else
                             {k: spread([r[label][key][k] for r in ordered]) for k in ordered[0][label][key]})
                       for key in ordered[0][label] if key not in ("layers",)}
               for label in variants}
    found = {label: {f["id"]: {k: f[k] for k in ("held", "checked", "seeds", "per_seed", "reproduces")}
                     for f in combine_findings(v)} for label, v in verdicts.items()}
    return run, per_seed, summary, found


# SAM's neighbourhood radius rho: the study's 0.05, and a fifth and four times that, beside plain AdamW
SAM_RHOS = (0.01, 0.05, 0.2)


def sam_dose(seeds: Sequence[int] = DEFAULT_SEEDS, rhos: Sequence[float] = SAM_RHOS,
             config: DemoConfig | None = None, workers: int | None = None) -> dict:
    """The study's late arm with plain AdamW and with SAM at each radius rho in ``rhos``, every seed from its one
    pretraining (``config``, default ``DemoConfig()``): acquisition A, retention, forgetting F and the injected
    and never-injected facts' rise per seed and rho, each rho's difference from the same seed's plain arm, and
    Zhu et al.'s "SAM improves knowledge acquisition" judged per rho and seed by ``findings.assess`` (criterion
    unchanged), combined over seeds."""
    base = config or DemoConfig()
    base.validate()
    variants = {"late": ("late", {})}
    for rho in rhos:
        if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
            raise KacqError(f"rho {rho!r}: SAM's radius must be a finite number > 0")
        variants[f"rho={rho:g}"] = ("late+sam", {"sam_rho": float(rho)})
    if len(variants) != 1 + len(rhos):
        raise KacqError(f"rhos {list(rhos)}: give each radius once (labels rho=<rho:g> must differ)")
    run, per_seed, summary, found = _against_plain(base, variants, "late+sam", ("sam_improves_acquisition",),
                                                   seeds, workers)
    return {"experiment": "sam-dose", "seeds": run["seeds"], "rhos": [float(r) for r in rhos],
            "study_rho": base.sam_rho, "per_seed": per_seed, "summary": summary, "findings": found,
            "timings": run["timings"]}


def plot_sam_dose(result: dict, path: Path) -> Path:
    return _plot_against_plain(
        result, path, [f"rho={r:g}" for r in result["rhos"]], ["AdamW", *[f"SAM rho {r:g}" for r in result["rhos"]]],
        (("acquisition", "acquisition A"), ("retention", "retention (share of the peak gain kept)"),
         ("injected_rise", "injected facts' rise (nats/token)")),
        f"optimizer at the late checkpoint (study: rho = {result['study_rho']:g})")


def _plot_against_plain(result: dict, path: Path, labels: list[str], ticks: list[str],
                        panels: Sequence[tuple[str, str]], xlabel: str) -> Path:
    """One panel per (key, name) of an :func:`_against_plain` result: the plain arm and each variant in
    ``labels`` along x (``ticks`` their names), a thin line per seed and a thick mean."""
    plt = pyplot()
    labels = ["late", *labels]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.8), constrained_layout=True)
    for ax, (key, name) in zip(axes, panels):
        for i, seed in enumerate(result["seeds"]):  # thin: one line per seed
            rows = result["per_seed"][str(seed)]
            ax.plot(range(len(labels)), [math.nan if rows[l][key] is None else rows[l][key] for l in labels],
                    color="grey", lw=0.8, alpha=0.6, marker=".", label="per seed" if i == 0 else None)
        mean = [result["summary"][l][key]["mean"] for l in labels]
        ax.plot(range(len(labels)), [math.nan if m is None else m for m in mean], color="C0", lw=2.5, marker="o",
                label=f"mean of {len(result['seeds'])} seeds")
        ax.set_xticks(range(len(labels)), ticks)
        ax.set(xlabel=xlabel, ylabel=name, title=name)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def resuscitation_dose(seeds: Sequence[int] = DEFAULT_SEEDS, factors: Sequence[float] = RESUSCITATION_FACTORS,
                       config: DemoConfig | None = None, workers: int | None = None) -> dict:
    """The study's late arm without resuscitation and with it at each factor q in ``factors``, every seed from
    its one pretraining (``config``, default ``DemoConfig()``). Per seed and factor: acquisition A, retention,
    forgetting F, the injected facts' rise, the entropy the edit reaches, how far below their layer's mean the
    selected slots were (the edit's mean multiplier is q x mean / c̄), and each factor's difference from the
    plain arm of the same seed; the two Kim et al. resuscitation findings judged per factor and seed by
    ``findings.assess`` (criteria unchanged) and combined over seeds."""
    base = config or DemoConfig()
    base.validate()
    variants = {"late": ("late", {})}
    for q in factors:
        variants[f"q={q:g}"] = ("late+resuscitation", {"resuscitation_factor": float(q)})
    if len(variants) != 1 + len(factors):  # two factors under one label would run one arm and report both
        raise KacqError(f"factors {list(factors)}: give each factor once (labels q=<factor:g> must differ)")
    run, per_seed, summary, found = _against_plain(base, variants, "late+resuscitation", RESUSCITATION_FINDINGS,
                                                   seeds, workers)
    return {"experiment": "resuscitation-dose", "seeds": run["seeds"], "factors": [float(q) for q in factors],
            "ratio": base.resuscitation_ratio, "cap": base.resuscitation_cap, "study_factor": base.resuscitation_factor,
            "per_seed": per_seed, "summary": summary, "findings": found, "timings": run["timings"]}


def _dose_row(arm: dict) -> dict:
    kim, learning, edit = arm["kim"], arm["learning"], arm.get("edit")
    row = {"acquisition": kim["acquisition"], "retention": kim["retention"], "forgetting": kim["forgetting"],
           "K_before": kim["K_before"], "K_peak": kim["K_peak"], "K_after": kim["K_after"],
           "injected_rise": learning["injected"]["rise"], "control_rise": (learning.get("control") or {}).get("rise"),
           "entropy_start": arm["entropy_start"]["total"]}
    if edit:
        row["entropy_before_edit"] = edit["entropy_before"]["total"]
        row["mean_multiplier"] = _mean([layer["mean_multiplier"] for layer in edit["layers"]])
        row["capped"] = edit["capped"]
        row["layers"] = [{"layer": l["layer"], "mean_multiplier": l["mean_multiplier"], "max_multiplier": l["max_multiplier"],
                          "capped": l["capped"]} for l in edit["layers"]]
    return row


def plot_resuscitation_dose(result: dict, path: Path) -> Path:
    return _plot_against_plain(
        result, path, [f"q={q:g}" for q in result["factors"]], ["none", *[f"q = {q:g}" for q in result["factors"]]],
        (("acquisition", "acquisition A"), ("retention", "retention (share of the peak gain kept)"),
         ("forgetting", "forgetting F")),
        f"resuscitation factor at the late checkpoint (study: q = {result['study_factor']:g})")


def landing(steps: int | None = None, seed: int = 0, config: DemoConfig | None = None,
            ks: Sequence[int] = (10, 25, 50, 100, 200, 400)) -> dict:
    """Where the injected facts land, by measures that do and do not scale with |C|.

    From the late checkpoint of the demo's pretraining (``config``, default ``DemoConfig(seed=seed)``): the
    low-activity slots are the study's (c̄ on the calibration text at or below the resuscitation quantile). For
    every probe, its top-k slots under grad x act (the study's measure, sum of C dlogp/dC over the predicting
    positions) and under the gradient alone (sum of dlogp/dC, got from the library's grad x act with baselines
    0 and 1: (C - 0) g - (C - 1) g = g), each ranked by signed score and by |score|, at the arm's start and
    end (the demo's plain arm). Then a second arm injects corpus documents in the same rows and steps instead
    of the facts; the per-slot distance between the two arms' FFN value vectors (columns of the output
    projection) at the end is what the facts themselves changed in each slot."""
    config = config or DemoConfig(seed=seed, **({"pretrain_steps": steps} if steps else {}))
    config.validate()
    k = ATTRIBUTION_K
    started = time.perf_counter()
    with deterministic(config.threads, config.device):
        data = _prepare(config, _quiet)
        pretraining, checkpoints = _pretrain(config, data, _quiet)
        model = checkpoints["model"]
        model.load_state_dict(checkpoints["late"]["state"])
        low = torch.cat(low_activity_mask(data.calibration.mean_abs_coefficients(model), config.resuscitation_ratio))
        tracker = kf.FactTracker(model, data.tokenizer, data.facts, batch_size=64)
        schedule = config.schedule(data.facts)
        injected = torch.tensor([bool(schedule.steps_of(p.record)) for p in tracker.probes])
        start = _slot_shares(model, data.tokenizer, tracker, low, ks)
        values_start = _value_vectors(model)
        arm = _json_ready(_run_arm(Arm("late", "late"), config, data, checkpoints, _quiet))  # the study's landing too
        end = _slot_shares(model, data.tokenizer, tracker, low, ks)
        values_facts = _value_vectors(model)
        texts = corpus_texts(config.corpus, config.max_docs)
        n = len(data.facts)

        def documents(injection: kf.Injection, facts: kf.FactSet, cfg: DemoConfig) -> str:
            return texts[-1 - (injection.round * n + injection.record) % len(texts)]

        _run_arm(Arm("late+documents", "late", transform=documents), config, data, checkpoints, _quiet)
        values_documents = _value_vectors(model)
    chance = float(low.double().mean())
    kinds = {kind: torch.tensor([p.kind == kind for p in tracker.probes]) for kind in KINDS}

    def summary(shares: dict) -> dict:
        out = {}
        for measure, by_k in shares.items():
            main = by_k[k]
            out[measure] = {
                "injected": _nan_mean(main[injected]), "control": _nan_mean(main[~injected]),
                "injected_by_kind": {kind: _nan_mean(main[injected & m]) for kind, m in kinds.items()},
                "injected_above_chance": _nan_mean((main[injected] > chance).double()
                                                   .where(~main[injected].isnan(), math.nan)),
                "injected_by_k": {str(kk): _nan_mean(v[injected]) for kk, v in by_k.items()},
            }
        return out

    changes = {"facts_vs_documents": [torch.linalg.vector_norm(a - b, dim=0) for a, b in zip(values_facts, values_documents)],
               "over_the_arm": [torch.linalg.vector_norm(a - b, dim=0) for a, b in zip(values_facts, values_start)]}
    value_change = {}
    for name, per_layer in changes.items():
        flat = torch.cat(per_layer)
        order = flat.argsort(descending=True)
        value_change[name] = {"by_k": {str(kk): float(low[order[:kk]].double().mean()) for kk in ks},
                              "mean_low": float(flat[low].mean()), "mean_other": float(flat[~low].mean())}
    return {"experiment": "landing", "seed": config.seed, "pretrain_steps": config.pretrain_steps, "k": k,
            "ks": list(ks), "quantile": config.resuscitation_ratio, "slots": int(low.numel()),
            "low_activity_slots": int(low.sum()), "chance": chance,
            "probes": {"injected": int(injected.sum()), "control": int((~injected).sum())},
            "start": summary(start), "end": summary(end), "value_change": value_change,
            "study_share": arm["attribution"]["share"]["mean"], "study_steps": arm["attribution"]["steps"],
            "injected_rise": arm["learning"]["injected"]["rise"],
            "seconds": time.perf_counter() - started}


def _slot_shares(model, tokenizer, tracker: kf.FactTracker, low: torch.Tensor, ks: Sequence[int]) -> dict:
    """Per measure and k, the share of each probe's top-k slots that are low-activity (NaN for a probe
    without scores). Measures: grad x act and the gradient alone, each ranked by score and by |score|."""
    sites = kh.find_sites(model)
    act = attribute(model, tokenizer, tracker, "grad_x_act")
    shifted = attribute(model, tokenizer, tracker, "grad_x_act", baseline=[torch.ones(s.d_ff) for s in sites])
    gradient = dataclasses.replace(act, method="gradient", scores=[a - b for a, b in zip(act.scores, shifted.scores)])
    offsets = torch.tensor([0, *[s.d_ff for s in sites]]).cumsum(0)
    out = {}
    for name, result in (("grad_x_act", act), ("gradient", gradient)):
        for by in ("score", "abs"):
            by_k = {}
            for kk in ks:
                top = result.top_slots(kk, by)                                   # [probes, k, 2]
                flat = offsets[top[..., 0].clamp(min=0)] + top[..., 1].clamp(min=0)
                share = low[flat].double().mean(1)
                by_k[kk] = share.where(top[:, 0, 0] >= 0, math.nan)
            out[f"{name}/{by}"] = by_k
    return out


def _value_vectors(model) -> list[torch.Tensor]:
    """Per FFN site, the output projection's weight ``[d_model, d_ff]``: column i is slot i's value vector."""
    return [site.module.weight.detach().to("cpu", torch.float32, copy=True) for site in kh.find_sites(model)]


def _nan_mean(values: torch.Tensor) -> float | None:
    kept = values[~values.isnan()]
    return float(kept.mean()) if kept.numel() else None


MEASURES = {"grad_x_act/score": "grad x act (the study's)", "grad_x_act/abs": "|grad x act|",
            "gradient/score": "gradient dlogp/dC", "gradient/abs": "|gradient|"}


def plot_landing(result: dict, path: Path) -> Path:
    plt = pyplot()
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    measures = list(MEASURES)
    series = (("injected", "start", "injected facts, arm start"), ("injected", "end", "injected facts, arm end"),
              ("control", "end", "never-injected facts, arm end"))
    width = 0.8 / len(series)
    for j, (group, when, label) in enumerate(series):
        bars.bar([i + j * width for i in range(len(measures))],
                 [result[when][m][group] for m in measures], width, label=label)
    bars.axhline(result["chance"], color="black", ls="--", lw=1, label=f"chance ({result['chance']:.2f})")
    bars.set_xticks([i + width for i in range(len(measures))], [MEASURES[m] for m in measures], fontsize=8)
    bars.set(xlabel="slot measure", ylim=(0, 1),
             ylabel=f"share of top-{result['k']} slots that are low-activity",
             title="low-activity share of each probe's top slots")
    bars.legend(fontsize=7)
    ks = result["ks"]
    for i, m in enumerate(measures):
        curves.plot(ks, [result["end"][m]["injected_by_k"][str(kk)] for kk in ks], marker="o", color=f"C{i}",
                    label=f"{MEASURES[m]} (per probe)")
    names = {"facts_vs_documents": "value-vector change: facts vs documents arm",
             "over_the_arm": "value-vector change over the arm"}
    for j, (name, label) in enumerate(names.items()):
        curves.plot(ks, [result["value_change"][name]["by_k"][str(kk)] for kk in ks], marker="s", ls="--",
                    color=f"C{len(measures) + j}", label=label)
    curves.axhline(result["chance"], color="black", ls="--", lw=1, label="chance")
    curves.set(xscale="log", xlabel="k (top slots per probe, or overall for the value vectors)",
               ylabel="share of top-k slots that are low-activity", ylim=(0, 1), title="at the end of the arm")
    curves.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    return save_figure(fig, path)


# A prompt that names no fact: what the target's log probability is from the target alone
NEUTRAL_PROMPT = "The name is"
WORDINGS = ("own", "other fact", "neutral")


def probe_wording(seeds: Sequence[int] = DEFAULT_SEEDS, config: DemoConfig | None = None,
                  workers: int | None = None) -> dict:
    """Whether continued training teaches the injected facts or only their target names. From the late
    checkpoint of each seed's pretraining (``config``, default ``DemoConfig()``), every probe's target is scored
    at the plain arm's start and end after three prompts: its own, the same kind's probe of another record
    (the records rotated by one, injected with injected, never-injected with never-injected), and a neutral
    prompt that names no fact. The rise of the target's log probability over the arm (per-token mean and first
    target token), per wording, probe kind and group, per seed and as spreads over seeds."""
    base = config or DemoConfig()
    base.validate()
    seeds = list(_checked_seeds(seeds, workers))  # as run_variants refuses them: none, repeated, workers < 1
    configs = [dataclasses.replace(base, seed=s) for s in seeds]
    workers = max(1, min(len(configs), os.cpu_count() or 1) if workers is None else min(len(configs), int(workers)))
    if workers == 1:
        rows = [_wording_seed(c) for c in configs]
    else:
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(_wording_seed, configs))
    per_seed = {str(s): row for s, row in zip(seeds, rows)}
    summary = {wording: {group: {reduction: {kind: spread([r["rise"][wording][group][reduction][kind] for r in rows])
                                             for kind in KINDS}
                                 for reduction in ("mean", "first")}
                         for group in ("injected", "control")}
               for wording in WORDINGS}
    return {"experiment": "probe-wording", "seeds": seeds, "neutral_prompt": NEUTRAL_PROMPT,
            "continue_steps": base.continue_steps, "per_seed": per_seed, "summary": summary}


def _donors(facts: kf.FactSet) -> dict[int, int]:
    """Each record's donor of "other fact" prompts: the next record of its group (injected or never-injected),
    rotated by one. A record alone in its group has no other record and no donor."""
    injected = [i for i, s in enumerate(facts.scenarios) if s != "unused"]
    control = [i for i, s in enumerate(facts.scenarios) if s == "unused"]
    return {i: group[(j + 1) % len(group)] for group in (injected, control) if len(group) > 1
            for j, i in enumerate(group)}


def _wording_sets(facts: kf.FactSet) -> dict[str, kf.FactSet]:
    """The records with their own prompts, with another record's prompts, and with the neutral prompt (a record
    without a donor keeps its own prompts in "other fact"; :func:`_wording_seed` leaves its probes out there)."""
    donor = _donors(facts)

    def prompts(record: kf.FactRecord, source: kf.FactRecord | None) -> kf.FactRecord:
        changed = {}
        for kind in KINDS:
            mine = getattr(record, f"{kind}_input")
            theirs = getattr(source, f"{kind}_input") if source is not None else []
            changed[f"{kind}_input"] = [theirs[k % len(theirs)] if source is not None else NEUTRAL_PROMPT
                                        for k in range(len(mine))]
        return dataclasses.replace(record, **changed)

    records = list(facts)
    return {"own": facts,
            "other fact": kf.FactSet([prompts(r, records[donor.get(i, i)]) for i, r in enumerate(records)],
                                     facts.scenarios),
            "neutral": kf.FactSet([prompts(r, None) for r in records], facts.scenarios)}


def _wording_seed(config: DemoConfig) -> dict:
    with deterministic(config.threads, config.device):
        data = _prepare(config, _quiet)
        _, checkpoints = _pretrain(config, data, _quiet)
        model = checkpoints["model"]
        model.load_state_dict(checkpoints["late"]["state"])
        trackers = {name: kf.FactTracker(model, data.tokenizer, facts, batch_size=64)
                    for name, facts in _wording_sets(data.facts).items()}
        start = {name: tracker.score_probes() for name, tracker in trackers.items()}
        arm = _json_ready(_run_arm(Arm("late", "late"), config, data, checkpoints, _quiet))
        end = {name: tracker.score_probes() for name, tracker in trackers.items()}
    probes = trackers["own"].probes
    injected = torch.tensor([data.facts.scenarios[p.record] != "unused" for p in probes])
    donors = _donors(data.facts)
    has_donor = torch.tensor([p.record in donors for p in probes])  # "other fact" scores only these
    rise = {}
    for name in WORDINGS:
        rise[name] = {}
        for group, mask in (("injected", injected), ("control", ~injected)):
            if name == "other fact":
                mask = mask & has_donor
            rise[name][group] = {}
            for reduction in ("mean", "first"):
                delta = end[name][reduction] - start[name][reduction]
                rise[name][group][reduction] = {
                    kind: _nan_mean(delta[mask & torch.tensor([p.kind == kind for p in probes])].double())
                    for kind in KINDS}
    return {"seed": config.seed, "rise": rise, "study_injected_rise": arm["learning"]["injected"]["rise"],
            "effectivity": {kind: _mean([g["effectivity"] for key, g in arm["groups"].items() if key.endswith("/" + kind)])
                            for kind in KINDS}}


def plot_probe_wording(result: dict, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    for ax, reduction, name in zip(axes, ("mean", "first"), ("per-token mean", "first target token")):
        width = 0.8 / len(WORDINGS)
        for j, wording in enumerate(WORDINGS):
            boxes = [result["summary"][wording]["injected"][reduction][kind] for kind in KINDS]
            x = [i + j * width for i in range(len(KINDS))]
            ax.bar(x, [b["mean"] for b in boxes], width, label=f"injected facts, {wording} prompt", color=f"C{j}")
            for i, seed in enumerate(result["seeds"]):  # one dot per seed
                ax.scatter(x, [result["per_seed"][str(seed)]["rise"][wording]["injected"][reduction][k] for k in KINDS],
                           color="black", s=8, zorder=3, label="per seed" if (i == 0 and j == 0) else None)
        control = [result["summary"]["own"]["control"][reduction][kind]["mean"] for kind in KINDS]
        ax.plot([i + width for i in range(len(KINDS))], control, "k_", markersize=30, mew=2,
                label="never-injected facts, own prompt")
        ax.set_xticks([i + width for i in range(len(KINDS))], list(KINDS))
        ax.axhline(0, color="black", lw=0.5)
        ax.set(xlabel="probe kind", ylabel=f"rise of the target's log prob over the arm ({name}, nats)",
               title=f"{name}: mean of {len(result['seeds'])} seeds")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def augmentation_rows(seeds: Sequence[int] = DEFAULT_SEEDS, config: DemoConfig | None = None,
                      workers: int | None = None) -> dict:
    """Whether formatting augmentation still puts the facts into the rows. In row injection each passage + EOS
    starts a row and is cut to ``seq_len`` tokens; a layout adds markup around every sentence. For every seed
    and every scheduled injection of the study's facts, as the plain arm (``late``) and the augmentation arm
    (``late+augment``) inject it: the passage's length in tokens and the share of the record's probe targets
    whose tokens (as the probes score them) are inside the row, and the share that are anywhere in the uncut
    passage (a layout can change how a name tokenizes). No training, only the tokenizer and the schedule,
    so it runs in this process (``workers`` is accepted for the CLI and checked, not used)."""
    base = config or DemoConfig()
    base.validate()
    seeds = list(_checked_seeds(seeds, workers))
    per_seed = {}
    for seed in seeds:
        c = dataclasses.replace(base, seed=seed)
        with deterministic(c.threads, "cpu"):
            data = _prepare(dataclasses.replace(c, device="cpu"), _quiet)
        tokenizer = data.tokenizer
        targets = {}
        for index, record in enumerate(data.facts):
            targets[index] = [_target_ids(tokenizer, prompt, target) for kind in KINDS for prompt, target in record.probes(kind)]
        rows = {"plain": [], "augment": []}
        for injection in c.schedule(data.facts):
            for arm, text in (("plain", injection.text), ("augment", _augmented_passage(injection, data.facts, c))):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                row = ids[:c.seq_len]
                inside = [_contains(row, t) for t in targets[injection.record]]
                # a layout can also change a target's tokens (markup right before a name): not in the passage at all
                present = [_contains(ids, t) for t in targets[injection.record]]
                rows[arm].append({"round": injection.round, "record": injection.record, "tokens": len(ids),
                                  "cut": len(ids) > c.seq_len, "targets_inside": sum(inside) / len(inside),
                                  "targets_in_passage": sum(present) / len(present)})
        per_seed[str(seed)] = {arm: {"injections": len(r), "mean_tokens": _mean([x["tokens"] for x in r]),
                                     "share_cut": _mean([float(x["cut"]) for x in r]),
                                     "targets_inside": _mean([x["targets_inside"] for x in r]),
                                     "targets_in_passage": _mean([x["targets_in_passage"] for x in r]),
                                     "by_round": [_mean([x["targets_inside"] for x in r if x["round"] == k])
                                                  for k in range(c.injection_rounds)]}
                               for arm, r in rows.items()}
    summary = {arm: {key: spread([per_seed[str(s)][arm][key] for s in seeds])
                     for key in ("mean_tokens", "share_cut", "targets_inside", "targets_in_passage")}
               for arm in ("plain", "augment")}
    return {"experiment": "augmentation-rows", "seeds": seeds, "seq_len": base.seq_len,
            "augment_variants": base.augment_variants, "per_seed": per_seed, "summary": summary}


def _target_ids(tokenizer, prompt: str, target: str) -> list[int]:
    """A target's tokens as a probe scores them: the ids after the prompt's in the tokenized prompt + target."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + " " + target, add_special_tokens=False)["input_ids"]
    return full[len(prompt_ids):]


def _contains(sequence: list[int], part: list[int]) -> bool:
    n = len(part)
    return n > 0 and any(sequence[i:i + n] == part for i in range(len(sequence) - n + 1))


def plot_augmentation_rows(result: dict, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8), constrained_layout=True)
    for j, arm in enumerate(("plain", "augment")):
        for i, seed in enumerate(result["seeds"]):
            by_round = result["per_seed"][str(seed)][arm]["by_round"]
            ax.plot(range(len(by_round)), [math.nan if v is None else v for v in by_round], color=f"C{j}", lw=0.8,
                    alpha=0.5, label=f"{arm} arm: one thin line per seed" if i == 0 else None)
        mean = [_mean([result["per_seed"][str(s)][arm]["by_round"][k] for s in result["seeds"]])
                for k in range(len(result["per_seed"][str(result["seeds"][0])][arm]["by_round"]))]
        ax.plot(range(len(mean)), [math.nan if v is None else v for v in mean], color=f"C{j}", lw=2.5,
                label=f"{arm} arm: mean of {len(result['seeds'])} seeds")
    ax.set(xlabel="injection round", ylim=(0, 1.05),
           ylabel=f"share of the record's probe targets\ninside its {result['seq_len']}-token row",
           title="facts that reach the row, plain passages against formatted layouts")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


EXPERIMENTS = {"entropy-widths": (entropy_widths, plot_entropy_widths),
               "acquisition-vs-entropy": (acquisition_vs_entropy, plot_acquisition_vs_entropy),
               "forgetting-horizon": (forgetting_horizon, plot_forgetting_horizon),
               "landing": (landing, plot_landing),
               "resuscitation-dose": (resuscitation_dose, plot_resuscitation_dose),
               "probe-wording": (probe_wording, plot_probe_wording),
               "augmentation-rows": (augmentation_rows, plot_augmentation_rows),
               "sam-dose": (sam_dose, plot_sam_dose)}

# the experiments over several seeds (run in parallel processes, as the study runs); the others use one
MULTI_SEED = {"forgetting-horizon", "resuscitation-dose", "probe-wording", "augmentation-rows", "sam-dose"}


def _f(value, spec: str) -> str:
    """A number for the summary lines, "n/a" for a missing one (None or NaN)."""
    return format(value, spec) if isinstance(value, (int, float)) and value == value else "n/a"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kacq_study.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--out", default="docs/findings", help="folder for the figure and the JSON")
    parser.add_argument("--steps", type=_positive, default=None,
                        help="pretraining steps, >= 1 (entropy-widths and acquisition-vs-entropy; experiment's default if "
                        "omitted)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of a one-seed experiment")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                        help=f"comma-separated seeds of {' and '.join(sorted(MULTI_SEED))} (default: the study's)")
    parser.add_argument("--workers", type=int, default=None, help="processes for the multi-seed experiments")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run, plot = EXPERIMENTS[args.experiment]
    if args.experiment in MULTI_SEED:
        if args.steps is not None:
            parser.error(f"--steps is not an option of {args.experiment}: it runs the study's own pretraining")
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
            _checked_seeds(seeds, args.workers)  # none, repeated, --workers < 1: refused here, before any work
        except ValueError:
            parser.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
        except KacqError as error:
            parser.error(f"--seeds {args.seeds!r} / --workers {args.workers}: {error}")
        kwargs = {"seeds": seeds, "workers": args.workers}
    else:
        kwargs = {"seed": args.seed, **({"steps": args.steps} if args.steps is not None else {})}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the run: an unwritable folder fails in seconds, not after it
    started = time.perf_counter()
    result = _json_ready(run(**kwargs))
    name = args.experiment.replace("-", "_")
    write_text_atomic(out / f"{name}.json", json.dumps(result, indent=1, sort_keys=True) + "\n")
    figure = plot(result, out / f"{name}.png")
    print(f"wrote {figure} and {name}.json in {time.perf_counter() - started:.0f} s")
    for width, r in result.get("runs", {}).items():
        print(f"d_model {width}: entropy minimum {_f(r['minimum'], '.3f')} at step {r['minimum_step']}, last {_f(r['last'], '.3f')} "
              f"(max {_f(r['max_total'], '.3f')}); Spearman(step, H) after the minimum {r['spearman_after_minimum']}")
    for r in result.get("checkpoints", []):
        print(f"step {r['step']}: H {_f(r['entropy'], '.3f')}, A {_f(r['acquisition'], '.4f')}, injected rise {_f(r['injected_rise'], '.2f')}, "
              f"effectivity {r['effectivity']}, first token {r['effectivity_first_token']}")
    if "pearson" in result:
        print(f"Pearson(H, A) = {result['pearson']}")
    for scenario, r in result.get("scenarios", {}).items():
        print(f"{scenario}: effectivity {_text(r['effectivity'])}; power-law kinds over t <= {_text(r['horizon_long'])}: "
              f"{_text(r['power_law_kinds_long'])} of 3 (over t <= {_text(r['horizon_short'])}: "
              f"{_text(r['power_law_kinds_short'])}); mean decay {_text(r['decay_long'])} ({_text(r['decay_short'])}); "
              f"R at the end {_text(r['R_end'])}")
    if result.get("experiment") == "forgetting-horizon":
        for horizon, found in result.get("findings", {}).items():
            print(f"{horizon} horizon: " + ", ".join(f"{key} held {f['held']} of {f['seeds']}" for key, f in found.items()))
    if result.get("experiment") in ("resuscitation-dose", "sam-dose"):
        for label, row in result["summary"].items():
            print(f"{label}: " + ", ".join(f"{key} {_text(row[key])}" for key in
                                           ("acquisition", "retention", "forgetting", "injected_rise", "entropy_start",
                                            "mean_multiplier") if key in row))
        for label, found in result["findings"].items():
            print(f"{label}: " + ", ".join(f"{key} held {f['held']} of {f['seeds']}" for key, f in found.items()))
    if result.get("experiment") == "probe-wording":
        for wording, groups in result["summary"].items():
            for reduction, kinds in groups["injected"].items():
                print(f"injected, {wording} prompt, {reduction}: " + ", ".join(f"{k} {_text(v)}" for k, v in kinds.items()))
        print("never-injected, own prompt, mean: " + ", ".join(f"{k} {_text(v)}" for k, v in
                                                             result["summary"]["own"]["control"]["mean"].items()))
    if result.get("experiment") == "landing":
        print(f"chance {_f(result['chance'], '.3f')}; study's grad x act share {result['study_share']}")
        for measure in MEASURES:
            print(f"{measure}: injected start {_f(result['start'][measure]['injected'], '.3f')} end "
                  f"{_f(result['end'][measure]['injected'], '.3f')}, control end {_f(result['end'][measure]['control'], '.3f')}")
        for name, r in result["value_change"].items():
            print(f"value change {name}: share by k {r['by_k']}, mean low {_f(r['mean_low'], '.4g')} other {_f(r['mean_other'], '.4g')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
