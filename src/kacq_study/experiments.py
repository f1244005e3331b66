"""Dedicated experiments behind ``docs/findings.md``: small studies of why a finding does or does not
reproduce at the demo's scale, each one command that writes a figure and a JSON of its numbers.

    python -m kacq_study.experiments entropy-widths --out docs/findings
    python -m kacq_study.experiments acquisition-vs-entropy --out docs/findings

``entropy-widths``: knowledge entropy against pretraining step for three model widths, far past the
demo's pretraining, with the loss beside it. Kim et al. measured OLMo checkpoints long after the start
of training, where entropy falls; a model trained from scratch first passes through a transient (the
entropy drops within tens of steps, then climbs back as the model starts to use its slots), and the
question is whether, and when, the climb turns into the papers' decay.

``acquisition-vs-entropy``: the demo's pretraining with checkpoints at several steps, and the demo's
plain continued-training arm with fact injection from each. Kim et al.'s account is that acquisition
follows knowledge entropy (r = 0.94 over OLMo checkpoints), and that later checkpoints acquire less
*because* their entropy has decayed: where entropy still climbs, the account predicts the opposite order.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from kacq_hooks.report import pyplot, save_figure

from .demo import Arm, DemoConfig, _prepare, _pretrain, _run_arm, deterministic
from .findings import _spearman

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
            data = _prepare(config, lambda phase, info: None)
            pretraining, _ = _pretrain(config, data, lambda phase, info: None)
        entropy = pretraining["entropy"]
        totals, at = entropy["total"], entropy["steps"]
        low = min(range(len(totals)), key=totals.__getitem__)
        runs[str(width)] = {
            "d_model": width, "d_ff": 4 * width, "max_total": entropy["max_total"],
            "steps": at, "total": totals, "loss": pretraining["loss"],
            "minimum_step": at[low], "minimum": totals[low], "last": totals[-1],
            # the trend after the transient: negative would be the papers' decay
            "spearman_after_minimum": _spearman([float(s) for s in at[low:]], totals[low:]),
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


def acquisition_vs_entropy(steps: int | None = None, seed: int = 0, points: int = 5) -> dict:
    """Acquisition A and knowledge entropy H of ``points`` checkpoints spread over the demo's pretraining
    (the demo's default config; ``steps`` pretraining steps if given), each continued with the demo's plain
    AdamW arm and the same injected facts."""
    config = DemoConfig(seed=seed, **({"pretrain_steps": steps} if steps else {}))
    at = sorted({max(1, round(config.pretrain_steps * (i + 1) / points)) for i in range(points)})
    quiet = lambda phase, info: None  # noqa: E731
    with deterministic(config.threads, config.device):
        data = _prepare(config, quiet)
        pretraining, checkpoints = _pretrain(config, data, quiet, snapshot_at=at)
        rows = []
        for step in at:
            arm = _run_arm(Arm(f"step{step}", f"step{step}"), config, data, checkpoints, quiet)
            rows.append({"step": step, "entropy": arm["entropy_start"]["total"],
                         "acquisition": arm["kim"]["acquisition"], "K_before": arm["kim"]["K_before"],
                         "K_after": arm["kim"]["K_after"], "forgetting": arm["kim"]["forgetting"],
                         "injected_rise": arm["learning"]["injected"]["rise"],
                         # Chang et al.'s order of probe kinds, on the per-token mean and on the first token
                         **{key: {kind: _mean([g[key] for name, g in arm["groups"].items()
                                              if name.endswith("/" + kind)]) for kind in ("mem", "gen", "hard_gen")}
                            for key in ("effectivity", "effectivity_first_token")}})
    entropy = [r["entropy"] for r in rows]
    acquisition = [r["acquisition"] for r in rows]
    return {"experiment": "acquisition-vs-entropy", "seed": seed, "pretrain_steps": config.pretrain_steps,
            "checkpoints": rows, "pearson": _pearson(entropy, acquisition),
            "spearman_step_acquisition": _spearman([float(r["step"]) for r in rows], acquisition),
            "spearman_step_entropy": _spearman([float(r["step"]) for r in rows], entropy),
            "pretraining_entropy": {"steps": pretraining["entropy"]["steps"], "total": pretraining["entropy"]["total"]}}


def _mean(values: Sequence[float]) -> float | None:
    kept = [v for v in values if v is not None and v == v]
    return sum(kept) / len(kept) if kept else None


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


EXPERIMENTS = {"entropy-widths": (entropy_widths, plot_entropy_widths),
               "acquisition-vs-entropy": (acquisition_vs_entropy, plot_acquisition_vs_entropy)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kacq_study.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--out", default="docs/findings", help="folder for the figure and the JSON")
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (experiment's default if omitted)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run, plot = EXPERIMENTS[args.experiment]
    kwargs = {"seed": args.seed, **({"steps": args.steps} if args.steps else {})}
    started = time.perf_counter()
    result = run(**kwargs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.experiment.replace("-", "_")
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    figure = plot(result, out / f"{name}.png")
    print(f"wrote {figure} and {name}.json in {time.perf_counter() - started:.0f} s")
    for width, r in result.get("runs", {}).items():
        print(f"d_model {width}: entropy minimum {r['minimum']:.3f} at step {r['minimum_step']}, last {r['last']:.3f} "
              f"(max {r['max_total']:.3f}); Spearman(step, H) after the minimum {r['spearman_after_minimum']}")
    for r in result.get("checkpoints", []):
        print(f"step {r['step']}: H {r['entropy']:.3f}, A {r['acquisition']:.4f}, injected rise {r['injected_rise']:.2f}, "
              f"effectivity {r['effectivity']}, first token {r['effectivity_first_token']}")
    if "pearson" in result:
        print(f"Pearson(H, A) = {result['pearson']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
