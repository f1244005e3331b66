"""Figures and a short written report from a study's results dict (matplotlib, Agg backend).

>>> from kacq_study.report import write_report   # doctest: +SKIP
>>> paths = write_report(results, "runs/demo")     # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from kacq_hooks.report import pyplot, save_figure

from .findings import KINDS, LANDING_MARGIN, SCENARIOS, landing, summarize

log = logging.getLogger(__name__)

FIGURES = ("entropy.png", "trajectories.png", "retainability.png", "arms.png", "attribution.png")
LANDING_FIGURE = "attribution.png"  # written when an arm recorded where its facts land
KIND_NAMES = {"mem": "memorization", "gen": "semantic", "hard_gen": "compositional"}


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def plot_entropy(results: dict, path: Path) -> Path:
    """Total and per-layer knowledge entropy against pretraining step."""
    plt = pyplot()
    entropy = results["pretraining"]["entropy"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(entropy["steps"], entropy["total"], marker="o", ms=3)
    for name, step in results["pretraining"]["checkpoints"].items():
        left.axvline(step, color="grey", ls=":", lw=1)
        left.annotate(name, (step, entropy["total"][-1]), fontsize=8, rotation=90, va="bottom")
    left.set(xlabel="pretraining step", ylabel="knowledge entropy (nats)", title="total")
    per_layer = list(zip(*entropy["per_layer"]))
    for layer, values in enumerate(per_layer):
        right.plot(entropy["steps"], values, label=f"layer {layer}")
    right.set(xlabel="pretraining step", ylabel="entropy (nats)", title="per layer")
    right.legend(fontsize=8)
    return save_figure(fig, path)


def plot_trajectories(results: dict, path: Path) -> Path:
    """Mean target log prob per (scenario, kind) against continued-training step, one line per arm."""
    plt = pyplot()
    arms = results["arms"]
    fig, axes = plt.subplots(len(SCENARIOS), len(KINDS), figsize=(12, 8), sharex=True, squeeze=False)
    for row, scenario in enumerate(SCENARIOS):
        for col, kind in enumerate(KINDS):
            ax = axes[row][col]
            key = f"{scenario}/{kind}"
            for name, arm in arms.items():
                if key in arm["trajectories"]:
                    ax.plot(arm["trajectories"][key], label=name, lw=1.2)
            steps = next((arm["groups"][key]["injection_steps"] for arm in arms.values() if key in arm["groups"]), [])
            for step in steps:
                ax.axvline(step, color="red", ls=":", lw=0.8)
            ax.set_title(f"{scenario} / {KIND_NAMES[kind]}", fontsize=9)
            if col == 0:
                ax.set_ylabel("mean target log prob")
            if row == len(SCENARIOS) - 1:
                ax.set_xlabel("continued-training step")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("probe log probability (red dotted lines: injections)")
    return save_figure(fig, path)


def plot_retainability(results: dict, path: Path, arm: str | None = None) -> Path:
    """Retainability against log10 t with the fitted power-law lines, for one arm (default "late")."""
    plt = pyplot()
    arm = arm or _reference_arm(results)
    groups = results["arms"][arm]["groups"]
    fig, axes = plt.subplots(1, len(SCENARIOS), figsize=(12, 3.6), sharey=True, squeeze=False)
    for col, scenario in enumerate(SCENARIOS):
        ax = axes[0][col]
        for kind in KINDS:
            group = groups.get(f"{scenario}/{kind}")
            if group is None:
                continue
            retain = group["retainability"]
            t = [math.log10(v) for v, r in zip(retain["t"], retain["R"]) if r is not None]
            r = [v for v in retain["R"] if v is not None]
            line, = ax.plot(t, r, marker=".", ls="", label=KIND_NAMES[kind])
            fit = retain["fit"]
            if fit["decay"] is not None and t:
                ax.plot([min(t), max(t)], [fit["intercept"] - fit["decay"] * min(t),
                                           fit["intercept"] - fit["decay"] * max(t)],
                        color=line.get_color(), lw=1)
        ax.set(title=scenario, xlabel="log10 t (steps after the acquisition maximum)")
        if col == 0:
            ax.set_ylabel("retainability R")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"retainability and fits R ~ b - a log10 t (arm: {arm})")
    return save_figure(fig, path)


def plot_arms(results: dict, path: Path) -> Path:
    """Acquisition, retention and forgetting per arm (Kim et al.'s summary metrics)."""
    plt = pyplot()
    names = list(results["arms"])
    metrics = ("acquisition", "retention", "forgetting")
    fig, axes = plt.subplots(1, len(metrics), figsize=(12, 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = [results["arms"][n]["kim"][metric] for n in names]
        ax.bar(range(len(names)), [v if v is not None else 0.0 for v in values])
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(metric)
    return save_figure(fig, path)


def _attributed(results: dict) -> dict[str, dict]:
    return {name: arm["attribution"] for name, arm in results["arms"].items() if arm.get("attribution")}


def plot_landing(results: dict, path: Path) -> Path:
    """Per attributed arm, the share of the probes' top-k slots that were low-activity (arm start, after the
    first injection, end; bars at the mean over probes, whiskers min to max) beside the share expected by chance."""
    plt = pyplot()
    arms = _attributed(results)
    bars = [("chance (all slots)", None), ("arm start", 0), ("after the 1st injection", 1), ("end of the arm", -1)]
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(7, 4))
    for b, (label, record) in enumerate(bars):
        x = [i + (b - (len(bars) - 1) / 2) * width for i in range(len(arms))]
        if record is None:
            ax.bar(x, [a["chance"] for a in arms.values()], width, label=label, color="lightgrey", edgecolor="grey")
            continue
        mean = [_or_nan(a["share"]["mean"][record]) for a in arms.values()]
        low = [m - _or_nan(a["share"]["min"][record]) for m, a in zip(mean, arms.values())]
        high = [_or_nan(a["share"]["max"][record]) - m for m, a in zip(mean, arms.values())]
        ax.bar(x, mean, width, yerr=[low, high], capsize=3, label=label)
    k = next(iter(arms.values()))["k"] if arms else "k"
    ax.set_xticks(range(len(arms)), list(arms))
    ax.set(xlabel="arm", ylabel=f"share of top-{k} slots that were low-activity", ylim=(0, 1),
           title="where the injected facts land (whiskers: min-max over probes)")
    ax.axhline(0, color="black", lw=0.6)
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)


def _or_nan(value) -> float:
    return math.nan if value is None else float(value)


def _landing_section(results: dict) -> list[str]:
    """The paragraph on where the injected facts landed, with the finding's criterion (empty if no arm recorded it)."""
    arms = _attributed(results)
    if not arms:
        return []
    first = next(iter(arms.values()))
    lines = ["## Where the injected facts land", "",
             f"Every probe was attributed by {first['method'].replace('_', ' ')} (the coefficient C times the gradient "
             f"of the target's mean log probability with respect to C, summed over the positions that predict the "
             f"target) at the arm's start, right after the first injection (step {first['first_injection'] + 1}) and "
             f"at the end; its top {first['k']} slots of {first['slots']} were compared with the slots that were "
             "low-activity at the starting checkpoint: c̄ (mean |C| on the "
             f"{results['data']['calibration_sequences']} held-out calibration sequences, measured before any edit "
             "and before the first injection) at or below "
             f"the {_fmt(first['quantile'])} quantile of its layer, the slots resuscitation amplifies "
             f"({first['low_activity_slots']} of {first['slots']}, chance {_fmt(first['chance'], 3)}).", ""]
    for name, arm in arms.items():
        share = arm["share"]
        finding = landing(results, name)
        verdict = {True: "holds", False: "does not hold", None: "could not be checked"}[finding["holds"]]
        lines.append(f"In arm {name}, a probe's top-{arm['k']} slots were low-activity with share "
                     f"{_fmt(share['mean'][-1], 3)} at the end (min {_fmt(share['min'][-1], 3)}, max "
                     f"{_fmt(share['max'][-1], 3)} over probes), {_fmt(share['mean'][1], 3)} right after the first "
                     f"injection and {_fmt(share['mean'][0], 3)} at the arm's start, against chance "
                     f"{_fmt(arm['chance'], 3)}; per probe kind at the end: "
                     + ", ".join(f"{KIND_NAMES[k]} {_fmt(v['mean'][-1], 3)}" for k, v in arm["share_by_kind"].items())
                     + f". \"Facts land preferentially in low-activity slots\" {verdict} (criterion fixed in code: "
                     f"end share > chance + {LANDING_MARGIN}).")
        lines.append("")
    lines += ["The arm-start share is the reference for the end share: grad x act grows with |C|, so active slots "
              "are favoured from the outset, and resuscitation alone raises the activations of exactly the "
              "low-activity slots.", "", f"![where the facts land]({LANDING_FIGURE})", ""]
    return lines


def _reference_arm(results: dict) -> str:
    return "late" if "late" in results["arms"] else next(iter(results["arms"]))


def render_markdown(results: dict) -> str:
    """report.md: a short paper-style section whose every statement is computed from ``results``."""
    config, data, pre = results["config"], results["data"], results["pretraining"]
    entropy = pre["entropy"]
    findings = results.get("findings", [])
    counts = summarize(findings)
    lines = [
        "# Knowledge entropy and fact acquisition in a small Llama",
        "",
        "## Setup",
        "",
        f"A Llama-style decoder ({config['n_layers']} layers, d_model {config['d_model']}, d_ff {config['d_ff']}, "
        f"sequence length {config['seq_len']}, byte-level BPE vocabulary {data['vocab_size']}) was pretrained from "
        f"scratch for {config['pretrain_steps']} steps of {config['batch_size']} sequences on {data['corpus']} "
        f"({data['documents']} documents, {data['tokens']} tokens), seed {config['seed']}. Knowledge entropy "
        f"(Kim et al. 2025, token-weighted, padding masked) was measured on {data['calibration_sequences']} held-out "
        f"sequences every {config['entropy_every']} steps. From the checkpoints at step {pre['checkpoints']['early']} "
        f"(early) and {pre['checkpoints']['late']} (late), training continued for {config['continue_steps']} steps "
        f"{_continued_training(config)}with {data['records']} {data['facts']} fact records injected at steps "
        f"{data['injection_steps']} (paraphrase, duplication and once scenarios, Chang et al. 2024); every probe was "
        "scored before every update.",
        "",
        "## Knowledge entropy during pretraining",
        "",
        f"Total entropy went from {_fmt(entropy['total'][0])} nats at initialization to {_fmt(entropy['total'][-1])} "
        f"at step {entropy['steps'][-1]} (maximum {_fmt(entropy['max_total'])}). Per layer at the end: "
        + ", ".join(f"layer {i}: {_fmt(v)}" for i, v in enumerate(entropy["per_layer"][-1])) + ".",
        "",
        "![entropy](entropy.png)",
        "",
        "## Continued training with fact injection",
        "",
        "| arm | start entropy | acquisition A | retention | forgetting F | K before -> after |",
        "|---|---|---|---|---|---|",
    ]
    for name, arm in results["arms"].items():
        kim = arm["kim"]
        lines.append(f"| {name} | {_fmt(arm['entropy_start']['total'])} | {_fmt(kim['acquisition'])} | "
                     f"{_fmt(kim['retention'])} | {_fmt(kim['forgetting'])} | "
                     f"{_fmt(kim['K_before'])} -> {_fmt(kim['K_after'])} |")
    lines += ["", "A = (K_after - K_before)/|K_before| with K the mean target log prob over all probes; retention = "
              "share of the peak gain in K still held at the end; F = relative drop of held-out next-token accuracy "
              "(the stand-in for downstream accuracy).", ""]
    for name, arm in results["arms"].items():
        if arm.get("edit"):
            layers = arm["edit"]["layers"]
            lines.append(f"Arm {name}: resuscitation (ratio {arm['edit']['ratio']}, factor {arm['edit']['factor']}, "
                         f"cap {arm['edit']['cap']}) scaled {sum(l['selected'] for l in layers)} neurons, "
                         f"{sum(l['capped'] for l in layers)} of them at the cap; entropy "
                         f"{_fmt(arm['edit']['entropy_before']['total'])} -> {_fmt(arm['entropy_start']['total'])}.")
    lines += ["", "Mean effectivity and end-of-run log-prob change per probe kind (mean over scenarios):", "",
              "| arm | " + " | ".join(f"E {KIND_NAMES[k]}" for k in KINDS) + " | "
              + " | ".join(f"dlogp {KIND_NAMES[k]}" for k in KINDS) + " |", "|---" * (1 + 2 * len(KINDS)) + "|"]
    for name, arm in results["arms"].items():
        eff = [_mean([g["effectivity"] for key, g in arm["groups"].items() if key.endswith("/" + k)]) for k in KINDS]
        change = [_mean([g["log_prob_end"] - g["log_prob_start"] for key, g in arm["groups"].items()
                         if key.endswith("/" + k) and g.get("log_prob_end") is not None
                         and g.get("log_prob_start") is not None]) for k in KINDS]
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in eff + change) + " |")
    timings = results.get("timings")
    if timings:
        lines += ["", "Wall-clock cost per continued-training step (this run, this machine; includes scoring every "
                  "probe): " + ", ".join(f"{name} {timings[f'arm:{name}_step_s']:.3g} s"
                                         for name in results["arms"] if f"arm:{name}_step_s" in timings)
                  + f"; pretraining {timings['pretrain_step_s']:.3g} s/step."]
    reference = _reference_arm(results)
    lines += ["", f"Per-group metrics in arm '{reference}' (effectivity: mean gain to the local acquisition "
              f"maximum within {config['window']} steps; fit of retainability R ~ b - a log10 t):", "",
              "| scenario / kind | effectivity | a | b | R^2 | x-intercept (steps) |", "|---|---|---|---|---|---|"]
    for key, group in results["arms"][reference]["groups"].items():
        fit = group["retainability"]["fit"]
        lines.append(f"| {key} | {_fmt(group['effectivity'])} | {_fmt(fit['decay'])} | {_fmt(fit['intercept'])} | "
                     f"{_fmt(fit['r_squared'])} | {_fmt(fit['x_intercept_steps'])} |")
    lines += ["", "![trajectories](trajectories.png)", "", "![retainability](retainability.png)", "",
              "![arms](arms.png)", "", *_landing_section(results), "## Which findings reproduce at this scale", "",
              f"{counts['reproduced']} of {len(findings)} findings hold, {counts['not_reproduced']} do not, "
              f"{counts['not_checked']} could not be checked in this run.", ""]
    for finding in findings:
        verdict = {True: "reproduces", False: "does not reproduce", None: "not checked"}[finding["holds"]]
        shown = ", ".join(f"{k} = {_fmt_value(v)}" for k, v in finding["values"].items())
        lines.append(f"- **{finding['claim']}** ({finding['paper']}): {verdict}. Criterion: {finding['criterion']}. "
                     f"Measured: {shown}.")
    lines += ["", "These are single-seed results of a very small model trained briefly; treat a verdict as "
              "what this run measured, not as evidence for or against the papers."]
    return "\n".join(lines) + "\n"


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


def _mean(values: list) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _fmt_value(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v, 3)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v, 3) for v in value) + "]"
    return _fmt(value)


def write_report(results: dict, out: str | os.PathLike) -> list[Path]:
    """Write report.md and the figures into ``out`` (attribution.png when an arm recorded where its facts
    land); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_entropy(results, out / "entropy.png"), plot_trajectories(results, out / "trajectories.png"),
             plot_retainability(results, out / "retainability.png"), plot_arms(results, out / "arms.png")]
    if _attributed(results):
        paths.append(plot_landing(results, out / LANDING_FIGURE))
    report = out / "report.md"
    report.write_text(render_markdown(results), encoding="utf-8")
    log.info("wrote %s and %d figures", report, len(paths))
    return [report, *paths]
