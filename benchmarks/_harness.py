"""Timing and memory helpers shared by the benchmarks: interleaved repeats, peak memory, tables.

Timing: every variant runs once to warm up, then the variants take turns ``repeats`` times (in
alternating order), so drift in the machine's load hits all of them alike; the median is reported. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` around one call, in the benchmark's own process; on the CPU the
peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` so that building the
models does not count) of a fresh subprocess that runs only that variant. Both measure one call
after a warm-up call.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).parent


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(runs: dict[str, Callable[[], object]], repeats: int, device: torch.device
                     ) -> dict[str, float]:
    """Median seconds per call of each run, measured in turns after one warm-up call each."""
    return {name: statistics.median(t) for name, t in time_samples(runs, repeats, device).items()}


def paired_ratio(samples: dict[str, list[float]], name: str, base: str) -> float:
    """Median over turns of ``name``'s time / ``base``'s time in the same turn: load drifts cancel."""
    return statistics.median(a / b for a, b in zip(samples[name], samples[base]))


def time_samples(runs: dict[str, Callable[[], object]], repeats: int, device: torch.device
                 ) -> dict[str, list[float]]:
    """Seconds of every call of each run, measured in turns after one warm-up call each."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for turn in range(repeats):
        order = list(runs) if turn % 2 == 0 else list(reversed(runs))  # no variant always runs second
        for name in order:
            sync(device)
            start = time.perf_counter()
            runs[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _status_mib(field: str) -> float:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def peak_during(run: Callable[[], object], device: torch.device) -> dict[str, float]:
    """{"peak_mib", "extra_mib"}: the peak memory of one call of ``run`` after a warm-up call, and its rise
    over the memory held before it (lazy state such as AdamW's moments is created by the warm-up)."""
    run()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mib": peak / 2**20, "extra_mib": (peak - base) / 2**20}
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    base = _status_mib("VmRSS")
    run()
    peak = _status_mib("VmHWM")
    return {"peak_mib": peak, "extra_mib": peak - base}


def peak_in_subprocess(script: Path, args: list[str]) -> dict[str, float]:
    """Run ``script args`` in a fresh interpreter; it prints one JSON line from :func:`peak_during` last."""
    # a fixed mmap threshold makes glibc hand every large freed block back, so RSS follows live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def describe(model, ids: torch.Tensor, mask: torch.Tensor) -> str:
    params = sum(p.numel() for p in model.parameters()) / 1e6
    dtype = next(model.parameters()).dtype
    where = torch.cuda.get_device_name(ids.device) if ids.device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} torch threads"
    return (f"model {params:.1f}M parameters ({type(model).__name__}, {dtype}), batch {tuple(ids.shape)} "
            f"with {int(mask.sum())} unpadded tokens, on {where}")


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
