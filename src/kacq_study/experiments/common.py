"""What several experiments share: means that refuse a missing value, the summary lines' number formats, and the
comparison of arm variants against the plain arm from one pretraining per seed (:func:`against_plain`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from kacq_hooks.report import pyplot, save_figure

from ..config import DemoConfig
from ..findings import assess, combine_findings, spread
from ..study import run_variants


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean, None when a value is missing (None or NaN): a mean over the others would not be like for like."""
    kept = [v for v in values if v is not None and v == v]
    return sum(kept) / len(kept) if kept and len(kept) == len(values) else None



def spread_text(value) -> str:
    """A spread over seeds as "mean (min to max)"; a plain number as itself."""
    if isinstance(value, dict) and "mean" in value:
        if value["mean"] is None:
            return "n/a"
        return f"{value['mean']:.4g} ({value['min']:.4g} to {value['max']:.4g})"
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def quiet(phase: str, info: dict) -> None:
    return None

def nan_mean(values: torch.Tensor) -> float | None:
    kept = values[~values.isnan()]
    return float(kept.mean()) if kept.numel() else None



def number_text(value, spec: str) -> str:
    """A number for the summary lines, "n/a" for a missing one (None or NaN)."""
    return format(value, spec) if isinstance(value, (int, float)) and value == value else "n/a"



def against_plain(base: DemoConfig, variants: dict[str, tuple[str, dict]], study_arm: str,
                   finding_ids: Sequence[str], seeds: Sequence[int], workers: int | None) -> tuple:
    """Run ``variants`` (one of them "late", the plain arm) with :func:`run_variants`; per seed and variant, the
    :func:`dose_row` numbers and their difference from the same seed's plain arm, and ``finding_ids`` judged by
    ``findings.assess`` with each variant in the place of the study's ``study_arm``, combined over seeds."""
    run = run_variants(base, variants, seeds, workers)
    per_seed, verdicts = {}, {label: [] for label in variants if label != "late"}
    for seed in run["seeds"]:
        results = run["per_seed"][str(seed)]
        plain = dose_row(results["arms"]["late"])
        rows = {"late": plain}
        for label in verdicts:
            arm = results["arms"][label]
            row = dose_row(arm)
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



def dose_row(arm: dict) -> dict:
    kim, learning, edit = arm["kim"], arm["learning"], arm.get("edit")
    row = {"acquisition": kim["acquisition"], "retention": kim["retention"], "forgetting": kim["forgetting"],
           "K_before": kim["K_before"], "K_peak": kim["K_peak"], "K_after": kim["K_after"],
           "injected_rise": learning["injected"]["rise"], "control_rise": (learning.get("control") or {}).get("rise"),
           "entropy_start": arm["entropy_start"]["total"]}
    if edit:
        row["entropy_before_edit"] = edit["entropy_before"]["total"]
        row["mean_multiplier"] = mean_or_none([layer["mean_multiplier"] for layer in edit["layers"]])
        row["capped"] = edit["capped"]
        row["layers"] = [{"layer": l["layer"], "mean_multiplier": l["mean_multiplier"], "max_multiplier": l["max_multiplier"],
                          "capped": l["capped"]} for l in edit["layers"]]
    return row



def plot_against_plain(result: dict, path: Path, labels: list[str], ticks: list[str],
                        panels: Sequence[tuple[str, str]], xlabel: str) -> Path:
    """One panel per (key, name) of an :func:`against_plain` result: the plain arm and each variant in
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



def dose_summary(result: dict) -> list[str]:
    """The summary lines of an :func:`against_plain` experiment: each variant's numbers, then its findings."""
    lines = []
    for label, row in result["summary"].items():
        lines.append(f"{label}: " + ", ".join(f"{key} {spread_text(row[key])}" for key in
                                              ("acquisition", "retention", "forgetting", "injected_rise",
                                               "entropy_start", "mean_multiplier") if key in row))
    for label, found in result["findings"].items():
        lines.append(f"{label}: " + ", ".join(f"{key} held {f['held']} of {f['seeds']}" for key, f in found.items()))
    return lines
