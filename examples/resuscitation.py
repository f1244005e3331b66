"""Resuscitation before continued training: lift the least active FFN neurons, then keep training.

Measure mean |C| per neuron on calibration text, pick each layer's bottom ``--ratio`` of neurons, and
scale their up-projection rows so their mean |C| becomes ``--factor`` x the layer mean (a weight edit,
saved by ``save_pretrained``), then continue training from the edited model. On a trained model, whose
activity has concentrated on few neurons, knowledge entropy rises; on the random model of ``--tiny``,
whose neurons are already near uniform, lifting half of them above the mean lowers it.

    python examples/resuscitation.py --tiny                 # seconds on a CPU
    python examples/resuscitation.py --tiny --ratio 0.5 --factor 2 --steps 20
"""
from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kacq_hooks as kh
from kacq_hooks.corpus import pack_documents, train_bpe_tokenizer
from kacq_hooks.facts import generate_facts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="a random tiny model on generated text")
    args = parser.parse_args(argv)
    steps = args.steps or (6 if args.tiny else 200)

    texts = [r.train_context for r in generate_facts(16, seed=0, n_paraphrases=1)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=600)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    rows = pack_documents(texts, tokenizer, seq_len=64)
    calibration, train = rows[:4], rows[4:]

    before = kh.measure(model, [calibration])
    plan = kh.resuscitation_plan(before, ratio=args.ratio, factor=args.factor)
    kh.resuscitate(model, plan, mode="weights")  # returns a handle whose .revert() undoes the edit exactly
    after = kh.measure(model, [calibration])
    print(f"knowledge entropy on the calibration text: {before.knowledge_entropy().total:.4f} before, "
          f"{after.knowledge_entropy().total:.4f} after resuscitation")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    with kh.instrument(model) as inst:  # knowledge entropy of the batches trained on after the edit
        for step in range(steps):
            batch = train[(step * 4) % len(train):][:4]
            loss = model(batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        print(f"{steps} steps of continued training: last loss {loss.item():.3f}, knowledge entropy of the "
              f"trained batches {inst.knowledge_entropy().total:.4f}")
    print(f"after training: {kh.measure(model, [calibration]).knowledge_entropy().total:.4f} on the calibration text")


if __name__ == "__main__":
    main()
