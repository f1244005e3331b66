"""``sparse-memory``: Lin et al.'s sparse memory finetuning against plain AdamW, from the study's late checkpoint.

    python -m kacq_study.experiments sparse-memory --out docs/findings

The study's late arm (continued training with Chang et al.'s fact injection, plain AdamW) beside the same arm
with :func:`kacq_hooks.interventions.sparse_memory`: only the ``top`` FFN slots per layer with the highest
TF-IDF of the batch's usage against the calibration text's (the pretraining corpus, held out) train, chosen
afresh every step, and nothing else; at two values of ``top``. For contrast, the same with resuscitation's
choice of slots (Kim et al.): the ``top`` least active slots of each layer on the calibration text, fixed.
Every arm sees the same batches, the same injected facts and the same optimizer settings (the study's).

Per seed and arm: acquisition A, retention (share of the peak gain kept at the end) and forgetting F on
held-out text (next-token accuracy on the calibration set), as the study computes them, and each arm's
difference from the plain arm of the same seed; over seeds, their mean with a 95% t-interval.

Lin et al. report that sparse memory finetuning learns new facts as well as full finetuning while forgetting
far less (held-out F1 drops 11% against 89%). The findings' criteria are fixed here, before any run:
:data:`CRITERIA`.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from kacq_hooks.report import pyplot, save_figure

from ..arms import Arm, adamw_step
from ..config import DemoConfig, DemoConfigError
from ..output import json_ready
from ..pipeline import build_model, deterministic, prepare, pretrain, run_arm
from ..study import DEFAULT_SEEDS, checked_seeds
from .common import number_text
from .registry import Experiment, register

# slots per layer that train: about 4% and 17% of the study's 384 slots per layer (Lin et al. train 500 of
# 1M memory slots; an FFN of this size has no room for such a ratio)
TOPS = (16, 64)
CHOICES = ("tfidf", "least")  # Lin et al.'s (per batch) and resuscitation's (the least active, fixed)

# The findings' criteria, fixed before the run. Per seed and top t:
#   sparse_memory_forgets_less:         F(tfidf, t) < F(plain)
#   sparse_memory_acquires_comparably:  A(tfidf, t) >= ACQUISITION_SHARE * A(plain)  (and A(plain) > 0)
#   tfidf_slots_acquire_more_than_least_active: A(tfidf, t) > A(least, t)
# A finding holds at t when it holds for at least HELD_SEEDS of the seeds checked (2 of 3).
ACQUISITION_SHARE = 0.5
HELD_SEEDS = 2
CRITERIA = {
    "sparse_memory_forgets_less": "F(sparse t) < F(plain AdamW), per seed",
    "sparse_memory_acquires_comparably": f"A(sparse t) >= {ACQUISITION_SHARE} x A(plain AdamW) > 0, per seed",
    "tfidf_slots_acquire_more_than_least_active": "A(sparse t, TF-IDF slots) > A(sparse t, least active slots), per seed",
}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
KEYS = ("acquisition", "retention", "forgetting")


def _label(choice: str, top: int) -> str:
    return f"{choice} t={top}"


def _sparse_optimizer(calibration, choice: str, top: int, handles: list):
    """The study's AdamW step, with sparse memory finetuning attached to the model first."""

    def factory(model, config: DemoConfig):
        # imported here, where used: listing the experiments does not load the intervention
        from kacq_hooks.interventions import sparse_memory as sparse_memory_finetuning
        from kacq_hooks.usage import least_used_slots

        reference = calibration.instrumentation(model)  # the checkpoint's usage of pretraining text
        slots = least_used_slots(reference, top) if choice == "least" else None
        handles.append(sparse_memory_finetuning(model, reference=reference, top=top, slots=slots))
        return adamw_step(model, config)

    return factory


def _quiet(phase: str, info: dict) -> None:
    return None


def _checkpoint(workdir: str, seed: int) -> Path:
    return Path(workdir) / f"sparse-seed{seed}.pt"


def pretrain_task(config: DemoConfig, workdir: str) -> dict:
    """One seed's pretraining (the study's); its late checkpoint is written into ``workdir``."""
    started = time.perf_counter()
    with deterministic(config.threads, config.device):
        data = prepare(config, _quiet)
        _, checkpoints = pretrain(config, data, _quiet)
    path = _checkpoint(workdir, config.seed)
    torch.save({"late": checkpoints["late"]}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)  # an arm task never sees half a file
    return {"seed": config.seed, "label": None, "task_s": time.perf_counter() - started}


