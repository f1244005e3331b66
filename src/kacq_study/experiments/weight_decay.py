"""``entropy-weight-decay``: knowledge entropy against pretraining measured in AdamW weight-decay time constants.

From scratch, knowledge entropy collapses within tens of steps, then climbs for as long as the demo trains. AdamW's
decoupled weight decay shrinks every weight by a factor (1 - lr * wd) per step, so the weight norm settles where the
decay balances the updates after a few time constants of 1 / (lr * wd) steps. This experiment pretrains the demo's
recipe at a small width with a constant learning rate (after a short warmup) at three weight decays, three seeds each,
and records entropy (total and per layer), the held-out loss and the FFN weight norm against the step and against the
time constants elapsed, sum_t lr_t * wd. A run's entropy "decays" when it falls after its peak by more than three times
its own step-to-step noise (the criterion is fixed here, before any run: :func:`analyse_run`).
"""
from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing
import time
from pathlib import Path
from typing import Sequence

import torch

from kacq_hooks.report import pyplot, save_figure

from .. import pipeline
from ..config import DemoConfig, DemoConfigError
from ..findings import DECAY_NOISE_MULTIPLE
from ..pipeline import deterministic
from ..study import DEFAULT_SEEDS, checked_seeds
from .common import number_text, quiet
from .registry import Experiment, register

WEIGHT_DECAYS = (0.1, 0.3, 1.0)
STEPS = 4000
EVERY = 100
WARMUP = 50
# the small recipe: 4 layers, d_model 64, d_ff 256, 128-token rows of 8, a 2,048-token BPE vocabulary
RECIPE = dict(d_model=64, d_ff=256, n_layers=4, n_heads=4, seq_len=128, vocab_size=2048, batch_size=8,
              calibration_sequences=64, max_docs=None)
# the fall after the peak must exceed this many times the step-to-step noise of the curve (fixed before any run; the
# demo's decay regime judges its checkpoints by the same number)
NOISE_MULTIPLE = DECAY_NOISE_MULTIPLE
# OLMo 7B's published peak and final learning rate and weight decay, and Kim et al.'s checkpoint span (steps)
OLMO = {"peak_lr": 3.0e-4, "final_lr": 3.0e-5, "weight_decay": 0.1, "warmup": 5000, "steps": 700_000}


