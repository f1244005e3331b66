"""What instrumentation costs on your model: the harness behind ``kacq bench`` and ``benchmarks/``.

Timing: every variant runs once to warm up, then the variants take turns ``repeats`` times (in
alternating order), so drift in the machine's load hits all of them alike; a ratio is the median
over turns of one variant's time over the baseline's in the same turn. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` around one call; on the CPU the peak resident set (Linux
``VmHWM``, reset through ``/proc/self/clear_refs``), in this process or, with
:func:`peak_in_subprocess`, in a fresh one that runs only that variant. Both after a warm-up call.

>>> model, ids, mask = build_preset("llama-tiny")
>>> result = run_bench(model, ids, mask, repeats=1, training=False)
>>> sorted(result["forward"])
['kacq instrument', 'plain']
"""
from __future__ import annotations

import copy
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

from transformers import AutoConfig, AutoModelForCausalLM

from . import kernels
from .errors import BenchmarkError, CheckpointError, ConfigError, UnknownKeyError
from .frontends.nnsight import underlying_module
from .instrumentation import instrument
from .locate import find_sites

# -- timing and memory ------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_samples(runs: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of every call of each run, measured in turns after one warm-up call each.

    ``clock`` is wall time by default; ``time.thread_time`` (with one torch thread) counts only the CPU
    time of the calling thread, which other processes' load on a shared machine does not inflate."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for turn in range(repeats):
        order = list(runs) if turn % 2 == 0 else list(reversed(runs))  # no variant always runs second
        for name in order:
            sync(device)
            start = clock()
            runs[name]()
            sync(device)
            times[name].append(clock() - start)
    return times


def time_interleaved(runs: dict[str, Callable[[], object]], repeats: int, device: torch.device
                     ) -> dict[str, float]:
    """Median seconds per call of each run, measured in turns after one warm-up call each."""
    return {name: statistics.median(t) for name, t in time_samples(runs, repeats, device).items()}


