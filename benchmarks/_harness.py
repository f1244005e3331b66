"""The benchmarks' harness is kacq_hooks.bench (what ``kacq bench`` runs); this adds the scripts' own parts.

Timing and memory are measured as described in :mod:`kacq_hooks.bench`: interleaved turns after a
warm-up, paired median ratios, peak memory after a warm-up call (a fresh subprocess per variant on the CPU).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

from kacq_hooks.bench import (describe, format_table, paired_ratio, peak_during, peak_in_subprocess,  # noqa: F401
                              sync, time_interleaved, time_samples)

HERE = Path(__file__).parent


def turn_quartiles(samples: dict[str, list[float]], name: str, base: str) -> str:
    """"low-high": the quartiles of ``name``'s time / ``base``'s time over the turns, beside their median
    (``paired_ratio``): how noisy the run was, a difference inside them not resolved."""
    turns = [a / b for a, b in zip(samples[name], samples[base])]
    low, _, high = statistics.quantiles(turns, n=4) if len(turns) > 1 else (turns[0],) * 3
    return f"{low:.3f}-{high:.3f}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print(format_table(header, rows))


def parse_args(doc: str, argv, repeats: int, peak_of: Callable[[str, str], None]) -> argparse.Namespace | None:
    """The arguments every benchmark takes (--size, --repeats), or None when this process was started
    only to measure one variant's peak memory (then ``peak_of(size, name)`` has printed it)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_of:
        peak_of(args.size, args.peak_of)
        return None
    if args.size == "gpu" and not torch.cuda.is_available():
        sys.exit("--size gpu needs a CUDA GPU; run --size cpu here")
    return args
