"""What instrument(model) costs on a mixture-of-experts training step: forward + backward + AdamW step.

The Mixtral-shaped model of benchmarks/moe_overhead.py (8 experts, top-2), batch 4 x 128 with right padding, on
the CPU, for each experts implementation. Variants take turns in one process: plain; ``kh.instrument(model)``
(forward statistics); ``kh.instrument(model, grads=True)`` (also the dL/dC statistics of every routed slot,
read by a tensor hook on each expert's C during backward). A ratio is the median over turns of variant / plain
time, beside the quartiles of the per-turn ratios (how noisy the run was). Time only: peak memory of the
forward is measured by benchmarks/moe_overhead.py.

    python benchmarks/moe_training_step.py [--repeats N] [--impl eager] [--cpu-time]
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import describe, paired_ratio, print_table, time_samples, turn_quartiles  # noqa: E402
from moe_overhead import IMPLS, arguments, build  # noqa: E402

from kacq_hooks import bench  # noqa: E402

VARIANTS = {"plain": None, "kacq instrument": {}, "kacq instrument(grads=True)": {"grads": True}}


def main(argv=None) -> None:
    args = arguments(__doc__, repeats=9).parse_args(argv)
    if args.cpu_time:
        torch.set_num_threads(1)
    rows = []
    for impl in args.impl or IMPLS:
        model, ids, mask = build(impl, batch=4, seq=128)
        if not rows:
            print(describe(model, ids, mask) + "\n")
        runs = bench.training_runs(model, ids, mask, VARIANTS)
        samples = time_samples(runs, args.repeats, ids.device,
                               clock=time.thread_time if args.cpu_time else time.perf_counter)
        plain = statistics.median(samples["plain"]) * 1e3
        for name in list(VARIANTS)[1:]:
            rows.append([impl, name, f"{plain:.1f} ms", f"{statistics.median(samples[name]) * 1e3:.1f} ms",
                         f"{paired_ratio(samples, name, 'plain'):.3f}x", turn_quartiles(samples, name, "plain")])
        print(f"{impl}: " + "; ".join(f"{r[1]} {r[4]} (quartiles {r[5]})" for r in rows if r[0] == impl),
              file=sys.stderr, flush=True)
    step = "training step (CPU time, 1 thread)" if args.cpu_time else "training step"
    print_table(["experts impl", "variant", f"plain {step}", "variant", "ratio", "quartiles of turns"], rows)


if __name__ == "__main__":
    main()
