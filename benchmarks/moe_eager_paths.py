"""Eager experts, the two ways kacq_hooks follows them, in one process: tagged tensors against the torch-function mode.

The Mixtral-shaped model and variants of benchmarks/moe_overhead.py (``kh.instrument`` and the ``ExpertsTap``
floor), each run once with the tags (the default) and once with the mode (what input-scaled layers and compiled
forwards use), turns interleaved and their order alternated. Time is the CPU time of one torch thread; each ratio
is the median over turns of variant / plain in the same turn.

    python benchmarks/moe_eager_paths.py [--repeats N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from moe_overhead import build, runs  # noqa: E402

from kacq_hooks import experts  # noqa: E402


def through_mode(fn):
    """``fn`` with every eager experts forward followed by the mode (the tags switched off for its duration)."""
    def run():
        tags = experts._Hub._can_tag
        experts._Hub._can_tag = lambda *args: False
        try:
            return fn()
        finally:
            experts._Hub._can_tag = tags
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, ids, mask = build("eager")
    base = runs(model, ids, mask)
    fns = {"plain": base["plain"], "instrument, tags": base["kacq instrument"],
           "instrument, mode": through_mode(base["kacq instrument"]), "floor, tags": base["ExpertsTap floor"],
           "floor, mode": through_mode(base["ExpertsTap floor"])}
    first = {name: fn() for name, fn in fns.items()}
    for name, logits in first.items():
        assert torch.equal(logits, first["plain"]), f"{name} changed the logits"
    ratios = {name: [] for name in fns}
    for turn in range(args.repeats):
        seconds = {}
        for name in (list(fns) if turn % 2 == 0 else list(reversed(fns))):
            start = time.thread_time()
            fns[name]()
            seconds[name] = time.thread_time() - start
        for name in fns:
            ratios[name].append(seconds[name] / seconds["plain"])
    for name, values in ratios.items():
        print(f"{name:17s} {statistics.median(values):.3f}x   turns " + " ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
