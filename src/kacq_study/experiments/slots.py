"""``landing``: whether the injected facts avoid the low-activity slots, or only grad x act does. The share of
each probe's top-k slots that were low-activity at the checkpoint, at the arm's start and end, under grad
x act (which scales with |C|) and under the gradient alone (d logp / dC, which does not), for injected and
never-injected facts, and the slots whose FFN value vectors the injected facts changed most (against an
arm that injects corpus documents in the same rows instead).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Sequence

import torch

import kacq_hooks as kh
from kacq_hooks import facts as kf
from kacq_hooks.attribution import attribute
from kacq_hooks.report import pyplot, save_figure
from kacq_hooks.training.attribution import low_activity_mask

from .. import pipeline
from ..arms import Arm
from ..config import ATTRIBUTION_K, DemoConfig
from ..findings import KINDS
from ..output import json_ready
from ..pipeline import corpus_texts, deterministic
from .common import nan_mean, number_text, quiet
from .registry import Experiment, register


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
        data = pipeline.prepare(config, quiet)
        pretraining, checkpoints = pipeline.pretrain(config, data, quiet)
        model = checkpoints["model"]
        model.load_state_dict(checkpoints["late"]["state"])
        low = torch.cat(low_activity_mask(data.calibration.mean_abs_coefficients(model), config.resuscitation_ratio))
        tracker = kf.FactTracker(model, data.tokenizer, data.facts, batch_size=64)
        schedule = config.schedule(data.facts)
        injected = torch.tensor([bool(schedule.steps_of(p.record)) for p in tracker.probes])
        start = _slot_shares(model, data.tokenizer, tracker, low, ks)
        values_start = _value_vectors(model)
        arm = json_ready(pipeline.run_arm(Arm("late", "late"), config, data, checkpoints, quiet))  # the study's landing too
        end = _slot_shares(model, data.tokenizer, tracker, low, ks)
        values_facts = _value_vectors(model)
        texts = corpus_texts(config.corpus, config.max_docs)
        n = len(data.facts)

        def documents(injection: kf.Injection, facts: kf.FactSet, cfg: DemoConfig) -> str:
            return texts[-1 - (injection.round * n + injection.record) % len(texts)]

        pipeline.run_arm(Arm("late+documents", "late", transform=documents), config, data, checkpoints, quiet)
        values_documents = _value_vectors(model)
    chance = float(low.double().mean())
    kinds = {kind: torch.tensor([p.kind == kind for p in tracker.probes]) for kind in KINDS}

    def summary(shares: dict) -> dict:
        out = {}
        for measure, by_k in shares.items():
            main = by_k[k]
            out[measure] = {
                "injected": nan_mean(main[injected]), "control": nan_mean(main[~injected]),
                "injected_by_kind": {kind: nan_mean(main[injected & m]) for kind, m in kinds.items()},
                "injected_above_chance": nan_mean((main[injected] > chance).double()
                                                   .where(~main[injected].isnan(), math.nan)),
                "injected_by_k": {str(kk): nan_mean(v[injected]) for kk, v in by_k.items()},
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


def summary(result: dict) -> list[str]:
    lines = [f"chance {number_text(result['chance'], '.3f')}; study's grad x act share {result['study_share']}"]
    for measure in MEASURES:
        lines.append(f"{measure}: injected start {number_text(result['start'][measure]['injected'], '.3f')} end "
                     f"{number_text(result['end'][measure]['injected'], '.3f')}, control end "
                     f"{number_text(result['end'][measure]['control'], '.3f')}")
    for name, r in result["value_change"].items():
        lines.append(f"value change {name}: share by k {r['by_k']}, mean low {number_text(r['mean_low'], '.4g')} other "
                     f"{number_text(r['mean_other'], '.4g')}")
    return lines


register(Experiment("landing", landing, plot_landing, multi_seed=False, summary=summary, about=__doc__))
