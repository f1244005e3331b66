"""What instrument(model) costs on a mixture of experts: a Mixtral-shaped model, plain against instrumented.

A ~20M-parameter Mixtral (8 experts, top-2), batch 8 x 256 with right padding, on the CPU. Three
variants take turns in one process, for each experts implementation: the plain forward; the forward
under ``kh.instrument(model)`` (every statistic of every slot, padding masked, then the knowledge
entropy); and, as a floor, an ``ExpertsTap`` on every layer whose consumer does nothing: what seeing C
costs before any statistic is formed (the hooks, following the routing, handing the rows over).
A ratio is the median over turns of variant / plain time; beside it, the quartiles of those per-turn
ratios say how noisy the run was (a difference inside them is not resolved). Peak memory is measured as in
benchmarks/_harness.py (a fresh subprocess per variant): "peak" is the high-water mark of one forward
after a warm-up, "rise" its increase over the memory held before that forward.

With ``--cpu-time`` torch runs one thread and each call is timed by the CPU time of that thread
(``time.thread_time``), which other processes' load on a shared machine does not inflate (wall time
does: a descheduled thread stretches every call); peak memory is measured as without it.

    python benchmarks/moe_overhead.py [--repeats N] [--impl grouped_mm] [--cpu-time]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from _harness import (describe, paired_ratio, peak_during, peak_in_subprocess, print_table, time_samples,  # noqa: E402
                      turn_quartiles)

import kacq_hooks as kh  # noqa: E402
from kacq_hooks.experts import ExpertsTap, find_experts  # noqa: E402

IMPLS = ("eager", "batched_mm", "grouped_mm")
TARGETS = {"forward": 1.03, "peak memory": 1.02, "memory rise": 1.02}
MEASURED = ("kacq instrument", "ExpertsTap floor")


def build(impl: str, batch: int = 8, seq: int = 256, seed: int = 0):
    config = MixtralConfig(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=5,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=seq, experts_implementation=impl)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        mask[row, seq - 16 * row:] = 0  # rows of different lengths, right padding
    return model, ids, mask


def _nothing(expert_ids, token_index, weight, c) -> None:
    """The floor's consumer: it takes the rows and forms no statistic."""


def runs(model, ids, mask):
    layers = [layer for layer in find_experts(model) if layer.kind == "experts"]

    def plain():
        with torch.no_grad():
            return model(ids, attention_mask=mask).logits

    def tapped():
        taps = [ExpertsTap(layer, _nothing).attach() for layer in layers]
        try:
            return plain()
        finally:
            for tap in taps:
                tap.remove()

    inst = kh.instrument(model)
    inst.remove()  # attached only while it runs, so the other variants see a bare model

    def instrumented():
        inst.reset()
        with inst:
            logits = plain()
        inst.knowledge_entropy()
        return logits

    return {"plain": plain, "kacq instrument": instrumented, "ExpertsTap floor": tapped}


def peak_of(impl: str, name: str) -> None:
    """Subprocess entry: one variant's peak memory, as JSON."""
    model, ids, mask = build(impl)
    print(json.dumps(peak_during(runs(model, ids, mask)[name], ids.device)))


def arguments(doc: str, repeats: int) -> argparse.ArgumentParser:
    """The options of the mixture-of-experts benchmarks: --repeats, --impl (repeatable), --cpu-time."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--impl", choices=IMPLS, action="append")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one torch thread, timed by its CPU time (time.thread_time) instead of wall time")
    return parser


def main(argv=None) -> None:
    parser = arguments(__doc__, repeats=11)
    parser.add_argument("--peak-of", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_of:
        peak_of(*args.peak_of)
        return
    if args.cpu_time:
        torch.set_num_threads(1)
    rows = []
    for impl in args.impl or IMPLS:
        model, ids, mask = build(impl)
        if not rows:
            print(describe(model, ids, mask) + "\n")
        fns = runs(model, ids, mask)
        first = {name: fn() for name, fn in fns.items()}
        for name in MEASURED:
            assert torch.equal(first["plain"], first[name]), f"{name} changed the logits"
        samples = time_samples(fns, args.repeats, ids.device,
                               clock=time.thread_time if args.cpu_time else time.perf_counter)
        memory = {name: peak_in_subprocess(Path(__file__), ["--peak-of", impl, name]) for name in fns}
        ms = {name: statistics.median(s) * 1e3 for name, s in samples.items()}
        for name in MEASURED:
            forward = "forward (CPU time, 1 thread)" if args.cpu_time else "forward"
            measured = {forward: (ms["plain"], ms[name], "ms", paired_ratio(samples, name, "plain"),
                                  turn_quartiles(samples, name, "plain"))}
            for what, key in (("peak memory", "peak_mib"), ("memory rise", "extra_mib")):
                plain, other = memory["plain"][key], memory[name][key]
                measured[what] = (plain, other, "MiB", other / plain, "")
            for what, (plain, other, unit, ratio, spread) in measured.items():
                target = TARGETS[what.split(" (")[0]]
                rows.append([impl, name, what, f"{plain:.1f} {unit}", f"{other:.1f} {unit}", f"{ratio:.3f}x", spread,
                             f"<= {target:.2f}x", "met" if ratio <= target else "MISSED"])
        log = sys.stderr  # a partial table after each implementation, in case a later one fails
        print(f"{impl}: " + "; ".join(f"{r[1]} {r[2]} {r[5]}" + (f" (quartiles {r[6]})" if r[6] else "")
                                      for r in rows if r[0] == impl), file=log, flush=True)
    print_table(["experts impl", "variant", "measure", "plain", "variant", "ratio", "quartiles of turns", "target", ""],
                rows)


if __name__ == "__main__":
    main()
