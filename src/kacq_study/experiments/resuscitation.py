"""``resuscitation-dose``: the study's late arm without resuscitation and with it at q = 1, 2 (the study's) and
4, for its three seeds from one pretraining each: whether resuscitation's effect on acquisition and
retention grows with the dose and stands out from the differences between seeds, and how far below their
layer's mean the resuscitated slots were (Kim et al. resuscitate a checkpoint whose entropy has decayed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


from ..config import DemoConfig, DemoConfigError
from ..study import DEFAULT_SEEDS
from .common import against_plain, dose_summary, plot_against_plain
from .registry import Experiment, register

# Resuscitation's multiplier q (a selected slot's mean |C| becomes q times its layer's mean): the study's 2, and
# half and twice that, beside the arm without resuscitation
RESUSCITATION_FACTORS = (1.0, 2.0, 4.0)
RESUSCITATION_FINDINGS = ("resuscitation_improves_acquisition", "resuscitation_improves_retention")


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
        raise DemoConfigError(f"factors {list(factors)}: give each factor once (labels q=<factor:g> must differ)")
    run, per_seed, summary, found = against_plain(base, variants, "late+resuscitation", RESUSCITATION_FINDINGS,
                                                   seeds, workers)
    return {"experiment": "resuscitation-dose", "seeds": run["seeds"], "factors": [float(q) for q in factors],
            "ratio": base.resuscitation_ratio, "cap": base.resuscitation_cap, "study_factor": base.resuscitation_factor,
            "per_seed": per_seed, "summary": summary, "findings": found, "timings": run["timings"]}



def plot_resuscitation_dose(result: dict, path: Path) -> Path:
    return plot_against_plain(
        result, path, [f"q={q:g}" for q in result["factors"]], ["none", *[f"q = {q:g}" for q in result["factors"]]],
        (("acquisition", "acquisition A"), ("retention", "retention (share of the peak gain kept)"),
         ("forgetting", "forgetting F")),
        f"resuscitation factor at the late checkpoint (study: q = {result['study_factor']:g})")



register(Experiment("resuscitation-dose", resuscitation_dose, plot_resuscitation_dose, multi_seed=True,
                    summary=dose_summary, about=__doc__))
