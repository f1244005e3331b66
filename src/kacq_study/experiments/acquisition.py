"""``acquisition-vs-entropy``: the demo's pretraining with checkpoints at several steps, and the demo's
plain continued-training arm with fact injection from each. Kim et al.'s account is that acquisition
follows knowledge entropy (r = 0.94 over OLMo checkpoints), and that later checkpoints acquire less
*because* their entropy has decayed: where entropy still climbs, the account predicts the opposite order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from kacq_hooks.report import pyplot, save_figure

from .. import pipeline
from ..arms import Arm
from ..config import DemoConfig
from ..findings import spearman
from ..pipeline import deterministic
from .common import mean_or_none, number_text
from .registry import Experiment, register


def acquisition_vs_entropy(steps: int | None = None, seed: int = 0, points: int = 5) -> dict:
    """Acquisition A and knowledge entropy H of ``points`` checkpoints spread over the demo's pretraining
    (the demo's default config; ``steps`` pretraining steps if given), each continued with the demo's plain
    AdamW arm and the same injected facts."""
    config = DemoConfig(seed=seed, **({"pretrain_steps": steps} if steps else {}))
    at = sorted({max(1, round(config.pretrain_steps * (i + 1) / points)) for i in range(points)})
    quiet = lambda phase, info: None  # noqa: E731
    with deterministic(config.threads, config.device):
        data = pipeline.prepare(config, quiet)
        pretraining, checkpoints = pipeline.pretrain(config, data, quiet, snapshot_at=at)
        rows = []
        for step in at:
            arm = pipeline.run_arm(Arm(f"step{step}", f"step{step}"), config, data, checkpoints, quiet)
            rows.append({"step": step, "entropy": arm["entropy_start"]["total"],
                         "acquisition": arm["kim"]["acquisition"], "K_before": arm["kim"]["K_before"],
                         "K_after": arm["kim"]["K_after"], "forgetting": arm["kim"]["forgetting"],
                         "injected_rise": arm["learning"]["injected"]["rise"],
                         # Chang et al.'s order of probe kinds, on the per-token mean and on the first token
                         **{key: {kind: mean_or_none([g[key] for name, g in arm["groups"].items()
                                              if name.endswith("/" + kind)]) for kind in ("mem", "gen", "hard_gen")}
                            for key in ("effectivity", "effectivity_first_token")}})
    entropy = [r["entropy"] for r in rows]
    acquisition = [r["acquisition"] for r in rows]
    return {"experiment": "acquisition-vs-entropy", "seed": seed, "pretrain_steps": config.pretrain_steps,
            "checkpoints": rows, "pearson": _pearson(entropy, acquisition),
            "spearman_step_acquisition": spearman([float(r["step"]) for r in rows], acquisition),
            "spearman_step_entropy": spearman([float(r["step"]) for r in rows], entropy),
            "pretraining_entropy": {"steps": pretraining["entropy"]["steps"], "total": pretraining["entropy"]["total"]}}



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



def summary(result: dict) -> list[str]:
    lines = [f"step {r['step']}: H {number_text(r['entropy'], '.3f')}, A {number_text(r['acquisition'], '.4f')}, injected rise "
             f"{number_text(r['injected_rise'], '.2f')}, effectivity {r['effectivity']}, first token {r['effectivity_first_token']}"
             for r in result.get("checkpoints", [])]
    if "pearson" in result:
        lines.append(f"Pearson(H, A) = {result['pearson']}")
    return lines


register(Experiment("acquisition-vs-entropy", acquisition_vs_entropy, plot_acquisition_vs_entropy, multi_seed=False,
                    summary=summary, about=__doc__))
