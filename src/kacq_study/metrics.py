"""An arm's metrics from its probe trajectory: Chang et al.'s effectivity and retainability fits per (scenario,
kind), Kim et al.'s acquisition, retention and forgetting, whether the facts were learned at all, and where
the injected facts land among the memory slots (:class:`Landing`).
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

import kacq_hooks as kh
from kacq_hooks import facts as kf
from kacq_hooks.attribution import attribute
from kacq_hooks.training.attribution import AttributionStore, low_activity_share, stability

from .config import ATTRIBUTION_BY, ATTRIBUTION_K, ATTRIBUTION_METHOD, CHECKPOINT_STEP, DemoConfig

class Landing:
    """Where an arm's injected facts land: every probe's top-k slots at a few steps, in an attribution store
    whose first record (:data:`CHECKPOINT_STEP`) holds c̄ of the starting checkpoint as loaded, before any edit.

    c̄ is taken before the edit because the question is whether facts land in the slots resuscitation
    amplifies, and those are the low-activity slots of the checkpoint it edited (after the edit they are
    no longer low). The late arms share the checkpoint, so they are measured against the same slots.
    """

    def __init__(self, model: nn.Module, tokenizer, tracker: kf.FactTracker, cbar: list[torch.Tensor]):
        self.model, self.tokenizer, self.tracker = model, tokenizer, tracker
        sites = kh.find_sites(model)
        self.store = AttributionStore(None, tracker.probes, labels=[s.label for s in sites],
                                      d_ff=[s.d_ff for s in sites], k=ATTRIBUTION_K, method=ATTRIBUTION_METHOD)
        # c̄ without slots: the checkpoint is not attributed, only its activity is needed
        self.store.append(CHECKPOINT_STEP, [[] for _ in tracker.probes], [[] for _ in tracker.probes], cbar)
        self.seconds = 0.0

    def record(self, step: int) -> None:
        started = time.perf_counter()
        result = attribute(self.model, self.tokenizer, self.tracker, ATTRIBUTION_METHOD)
        best = result.top_k(ATTRIBUTION_K, ATTRIBUTION_BY)
        self.store.append(step, [[(s.layer, s.neuron) for s in row] for row in best],
                          [[s.score for s in row] for row in best])
        self.seconds += time.perf_counter() - started

    def summary(self, schedule: kf.InjectionSchedule, facts: kf.FactSet, quantile: float) -> dict:
        """The low-activity share of the probes' top-k slots per recorded step (mean, min, max over probes, and
        per probe kind and scenario), against chance, with the top-k sets' stability between records."""
        first = [schedule.steps_of(r) for r in range(len(facts))]
        # every record after the checkpoint is measured against its c̄ (the step-0 record too: the share the
        # edit alone gives, since resuscitation raises exactly these slots' activations); the records after
        # the first injection are then what low_activity_share reports with the schedule's injection steps
        measured = low_activity_share(self.store, {r: CHECKPOINT_STEP for r, when in enumerate(first) if when},
                                      quantile)
        steps, share = self.store.steps[1:], measured.share[1:]                  # [records, probes]
        injected = torch.tensor([bool(first[p.record]) for p in self.store.probes])

        def stats(columns: torch.Tensor) -> dict:
            rows = share[:, columns]
            return {"mean": _nanmean(rows), "min": _nanreduce(rows, torch.amin), "max": _nanreduce(rows, torch.amax)}

        kinds = {kind: torch.tensor([p.kind == kind for p in self.store.probes]) for kind in kf.PROBE_KINDS}
        scenarios = {scenario: torch.tensor([facts.scenarios[p.record] == scenario for p in self.store.probes])
                     for scenario in kf.SCENARIOS}
        by_kind = {kind: stats(columns) for kind, columns in kinds.items() if columns.any()}
        by_scenario = {scenario: stats(columns) for scenario, columns in scenarios.items() if columns.any()}
        total = sum(self.store.d_ff)
        chance = float(measured.chance[injected].double().mean())
        return {
            "method": ATTRIBUTION_METHOD, "k": ATTRIBUTION_K, "by": ATTRIBUTION_BY, "quantile": quantile,
            "slots": total, "low_activity_slots": round(chance * total), "chance": chance,
            "steps": steps, "first_injection": min(when[0] for when in first if when),
            "share": stats(injected), "share_by_kind": by_kind, "share_by_scenario": by_scenario,
            # Jaccard of each probe's top-k set with its previous record's (the c̄-only record has none)
            "stability": _nanmean(stability(self.store)[1:]),
        }


def _nanmean(rows: torch.Tensor) -> list[float]:
    """Per row of ``[rows, probes]`` the mean over its finite entries (NaN where there is none)."""
    return rows.double().nanmean(1).tolist()


def _nanreduce(rows: torch.Tensor, reduce) -> list[float]:
    finite = torch.isfinite(rows)
    fill = math.inf if reduce is torch.amin else -math.inf
    out = reduce(torch.where(finite, rows.double(), fill), dim=1)
    return torch.where(finite.any(1), out, math.nan).tolist()