def paired_ratio(samples: dict[str, list[float]], name: str, base: str) -> float:
    """Median over turns of ``name``'s time / ``base``'s time in the same turn: load drifts cancel."""
    return statistics.median(a / b for a, b in zip(samples[name], samples[base]))


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
    if not Path("/proc/self/clear_refs").exists():
        return {"peak_mib": float("nan"), "extra_mib": float("nan")}  # CPU peaks need Linux's /proc
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
        why = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        raise BenchmarkError(f"the measuring child {script.name} failed: {why}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, columns padded to their widest cell.

    >>> print(format_table(["a", "bb"], [["1", "2"]]))
    | a | bb |
    |---|----|
    | 1 | 2  |
    """
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def describe(model, ids: torch.Tensor, mask: torch.Tensor) -> str:
    params = sum(p.numel() for p in model.parameters()) / 1e6
    dtype = next(model.parameters()).dtype
    where = torch.cuda.get_device_name(ids.device) if ids.device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} torch threads"
    return (f"model {params:.1f}M parameters ({type(model).__name__}, {dtype}), batch {tuple(ids.shape)} "
            f"with {int(mask.sum())} unpadded tokens, on {where}")


# -- models -----------------------------------------------------------------------------------------------------

# name -> (model type, config overrides, batch, seq, dtype, needs CUDA); random weights, built offline
PRESETS: dict[str, tuple[str, dict, int, int, torch.dtype, bool]] = {
    "llama-tiny": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
                   2, 32, torch.float32, False),
    "gpt2-tiny": ("gpt2", dict(vocab_size=512, n_embd=64, n_inner=256, n_layer=2, n_head=4, n_positions=256,
                               bos_token_id=0, eos_token_id=0),
                  2, 32, torch.float32, False),
    # the CPU benchmark of benchmarks/overhead.py: ~20M parameters, batch 8 x 256
    "llama-20m": ("llama", dict(vocab_size=8192, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=512),
                  8, 256, torch.float32, False),
    # OLMo-1B's shape (16 layers, d_model 2048, d_ff 8192) in the Llama layout, bf16, batch 8 x 1024
    "olmo-1b-shape": ("llama", dict(vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
                      8, 1024, torch.bfloat16, True),
}


def random_batch(vocab: int, batch: int, seq: int, device, seed: int = 0):
    """(ids, mask): random tokens with half the rows right-padded by an eighth, so the masked path is measured."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
    mask = torch.ones_like(ids)
    mask[1::2, seq - max(1, seq // 8):] = 0
    return ids, mask


def build_preset(name: str, device: str | None = None, seed: int = 0):
    """(model, input_ids, attention_mask) for a preset of :data:`PRESETS`, random weights, no download."""

    if name not in PRESETS:
        raise UnknownKeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    model_type, overrides, batch, seq, dtype, needs_cuda = PRESETS[name]
    device = device or ("cuda" if needs_cuda else "cpu")
    if needs_cuda and not str(device).startswith("cuda"):
        raise ConfigError(f"preset {name!r} is sized for a GPU; run it with --device cuda, or pick llama-20m on a CPU")
    config = AutoConfig.for_model(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    ids, mask = random_batch(config.vocab_size, batch, seq, device, seed)
    return model, ids, mask


def load_model(source: str, device: str, batch: int, seq: int, seed: int = 0):
    """(model, ids, mask) for a local ``save_pretrained`` folder or, when online, a hub id; random tokens."""

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto").to(device)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"could not load {source!r} ({err}); give a folder written by save_pretrained, a hub id "
                        f"when online, or --config with one of {', '.join(PRESETS)}") from err
    return (model, *random_batch(model.config.vocab_size, batch, seq, device, seed))


# -- variants ---------------------------------------------------------------------------------------------------

def forward_runs(model, ids, mask, frontends: bool = False) -> tuple[dict[str, Callable], dict[str, str]]:
    """({name: one no-grad forward}, {name: why it could not be built}) for the forward comparison."""

    model.eval()

    def plain():
        with torch.no_grad():
            model(ids, attention_mask=mask)

    inst = instrument(model)
    inst.remove()  # attached only during its own runs, so the others see a bare model

    def kacq():
        inst.reset()
        with inst, torch.no_grad():
            model(ids, attention_mask=mask)

    runs, skipped = {"plain": plain, "kacq instrument": kacq}, {}
    if frontends:
        for name, make in (("TransformerLens run_with_cache", _transformer_lens_run),
                           ("nnsight trace (saves C)", _nnsight_run)):
            try:
                runs[name] = make(model, ids, mask)
            except Exception as err:  # not installed, or this architecture is not convertible: a row says why
                skipped[name] = f"{type(err).__name__}: {err}".splitlines()[0][:100]
    return runs, skipped


def _transformer_lens_run(model, ids, mask):
    from .frontends.transformer_lens import hooked_transformer_from_hf  # the transformer-lens extra

    hooked = hooked_transformer_from_hf(model)
    wanted = lambda name: name.endswith("mlp.hook_post")  # noqa: E731

    def run():
        with torch.no_grad():
            hooked.run_with_cache(ids, attention_mask=mask, names_filter=wanted)
    return run


def _nnsight_run(model, ids, mask):
    from nnsight import NNsight  # the nnsight extra


    traced = NNsight(copy.deepcopy(model))  # nnsight rewires its model's forwards: keep the shared one bare
    envoys = []
    for site in find_sites(underlying_module(traced)):
        envoy = traced
        for part in site.path.split("."):
            envoy = getattr(envoy, part)
        envoys.append(envoy)

    def run():
        with torch.no_grad(), traced.trace(ids, attention_mask=mask):
            saved = [envoy.input.save() for envoy in envoys]  # noqa: F841 (kept until the trace ends)
    return run


TRAINING_VARIANTS = {"plain": None, "kacq instrument(grads=True)": {"grads": True}}


def training_runs(model, ids, mask, variants: dict | None = None) -> dict[str, Callable]:
    """Forward + backward + AdamW step per variant: name -> ``instrument()`` options, or None for the bare model.

    Each instrumentation is attached only during its own steps, so interleaved variants do not overlap.
    """
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    labels = ids.masked_fill(mask == 0, -100)

    def step():
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    runs = {}
    for name, options in (TRAINING_VARIANTS if variants is None else variants).items():
        if options is None:
            runs[name] = step
            continue
        inst = instrument(model, **options)
        inst.remove()

        def instrumented(inst=inst):
            with inst:
                step()
        runs[name] = instrumented
    return runs


def run_bench(model, ids, mask, *, repeats: int = 9, training: bool = True, frontends: bool = False,
              memory: bool = True) -> dict:
    """Plain against instrumented forward (and training step), interleaved; a JSON-ready dict.

    ``result["forward"][name]`` has ``ms`` (median), ``ratio`` (paired median against plain) and, with
    ``memory``, ``peak_mib`` / ``extra_mib``; ``result["training"]`` likewise; ``result["skipped"]``
    says why an optional variant did not run.
    """
    device = ids.device
    result: dict = {"setup": describe(model, ids, mask), "device": str(device), "repeats": repeats,
                    "kernels": kernels.describe(device)}
    runs, result["skipped"] = forward_runs(model, ids, mask, frontends)
    sections = {"forward": runs}
    if training:
        sections["training"] = training_runs(model, ids, mask)
    for section, section_runs in sections.items():
        samples = time_samples(section_runs, repeats, device)
        rows = {}
        for name in section_runs:
            rows[name] = {"ms": statistics.median(samples[name]) * 1e3,
                          "ratio": paired_ratio(samples, name, "plain"),
                          "spread": [min(a / b for a, b in zip(samples[name], samples["plain"])),
                                     max(a / b for a, b in zip(samples[name], samples["plain"]))]}
            if memory:
                rows[name].update(peak_during(section_runs[name], device))
        result[section] = rows
    model.eval()
    return result


def bench_table(result: dict) -> str:
    """The terminal table of a :func:`run_bench` result."""
    rows = []
    for section in ("forward", "training"):
        for name, row in result.get(section, {}).items():
            rows.append([section, name, f"{row['ms']:.1f}", f"{row['ratio']:.3f}x",
                         f"{row['spread'][0]:.3f}-{row['spread'][1]:.3f}",
                         f"{row['peak_mib']:.0f}" if "peak_mib" in row else "-",
                         f"{row['extra_mib']:.0f}" if "extra_mib" in row else "-"])
    for name, why in result.get("skipped", {}).items():
        rows.append(["forward", name, "-", "-", "-", "-", f"not run: {why}"])
    table = format_table(["pass", "variant", "ms", "vs plain", "range over turns", "peak MiB", "extra MiB"], rows)
    kernels = f"; kacq kernels: {result['kernels']}" if "kernels" in result else ""
    return f"{result['setup']}{kernels}; median of {result['repeats']} interleaved turns\n\n{table}"


__all__ = ["time_samples", "time_interleaved", "paired_ratio", "peak_during", "peak_in_subprocess", "format_table",
           "describe", "PRESETS", "build_preset", "load_model", "random_batch", "forward_runs", "training_runs",
           "run_bench", "bench_table"]
