"""Knowledge entropy of one batch, five ways: time and peak memory of a forward pass with each.

Variants (each runs one no-grad forward and ends with the knowledge entropy of that batch):

- plain: the model alone (the baseline of every ratio; computes nothing);
- kacq instrument: ``kacq_hooks.instrument(model)``, statistics streamed by hooks, no activation kept;
- TransformerLens run_with_cache: a ``HookedTransformer`` built in memory from the same weights,
  cache restricted to ``blocks.*.mlp.hook_post`` by ``names_filter``, reduced after the forward;
- nnsight trace: ``NNsight(model)``, every ``down_proj`` input saved in the trace, reduced after;
- naive hooks: forward pre-hooks that append C to a list, reduced at the end, as released
  research code does.

All variants share the reduction (mean |C| over unpadded tokens, in fp32), so the entropy column
shows that they measure the same thing. Time: median of interleaved repeats in one process.
Peak memory of one forward after a warm-up: on CUDA ``max_memory_allocated``; on the CPU the peak
RSS (VmHWM, reset after the models are built) of a fresh subprocess per variant; "extra" is the
rise over the memory held before the forward. A variant that cannot be built prints why in its row.

    python benchmarks/end_to_end.py [--size cpu|gpu] [--repeats N]
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
import kacq_hooks as kh  # noqa: E402
from _harness import (describe, paired_ratio, parse_args, peak_during, peak_in_subprocess,  # noqa: E402
                      print_table, time_samples)
from _models import build  # noqa: E402

Run = Callable[[], "float | None"]  # one forward; returns the batch's knowledge entropy (None: not measured)


@dataclass
class Setup:
    model: torch.nn.Module
    ids: torch.Tensor
    mask: torch.Tensor


def entropy_of(coefficients: list[torch.Tensor], mask: torch.Tensor) -> float:
    """The shared reduction: knowledge entropy of saved C tensors [batch, seq, d_ff] over unpadded tokens."""
    valid = mask.reshape(-1).bool()
    total = 0.0
    for c in coefficients:
        mean_abs = c.reshape(-1, c.shape[-1])[valid].float().abs().mean(0)
        total += kh.entropy.entropy(mean_abs)
    return total


def down_projections(model) -> list[torch.nn.Module]:
    return [layer.mlp.down_proj for layer in model.model.layers]


# -- variants: each builds what it needs and returns its run ------------------------------------
def plain(s: Setup) -> Run:
    def run():
        with torch.no_grad():
            s.model(s.ids, attention_mask=s.mask)
    return run


def kacq_instrument(s: Setup) -> Run:
    inst = kh.instrument(s.model)
    inst.remove()  # attached only while it runs, so the other variants see a bare model

    def run():
        inst.reset()
        with inst, torch.no_grad():
            s.model(s.ids, attention_mask=s.mask)
        return inst.knowledge_entropy().total
    return run


def transformer_lens_cache(s: Setup) -> Run:
    from kacq_hooks.frontends.transformer_lens import hooked_transformer_from_hf

    hooked = hooked_transformer_from_hf(s.model)
    wanted = lambda name: name.endswith("mlp.hook_post")  # noqa: E731

    def run():
        with torch.no_grad():
            _, cache = hooked.run_with_cache(s.ids, attention_mask=s.mask, names_filter=wanted)
        return entropy_of([cache[f"blocks.{i}.mlp.hook_post"] for i in range(hooked.cfg.n_layers)], s.mask)
    return run


def nnsight_trace(s: Setup) -> Run:
    from nnsight import NNsight

    traced = NNsight(copy.deepcopy(s.model))  # nnsight rewires the modules' forwards: keep the shared model bare
    layers = range(len(s.model.model.layers))

    def run():
        saved: list = []
        with torch.no_grad():
            with traced.trace(s.ids, attention_mask=s.mask):  # nnsight runs this block's source itself
                for i in layers:
                    saved.append(traced.model.layers[i].mlp.down_proj.input.save())
        return entropy_of(saved, s.mask)
    return run


def naive_hooks(s: Setup) -> Run:
    kept: list[torch.Tensor] = []

    def keep(module, args):
        kept.append(args[0].detach())

    def run():
        handles = [m.register_forward_pre_hook(keep) for m in down_projections(s.model)]
        try:
            with torch.no_grad():
                s.model(s.ids, attention_mask=s.mask)
        finally:
            for h in handles:
                h.remove()
        value = entropy_of(kept, s.mask)
        kept.clear()
        return value
    return run


VARIANTS: dict[str, Callable[[Setup], Run]] = {
    "plain": plain,
    "kacq instrument": kacq_instrument,
    "TransformerLens run_with_cache": transformer_lens_cache,
    "nnsight trace": nnsight_trace,
    "naive hooks (keep C)": naive_hooks,
}
# kacq through each front end, against the same front end without it: benchmarks/frontends.py.


# -- driver ---------------------------------------------------------------------------------------
def peak_of(size: str, name: str) -> None:
    """Subprocess entry: build one variant, print its peak memory as JSON."""
    model, ids, mask = build(size)
    run = VARIANTS[name](Setup(model.eval(), ids, mask))
    print(json.dumps(peak_during(run, ids.device)))


def main(argv=None) -> None:
    args = parse_args(__doc__, argv, repeats=7, peak_of=peak_of)
    if args is None:
        return
    model, ids, mask = build(args.size)
    setup = Setup(model.eval(), ids, mask)
    print(describe(model, ids, mask) + f"; kacq kernels: {kh.kernels.describe(ids.device)}")

    runs, failures = {}, {}
    for name, make in VARIANTS.items():
        try:
            runs[name] = make(setup)
        except Exception as err:  # a route that cannot be built is a row that says why
            failures[name] = f"{type(err).__name__}: {err}".splitlines()[0][:90]
    entropies = {}
    for name in list(runs):
        try:
            entropies[name] = runs[name]()
        except Exception as err:
            failures[name] = f"{type(err).__name__}: {err}".splitlines()[0][:90]
            del runs[name]
    samples = time_samples(runs, args.repeats, ids.device)
    seconds = {name: statistics.median(times) for name, times in samples.items()}

    memory = {}
    for name in runs:
        try:
            if ids.device.type == "cuda":
                memory[name] = peak_during(runs[name], ids.device)
            else:
                memory[name] = peak_in_subprocess(Path(__file__), ["--size", args.size, "--peak-of", name])
        except Exception as err:
            memory[name] = {"error": f"{type(err).__name__}: {err}"[:60]}

    base_extra = memory.get("plain", {}).get("extra_mib")
    table = []
    for name in VARIANTS:
        if name in failures:
            table.append([name, "-", "-", "-", "-", "-", f"not run: {failures[name]}"])
            continue
        mem = memory[name]
        value = entropies[name]
        peak = f"{mem['peak_mib']:.0f}" if "peak_mib" in mem else mem.get("error", "-")
        extra = f"{mem['extra_mib']:.0f}" if "extra_mib" in mem else "-"
        extra_ratio = (f"{mem['extra_mib'] / base_extra:.2f}x" if "extra_mib" in mem and base_extra
                       and base_extra > 0 else "-")
        table.append([name, f"{seconds[name] * 1e3:.1f}", f"{paired_ratio(samples, name, 'plain'):.3f}x", peak, extra,
                      extra_ratio, "-" if value is None else f"{value:.6f}"])
    print(f"\nforward + knowledge entropy of one batch; median of {args.repeats} interleaved repeats; "
          f"memory: {'max_memory_allocated' if ids.device.type == 'cuda' else 'peak RSS of a subprocess'}\n")
    print_table(["variant", "ms", "time vs plain", "peak MiB", "extra MiB", "extra vs plain", "entropy (nats)"],
                table)


if __name__ == "__main__":
    main()
