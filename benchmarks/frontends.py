"""Front ends side by side: the same Llama weights as a Hugging Face model, a HookedTransformer, a
TransformerBridge and an nnsight envoy (plain call and trace). For each: median forward time plain
and instrumented (interleaved in one process), and how far its statistics are from the HF model's.

    python benchmarks/frontends.py [--size cpu|gpu] [--repeats N]

``--size gpu`` uses the OLMo-1B shape of benchmarks/_models.py as a Llama (HookedTransformer
conversion covers GPT-2 and Llama) in bf16 on CUDA.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).parent))
import kacq_hooks as kh  # noqa: E402
from _models import SIZES  # noqa: E402
from _harness import paired_ratio, time_samples  # noqa: E402


def build_llama(size: str):
    spec = SIZES[size]
    device = "cuda" if size == "gpu" else "cpu"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**spec["config"]), dtype=spec["dtype"]).to(device).eval()
    ids = torch.randint(0, spec["config"]["vocab_size"], (spec["batch"], spec["seq"]), device=device)
    mask = torch.ones_like(ids)
    mask[1::2, -spec["seq"] // 8:] = 0  # right padding: positions are the same in every front end
    return model, ids, mask


def front_ends(hf):
    """name -> (model to instrument, forward(ids, mask))."""
    from nnsight import NNsight

    from kacq_hooks.frontends.transformer_lens import bridge_from_hf, hooked_transformer_from_hf

    envoy = NNsight(copy.deepcopy(hf))

    def trace(ids, mask):
        with envoy.trace(ids, attention_mask=mask):
            pass

    ht, bridge = hooked_transformer_from_hf(hf), bridge_from_hf(copy.deepcopy(hf))
    return {
        "hf": (hf, lambda ids, mask: hf(ids, attention_mask=mask)),
        "hooked_transformer": (ht, lambda ids, mask: ht(ids, attention_mask=mask)),
        "bridge": (bridge, lambda ids, mask: bridge(ids, attention_mask=mask)),
        "nnsight call": (envoy, lambda ids, mask: envoy(ids, attention_mask=mask)),
        "nnsight trace": (envoy, trace),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    hf, ids, mask = build_llama(args.size)
    device = ids.device
    reference = None
    print(f"{args.size}: batch {tuple(ids.shape)}, {torch.get_num_threads()} threads, {device}")
    print(f"{'front end':<20} {'plain ms':>9} {'kacq ms':>9} {'ratio':>6} {'max rel dc':>11} {'dH total':>9}")
    for name, (model, forward) in front_ends(hf).items():
        inst = kh.instrument(model)
        inst.remove()

        def plain():
            with torch.no_grad():
                forward(ids, mask)

        def instrumented():
            with inst, torch.no_grad():
                forward(ids, mask)

        times = time_samples({"plain": plain, "kacq": instrumented}, args.repeats, device)
        inst.reset()
        instrumented()
        means = inst.mean_abs_coefficients()
        entropy = inst.knowledge_entropy().total
        if reference is None:
            reference = (means, entropy)
        rel = max(float(((a - b).abs() / b.abs().clamp_min(1e-12)).max()) for a, b in zip(means, reference[0]))
        p, k = statistics.median(times["plain"]) * 1e3, statistics.median(times["kacq"]) * 1e3
        ratio = paired_ratio(times, "kacq", "plain")
        print(f"{name:<20} {p:>9.1f} {k:>9.1f} {ratio:>6.3f} {rel:>11.2e} {entropy - reference[1]:>9.1e}")


if __name__ == "__main__":
    main()
