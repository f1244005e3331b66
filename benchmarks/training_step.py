"""Cost of instrumenting a training step: forward + backward + AdamW step, plain vs instrumented.

Variants: plain; ``instrument(model)`` (forward statistics only); ``instrument(model, grads=True)``
(forward statistics and, through a tensor hook on C, the dL/dC statistics of the backward pass).
Time: median of interleaved repeats on one model in one process. Peak memory: on CUDA
``max_memory_allocated`` around one step; on the CPU the peak RSS (VmHWM, reset after the model and
optimizer are built) of a fresh subprocess per variant; both after a warm-up step, which creates
AdamW's state. "extra" is the rise over the memory held before the step.

    python benchmarks/training_step.py [--size cpu|gpu] [--repeats N]
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Callable


sys.path.insert(0, str(Path(__file__).parent))
import kacq_hooks as kh  # noqa: E402
from kacq_hooks import bench  # noqa: E402
from _harness import (describe, paired_ratio, parse_args, peak_during, peak_in_subprocess,  # noqa: E402
                      print_table, time_samples)
from _models import build  # noqa: E402

VARIANTS = {  # name -> instrument() options, or None for the bare model
    "plain": None,
    "kacq instrument": {},
    "kacq instrument(grads=True)": {"grads": True},
}


def training_runs(model, ids, mask, names) -> dict[str, Callable[[], None]]:
    return bench.training_runs(model, ids, mask, {name: VARIANTS[name] for name in names})


def peak_of(size: str, name: str) -> None:
    """Subprocess entry: one variant's peak memory over a training step, as JSON."""
    model, ids, mask = build(size)
    run = training_runs(model, ids, mask, [name])[name]
    print(json.dumps(peak_during(run, ids.device)))


def main(argv=None) -> None:
    args = parse_args(__doc__, argv, repeats=5, peak_of=peak_of)
    if args is None:
        return
    model, ids, mask = build(args.size)
    print(describe(model, ids, mask) + f"; kacq kernels: {kh.kernels.describe(ids.device)}")
    runs = training_runs(model, ids, mask, list(VARIANTS))
    samples = time_samples(runs, args.repeats, ids.device)
    seconds = {name: statistics.median(times) for name, times in samples.items()}
    if ids.device.type == "cuda":
        memory = {name: peak_during(run, ids.device) for name, run in runs.items()}
    else:
        memory = {name: peak_in_subprocess(Path(__file__), ["--size", args.size, "--peak-of", name]) for name in runs}
    base_extra = memory["plain"]["extra_mib"]
    table = [[name, f"{seconds[name] * 1e3:.1f}", f"{paired_ratio(samples, name, 'plain'):.3f}x",
              f"{memory[name]['peak_mib']:.0f}", f"{memory[name]['extra_mib']:.0f}",
              f"{memory[name]['extra_mib'] / base_extra:.2f}x" if base_extra > 0 else "-"] for name in runs]
    print(f"\ntraining step (forward + backward + AdamW); median of {args.repeats} interleaved repeats; memory: "
          f"{'max_memory_allocated' if ids.device.type == 'cuda' else 'peak RSS of a subprocess'}\n")
    print_table(["variant", "ms", "time vs plain", "peak MiB", "extra MiB", "extra vs plain"], table)


if __name__ == "__main__":
    main()
