"""``probe-wording``: whether continued training teaches the injected facts or only their invented names. Each
target is scored at the plain arm's start and end after its own prompt, another fact's prompt of the same
kind, and a neutral prompt; if the targets rise as much after prompts that do not ask for them, probe kinds
cannot differ (Chang et al.'s memorization > semantic > compositional order needs fact-specific learning).
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
import os
from pathlib import Path
from typing import Sequence

import torch

from kacq_hooks import facts as kf
from kacq_hooks.report import pyplot, save_figure

from .. import pipeline
from ..arms import Arm
from ..config import DemoConfig
from ..findings import KINDS, spread
from ..output import json_ready
from ..pipeline import deterministic
from ..study import DEFAULT_SEEDS, checked_seeds
from .common import mean_or_none, nan_mean, quiet, spread_text
from .registry import Experiment, register

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
    seeds = list(checked_seeds(seeds, workers))  # as run_variants refuses them: none, repeated, workers < 1
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


def wording_sets(facts: kf.FactSet) -> dict[str, kf.FactSet]:
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
        data = pipeline.prepare(config, quiet)
        _, checkpoints = pipeline.pretrain(config, data, quiet)
        model = checkpoints["model"]
        model.load_state_dict(checkpoints["late"]["state"])
        trackers = {name: kf.FactTracker(model, data.tokenizer, facts, batch_size=64)
                    for name, facts in wording_sets(data.facts).items()}
        start = {name: tracker.score_probes() for name, tracker in trackers.items()}
        arm = json_ready(pipeline.run_arm(Arm("late", "late"), config, data, checkpoints, quiet))
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
                    kind: nan_mean(delta[mask & torch.tensor([p.kind == kind for p in probes])].double())
                    for kind in KINDS}
    return {"seed": config.seed, "rise": rise, "study_injected_rise": arm["learning"]["injected"]["rise"],
            "effectivity": {kind: mean_or_none([g["effectivity"] for key, g in arm["groups"].items() if key.endswith("/" + kind)])
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



def summary(result: dict) -> list[str]:
    lines = []
    for wording, groups in result["summary"].items():
        for reduction, kinds in groups["injected"].items():
            lines.append(f"injected, {wording} prompt, {reduction}: " + ", ".join(f"{k} {spread_text(v)}"
                                                                              for k, v in kinds.items()))
    lines.append("never-injected, own prompt, mean: " + ", ".join(f"{k} {spread_text(v)}" for k, v in
                                                                  result["summary"]["own"]["control"]["mean"].items()))
    return lines


register(Experiment("probe-wording", probe_wording, plot_probe_wording, multi_seed=True, summary=summary,
                    about=__doc__))
