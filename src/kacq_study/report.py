"""Figures and a short written report from a study's results (matplotlib, Agg backend).

The results are :func:`kacq_study.study.run_study`'s (several seeds); a single-seed results
dict (version 1) is read as a one-seed study. Every number in report.md is a mean over the seeds with its range over
seeds (min to max); every curve figure shows each seed as a thin line and the mean as a thick one.

>>> from kacq_study.report import write_report   # doctest: +SKIP
>>> paths = write_report(results, "runs/demo")     # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from kacq_hooks.report import pyplot, save_figure

from .findings import (KINDS, LANDING_MARGIN, LEARNED_MARGIN, LEARNED_MIN_RISE, LOSS_FLAT_TOLERANCE,
                       LOSS_FLAT_WINDOW, POWER_LAW_MIN_R2, SCENARIOS, combine_findings, experiment_for, fit_ok, landing,
                       summarize)

log = logging.getLogger(__name__)

FIGURES = ("entropy.png", "trajectories.png", "retainability.png", "arms.png", "arm_entropy.png",
           "attribution.png")
LANDING_FIGURE = "attribution.png"  # written when an arm recorded where its facts land
KIND_NAMES = {"mem": "memorization", "gen": "semantic", "hard_gen": "compositional"}
# An extrapolated x-intercept further out than this many times the observed range is not printed as a number.
MAX_EXTRAPOLATION = 100
BEYOND = f"beyond {MAX_EXTRAPOLATION}x the observed range"


# ------------------------------------------------------------------------------------------------
# Numbers as text


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _is_spread(value) -> bool:
    return isinstance(value, dict) and set(value) == {"mean", "min", "max", "values"}


def _sp(value, digits: int = 4) -> str:
    """A spread as "mean (min to max)" (just the mean when the seeds agree or there is one), with the number
    of seeds it covers when some seeds have no value; a plain number as it is."""
    if not _is_spread(value):
        return _fmt(value, digits)
    if value["mean"] is None:
        return "n/a"
    text = _fmt(value["mean"], digits)
    if _fmt(value["min"], digits) != _fmt(value["max"], digits):
        text += f" ({_fmt(value['min'], digits)} to {_fmt(value['max'], digits)})"
    have = sum(v is not None for v in value["values"])
    if have < len(value["values"]):
        text += f" [{have} of {len(value['values'])} seeds]"
    return text


def _get(tree, *path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _per_seed(*values) -> list[list]:
    """Each value's per-seed list, all of one length: a spread's values, and a plain value (e.g. None where
    :func:`findings.combine` found no number for any seed) repeated for every seed, so that zipping them never
    drops a seed.

    >>> _per_seed({"mean": 1.0, "min": 1.0, "max": 1.0, "values": [1.0, None]}, None)
    [[1.0, None], [None, None]]
    """
    n = max((len(v["values"]) for v in values if _is_spread(v)), default=1)
    return [list(v["values"]) if _is_spread(v) else [v] * n for v in values]


def fit_text(r_squared, decay, digits: int = 4) -> str:
    """The decay constant of a group's retainability fit over seeds, or "no power law (R^2 = ...)" when any
    seed's fit fails :data:`findings.POWER_LAW_MIN_R2` (a failed fit's decay is never shown as a number).

    >>> fit_text({"mean": 0.21, "min": 0.21, "max": 0.21, "values": [0.21]},
    ...          {"mean": 0.3, "min": 0.3, "max": 0.3, "values": [0.3]})
    'no power law (R^2 = 0.21)'
    """
    r2, a = _per_seed(r_squared, decay)
    bad = sum(not fit_ok({"r_squared": r, "decay": d}) for r, d in zip(r2, a))
    if not bad:
        return _sp(decay, digits)
    seeds = f" in {bad} of {len(r2)} seeds" if len(r2) > 1 else ""
    return f"no power law{seeds} (R^2 = {_sp(r_squared, 2)})"


def horizon_text(x_intercept, observed, r_squared=None, decay=None, digits: int = 4) -> str:
    """The retainability horizon (the fit's x-intercept in steps) over seeds, "beyond 100x the observed range"
    when a seed's lies further out than :data:`MAX_EXTRAPOLATION` times its observed range (the largest t
    fitted), and "n/a" where a seed's fit is no power law or R never reaches zero.

    >>> horizon_text(5000.0, 20)
    'beyond 100x the observed range'
    >>> horizon_text(900.0, 20)
    '900'
    """
    xs, span, r2, a = _per_seed(x_intercept, observed, r_squared, decay)
    if r_squared is not None and not all(fit_ok({"r_squared": r, "decay": d}) for r, d in zip(r2, a)):
        return "n/a"
    if any(x is None for x in xs):
        return "n/a"
    far = sum(x > MAX_EXTRAPOLATION * (t or 0) for x, t in zip(xs, span))
    if far:
        return BEYOND + (f" ({far} of {len(xs)} seeds)" if len(xs) > 1 and far < len(xs) else "")
    return _sp(x_intercept, digits) if _is_spread(x_intercept) else _fmt(x_intercept, digits)


def _held_text(finding: dict, check: bool = False) -> str:
    """A combined finding's verdict over seeds: "held for k of n seeds: reproduced / not reproduced" for the
    papers' findings; a regime check (``check``) "passed for k of n seeds: passed / failed" (it is a condition
    on the run, not a finding that could be reproduced)."""
    n, held = finding["seeds"], finding["held"]
    if finding["checked"] == 0:
        return f"not checked for any of {n} seed{'s' * (n != 1)}"
    words = ("passed", "passed", "failed") if check else ("held", "reproduced", "not reproduced")
    verdict = words[1] if finding["reproduces"] else words[2]
    unchecked = n - finding["checked"]
    extra = f", not checked for {unchecked}" if unchecked else ""
    return f"{words[0]} for {held} of {n} seed{'s' * (n != 1)}{extra}: {verdict}"


def _measured(values: dict) -> str:
    """A finding's values as text; a decay constant next to its fit's R^2 goes through :func:`fit_text`, so a
    failed fit reads "no power law" there too."""
    values = dict(values)
    decay, r2 = values.get("decay"), values.get("r_squared")
    if isinstance(decay, dict) and isinstance(r2, dict) and not _is_spread(decay):
        values["decay"] = {k: _Text(fit_text(r2.get(k), v, 3)) for k, v in decay.items()}
    return ", ".join(f"{k} = {_fmt_value(v)}" for k, v in values.items())


class _Text(str):
    """Already formatted."""


def _fmt_value(value) -> str:
    if isinstance(value, _Text):
        return str(value)
    if _is_spread(value):
        return _sp(value, 3)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt_value(v) for v in value) + "]"
    return _fmt(value, 3)


# ------------------------------------------------------------------------------------------------
# Seeds in figures


def _study(results: dict) -> dict:
    from .study import as_study  # study imports torch; the report's text helpers need not

    return as_study(results)


def _seeds(results: dict) -> list[dict]:
    return results["per_seed"] if "per_seed" in results else [results]


def _mean_curve(curves: list[list]) -> list[float]:
    size = max((len(c) for c in curves), default=0)
    out = []
    for i in range(size):
        vals = [c[i] for c in curves if i < len(c) and isinstance(c[i], (int, float)) and math.isfinite(c[i])]
        out.append(sum(vals) / len(vals) if vals else math.nan)
    return out


def _clean(curve: list) -> list[float]:
    return [math.nan if v is None else v for v in curve]


def _seed_lines(ax, xs: list[list], ys: list[list], label: str, color=None, ls: str = "-", marker=None):
    """Each seed's curve thin, the mean over seeds thick (labelled); returns the mean line's color."""
    mean = _mean_curve(ys)
    x = max(xs, key=len) if xs else []
    line, = ax.plot(x[:len(mean)], mean, color=color, ls=ls, lw=2.2, label=label, marker=marker, ms=3)
    if len(ys) > 1:
        for xi, yi in zip(xs, ys):
            ax.plot(xi[:len(yi)], _clean(yi), color=line.get_color(), ls=ls, lw=0.7, alpha=0.45)
    return line.get_color()


def _seed_legend_note(ax, n: int) -> None:
    if n > 1:
        ax.plot([], [], color="grey", lw=0.7, alpha=0.6, label=f"thin: each of {n} seeds; thick: mean")


def _mark_injections(ax, steps: list[int], label: bool = True) -> None:
    for i, step in enumerate(steps):
        ax.axvline(step, color="red", ls=":", lw=0.9, label="injection steps" if label and i == 0 else None)


# ------------------------------------------------------------------------------------------------
# Figures


def plot_entropy(results: dict, path: Path) -> Path:
    """Total knowledge entropy and the training loss against pretraining step (checkpoints marked), and the
    per-layer entropy."""
    plt = pyplot()
    seeds = _seeds(results)
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 3.9))
    _seed_lines(left, [s["pretraining"]["entropy"]["steps"] for s in seeds],
                [s["pretraining"]["entropy"]["total"] for s in seeds], "total entropy", marker="o")
    _seed_lines(middle, [s["pretraining"]["steps"] for s in seeds], [s["pretraining"]["loss"] for s in seeds],
                "training loss", color="tab:green")
    checkpoints = seeds[0]["pretraining"]["checkpoints"]
    for ax in (left, middle):
        for name, style in zip(checkpoints, ("--", "-.")):
            # one line when every seed has the same step; a line per seed when the entropy curve chose them
            steps = sorted({s["pretraining"]["checkpoints"][name] for s in seeds})
            label = (f"{name} checkpoint (step {steps[0]})" if len(steps) == 1
                     else f"{name} checkpoints (steps {', '.join(map(str, steps))}; by seed)")
            for i, step in enumerate(steps):
                ax.axvline(step, color="black", ls=style, lw=1, label=label if i == 0 else None)
    left.set(xlabel="pretraining step", ylabel="knowledge entropy H (nats)", title="knowledge entropy (total)")
    middle.set(xlabel="pretraining step", ylabel="training loss (nats/token)", title="pretraining loss")
    per_seed_layers = [list(zip(*s["pretraining"]["entropy"]["per_layer"])) for s in seeds]
    for layer in range(len(per_seed_layers[0])):
        _seed_lines(right, [s["pretraining"]["entropy"]["steps"] for s in seeds],
                    [list(layers[layer]) for layers in per_seed_layers], f"layer {layer}")
    right.set(xlabel="pretraining step", ylabel="knowledge entropy H (nats)", title="per layer")
    for ax in (left, middle, right):
        _seed_legend_note(ax, len(seeds))
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_trajectories(results: dict, path: Path) -> Path:
    """Mean target log prob per (scenario, kind) against continued-training step, one color per arm; the
    never-injected control facts of the same kind dashed."""
    plt = pyplot()
    seeds = _seeds(results)
    names = list(seeds[0]["arms"])
    fig, axes = plt.subplots(len(SCENARIOS), len(KINDS), figsize=(13, 9), sharex=True, squeeze=False)
    for row, scenario in enumerate(SCENARIOS):
        for col, kind in enumerate(KINDS):
            ax = axes[row][col]
            key, control = f"{scenario}/{kind}", f"unused/{kind}"
            for name in names:
                curves = [s["arms"][name]["trajectories"][key] for s in seeds if key in s["arms"][name]["trajectories"]]
                if not curves:
                    continue
                color = _seed_lines(ax, [list(range(len(c))) for c in curves], curves, name)
                controls = [s["arms"][name]["trajectories"][control] for s in seeds
                            if control in s["arms"][name]["trajectories"]]
                if controls:
                    mean = _mean_curve(controls)
                    ax.plot(range(len(mean)), mean, color=color, ls="--", lw=1.3,
                            label=f"{name}: never-injected controls (mean)")
            steps = next((s["arms"][n]["groups"][key]["injection_steps"] for s in seeds for n in names
                          if key in s["arms"][n]["groups"]), [])
            _mark_injections(ax, steps)
            ax.set_title(f"{scenario} / {KIND_NAMES[kind]}", fontsize=9)
            if col == 0:
                ax.set_ylabel("mean target log probability\n(nats/token)", fontsize=8)
            if row == len(SCENARIOS) - 1:
                ax.set_xlabel("continued-training step")
    _seed_legend_note(axes[0][0], len(seeds))
    axes[0][0].legend(fontsize=6)
    fig.suptitle("probe log probability during continued training (dashed: facts never injected)")
    return save_figure(fig, path)


def _reference_arm(results: dict) -> str:
    arms = _seeds(results)[0]["arms"]
    return "late" if "late" in arms else next(iter(arms))


def plot_retainability(results: dict, path: Path, arm: str | None = None) -> Path:
    """Retainability against t (log scale) for one arm (default "late"), each kind's mean over seeds thick,
    and each seed's power-law fit R ~ b - a log10 t where it passes its R^2 criterion."""
    plt = pyplot()
    seeds = _seeds(results)
    arm = arm or _reference_arm(results)
    fig, axes = plt.subplots(1, len(SCENARIOS), figsize=(13, 3.8), sharey=True, squeeze=False)
    for col, scenario in enumerate(SCENARIOS):
        ax = axes[0][col]
        for kind in KINDS:
            groups = [s["arms"][arm]["groups"].get(f"{scenario}/{kind}") for s in seeds]
            groups = [g for g in groups if g is not None]
            if not groups:
                continue
            color = _seed_lines(ax, [g["retainability"]["t"] for g in groups],
                                [g["retainability"]["R"] for g in groups], KIND_NAMES[kind], marker=".")
            for g in groups:
                fit, t = g["retainability"]["fit"], g["retainability"]["t"]
                if fit_ok(fit) and t:
                    ends = [min(t), max(t)]
                    ax.plot(ends, [fit["intercept"] - fit["decay"] * math.log10(v) for v in ends], color=color,
                            ls="--", lw=0.9)
        ax.plot([], [], color="grey", ls="--", lw=0.9, label=f"power-law fit (seeds with R^2 >= {POWER_LAW_MIN_R2})")
        ax.set_xscale("log")
        ax.set(title=scenario, xlabel="steps since the last acquisition maximum t")
        if col == 0:
            ax.set_ylabel("retainability R(t)")
    _seed_legend_note(axes[0][0], len(seeds))
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"retainability and fits R ~ b - a log10 t (arm: {arm})")
    return save_figure(fig, path)


