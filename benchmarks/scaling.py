"""Cost as the work grows: knowledge entropy of 1, 4, 16 and 64 batches of 8 x 256 tokens (and 2 of 4 x 2048).

Four ways on the same ~20M-parameter Llama (benchmarks/_models.py, ``--size cpu``), each ending with the
knowledge entropy of all the batches:

- kacq: ``kh.measure(model, batches)``, running sums only;
- TransformerLens: ``run_with_cache`` per batch (cache limited to ``mlp.hook_post``), reduced per batch;
- nnsight: a trace per batch that saves every ``down_proj`` input, reduced per batch;
- keep-C hooks: forward pre-hooks that keep every batch's C and reduce at the end (released research code).

Time is one run per (variant, size) after a warm-up on one batch; memory is the rise of the process's
peak RSS over its RSS before the run (``/proc/self/clear_refs``; glibc told to return large blocks, so
RSS follows live tensors). Writes a table and ``scaling.png`` (``--out``).

    python benchmarks/scaling.py [--sizes 1,4,16,64] [--long 2] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import kacq_hooks as kh  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402  (after kacq_hooks, as in _models)
from _harness import print_table  # noqa: E402
from _models import CPU  # noqa: E402
from kacq_hooks.bench import _status_mib, random_batch  # noqa: E402


def _return_freed_memory() -> None:
    try:  # M_MMAP_THRESHOLD = -3: blocks over 1 MiB are mmapped, so freeing them lowers RSS
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
    except OSError:
        pass


def mean_abs_entropy(sum_abs: list[torch.Tensor], tokens: int) -> float:
    return sum(kh.entropy.entropy(s / max(tokens, 1)) for s in sum_abs)


def kacq(model, batches):
    return kh.measure(model, batches).knowledge_entropy().total


def transformer_lens(model, batches, hooked):
    names = lambda name: name.endswith("mlp.hook_post")  # noqa: E731
    sums, tokens = None, 0
    with torch.no_grad():
        for batch in batches:
            _, cache = hooked.run_with_cache(batch["input_ids"], attention_mask=batch["attention_mask"],
                                             names_filter=names)
            valid = batch["attention_mask"].reshape(-1).bool()
            layer = [cache[f"blocks.{i}.mlp.hook_post"].reshape(valid.numel(), -1)[valid].abs().float().sum(0)
                     for i in range(hooked.cfg.n_layers)]
            sums = layer if sums is None else [a + b for a, b in zip(sums, layer)]
            tokens += int(valid.sum())
    return mean_abs_entropy(sums, tokens)


def nnsight(model, batches, traced):
    sums, tokens = None, 0
    with torch.no_grad():
        for batch in batches:
            saved: list = []  # filled inside the trace (nnsight runs the block's source itself)
            with traced.trace(batch["input_ids"], attention_mask=batch["attention_mask"]):
                for layer in traced.model.layers:
                    saved.append(layer.mlp.down_proj.input.save())
            valid = batch["attention_mask"].reshape(-1).bool()
            layer = [c.reshape(valid.numel(), -1)[valid].abs().float().sum(0) for c in saved]
            sums = layer if sums is None else [a + b for a, b in zip(sums, layer)]
            tokens += int(valid.sum())
    return mean_abs_entropy(sums, tokens)


def keep_c(model, batches):
    kept: dict[int, list[torch.Tensor]] = {}
    handles = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda module, args, i=i: kept.setdefault(i, []).append(args[0].detach()))
        for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    valid = torch.cat([b["attention_mask"].reshape(-1) for b in batches]).bool()
    sums = [torch.cat([c.reshape(-1, c.shape[-1]) for c in kept[i]])[valid].abs().float().sum(0) for i in sorted(kept)]
    return mean_abs_entropy(sums, int(valid.sum()))


def measure(run) -> tuple[float, float, float]:
    """(seconds, extra MiB, entropy) of one call."""
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_mib("VmRSS")
    start = time.perf_counter()
    value = run()
    seconds = time.perf_counter() - start
    return seconds, _status_mib("VmHWM") - base, value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,4,16,64", help="numbers of 8 x 256 batches")
    parser.add_argument("--long", type=int, default=2, help="numbers of 4 x 2048 batches (0: skip)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    _return_freed_memory()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**CPU["config"], "max_position_embeddings": 2048})).eval()
    vocab = CPU["config"]["vocab_size"]
    sizes = [(int(n), 8, 256) for n in args.sizes.split(",") if n]
    if args.long:
        sizes.append((args.long, 4, 2048))

    from kacq_hooks.frontends.transformer_lens import hooked_transformer_from_hf  # the transformer-lens extra
    from nnsight import NNsight  # the nnsight extra
    import copy

    hooked, traced = hooked_transformer_from_hf(model), NNsight(copy.deepcopy(model))
    variants = {"kacq": lambda b: kacq(model, b), "TransformerLens run_with_cache": lambda b: transformer_lens(model, b, hooked),
                "nnsight trace (saves C)": lambda b: nnsight(model, b, traced), "keep-C hooks": lambda b: keep_c(model, b)}
    warm = [dict(zip(("input_ids", "attention_mask"), random_batch(vocab, 8, 256, "cpu", seed=99)))]
    for run in variants.values():
        run(warm)
    results = []
    for n, rows, seq in sizes:
        batches = [dict(zip(("input_ids", "attention_mask"), random_batch(vocab, rows, seq, "cpu", seed=i)))
                   for i in range(n)]
        for name, run in variants.items():
            seconds, extra, value = measure(lambda: run(batches))
            results.append({"size": f"{n} x {rows}x{seq}", "tokens": n * rows * seq, "variant": name,
                            "seconds": seconds, "extra_mib": extra, "entropy": value})
            print(f"{results[-1]['size']:>14}  {name:<32} {seconds:8.2f} s  {extra:8.0f} MiB  {value:.6f}", flush=True)
    print()
    print_table(["batches", "variant", "time s", "time vs kacq", "extra MiB", "extra vs kacq", "entropy"],
                [[r["size"], r["variant"], f"{r['seconds']:.2f}",
                  f"{r['seconds'] / next(k['seconds'] for k in results if k['size'] == r['size'] and k['variant'] == 'kacq'):.2f}x",
                  f"{r['extra_mib']:.0f}",
                  f"{r['extra_mib'] / max(1.0, next(k['extra_mib'] for k in results if k['size'] == r['size'] and k['variant'] == 'kacq')):.1f}x",
                  f"{r['entropy']:.6f}"] for r in results])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import json
    (out / "scaling.json").write_text(json.dumps(results, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    short = [s for s in dict.fromkeys(r["size"] for r in results) if s.endswith("8x256")]
    for name in variants:
        picked = [r for r in results if r["variant"] == name and r["size"] in short]
        left.plot([r["tokens"] for r in picked], [r["seconds"] for r in picked], marker="o", label=name)
        right.plot([r["tokens"] for r in picked], [r["extra_mib"] for r in picked], marker="o", label=name)
    left.set(xscale="log", yscale="log", xlabel="tokens (batches of 8 x 256)", ylabel="seconds", title="time")
    right.set(xscale="log", yscale="log", xlabel="tokens (batches of 8 x 256)", ylabel="MiB over the start",
              title="peak memory rise")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    print(f"wrote {out / 'scaling.png'} and scaling.json")


if __name__ == "__main__":
    main()
