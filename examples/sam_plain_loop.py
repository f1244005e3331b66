"""SAM in a hand-written training loop, on formatting variants of one made-up passage.

A tiny random Llama learns byte-level text (no tokenizer, no download). Each optimizer step
accumulates two micro-batches, perturbs the weights along the accumulated gradient, recomputes both
micro-batches at the perturbed weights (with the knowledge-entropy instrumentation paused, so it
counts every token once), clips, and steps from the original weights.

    python examples/sam_plain_loop.py          # a few seconds on a laptop CPU
    python examples/sam_plain_loop.py --tiny   # four steps (what the tests run)
"""
from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kacq_hooks as kh
from kacq_hooks.training import SAM, formatting_variants

PASSAGE = ("The harbour of Velmora was founded in 1312 by the salt traders of Ostrin. "
           "Its lighthouse burns blue oil. Ships from Karst arrive every ninth day.")
SEQ, MICRO_BATCH, ACCUMULATION, STEPS = 64, 4, 2, 20


def byte_batches(texts: list[str], generator: torch.Generator) -> list[torch.Tensor]:
    """ACCUMULATION micro-batches of SEQ-byte windows cut at random offsets from random texts."""
    rows = []
    for _ in range(MICRO_BATCH * ACCUMULATION):
        data = list(texts[int(torch.randint(len(texts), (1,), generator=generator))].encode("utf-8"))
        data = (data * (SEQ // len(data) + 2))
        start = int(torch.randint(len(data) - SEQ, (1,), generator=generator))
        rows.append(torch.tensor(data[start:start + SEQ]))
    return list(torch.stack(rows).chunk(ACCUMULATION))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="four steps instead of twenty")
    steps = 4 if parser.parse_args(argv).tiny else STEPS
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    model = LlamaForCausalLM(config).train()
    texts = [PASSAGE, *formatting_variants(PASSAGE, k=7, seed=0, protect=["1312", "blue oil"])]
    sam = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)

    with kh.instrument(model) as inst:
        for step in range(steps):
            micro_batches = byte_batches(texts, generator)
            loss_at_w = 0.0
            for ids in micro_batches:  # pass 1 at w: counted by the instrumentation
                loss = model(ids, labels=ids).loss / ACCUMULATION
                loss.backward()
                loss_at_w += loss.item()
            sam.first_step(zero_grad=True)
            with kh.paused(model):  # pass 2 at w + e: not counted
                for ids in micro_batches:
                    (model(ids, labels=ids).loss / ACCUMULATION).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            sam.second_step(zero_grad=True)
            if step % 5 == 0 or step == steps - 1:
                print(f"step {step:2d}  loss {loss_at_w:.3f}")
        tokens = int(inst.stats[0].tokens)
        rows = MICRO_BATCH * ACCUMULATION
        print(f"tokens counted {tokens} = {steps} steps x {rows} rows x {SEQ} (one pass per step)")
        print(f"knowledge entropy {inst.knowledge_entropy().total:.4f} of max {inst.knowledge_entropy().max_total:.4f}")


if __name__ == "__main__":
    main()
