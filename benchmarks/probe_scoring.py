"""Cost of FactTracker scoring against a plain no-grad forward over the same padded batches.

All 1,950 probes of the Fictional Knowledge data (130 records x 3 kinds x 5) are scored with a
small Llama-shaped random model. The baseline runs ``model(input_ids, attention_mask=mask)`` under
``torch.no_grad()`` on exactly the batches the tracker builds; scoring adds position ids, the
target-span gather, log-softmax over the target rows and the bookkeeping (eval mode, RNG, pauses),
and asks the model for the logits of the last positions only (``logits_to_keep``).
``--full-logits`` turns that last part off, to see the bookkeeping alone. The two runs take turns
``--repeats`` times after a warm-up; the median ratio is printed.

    python benchmarks/probe_scoring.py [--hidden 128] [--layers 2] [--vocab 4096] [--batch-size 64] [--full-logits]

Measured on the 2-core CPU test machine, defaults (1.6M parameters, 64,837 probe tokens in 31 batches):
ratio 0.71 (scoring is cheaper: the LM head runs on target positions only); with --full-logits 1.05.
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

from kacq_hooks import facts
from kacq_hooks.corpus import train_bpe_tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/fictional_knowledge/fictional_knowledge.json"


def build(args):
    fact_set = facts.load_fictional_knowledge(args.data)
    # a BPE trained on the passages themselves: word-sized tokens, as a real tokenizer would give
    tokenizer = train_bpe_tokenizer([r.train_context for r in fact_set], vocab_size=args.vocab)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(args.device).eval()
    tracker = facts.FactTracker(model, tokenizer, fact_set, batch_size=args.batch_size,
                                padding_side=args.padding_side, trim_logits=not args.full_logits)
    return model, tracker


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary trained on the passages")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--padding-side", choices=["left", "right"], default="left")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads spin against each other)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full-logits", action="store_true", help="score without logits_to_keep")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tracker = build(args)
    batches = list(tracker.batches())

    def plain():
        with torch.no_grad():
            for batch in batches:
                model(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))

    def scoring():
        tracker.score_probes()

    runs = {"plain": plain, "scoring": scoring}
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    ratios = [s / p for s, p in zip(times["scoring"], times["plain"])]
    result = {
        "probes": len(tracker.encoded),
        "batches": len(batches),
        "tokens": int(sum(int(b.attention_mask.sum()) for b in batches)),
        "padded_tokens": int(sum(b.input_ids.numel() for b in batches)),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "plain_s": round(statistics.median(times["plain"]), 4),
        "scoring_s": round(statistics.median(times["scoring"]), 4),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "full_logits": args.full_logits,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    print(json.dumps(result))
    print(f"scoring / plain forward: {result['ratio_median']:.3f} (median of {args.repeats} interleaved repeats)",
          file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