def plot_arms(results: dict, path: Path) -> Path:
    """Acquisition, retention and forgetting per arm (Kim et al.'s summary metrics): mean over seeds, error
    bars from the seeds' min to max, each seed a dot."""
    plt = pyplot()
    seeds = _seeds(results)
    names = list(seeds[0]["arms"])
    metrics = ("acquisition", "retention", "forgetting")
    fig, axes = plt.subplots(1, len(metrics), figsize=(12, 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        per = [[v for v in (s["arms"][n]["kim"][metric] for s in seeds)
                if isinstance(v, (int, float)) and math.isfinite(v)] for n in names]
        # an arm without a value for any seed gets no bar (a zero bar would read as a measured zero)
        drawn = [i for i, v in enumerate(per) if v]
        mean = [sum(per[i]) / len(per[i]) for i in drawn]
        low = [m - min(per[i]) for m, i in zip(mean, drawn)]
        high = [max(per[i]) - m for m, i in zip(mean, drawn)]
        ax.bar(drawn, mean, yerr=[low, high], capsize=4, color="tab:blue", alpha=0.8,
               label=f"mean over {len(seeds)} seed{'s' * (len(seeds) != 1)} (whiskers: min to max)")
        for i in drawn:
            ax.plot([i] * len(per[i]), per[i], "k.", ms=4, label="each seed" if i == drawn[0] else None)
        ax.set_xticks(range(len(names)), [n if per[i] else f"{n}\n(n/a)" for i, n in enumerate(names)],
                      rotation=20, fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)  # every arm keeps its place, with or without a bar
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title({"acquisition": "acquisition A", "retention": "retention", "forgetting": "forgetting F"}[metric])
        ax.set(xlabel="arm", ylabel={"acquisition": "A = (K_after - K_before) / |K_before|",
                                     "retention": "share of the peak gain in K held at the end",
                                     "forgetting": "F = relative drop of held-out accuracy"}[metric])
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def plot_arm_entropy(results: dict, path: Path) -> Path:
    """Knowledge entropy on the calibration set during each arm's continued training (injections marked)."""
    plt = pyplot()
    seeds = _seeds(results)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in seeds[0]["arms"]:
        entropies = [s["arms"][name].get("entropy") for s in seeds]
        entropies = [e for e in entropies if e]
        if entropies:
            _seed_lines(ax, [e["steps"] for e in entropies], [e["total"] for e in entropies], name, marker="o")
    _mark_injections(ax, seeds[0]["data"]["injection_steps"] if "data" in seeds[0] else [])
    _seed_legend_note(ax, len(seeds))
    ax.set(xlabel="continued-training step", ylabel="knowledge entropy H (nats)",
           title="knowledge entropy during continued training")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _attributed(results: dict) -> dict[str, list[dict]]:
    """Per arm that recorded where its facts land, each seed's attribution summary."""
    out: dict[str, list[dict]] = {}
    for seed in _seeds(results):
        for name, arm in seed["arms"].items():
            if arm.get("attribution"):
                out.setdefault(name, []).append(arm["attribution"])
    return out


def plot_landing(results: dict, path: Path) -> Path:
    """Per attributed arm, the share of the probes' top-k slots that were low-activity (arm start, after the
    first injection, end; bars at the mean over seeds of the mean over probes, whiskers the seeds' min to max)
    beside the share expected by chance."""
    plt = pyplot()
    arms = _attributed(results)
    bars = [("chance (all slots)", None), ("arm start", 0), ("after the 1st injection", 1), ("end of the arm", -1)]
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(7, 4))
    for b, (label, record) in enumerate(bars):
        x = [i + (b - (len(bars) - 1) / 2) * width for i in range(len(arms))]
        per = [[a["chance"] if record is None else a["share"]["mean"][record] for a in seeds] for seeds in arms.values()]
        per = [[v for v in p if v is not None] for p in per]
        mean = [sum(p) / len(p) if p else math.nan for p in per]
        low = [m - min(p) if p else 0 for m, p in zip(mean, per)]
        high = [max(p) - m if p else 0 for m, p in zip(mean, per)]
        if record is None:
            ax.bar(x, mean, width, label=label, color="lightgrey", edgecolor="grey")
        else:
            ax.bar(x, mean, width, yerr=[low, high], capsize=3, label=label)
    k = next(iter(arms.values()))[0]["k"] if arms else "k"
    ax.set_xticks(range(len(arms)), list(arms))
    n = len(_seeds(results))
    ax.set(xlabel="arm", ylabel=f"share of top-{k} slots that were low-activity", ylim=(0, 1),
           title=f"where the injected facts land (mean over probes; whiskers: min-max over {n} seeds)")
    ax.axhline(0, color="black", lw=0.6)
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------
# Text


def _landing_section(results: dict) -> list[str]:
    """The paragraph on where the injected facts landed, with the finding's criterion (empty if no arm recorded it)."""
    from .findings import combine

    arms = _attributed(results)
    if not arms:
        return []
    first = next(iter(arms.values()))[0]
    calibration = _seeds(results)[0].get("data", {}).get("calibration_sequences", "the")
    lines = ["## Where the injected facts land", "",
             f"Every probe was attributed by {first['method'].replace('_', ' ')} (the coefficient C times the gradient "
             f"of the target's mean log probability with respect to C, summed over the positions that predict the "
             f"target) at the arm's start, right after the first injection (step {first['first_injection'] + 1}) and "
             f"at the end; its top {first['k']} slots of {first['slots']} were compared with the slots that were "
             "low-activity at the starting checkpoint: c̄ (mean |C| on the "
             f"{calibration} held-out calibration sequences, measured before any edit "
             "and before the first injection) at or below "
             f"the {_fmt(first['quantile'])} quantile of its layer, the slots resuscitation amplifies "
             f"({_sp(combine([a['low_activity_slots'] for a in next(iter(arms.values()))]))} of {first['slots']}).", ""]
    for name, seeds in arms.items():
        # over every seed, None where a seed has no attribution (its numbers then say "[k of n seeds]")
        every = [s["arms"].get(name, {}).get("attribution") for s in _seeds(results)]
        share = combine([a["share"] if a else None for a in every])
        chance = combine([a["chance"] if a else None for a in every])
        by_kind = combine([a["share_by_kind"] if a else None for a in every])
        # the study's own combined finding, over every seed (a seed without an attribution counts as not held)
        finding = next((f for f in results.get("findings", []) if f["id"] == f"facts_land_in_low_activity_slots[{name}]"),
                       None) or combine_findings([[landing({"arms": {name: {"attribution": a}}}, name)] for a in seeds])[0]
        lines.append(f"In arm {name}, the mean share of a probe's top-{first['k']} slots that were low-activity was "
                     f"{_sp(share['mean'][-1], 3)} at the end, {_sp(share['mean'][1], 3)} right after the first "
                     f"injection and {_sp(share['mean'][0], 3)} at the arm's start, against chance "
                     f"{_sp(chance, 3)}; per probe kind at the end: "
                     + ", ".join(f"{KIND_NAMES[k]} {_sp(v['mean'][-1], 3)}" for k, v in by_kind.items())
                     + f". \"Facts land preferentially in low-activity slots\": {_held_text(finding)} (criterion "
                     f"fixed in code: end share > chance + {LANDING_MARGIN}).")
        lines.append("")
    lines += ["The arm-start share is the reference for the end share: grad x act grows with |C|, so active slots "
              "are favoured from the outset, and resuscitation alone raises the activations of exactly the "
              "low-activity slots.", "", f"![where the facts land]({LANDING_FIGURE})", ""]
    return lines


def _regime_section(results: dict) -> list[str]:
    """Why the study's regime (model, sequence length, schedule, corpus use) stands in for the papers' setting."""
    from .config import DemoConfig  # the study's own defaults stand in for keys an older results file lacks

    c = {**DemoConfig().to_dict(), **results.get("config", {})}
    if c.get("checkpoint_rule") == "peak":
        return _decay_regime_section(results, c)
    tokens = c["batch_size"] * c["seq_len"]
    rows = c.get("continue_batch_size") or c["batch_size"]
    return [
        "## Why this regime", "",
        f"- **Pretraining to the flat part of the loss curve.** A {c['n_layers']}-layer Llama-style model "
        f"(d_model {c['d_model']}, {c['d_ff']} FFN slots per layer, vocabulary {c['vocab_size']}) is trained from "
        f"scratch for {c['pretrain_steps']} steps of {c['batch_size']} x {c['seq_len']} tokens ({tokens:,} per step) "
        "on English Wikipedia summaries, under a warmup and a cosine schedule to a tenth of the peak rate, the "
        "shape of OLMo's: the late checkpoint is the end of a finished run, as the papers' final checkpoints are, and "
        "the regime check above says whether the loss had flattened. Kim et al. and Chang et al. measured "
        "checkpoints long after the first transient of training; from scratch, knowledge entropy collapses within "
        "the first tens of steps and then climbs back, so the early checkpoint "
        f"(step {results['per_seed'][0]['pretraining']['checkpoints']['early'] if results.get('per_seed') else c['early_step']}) "
        "sits after that collapse and after the fast phase of the loss, and every entropy finding is judged from "
        "it on.",
        f"- **Injection as Chang et al. do it.** Each passage plus EOS is written at the start of one batch row and "
        f"cut to the sequence length of {c['seq_len']} tokens (the longest generated passages lose their last few tokens "
        "there; the run's log counts them), so the batch shape "
        f"never changes. A row is 1/{rows} of a continued-training update here and 1/2,048 in the paper: a model "
        "this small learns a fact from one exposure only when the fact is a larger share of the update, which is "
        "what the paper's 1B and 7B models do at 1/2,048. Duplication records see the same passage at every round, "
        "paraphrase records a new rewording each round, once records one injection, and never-injected controls "
        "show what continued training does to a fact it never sees.",
        f"- **The schedule of injections.** {c['injection_rounds']} rounds every {c['injection_every']} steps "
        f"(the paper: 10 rounds every 100 steps), after {c['lead_steps']} steps of warmup, and {c['tail_steps']} "
        f"steps after the last one for forgetting. AdamW with beta1 = {c['continue_beta1']} lets an update's effect "
        f"show within a few steps, so the window for the local acquisition maximum is t_w = {c['window']} steps, "
        "shorter than the interval between injections (the paper's t_w = 50 for beta1 = 0.9 and 100-step "
        "intervals). Continued training uses a fresh optimizer at a constant rate after warmup, as Kim et al. do "
        "after resuscitation, for every arm alike.",
        "- **Probes every step.** Every probe is scored before every update, without special tokens (as the "
        "packed training rows hold text), in one batched no-grad pass; retainability is fitted over the range "
        "every probe was recorded at.",
        "- **What does not carry over.** A model of under a million parameters trained for minutes is not "
        "OLMo: its knowledge entropy is still climbing when its loss flattens, which is the first thing to read "
        "in the findings below (docs/findings.md has the dedicated experiments).", ""]


def _decimals(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _decay_regime_section(results: dict, c: dict) -> list[str]:
    """Why the decay regime (``DemoConfig.decay``) stands in for the papers' checkpoints, with each seed's
    checkpoints as its entropy curve chose them."""
    from .config import DemoConfig  # the default study, for comparison
    tokens = c["batch_size"] * c["seq_len"]
    rows = c.get("continue_batch_size") or c["batch_size"]
    wd, lr = c["weight_decay"], c["lr"]
    per_tau = 1 / (lr * wd) if lr and wd else None
    chosen = []
    for seed, r in zip(results.get("seeds", []), results.get("per_seed", [])):
        rule = r["pretraining"].get("checkpoint_rule") or {}
        verdict = {True: "decayed", False: "did not decay by the criterion", None: "not judged"}[rule.get("decays")]
        chosen.append(f"seed {seed}: early minimum at step {rule.get('early_minimum_step')}, peak (early checkpoint) at "
                      f"step {rule.get('peak_step')} ({_decimals(rule.get('peak'), 3)} nats), late checkpoint at step "
                      f"{rule.get('late_step')} ({_decimals(rule.get('last'), 3)} nats): a fall of "
                      f"{_decimals(rule.get('fall_after_peak'), 4)} against noise {_decimals(rule.get('noise'), 4)}, {verdict}")
    tau = f"{per_tau:,.0f} steps" if per_tau else "n/a"
    default = DemoConfig()
    shrink = 1 - (1 - c["continue_lr"] * wd) ** c["continue_steps"]
    rules = [r["pretraining"].get("checkpoint_rule") or {} for r in results.get("per_seed", [])]
    fall_values = [r.get("fall_after_peak") for r in rules]
    falls = ", ".join(_decimals(f, 4) for f in fall_values) or "n/a"
    share = ", ".join("n/a" if f is None or not r.get("peak") else f"{f / r['peak']:.2%}"
                      for f, r in zip(fall_values, rules)) or "n/a"
    spans = f"{c['pretrain_steps'] / per_tau:.1f}" if per_tau else "n/a"
    return [
        "## Why this regime", "",
        f"- **Pretraining for many weight-decay time constants.** A {c['n_layers']}-layer Llama-style model "
        f"(d_model {c['d_model']}, {c['d_ff']} FFN slots per layer, vocabulary {c['vocab_size']}) is trained from "
        f"scratch for {c['pretrain_steps']} steps of {c['batch_size']} x {c['seq_len']} tokens ({tokens:,} per step) "
        f"on English Wikipedia summaries with AdamW at a constant rate {_fmt(lr)} after {c['warmup_steps']} warmup "
        f"steps and weight decay {_fmt(wd)}: one time constant 1 / (lr x wd) is {tau}, and the run spans {spans} of "
        "them. The papers' OLMo checkpoints span many such time constants; the default study (weight decay "
        f"{_fmt(default.weight_decay)}, {default.pretrain_steps} steps at a peak rate of {_fmt(default.lr)}) covers "
        f"at most {default.pretrain_steps * default.lr * default.weight_decay:.3f} of one (at its peak rate "
        "throughout), and its entropy climbs throughout. "
        "In the entropy-weight-decay experiment at this recipe, entropy peaked once the FFN weight norm had levelled "
        "off (decay balancing the updates) and then fell, the shape Kim et al. measured; whether it did in this run "
        "is the regime check below.",
        "- **Checkpoints chosen by the entropy curve, not by a finding.** The early checkpoint is the peak of the "
        "calibration entropy after the early collapse (measured every "
        f"{c['entropy_every']} steps, a snapshot kept at each), the late one the last step; the rule says whether "
        "entropy decayed in between (the fall from the peak exceeds 3x the curve's step-to-step noise), and the "
        "regime check below counts the seeds where it did not. " + "; ".join(chosen) + ". "
        "Choosing the early checkpoint at the curve's maximum favours the verdicts judged from it: \"entropy "
        "decays\" needs the last measurement below the early checkpoint, which then holds by construction whenever "
        "the peak is not the last measurement, and its Spearman starts from the curve's highest point; the "
        "3x-noise fall is measured from a maximum of noisy measurements. On simulated curves that climb to a flat "
        "noisy plateau and never decay (tests/test_demo_decay_regime_edge_cases.py), the regime check passes for "
        "about 1 seed in 5 and \"entropy decays\" holds for about 1 in 5, both for about 1 in 10: a single seed's "
        "decay is weak evidence; every seed's is the claim.",
        f"- **Injection over rows of {c['seq_len']} tokens.** A passage plus EOS starts a row and continues over the "
        f"next rows whole, {rows} rows a continued-training step; the arms, their schedule "
        f"({c['injection_rounds']} rounds every {c['injection_every']} steps), rate, momentum, resuscitation and the "
        "landing analysis are the default study's. " + _arm_weight_decay_text(c, wd, shrink),
        f"- **What does not carry over.** The fall after the peak is {falls} nats ({share} of the total at the "
        f"peak); a {c['n_layers']}-layer model of width {c['d_model']} trained for {c['pretrain_steps']} steps is "
        "not OLMo.", ""]


def _arm_weight_decay_text(c: dict, wd: float, shrink: float) -> str:
    """What weight decay continued training used (``continue_weight_decay``; absent from the settings: the
    pretraining's), and what the pretraining's would have done at the continued rate."""
    arm_wd = c.get("continue_weight_decay")
    effect = (f"the pretraining's {_fmt(wd)} at the continued rate {_fmt(c['continue_lr'])} shrinks every weight by "
              f"{shrink:.0%} over an arm's {c['continue_steps']} steps")
    if arm_wd is None or arm_wd == wd:
        return (f"Continued training keeps the pretraining's weight decay {_fmt(wd)}, and the arms' numbers include "
                f"its shrinkage: {effect}.")
    return f"Continued training uses weight decay {_fmt(arm_wd)}: {effect.replace('shrinks', 'would shrink')}, an " \
           "intervention of its own."


def _regime_checks(results: dict) -> list[str]:
    checks = {f["id"]: f for f in results.get("regime", [])}
    summary = results["summary"]
    lines = ["## Regime checks", "",
             "Whether the study is in the regime the papers measured at all (fixed in code before the run; not "
             "counted among the papers' findings).", ""]
    flat = checks.get("loss_flattened")
    if flat:
        v = flat["values"]
        lines.append(f"- **{flat['claim']}**: {_held_text(flat, check=True)}. Criterion: {flat['criterion']}. Measured: last "
                     f"{_sp(v.get('last'))}, before {_sp(v.get('before'))}, relative change "
                     f"{_sp(v.get('relative_change'), 3)}.")
    decayed = checks.get("entropy_decayed_before_late")
    if decayed:
        lines.append(f"- **{decayed['claim']}**: {_held_text(decayed, check=True)}. Criterion: {decayed['criterion']}.")
    learned = [f for key, f in checks.items() if key.startswith("facts_are_learned[")]
    for f in learned:
        lines.append(f"- **{f['claim']}**: {_held_text(f, check=True)}. Criterion: {f['criterion']}.")
    lines.append("")
    rows = [(name, arm["learning"]) for name, arm in summary["arms"].items() if arm.get("learning")]
    if rows:
        lines += [f"Mean target log probability (nats/token, all probe kinds) of the injected facts and of the "
                  f"never-injected controls over each arm (criterion: injected rise >= {LEARNED_MIN_RISE} and >= "
                  f"control rise + {LEARNED_MARGIN}):", "",
                  "| arm | facts | start | end | peak | rise | " + " | ".join(f"rise {KIND_NAMES[k]}" for k in KINDS)
                  + " |", "|---" * (6 + len(KINDS)) + "|"]
        for name, learning in rows:
            for group in ("injected", "control"):
                g = learning.get(group)
                if not g:
                    continue
                lines.append(f"| {name} | {group} | {_sp(g.get('start'))} | {_sp(g.get('end'))} | {_sp(g.get('peak'))} "
                             f"| {_sp(g.get('rise'))} | "
                             + " | ".join(_sp(_get(g, "rise_by_kind", k)) for k in KINDS) + " |")
        lines.append("")
    return lines


def _costs(results: dict) -> list[str]:
    """Seconds per step (pretraining and each arm's continued training), mean over seeds, from the timings."""
    from .findings import combine

    per_seed = (results.get("timings") or {}).get("per_seed")
    if not per_seed:
        return []
    timings = combine(list(per_seed.values()))
    names = list(_seeds(results)[0]["arms"])
    lines = ["Wall-clock cost per step on this run's machine (seconds; mean over seeds, range in parentheses; a "
             "continued-training step includes scoring every probe; tasks ran "
             f"{(results.get('timings') or {}).get('workers', 1)} at a time):", "",
             "| phase | s / step |", "|---|---|", f"| pretraining | {_sp(timings.get('pretrain_step_s'), 3)} |"]
    for name in names:
        lines.append(f"| arm {name} | {_sp(timings.get(f'arm:{name}_step_s'), 3)} |")
    return lines + [""]


def render_markdown(results: dict) -> str:
    """report.md: a short paper-style section whose every statement is computed from ``results``."""
    results = _study(results)
    seeds, summary = results["seeds"], results["summary"]
    first = results["per_seed"][0]
    config, data, pre = first["config"], first["data"], first["pretraining"]
    spre = summary["pretraining"]
    findings, checks = results.get("findings", []), results.get("regime", [])
    counts, regime_counts = summarize(findings), summarize(checks)
    n = len(seeds)
    partly = sum(0 < f["held"] < n for f in findings)
    lines = [
        "# Knowledge entropy and fact acquisition in a small Llama",
        "",
        f"**{counts['reproduced']} of {len(findings)} of the papers' findings reproduce** (held for every one of the "
        f"{n} seed{'s' * (n != 1)} {', '.join(map(str, seeds))}); {partly} held for some seeds but not all, "
        f"{counts['not_reproduced'] - partly} for none, and {counts['not_checked']} could not be checked. Regime "
        f"checks: {regime_counts['reproduced']} of {len(checks)} pass for every seed.",
        "",
        f"Every number below is the mean over the {n} seed{'s' * (n != 1)} with its range over seeds (min to max) "
        "in parentheses; a single number means the seeds agree to the digits shown.",
        "",
        "## Setup",
        "",
        f"A Llama-style decoder ({config['n_layers']} layers, d_model {config['d_model']}, d_ff {config['d_ff']}, "
        f"sequence length {config['seq_len']}, byte-level BPE vocabulary {data['vocab_size']}) was pretrained from "
        f"scratch for {config['pretrain_steps']} steps of {config['batch_size']} sequences on {data['corpus']} "
        f"({data['documents']} documents, {data['tokens']} tokens), once per seed ({', '.join(map(str, seeds))}). "
        f"Knowledge entropy (Kim et al. 2025, token-weighted, padding masked) was measured on "
        f"{data['calibration_sequences']} held-out sequences every {config['entropy_every']} steps. From the "
        f"checkpoints at step {_early_steps(results)} (early) and {pre['checkpoints']['late']} (late), training "
        f"continued for {config['continue_steps']} steps {_continued_training(config)}with {data['records']} "
        f"{data['facts']} fact records injected at steps {data['injection_steps']} (paraphrase, duplication and once "
        "scenarios, Chang et al. 2024, and never-injected controls); every probe was scored before every update.",
        "",
        *_regime_section(results),
        *_regime_checks(results),
        "## Knowledge entropy during pretraining",
        "",
        f"Total entropy went from {_sp(spre['entropy_first'])} nats at initialization to {_sp(spre['entropy_last'])} "
        f"at step {pre['entropy']['steps'][-1]} (maximum {_sp(spre['entropy_max_total'])}); the training loss from "
        f"{_sp(spre['loss_first'])} to {_sp(spre['loss_last'])}. Per layer at the end: "
        + ", ".join(f"layer {i}: {_sp(v)}" for i, v in enumerate(spre["entropy_per_layer_last"])) + ".",
        "",
        "![entropy](entropy.png)",
        "",
        "## Continued training with fact injection",
        "",
        "| arm | start entropy | acquisition A | retention | forgetting F | K before | K after |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, arm in summary["arms"].items():
        lines.append(f"| {name} | {_sp(arm['entropy_start'])} | {_sp(arm['acquisition'])} | {_sp(arm['retention'])} | "
                     f"{_sp(arm['forgetting'])} | {_sp(arm['K_before'])} | {_sp(arm['K_after'])} |")
    lines += ["", "A = (K_after - K_before)/|K_before| with K the mean target log prob over the injected facts' "
              "probes; retention = share of the peak gain in K still held at the end; F = relative drop of held-out "
              "next-token accuracy (the stand-in for downstream accuracy).", ""]
    for name, arm in summary["arms"].items():
        if arm.get("edit"):
            edit = first["arms"][name]["edit"]
            lines.append(f"Arm {name}: resuscitation (ratio {edit['ratio']}, factor {edit['factor']}, cap "
                         f"{edit['cap']}) scaled {_sp(arm['edit']['selected'])} neurons, {_sp(arm['edit']['capped'])} "
                         f"of them at the cap; entropy {_sp(arm['edit']['entropy_before'])} -> "
                         f"{_sp(arm['entropy_start'])}.")
    lines += ["", "Mean effectivity and end-of-run log-prob change per probe kind (mean over scenarios):", "",
              "| arm | " + " | ".join(f"E {KIND_NAMES[k]}" for k in KINDS) + " | "
              + " | ".join(f"dlogp {KIND_NAMES[k]}" for k in KINDS) + " |", "|---" * (1 + 2 * len(KINDS)) + "|"]
    for name, arm in summary["arms"].items():
        lines.append(f"| {name} | " + " | ".join(_sp(arm["effectivity"][k]) for k in KINDS) + " | "
                     + " | ".join(_sp(arm["dlogp"][k]) for k in KINDS) + " |")
    lines += ["", "![entropy during continued training](arm_entropy.png)", "", *_costs(results)]
    reference = _reference_arm(results)
    lines += [f"Per-group metrics in arm '{reference}' (effectivity: mean gain to the local acquisition maximum "
              f"within {config['window']} steps; fit of retainability R ~ b - a log10 t; a fit with R^2 < "
              f"{POWER_LAW_MIN_R2} is no power law and its decay is not shown; the horizon is where the fit "
              f"reaches R = 0, not shown beyond {MAX_EXTRAPOLATION}x the observed range of t):", "",
              "| scenario / kind | effectivity | decay a | R^2 | horizon (steps) |", "|---|---|---|---|---|"]
    for key, group in summary["arms"][reference]["groups"].items():
        lines.append(f"| {key} | {_sp(group['effectivity'])} | {fit_text(group['r_squared'], group['decay'])} | "
                     f"{_sp(group['r_squared'], 3)} | "
                     f"{horizon_text(group['x_intercept_steps'], group['horizon'], group['r_squared'], group['decay'])} |")
    lines += ["", "![trajectories](trajectories.png)", "", "![retainability](retainability.png)", "",
              "![arms](arms.png)", "", *_landing_section(results),
              "## Which findings reproduce", "",
              f"{counts['reproduced']} of {len(findings)} findings reproduce (held for all {n} seeds), "
              f"{counts['not_reproduced']} do not, {counts['not_checked']} could not be checked for any seed. A "
              "finding that could not be checked for a seed counts as not held for it.", ""]
    for finding in findings:
        shown = _measured(finding["values"])
        per = ", ".join(f"{s}: {({True: 'held', False: 'not held', None: 'not checked'})[v]}"
                        for s, v in zip(seeds, finding["per_seed"]))
        experiment = experiment_for(finding["id"]) if not finding["reproduces"] else None
        why = (f" Why not: the dedicated experiment `python -m kacq_study.experiments {experiment}` "
               "(docs/findings.md)." if experiment else "")
        lines.append(f"- **{finding['claim']}** ({finding['paper']}): {_held_text(finding)}. Criterion: "
                     f"{finding['criterion']}. Measured: {shown}. Per seed: {per}.{why}")
    lines += ["", f"These are results of a very small model trained briefly, over {n} seed{'s' * (n != 1)}; treat a "
              "verdict as what these runs measured, not as evidence for or against the papers."]
    return "\n".join(lines) + "\n"


def _early_steps(results: dict) -> str:
    """The early checkpoint's step: one number when every seed's is the same (fixed), else each seed's."""
    steps = [r["pretraining"]["checkpoints"]["early"] for r in results["per_seed"]]
    if len(set(steps)) == 1:
        return str(steps[0])
    return ", ".join(f"{s} (seed {seed})" for seed, s in zip(results["seeds"], steps))


def _continued_training(config: dict) -> str:
    """How continued training ran, for configs that record it (older results files do not)."""
    if "continue_lr" not in config or "continue_beta1" not in config:
        return ""
    rows = config.get("continue_batch_size") or config["batch_size"]
    placement = {"row": "each passage + EOS at the start of one row, cut to the sequence length",
                 "span": "each passage + EOS from the start of a row, continuing over rows"}.get(config.get("injection"))
    return (f"(fresh AdamW, lr {_fmt(config['continue_lr'])}, beta1 {_fmt(config['continue_beta1'])}, "
            f"{config.get('continue_warmup', 0)} warmup steps, {rows} sequences a step"
            + (f"; {placement}" if placement else "") + ") ")


def write_report(results: dict, out: str | os.PathLike) -> list[Path]:
    """Write report.md and the figures of :data:`FIGURES` into ``out`` (attribution.png when an arm recorded
    where its facts land); returns their paths."""
    from .output import write_text_atomic

    results = _study(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_entropy(results, out / "entropy.png"), plot_trajectories(results, out / "trajectories.png"),
             plot_retainability(results, out / "retainability.png"), plot_arms(results, out / "arms.png"),
             plot_arm_entropy(results, out / "arm_entropy.png")]
    if _attributed(results):
        paths.append(plot_landing(results, out / LANDING_FIGURE))
    report = out / "report.md"
    write_text_atomic(report, render_markdown(results))
    log.info("wrote %s and %d figures", report, len(paths))
    return [report, *paths]
