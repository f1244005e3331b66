"""``sam-dose``: the study's late arm with plain AdamW and with SAM (Zhu et al.) at a fifth of, at, and at four
times the study's radius rho, for its three seeds from one pretraining each: whether SAM's effect on acquisition
and retention grows with rho and stands out from the differences between seeds.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence


from ..config import DemoConfig, DemoConfigError
from ..study import DEFAULT_SEEDS
from .common import against_plain, dose_summary, plot_against_plain
from .registry import Experiment, register

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
            raise DemoConfigError(f"rho {rho!r}: SAM's radius must be a finite number > 0")
        variants[f"rho={rho:g}"] = ("late+sam", {"sam_rho": float(rho)})
    if len(variants) != 1 + len(rhos):
        raise DemoConfigError(f"rhos {list(rhos)}: give each radius once (labels rho=<rho:g> must differ)")
    run, per_seed, summary, found = against_plain(base, variants, "late+sam", ("sam_improves_acquisition",),
                                                   seeds, workers)
    return {"experiment": "sam-dose", "seeds": run["seeds"], "rhos": [float(r) for r in rhos],
            "study_rho": base.sam_rho, "per_seed": per_seed, "summary": summary, "findings": found,
            "timings": run["timings"]}


def plot_sam_dose(result: dict, path: Path) -> Path:
    return plot_against_plain(
        result, path, [f"rho={r:g}" for r in result["rhos"]], ["AdamW", *[f"SAM rho {r:g}" for r in result["rhos"]]],
        (("acquisition", "acquisition A"), ("retention", "retention (share of the peak gain kept)"),
         ("injected_rise", "injected facts' rise (nats/token)")),
        f"optimizer at the late checkpoint (study: rho = {result['study_rho']:g})")



register(Experiment("sam-dose", sam_dose, plot_sam_dose, multi_seed=True, summary=dose_summary, about=__doc__))
