"""Cost of instrument(model) on the CPU: forward, training step with grads=True, and peak memory.

Plain and instrumented runs are interleaved in one process (same model, same inputs) and the
median ratio is printed. Peak memory is measured in fresh subprocesses (ru_maxrss), one per variant.

    python benchmarks/overhead.py [--size cpu|gpu] [--repeats N]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import kacq_hooks as kh  # noqa: E402
import kacq_hooks.kernels  # noqa: E402,F401
from _models import build, n_params  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(variants: dict, repeats: int, device) -> dict[str, list[float]]:
    times = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def forward_variants(model, ids, mask):
    inst = kh.instrument(model)
    inst.remove()

    def plain():
        with torch.no_grad():
            model(ids, attention_mask=mask)

    def instrumented():
        with inst, torch.no_grad():
            model(ids, attention_mask=mask)

    return {"plain": plain, "instrumented": instrumented}


def training_variants(model, ids, mask):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    inst = kh.instrument(model, grads=True)
    inst.remove()
    labels = ids.masked_fill(mask == 0, -100)

    def step():
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def instrumented():
        with inst:
            step()

    return {"plain": step, "instrumented": instrumented}


def peak_memory(size: str, variant: str) -> float:
    """Peak RSS (MiB) of a fresh process that runs one forward of ``variant``."""
    code = f"""
import sys, resource, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import kacq_hooks as kh
from _models import build
model, ids, mask = build({size!r})
if {variant!r} == "instrumented":
    kh.instrument(model)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    for _ in range(2):
        model(ids, attention_mask=mask)
print(base / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    model, ids, mask = build(args.size)
    device = ids.device
    print(f"model: {n_params(model):.1f}M parameters, batch {tuple(ids.shape)}, {next(model.parameters()).dtype}, "
          f"device {device}, torch threads {torch.get_num_threads()}, kernels {kh.kernels.backend_for(device)}")
    rows = []
    for what, variants, repeats in (("forward", forward_variants(model, ids, mask), args.repeats),
                                    ("training step, grads=True", training_variants(model, ids, mask),
                                     max(3, args.repeats // 3))):
        times = time_interleaved(variants, repeats, device)
        plain, inst = statistics.median(times["plain"]), statistics.median(times["instrumented"])
        rows.append({"what": what, "plain_ms": plain * 1e3, "instrumented_ms": inst * 1e3, "ratio": inst / plain})
        model.eval()
    if device.type == "cpu":
        plain_mb, inst_mb = peak_memory(args.size, "plain"), peak_memory(args.size, "instrumented")
        rows.append({"what": "peak RSS, forward (MiB)", "plain_ms": plain_mb, "instrumented_ms": inst_mb,
                     "ratio": inst_mb / plain_mb})
    print(f"\n| {'measure':28s} | {'plain':>10s} | {'instrumented':>12s} | {'ratio':>6s} |")
    print(f"|{'-' * 30}|{'-' * 12}|{'-' * 14}|{'-' * 8}|")
    for r in rows:
        unit = "" if "MiB" in r["what"] else " ms"
        print(f"| {r['what']:28s} | {r['plain_ms']:7.1f}{unit:3s} | {r['instrumented_ms']:9.1f}{unit:3s} | "
              f"{r['ratio']:5.3f}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