def decay_config(seed: int, weight_decay: float, steps: int = STEPS, every: int = EVERY, **overrides) -> DemoConfig:
    """The demo's learning rate on :data:`RECIPE`, with ``weight_decay``; entropy every ``every`` steps."""
    settings = {**RECIPE, **overrides}
    return DemoConfig(seed=seed, weight_decay=weight_decay, pretrain_steps=steps, early_step=max(1, steps // 2),
                      warmup_steps=min(WARMUP, max(1, steps // 10)), entropy_every=every, **settings)


def time_constants(lrs: Sequence[float], weight_decay: float) -> list[float]:
    """Weight-decay time constants elapsed after each step: the running sum of lr_t * wd."""
    elapsed, out = 0.0, []
    for lr in lrs:
        elapsed += lr * weight_decay
        out.append(elapsed)
    return out


def olmo_time_constants(olmo: dict = OLMO) -> dict:
    """Time constants OLMo's schedule spans: at its peak rate throughout (an upper bound) and under a linear decay
    from the peak to the final rate after the warmup (its published schedule's shape)."""
    peak = olmo["steps"] * olmo["peak_lr"] * olmo["weight_decay"]
    decaying = olmo["steps"] - olmo["warmup"]
    mean_lr = (olmo["peak_lr"] + olmo["final_lr"]) / 2
    scheduled = (olmo["warmup"] * olmo["peak_lr"] / 2 + decaying * mean_lr) * olmo["weight_decay"]
    return {**olmo, "steps_per_time_constant": 1 / (olmo["peak_lr"] * olmo["weight_decay"]),
            "at_peak_lr": peak, "scheduled": scheduled}


def _ffn_norm(model: torch.nn.Module) -> float:
    return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for n, p in model.named_parameters() if ".mlp." in n))


def pretrain_run(config: DemoConfig) -> dict:
    """Pretrain ``config``'s model with AdamW at a constant learning rate after a linear warmup, measuring entropy,
    held-out loss and FFN weight norm at step 0 and every ``entropy_every`` steps."""
    started = time.perf_counter()
    with deterministic(config.threads, config.device):
        data = pipeline.prepare(config, quiet)
        tokenizer = data.tokenizer
        model = pipeline.build_model(config, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                      betas=(0.9, 0.95))
        warmup = config.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(config.seed))
        curves = {"steps": [], "total": [], "per_layer": [], "held_out_loss": [], "ffn_norm": []}
        lrs, losses = [], []

        def measure(step: int) -> None:
            ke = data.calibration.entropy(model)
            curves["steps"].append(step)
            curves["total"].append(ke["total"])
            curves["per_layer"].append(ke["per_layer"])
            curves["held_out_loss"].append(data.calibration.loss(model))
            curves["ffn_norm"].append(_ffn_norm(model))
            curves["max_total"] = ke["max_total"]

        measure(0)
        for step in range(1, config.pretrain_steps + 1):
            lrs.append(optimizer.param_groups[0]["lr"])  # the rate this step's update uses
            loss = pipeline.pretrain_step(model, optimizer, schedule, data, order, step, config)
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if step % config.entropy_every == 0 or step == config.pretrain_steps:
                measure(step)
    elapsed = time_constants(lrs, config.weight_decay)
    curves["time_constants"] = [0.0 if s == 0 else elapsed[s - 1] for s in curves["steps"]]
    return {"seed": config.seed, "weight_decay": config.weight_decay, "lr": config.lr, "epoch_steps":
            len(data.train) / config.batch_size, "train_loss": losses, **curves,
            "seconds": time.perf_counter() - started}


def _noise(values: Sequence[float]) -> float | None:
    """Step-to-step noise of a curve (:func:`kacq_study.pipeline.curve_noise`, shared with the demo's decay regime)."""
    return pipeline.curve_noise(values)


def analyse_run(run: dict) -> dict:
    """Where entropy bottoms out after the early collapse, where it peaks after that, and whether it then decays.

    The early minimum, the peak and "decays" are :func:`kacq_study.pipeline.entropy_peak`'s (the demo's decay regime
    picks its checkpoints by the same rule): the early minimum is the lowest total in the first quarter of the
    measurements after step 0; the peak is the highest total after it. "Decays" holds when the last total is below
    the peak by more than :data:`NOISE_MULTIPLE` times the noise of the curve after the peak (None when fewer than
    three points follow the peak). A layer falls when its own entropy at the end is below its value at the total's
    peak by more than that multiple of its own noise.
    """
    steps, totals = run["steps"], run["total"]
    rule = pipeline.entropy_peak(steps, totals, NOISE_MULTIPLE)
    peak = steps.index(rule["peak_step"])
    low = steps.index(rule["early_minimum_step"])
    noise, fall, decays = rule["noise"], rule["fall_after_peak"], rule["decays"]
    layers = []
    for k in range(len(run["per_layer"][0])):
        curve = [row[k] for row in run["per_layer"]]
        layer_noise = _noise(curve[peak:])
        change = curve[-1] - curve[peak]
        layers.append({"change_after_peak": change, "noise": layer_noise,
                       "falls": None if layer_noise is None or len(curve) - peak < 4  # three after the peak
                       else -change > NOISE_MULTIPLE * layer_noise})
    norms = run["ffn_norm"]
    last_quarter = norms[-max(2, len(norms) // 4):]
    return {"early_minimum_step": steps[low], "early_minimum": totals[low], "peak_step": steps[peak],
            "peak": totals[peak], "peak_time_constants": run["time_constants"][peak], "last": totals[-1],
            "fall_after_peak": fall, "noise": noise, "decays": decays, "layers": layers,
            "held_out_loss_last": run["held_out_loss"][-1],
            # the FFN weight norm's relative change over the last quarter of the run: near 0 once decay balances it
            "ffn_norm_change_last_quarter": (last_quarter[-1] - last_quarter[0]) / last_quarter[0]}


def _task(config: DemoConfig) -> dict:
    run = pretrain_run(config)
    return {**run, "analysis": analyse_run(run)}


def entropy_weight_decay(seeds: Sequence[int] = DEFAULT_SEEDS, workers: int | None = None,
                         weight_decays: Sequence[float] = WEIGHT_DECAYS, steps: int = STEPS, every: int = EVERY,
                         **overrides) -> dict:
    """Every (weight decay, seed) run of :func:`pretrain_run`, in ``workers`` processes, with each weight decay's
    peaks, falls and decaying layers over the seeds, and OLMo's span in time constants beside them."""
    seeds = checked_seeds(seeds, workers)
    if not weight_decays or any(not wd > 0 for wd in weight_decays) or len(set(weight_decays)) < len(weight_decays):
        raise DemoConfigError(f"weight_decays must be distinct positive numbers, got {list(weight_decays)}")
    configs = [decay_config(seed, wd, steps, every, **overrides) for wd in weight_decays for seed in seeds]
    for config in configs:
        config.validate()  # before any process starts
    workers = workers or min(2, len(configs))
    if workers == 1:
        runs = [_task(config) for config in configs]
    else:
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = list(pool.map(_task, configs))
    return {"experiment": "entropy-weight-decay", "seeds": list(seeds), "weight_decays": list(weight_decays),
            "steps": steps, "every": every, "lr": configs[0].lr, "recipe": {**RECIPE, **overrides},
            "noise_multiple": NOISE_MULTIPLE, "olmo": olmo_time_constants(), "runs": runs,
            "by_weight_decay": by_weight_decay(runs, weight_decays)}


def by_weight_decay(runs: Sequence[dict], weight_decays: Sequence[float]) -> dict:
    """Each weight decay's peaks, falls and decaying layers over its seeds, from the runs' analyses."""
    summary = {}
    for wd in weight_decays:
        mine = [r for r in runs if r["weight_decay"] == wd]
        analyses = [r["analysis"] for r in mine]
        n_layers = len(analyses[0]["layers"])
        summary[str(wd)] = {
            "steps_per_time_constant": 1 / (mine[0]["lr"] * wd),
            "time_constants_at_end": mine[0]["time_constants"][-1],
            "peak_step": [a["peak_step"] for a in analyses],
            "peak_time_constants": [a["peak_time_constants"] for a in analyses],
            "fall_after_peak": [a["fall_after_peak"] for a in analyses],
            "noise": [a["noise"] for a in analyses],
            "decays": [a["decays"] for a in analyses],
            "layers_falling": [sum(bool(a["layers"][k]["falls"]) for a in analyses) for k in range(n_layers)],
            "held_out_loss_last": [a["held_out_loss_last"] for a in analyses],
            "ffn_norm_change_last_quarter": [a["ffn_norm_change_last_quarter"] for a in analyses],
        }
    return summary


def reanalysed(result: dict) -> dict:
    """``result`` (a saved run of this experiment) with every run analysed again by today's :func:`analyse_run`:
    the measured curves are kept, only the verdicts drawn from them are recomputed."""
    runs = [{**run, "analysis": analyse_run(run)} for run in result["runs"]]
    return {**result, "runs": runs, "by_weight_decay": by_weight_decay(runs, result["weight_decays"])}


def plot_entropy_weight_decay(result: dict, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    (by_step, by_tau), (loss_ax, norm_ax) = axes
    colors = dict(zip(map(str, result["weight_decays"]), ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    labelled = set()
    for run in result["runs"]:
        wd = str(run["weight_decay"])
        label = None if wd in labelled else f"wd {wd}"
        labelled.add(wd)
        color = colors.get(wd)
        by_step.plot(run["steps"], run["total"], color=color, lw=0.9, label=label)
        by_tau.plot(run["time_constants"], run["total"], color=color, lw=0.9, label=label)
        loss_ax.plot(run["steps"], run["held_out_loss"], color=color, lw=0.9, label=label)
        norm_ax.plot(run["steps"], run["ffn_norm"], color=color, lw=0.9, label=label)
        peak = run["analysis"]["peak_step"]
        by_step.plot([peak], [run["analysis"]["peak"]], marker="v", color=color, ms=5)
    by_step.set(xlabel="pretraining step", ylabel="knowledge entropy H (nats)",
                title="entropy (one line per seed; v: peak after the early collapse)")
    by_tau.set(xlabel="weight-decay time constants elapsed (sum of lr x wd)", ylabel="H (nats)",
               title="the same against time constants")
    loss_ax.set(xlabel="pretraining step", ylabel="held-out loss (nats/token)", title="held-out loss")
    norm_ax.set(xlabel="pretraining step", ylabel="FFN weight norm (Frobenius)", title="FFN weight norm")
    for ax in axes.flat:
        ax.legend(fontsize=8)
    # the early collapse dwarfs the later change: show the entropy from its early minimum on
    lows = [r["analysis"]["early_minimum"] for r in result["runs"]]
    highs = [max(r["total"]) for r in result["runs"]]
    if lows and highs:
        margin = 0.05 * (max(highs) - min(lows) or 1.0)
        for ax in (by_step, by_tau):
            ax.set_ylim(min(lows) - margin, max(highs) + margin)
    fig.tight_layout()
    return save_figure(fig, path)


def summary(result: dict) -> list[str]:
    lines = []
    for wd, row in result.get("by_weight_decay", {}).items():
        decays = row["decays"]
        lines.append(
            f"wd {wd} ({row['steps_per_time_constant']:.0f} steps per time constant, "
            f"{number_text(row['time_constants_at_end'], '.2f')} at the end): peak at steps {row['peak_step']} "
            f"({', '.join(number_text(t, '.2f') for t in row['peak_time_constants'])} time constants); fall after it "
            f"{', '.join(number_text(f, '.4f') for f in row['fall_after_peak'])} nats against noise "
            f"{', '.join(number_text(n, '.4f') for n in row['noise'])}; decays in {sum(bool(d) for d in decays)} of "
            f"{len(decays)} seeds; seeds whose layer falls: {row['layers_falling']}")
    olmo = result.get("olmo")
    if olmo:
        lines.append(f"OLMo 7B: {olmo['steps_per_time_constant']:.0f} steps per time constant at its peak rate; "
                     f"{olmo['steps']} steps span {olmo['scheduled']:.1f} time constants under its schedule "
                     f"({olmo['at_peak_lr']:.1f} at the peak rate throughout)")
    return lines


register(Experiment("entropy-weight-decay", entropy_weight_decay, plot_entropy_weight_decay, multi_seed=True,
                    summary=summary, about=__doc__))
