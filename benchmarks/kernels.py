"""The fused Triton kernels against the torch reference they implement, on a CUDA GPU.

For each case: time per call of the fused kernel, of the multi-op torch reference and of the
reference compiled by ``torch.compile``; the kernel's achieved bandwidth (bytes of C, and dL/dC,
read once) and its share of the device's copy bandwidth, measured in the same run by copying a
1 GiB tensor. Every case first checks that the kernel's statistics equal the reference's (counts
exactly, sums to fp32 tolerance): the GPU code path is otherwise only tested under the interpreter.

    python benchmarks/kernels.py [--repeats 20]

Needs a CUDA GPU and Triton; without one it exits with status 2 and says so.
``TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke`` runs the same code on tiny shapes on the
CPU (timings meaningless) so that this script's own code is checked where there is no GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import print_table, sync  # noqa: E402


@dataclass
class Case:
    name: str
    rows: int
    d_ff: int
    dtype: torch.dtype = torch.bfloat16
    backward: bool = False
    masked: bool = True
    doc: bool = False
    column_major: bool = False


CASES = [  # OLMo-1B's FFN: d_ff 8192; a batch of 8 x 1024 tokens is 8192 rows
    Case("forward, 8x1024 tokens, bf16, padded", 8192, 8192),
    Case("forward, 8x1024 tokens, fp32, padded", 8192, 8192, torch.float32),
    Case("forward, 8x1024 tokens, bf16, no mask", 8192, 8192, masked=False),
    Case("forward, + document weights", 8192, 8192, doc=True),
    Case("forward, column-major C", 8192, 8192, column_major=True),
    Case("forward, tall: 64x1024 tokens", 65536, 8192),
    Case("forward, decode step: 8 tokens", 8, 8192),
    Case("backward, 8x1024 tokens, bf16, padded", 8192, 8192, backward=True),
    Case("backward, tall: 64x1024 tokens", 65536, 8192, backward=True),
]


def seconds_per_call(runs: dict, repeats: int, inner: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call over ``inner`` back-to-back calls (CUDA events on a GPU), variants interleaved."""
    for run in runs.values():
        run()
    sync(device)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    run()
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end) / 1e3
            else:
                begin = time.perf_counter()
                for _ in range(inner):
                    run()
                elapsed = time.perf_counter() - begin
            times[name].append(elapsed / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(repeats: int, device: torch.device, nbytes: int) -> float:
    """Bytes per second of a copy of ``nbytes`` on the device (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = seconds_per_call({"copy": lambda: dst.copy_(src)}, repeats, 5, device)["copy"]
    src = dst = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / seconds


def inputs(case: Case, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (case.d_ff, case.rows) if case.column_major else (case.rows, case.d_ff)
    c = torch.randn(shape, device=device, generator=g)
    c = (torch.nn.functional.silu(c) * c).to(case.dtype)  # a gated FFN's C: mostly small, a few large
    c = c.t() if case.column_major else c
    grad = torch.randn(case.rows, case.d_ff, device=device, generator=g).to(case.dtype) if case.backward else None
    rows = None
    if case.masked:
        rows = torch.ones(case.rows, dtype=torch.bool, device=device)
        rows[-max(1, case.rows // 8):] = False
    weight = torch.rand(case.rows, device=device, generator=g) if case.doc else None
    return c, grad, rows, weight


def check(case: Case, c, grad, rows, weight, kernel_module, reference) -> str:
    from kacq_hooks.stats import LayerStats

    got, want = LayerStats(case.d_ff, c.device), LayerStats(case.d_ff, c.device)
    for module, stats in ((kernel_module, got), (reference, want)):
        if case.backward:
            module.accumulate_backward(c, grad, rows, stats)
        else:
            module.accumulate_forward(c, rows, weight, stats)
    bad = []
    for (name, mine), (_, theirs) in zip(got.buffers(), want.buffers()):
        if mine.dtype.is_floating_point:
            ok = torch.allclose(mine, theirs, rtol=1e-4, atol=1e-3)
        else:
            ok = torch.equal(mine, theirs)
        if not ok:
            bad.append(name)
    return "ok" if not bad else "MISMATCH: " + ", ".join(bad)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1: checks the script, not the speed")
    args = parser.parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("--smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        sys.exit(2)
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False): it times the CUDA "
              "kernels. On the CPU they are checked against the reference by tests/test_kernels.py, under "
              "TRITON_INTERPRET=1.", file=sys.stderr)
        sys.exit(2)
    try:
        from kacq_hooks.kernels import reference
        from kacq_hooks.kernels import triton as fused
    except ImportError as err:
        print(f"benchmarks/kernels.py needs Triton: {err}. pip install 'kacq_hooks[triton]'", file=sys.stderr)
        sys.exit(2)
    from kacq_hooks.stats import LayerStats

    device = torch.device("cpu" if args.smoke else "cuda")
    cases = [replace(case, rows=max(1, case.rows // 512), d_ff=case.d_ff // 64) for case in CASES] if args.smoke \
        else CASES
    bandwidth = copy_bandwidth(args.repeats, device, 2**20 if args.smoke else 2**30)
    name = "CPU (smoke run, interpreter)" if args.smoke else torch.cuda.get_device_name()
    print(f"device: {name}, measured copy bandwidth {bandwidth / 1e9:.0f} GB/s (device-to-device, read + write); "
          f"torch {torch.__version__}")
    torch._dynamo.config.recompile_limit = 64  # every case is a new shape: keep compiling, do not fall back
    compiled_forward = torch.compile(reference.accumulate_forward, dynamic=False)
    compiled_backward = torch.compile(reference.accumulate_backward, dynamic=False)
    table = []
    for case in cases:
        c, grad, rows, weight = inputs(case, device)
        verdict = check(case, c, grad, rows, weight, fused, reference)
        stats = {variant: LayerStats(case.d_ff, device) for variant in ("kernel", "reference", "compiled")}
        if case.backward:
            runs = {"kernel": lambda: fused.accumulate_backward(c, grad, rows, stats["kernel"]),
                    "reference": lambda: reference.accumulate_backward(c, grad, rows, stats["reference"]),
                    "compiled": lambda: compiled_backward(c, grad, rows, stats["compiled"])}
        else:
            runs = {"kernel": lambda: fused.accumulate_forward(c, rows, weight, stats["kernel"]),
                    "reference": lambda: reference.accumulate_forward(c, rows, weight, stats["reference"]),
                    "compiled": lambda: compiled_forward(c, rows, weight, stats["compiled"])}
        compile_note = "-"
        if args.no_compile or args.smoke:
            runs.pop("compiled")
        else:
            try:
                runs["compiled"]()
            except Exception as err:  # a compiler failure is a row note, not the end of the table
                compile_note = f"compile failed: {type(err).__name__}"
                runs.pop("compiled")
        moved = c.numel() * c.element_size() * (2 if case.backward else 1)
        moved += (0 if rows is None else rows.numel()) + (0 if weight is None else weight.numel() * 4)
        inner = 1 if args.smoke else min(200, max(5, 2**32 // moved))  # ~4 GiB of traffic per sample
        seconds = seconds_per_call(runs, 1 if args.smoke else args.repeats, inner, device)
        achieved = moved / seconds["kernel"]
        compiled = f"{seconds['compiled'] * 1e3:.3f}" if "compiled" in seconds else compile_note
        table.append([case.name, f"{seconds['kernel'] * 1e3:.3f}", f"{seconds['reference'] * 1e3:.3f}",
                      f"{seconds['reference'] / seconds['kernel']:.1f}x", compiled,
                      f"{achieved / 1e9:.0f}", f"{100 * achieved / bandwidth:.0f}%", verdict])
        c = grad = rows = weight = stats = runs = None  # free this case's tensors before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print_table(["case", "kernel ms", "reference ms", "speed-up", "compiled ref ms", "kernel GB/s",
                 "of copy BW", "check"], table)


if __name__ == "__main__":
    main()
