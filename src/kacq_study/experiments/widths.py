"""``entropy-widths``: knowledge entropy against pretraining step for three model widths, far past the
demo's pretraining, with the loss beside it. Kim et al. measured OLMo checkpoints long after the start
of training, where entropy falls; a model trained from scratch first passes through a transient (the
entropy drops within tens of steps, then climbs back as the model starts to use its slots), and the
question is whether, and when, the climb turns into the papers' decay.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from kacq_hooks.report import pyplot, save_figure

from .. import pipeline
from ..config import DemoConfig
from ..findings import spearman
from ..pipeline import deterministic
from .common import number_text
from .registry import Experiment, register

WIDTHS = (32, 64, 128)


def entropy_widths(widths: Sequence[int] = WIDTHS, steps: int = 1500, seq_len: int = 128, seed: int = 0,
                   every: int = 25) -> dict:
    """Pretrain the demo's model at each width (d_ff = 4 d_model, 4 layers, cosine schedule over ``steps``)
    and record total knowledge entropy on the calibration set every ``every`` steps, with the loss."""
    runs = {}
    for width in widths:
        config = DemoConfig(seed=seed, d_model=width, d_ff=4 * width, n_heads=4, seq_len=seq_len,
                            pretrain_steps=steps, early_step=steps // 2, entropy_every=every,
                            warmup_steps=max(10, steps // 40), max_docs=None, batch_size=8)
        started = time.perf_counter()
        with deterministic(config.threads, config.device):
            data = pipeline.prepare(config, lambda phase, info: None)
            pretraining, _ = pipeline.pretrain(config, data, lambda phase, info: None)
        entropy = pretraining["entropy"]
        totals, at = entropy["total"], entropy["steps"]
        low = min(range(len(totals)), key=totals.__getitem__)
        runs[str(width)] = {
            "d_model": width, "d_ff": 4 * width, "max_total": entropy["max_total"],
            "steps": at, "total": totals, "loss": pretraining["loss"],
            "minimum_step": at[low], "minimum": totals[low], "last": totals[-1],
            # the trend after the transient: negative would be the papers' decay
            "spearman_after_minimum": spearman([float(s) for s in at[low:]], totals[low:]),
            "seconds": time.perf_counter() - started,
        }
    return {"experiment": "entropy-widths", "steps": steps, "seq_len": seq_len, "seed": seed, "runs": runs}


def plot_entropy_widths(result: dict, path: Path) -> Path:
    plt = pyplot()
    fig, (loss_ax, entropy_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, run in result["runs"].items():
        loss = run["loss"]
        window = max(1, len(loss) // 50)
        smooth = [sum(loss[i:i + window]) / len(loss[i:i + window]) for i in range(0, len(loss), window)]
        loss_ax.plot([1 + i for i in range(0, len(loss), window)], smooth, label=f"d_model {name}")
        gap = [run["max_total"] - h for h in run["total"]]
        entropy_ax.plot(run["steps"], gap, label=f"d_model {name} (max {run['max_total']:.1f} nats)")
        entropy_ax.axvline(run["minimum_step"], ls=":", lw=0.8, color=entropy_ax.lines[-1].get_color())
    loss_ax.set(xlabel="pretraining step", ylabel="training loss (nats/token)", title="loss")
    entropy_ax.set(xlabel="pretraining step", ylabel="max entropy - knowledge entropy H (nats)",
                   title="distance below the maximum L ln(d_ff) (dotted: entropy minimum)", yscale="log")
    loss_ax.legend(fontsize=8)
    entropy_ax.legend(fontsize=8)
    return save_figure(fig, path)



def summary(result: dict) -> list[str]:
    return [f"d_model {width}: entropy minimum {number_text(r['minimum'], '.3f')} at step {r['minimum_step']}, last "
            f"{number_text(r['last'], '.3f')} (max {number_text(r['max_total'], '.3f')}); Spearman(step, H) after the minimum "
            f"{r['spearman_after_minimum']}" for width, r in result.get("runs", {}).items()]


register(Experiment("entropy-widths", entropy_widths, plot_entropy_widths, multi_seed=False, summary=summary,
                    about=__doc__))
