"""Cost of slot attribution against a plain no-grad forward over the same padded probe batches.

All 1,950 probes of the Fictional Knowledge data (130 records x 3 kinds x 5) are attributed with
grad x act on a small Llama-shaped random model; the baseline runs ``model(input_ids,
attention_mask=mask)`` under ``torch.no_grad()`` on exactly the batches the fact tracker builds. The two
take turns ``--repeats`` times after a warm-up (benchmarks/_harness.py) and the median paired ratio is
printed (target: at most 3). Integrated gradients are timed once on the first ``--ig-probes`` probes
with ``--ig-steps`` steps, and reported as the cost of one step relative to the plain pass over the same
probes.

    python benchmarks/attribution.py [--hidden 128] [--layers 2] [--vocab 4096] [--batch-size 64] [--records 130]

Measured on the shared 2-core CPU test machine, defaults (1.6M parameters, 1,950 probes, 64,837 tokens in
31 batches, 3 paired turns): plain 6.95 s, grad x act 20.0 s, ratio 2.88; integrated gradients on 60
probes x 16 steps: 3.7 plain passes per step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).parent))
import _harness  # noqa: E402

from kacq_hooks import facts  # noqa: E402
from kacq_hooks.attribution import attribute  # noqa: E402
from kacq_hooks.corpus import train_bpe_tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/fictional_knowledge/fictional_knowledge.json"


def build(args):
    fact_set = facts.load_fictional_knowledge(args.data)
    fact_set = facts.FactSet(fact_set.records[:args.records], fact_set.scenarios[:args.records])
    tokenizer = train_bpe_tokenizer([r.train_context for r in fact_set], vocab_size=args.vocab)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(args.device).eval()
    tracker = facts.FactTracker(model, tokenizer, fact_set, batch_size=args.batch_size)
    return model, tokenizer, fact_set, tracker


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--records", type=int, default=130, help="use the first N records (all 130 by default)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ig-probes", type=int, default=64)
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tokenizer, fact_set, tracker = build(args)
    batches = list(tracker.batches())

    def plain(chosen=batches):
        with torch.no_grad():
            for batch in chosen:
                model(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))

    runs = {"plain": plain, "grad_x_act": lambda: attribute(model, tokenizer, tracker, "grad_x_act")}
    samples = _harness.time_samples(runs, args.repeats, device)

    # integrated gradients on a subset: one timed run, against plain passes over the same probes
    subset = facts.FactTracker(model, tokenizer, facts.FactSet(fact_set.records[:max(1, args.ig_probes // 15)]),
                               batch_size=args.batch_size)
    sub_batches = list(subset.batches())
    ig_times = _harness.time_samples({"plain": lambda: plain(sub_batches),
                                      "ig": lambda: attribute(model, tokenizer, subset, "integrated_gradients",
                                                              steps=args.ig_steps, rows_per_pass=512)}, 1, device)
    result = {
        "probes": len(tracker.encoded),
        "batches": len(batches),
        "tokens": int(sum(int(b.attention_mask.sum()) for b in batches)),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "plain_s": round(statistics.median(samples["plain"]), 4),
        "grad_x_act_s": round(statistics.median(samples["grad_x_act"]), 4),
        "ratio_median": round(_harness.paired_ratio(samples, "grad_x_act", "plain"), 3),
        "ig_probes": len(subset.encoded),
        "ig_steps": args.ig_steps,
        "ig_s": round(ig_times["ig"][0], 4),
        "ig_per_step_vs_plain": round(ig_times["ig"][0] / args.ig_steps / ig_times["plain"][0], 3),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    print(json.dumps(result))
    print(f"grad_x_act / plain forward: {result['ratio_median']:.3f} (median of {args.repeats} paired turns); "
          f"integrated gradients: {result['ig_per_step_vs_plain']:.3f} plain passes per step", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