def fact_metrics(store: kf.TrajectoryStore, schedule: kf.InjectionSchedule, config: DemoConfig) -> dict:
    """Chang et al.'s metrics per (scenario, kind): ``facts.summarize_acquisition``'s effectivity and
    power-law fit, with the per-injection gains and the retainability curve it was fitted to (for the
    figures and findings), from the store's trajectory (the probes' scores before each step)."""
    summary = {(row["scenario"], row["kind"]): row for row in
               kf.summarize_acquisition(store, schedule, window=config.window, iqr_factor=config.iqr_factor)}
    # the same effectivity on the first target token alone: a name's later tokens follow from its first
    # whatever the probe's wording, which flattens differences between probe kinds in the per-token mean
    first_token = {(row["scenario"], row["kind"]): row["effectivity"] for row in
                   kf.summarize_acquisition(store, schedule, "first", window=config.window,
                                            iqr_factor=config.iqr_factor)}
    values = store.values("mean").double()                                      # [steps + 1, probes]
    groups: dict[str, dict] = {}
    trajectories: dict[str, list] = {}
    for scenario in kf.SCENARIOS:
        for kind in kf.PROBE_KINDS:
            row = summary.get((scenario, kind))
            if row is None:
                columns = store.columns(kind=kind, scenario=scenario) if scenario == "unused" else []
                if columns:  # never injected: a trajectory for the figures, no metrics
                    trajectories[f"{scenario}/{kind}"] = values[:, columns].T.nanmean(0).tolist()
                continue
            key = f"{scenario}/{kind}"
            columns = store.columns(kind=kind, scenario=scenario)
            when = schedule.steps_of(store.probes[columns[0]].record)  # a scenario's records share their steps
            group = values[:, columns].T                                           # [probes, steps + 1]
            trajectories[key] = group.nanmean(0).tolist()
            curve = torch.tensor(row["retainability"][1:], dtype=torch.float64)  # R from t = 1, as it is fitted
            fitted = math.isfinite(row["r_squared"])
            groups[key] = {
                "injection_steps": list(when),
                "effectivity": row["effectivity"],
                "effectivity_first_token": first_token[(scenario, kind)],
                "effectivity_per_round": row["effectivity_per_injection"],
                "effectivity_positive_fraction": row["effectivity_positive_fraction"],
                "retainability": {"t": list(range(1, row["horizon"] + 1)), "R": curve.tolist(),
                                  "probes": row["n_probes"], "fit": {
                    "decay": row["decay"], "intercept": row["intercept"], "r_squared": row["r_squared"],
                    "x_intercept_steps": row["x_intercept_steps"] if fitted and row["decay"] > 0 else None,
                    "points": int(torch.isfinite(curve).sum()) if fitted else 0}},
                "log_prob_start": float(group[:, 0].nanmean()), "log_prob_end": float(group[:, -1].nanmean()),
            }
    return {"trajectories": trajectories, "groups": groups, "learning": _learning(store, schedule)}


def _learning(store: kf.TrajectoryStore, schedule: kf.InjectionSchedule) -> dict:
    """Whether the arm learned its facts at all: the mean target log prob (nats per token, all probe kinds) of
    injected facts and of facts never injected ("unused"), at the arm's start, its end and the change, overall
    and per kind. Facts that rise no more than the controls were not learned from their injections."""
    values = store.values("mean").double()                                      # [steps + 1, probes]
    out: dict[str, dict] = {}
    for group, injected in (("injected", True), ("control", False)):
        columns = _probe_columns(store, schedule, injected)
        if not columns:
            continue
        picked = values[:, columns]
        kinds = {kind: [i for i, c in enumerate(columns) if store.probes[c].kind == kind] for kind in kf.PROBE_KINDS}
        out[group] = {"probes": len(columns), "start": float(picked[0].nanmean()), "end": float(picked[-1].nanmean()),
                      "peak": float(picked.nanmean(1).max()),
                      "rise": float(picked[-1].nanmean() - picked[0].nanmean()),
                      "rise_by_kind": {kind: float(picked[-1, idx].nanmean() - picked[0, idx].nanmean())
                                       for kind, idx in kinds.items() if idx}}
    return out


def injected_values(store: kf.TrajectoryStore, schedule: kf.InjectionSchedule) -> torch.Tensor:
    """``[steps + 1, probes]`` mean target log probs of the injected facts' probes (the controls left out)."""
    return store.values("mean").double()[:, _probe_columns(store, schedule, injected=True)]


def _probe_columns(store: kf.TrajectoryStore, schedule: kf.InjectionSchedule, injected: bool) -> list[int]:
    """Columns of the probes whose records the schedule injects (``injected``) or never injects (the controls)."""
    return [c for c, p in enumerate(store.probes) if bool(schedule.steps_of(p.record)) == injected]


def kim_metrics(trajectory: torch.Tensor, accuracy_before: float, accuracy_after: float) -> dict:
    """K = mean target log prob over probes; A = (K_after - K_before) / |K_before|; F on held-out accuracy;
    retention = share of the peak gain in K still held at the end."""
    k = torch.tensor([kf.knowledge_score(scores) for scores in trajectory], dtype=torch.float64)
    k_before, k_after, k_peak = float(k[0]), float(k[-1]), float(k.max())
    gain = k_peak - k_before
    return {
        "K_before": k_before, "K_after": k_after, "K_peak": k_peak,
        "acquisition": kf.acquisition(k_before, k_after),
        "retention": (k_after - k_before) / gain if gain > 0 else None,
        "P_before": accuracy_before, "P_after": accuracy_after,
        "forgetting": kf.forgetting(accuracy_before, accuracy_after) if accuracy_before > 0 else None,
        "K": k.tolist(),
    }

