"""What instrument(model) costs, against the targets of issue 14: forward, training step, peak memory.

A ~20M-parameter Llama-style model, batch 8 x 256 (``--size cpu``; ``--size gpu`` for the
OLMo-1B-shaped model on CUDA). Plain and instrumented runs take turns in one process; the ratio is
the median over turns of instrumented / plain time. Peak memory is measured as in
benchmarks/_harness.py (a fresh subprocess per variant on the CPU): "peak" is the process's high-water
mark during one forward after a warm-up, "extra" its rise over the memory held before that forward
(activations and workspaces; the fixed cost of loaded code, such as a compiler runtime, is in "peak"
only). The variants are those of end_to_end.py and training_step.py.

    python benchmarks/overhead.py [--size cpu|gpu] [--repeats N]
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
import end_to_end  # noqa: E402
import kacq_hooks as kh  # noqa: E402
import training_step  # noqa: E402
from _harness import (describe, paired_ratio, parse_args, peak_during, peak_in_subprocess,  # noqa: E402
                      print_table, time_samples)
from _models import build  # noqa: E402

FORWARD = ("plain", "kacq instrument")
TRAINING = ("plain", "kacq instrument(grads=True)")
TARGETS = {"forward": 1.01, "training step, grads=True": 1.03, "peak memory, forward": 1.02,
           "memory rise during a forward": 1.02}


def forward_runs(model, ids, mask):
    setup = end_to_end.Setup(model.eval(), ids, mask)
    return {name: end_to_end.VARIANTS[name](setup) for name in FORWARD}


def peak_of(size: str, name: str) -> None:
    """Subprocess entry: one forward variant's peak memory, as JSON."""
    model, ids, mask = build(size)
    print(json.dumps(peak_during(forward_runs(model, ids, mask)[name], ids.device)))


def main(argv=None) -> None:
    args = parse_args(__doc__, argv, repeats=15, peak_of=peak_of)
    if args is None:
        return
    model, ids, mask = build(args.size)
    device = ids.device
    print(describe(model, ids, mask) + f"; kacq kernels: {kh.kernels.describe(device)}\n")

    forward = time_samples(forward_runs(model, ids, mask), args.repeats, device)
    training = time_samples(training_step.training_runs(model, ids, mask, TRAINING),
                            max(5, args.repeats // 3), device)
    if device.type == "cuda":
        runs = forward_runs(model, ids, mask)
        memory = {name: peak_during(runs[name], device) for name in FORWARD}
    else:
        memory = {name: peak_in_subprocess(Path(__file__), ["--size", args.size, "--peak-of", name])
                  for name in FORWARD}
    median_ms = lambda samples, name: statistics.median(samples[name]) * 1e3  # noqa: E731
    measured = {
        "forward": (median_ms(forward, FORWARD[0]), median_ms(forward, FORWARD[1]), "ms",
                    paired_ratio(forward, FORWARD[1], FORWARD[0])),
        "training step, grads=True": (median_ms(training, TRAINING[0]), median_ms(training, TRAINING[1]), "ms",
                                      paired_ratio(training, TRAINING[1], TRAINING[0])),
    }
    for what, key in (("peak memory, forward", "peak_mib"), ("memory rise during a forward", "extra_mib")):
        plain, inst = memory[FORWARD[0]][key], memory[FORWARD[1]][key]
        measured[what] = (plain, inst, "MiB", inst / plain)
    rows = []
    for what, (plain, inst, unit, ratio) in measured.items():
        rows.append([what, f"{plain:.1f} {unit}", f"{inst:.1f} {unit}", f"{ratio:.3f}x",
                     f"<= {TARGETS[what]:.2f}x", "met" if ratio <= TARGETS[what] else "MISSED"])
    print_table(["measure", "plain", "instrumented", "ratio", "target", ""], rows)


if __name__ == "__main__":
    main()