def arm_task(config: DemoConfig, label: str, workdir: str) -> dict:
    """One (seed, arm) from the seed's late checkpoint in ``workdir``: "late" (plain) or "<choice> t=<top>"."""
    started = time.perf_counter()
    with deterministic(config.threads, config.device):
        data = prepare(config, _quiet)
        saved = torch.load(_checkpoint(workdir, config.seed), map_location="cpu", weights_only=True)
        tokenizer = data.tokenizer
        model = build_model(config, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        handles: list = []
        if label == "late":
            arm = Arm("adamw", "late")  # not named "late": that name also runs the landing attribution
        else:
            choice, top = label.split(" t=")
            arm = Arm(label, "late", optimizer=_sparse_optimizer(data.calibration, choice, int(top), handles))
        try:
            result = run_arm(arm, config, data, {"model": model, **saved}, _quiet)
        finally:
            for handle in handles:
                handle.remove()
        if handles:
            result["sparse"] = {"top": handles[0].top, "per_batch": handles[0].per_batch,
                                "layers": len(handles[0].sites), "d_ff": [s.d_ff for s in handles[0].sites]}
    result.pop("_attribution_s", None)
    return {"seed": config.seed, "label": label, "result": result, "task_s": time.perf_counter() - started}


def _run_tasks(configs: dict[int, DemoConfig], labels: list[str], workers: int) -> tuple[dict, dict]:
    """Each seed's pretraining, then its arms, in ``workers`` spawned processes (in this one for 1)."""
    results: dict[int, dict] = {s: {} for s in configs}
    task_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kacq-sparse-") as workdir:
        if workers == 1:
            for seed, config in configs.items():
                task_s[f"seed {seed} pretrain"] = pretrain_task(config, workdir)["task_s"]
                for label in labels:
                    value = arm_task(config, label, workdir)
                    results[seed][label] = value["result"]
                    task_s[f"seed {seed} arm:{label}"] = value["task_s"]
            return results, task_s
        context = multiprocessing.get_context("spawn")  # torch is not fork-safe once its thread pools started
        with cf.ProcessPoolExecutor(workers, mp_context=context) as pool:
            live = {pool.submit(pretrain_task, config, workdir) for config in configs.values()}
            while live:
                done, live = cf.wait(live, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    value = future.result()
                    seed, label = value["seed"], value["label"]
                    task_s[f"seed {seed} " + ("pretrain" if label is None else f"arm:{label}")] = value["task_s"]
                    if label is not None:
                        results[seed][label] = value["result"]
                        continue
                    live |= {pool.submit(arm_task, configs[seed], lab, workdir) for lab in labels}
    return results, task_s


def interval(values: Sequence[float | None]) -> dict:
    """Mean, 95% t-interval half-width, min, max over the finite values (one per seed)."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    out = {"mean": statistics.fmean(finite) if finite else None, "values": list(values), "n": len(finite),
           "min": min(finite) if finite else None, "max": max(finite) if finite else None, "ci95": None}
    if len(finite) >= 2:
        out["ci95"] = T_975.get(len(finite) - 1, 1.96) * statistics.stdev(finite) / math.sqrt(len(finite))
    return out


def judge(per_seed: dict, tops: Sequence[int]) -> dict:
    """The findings of :data:`CRITERIA` per top t: per-seed verdicts, seeds held and checked, and whether it holds."""
    found = {}
    for top in tops:
        sparse, least = _label("tfidf", top), _label("least", top)
        checks = {name: [] for name in CRITERIA}
        for rows in per_seed.values():
            plain, mine, other = rows["late"], rows[sparse], rows.get(least)
            f_plain, f_mine = plain["forgetting"], mine["forgetting"]
            checks["sparse_memory_forgets_less"].append(
                None if f_plain is None or f_mine is None else f_mine < f_plain)
            a_plain, a_mine = plain["acquisition"], mine["acquisition"]
            checks["sparse_memory_acquires_comparably"].append(
                None if a_plain is None or a_mine is None else a_plain > 0 and a_mine >= ACQUISITION_SHARE * a_plain)
            checks["tfidf_slots_acquire_more_than_least_active"].append(
                None if other is None or a_mine is None or other["acquisition"] is None
                else a_mine > other["acquisition"])
        for name, verdicts in checks.items():
            checked = [v for v in verdicts if v is not None]
            held = sum(bool(v) for v in checked)
            found[f"{name} (t={top})"] = {"criterion": CRITERIA[name], "per_seed": verdicts, "held": held,
                                          "checked": len(checked), "holds": len(checked) >= HELD_SEEDS and held >= HELD_SEEDS}
    return found


def sparse_memory_study(seeds: Sequence[int] = DEFAULT_SEEDS, tops: Sequence[int] = TOPS,
                        config: DemoConfig | None = None, workers: int | None = None) -> dict:
    """Plain AdamW against sparse memory finetuning at each ``top`` (TF-IDF slots per batch, and the least active
    slots for contrast) from each seed's late checkpoint (``config``, default the study's ``DemoConfig()``).
    Returns the result dict: per seed and arm A, retention, F; their differences from plain; intervals over
    seeds; the findings judged by :data:`CRITERIA`; timings."""
    base = config or DemoConfig()
    base.validate()
    seeds = checked_seeds(seeds, workers)
    tops = [int(t) for t in tops]
    if not tops or any(t < 1 or t > base.d_ff for t in tops) or len(set(tops)) != len(tops):
        raise DemoConfigError(f"tops {tops}: give distinct slot counts between 1 and d_ff={base.d_ff}")
    labels = ["late"] + [_label(c, t) for t in tops for c in CHOICES]
    configs = {s: dataclasses.replace(base, seed=s) for s in seeds}
    tasks = len(seeds) * (1 + len(labels))
    workers = max(1, min(os.cpu_count() or 1, tasks) if workers is None else min(int(workers), tasks))
    started = time.perf_counter()
    results, task_s = _run_tasks(configs, labels, workers)
    per_seed = {}
    for s in seeds:
        plain = _row(results[s]["late"])
        rows = {"late": plain}
        for lab in labels[1:]:
            row = _row(results[s][lab])
            row["minus_plain"] = {k: None if row[k] is None or plain[k] is None else row[k] - plain[k] for k in KEYS}
            rows[lab] = row
        per_seed[str(s)] = rows
    ordered = [per_seed[str(s)] for s in seeds]
    summary = {lab: {k: interval([r[lab][k] for r in ordered]) for k in KEYS + ("injected_rise", "P_before", "P_after")}
               for lab in labels}
    for lab in labels[1:]:
        summary[lab]["minus_plain"] = {k: interval([r[lab]["minus_plain"][k] for r in ordered]) for k in KEYS}
    return json_ready({
        "experiment": "sparse-memory", "seeds": list(seeds), "tops": tops, "choices": list(CHOICES),
        "labels": labels, "config": base.to_dict(), "criteria": CRITERIA, "acquisition_share": ACQUISITION_SHARE,
        "held_seeds": HELD_SEEDS, "per_seed": per_seed, "summary": summary, "findings": judge(per_seed, tops),
        "timings": {"wall_s": time.perf_counter() - started, "workers": workers, "tasks_s": task_s},
    })


def _row(arm: dict) -> dict:
    kim = arm["kim"]
    return {"acquisition": kim["acquisition"], "retention": kim["retention"], "forgetting": kim["forgetting"],
            "K_before": kim["K_before"], "K_peak": kim["K_peak"], "K_after": kim["K_after"],
            "P_before": kim["P_before"], "P_after": kim["P_after"],
            "injected_rise": arm["learning"]["injected"]["rise"],
            "control_rise": (arm["learning"].get("control") or {}).get("rise")}


def plot(result: dict, path: Path) -> Path:
    """A, retention and F per arm: one dot per seed, the mean with its 95% interval."""
    plt = pyplot()
    labels = result["labels"]
    names = {"late": "AdamW"} | {lab: lab.replace("tfidf", "sparse TF-IDF").replace("least", "least active")
                                 for lab in labels[1:]}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    for ax, (key, title) in zip(axes, (("acquisition", "acquisition A"),
                                       ("retention", "retention (share of the peak gain kept)"),
                                       ("forgetting", "forgetting F on held-out text"))):
        for x, lab in enumerate(labels):
            s = result["summary"][lab][key]
            ys = [v for v in s["values"] if v is not None]
            ax.scatter([x] * len(ys), ys, color="grey", s=12, zorder=2)
            if s["mean"] is not None:
                ax.errorbar([x], [s["mean"]], yerr=[s["ci95"] or 0], fmt="o", color="C0" if x else "C3", capsize=4,
                            zorder=3)
        ax.axhline(result["summary"]["late"][key]["mean"] or 0, color="C3", lw=0.8, ls="--")
        ax.set_xticks(range(len(labels)), [names[l] for l in labels], rotation=25, ha="right", fontsize=8)
        ax.set(title=title, xlabel="arm (t: slots per layer that train)", ylabel=title)
    fig.suptitle(f"sparse memory finetuning from the late checkpoint ({len(result['seeds'])} seeds; mean, 95% interval)")
    return save_figure(fig, path)


def summary_lines(result: dict) -> list[str]:
    lines = [f"{lab}: " + ", ".join(f"{k} {number_text(result['summary'][lab][k]['mean'], '.3f')} +- "
                                    f"{number_text(result['summary'][lab][k]['ci95'], '.3f')}" for k in KEYS)
             for lab in result["labels"]]
    lines += [f"{name}: {'holds' if f['holds'] else 'does not hold'} ({f['held']} of {f['checked']} seeds)"
              for name, f in result["findings"].items()]
    return lines


register(Experiment("sparse-memory", sparse_memory_study, plot, multi_seed=True, summary=summary_lines, about=__doc__))
