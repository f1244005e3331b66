"""A Trainer run that injects made-up facts and logs knowledge entropy and fact log-probs to TensorBoard.

``InjectionCallback`` puts each fact's passage into the training batches on its schedule,
``FactTrackingCallback`` scores the facts' probes (memorization, generalization) and
``KnowledgeEntropyCallback`` measures knowledge entropy on the training batches. ``.attach(trainer)``
puts the two logging callbacks ahead of the reporting integrations, so TensorBoard gets their scalars:
``knowledge_entropy/total``, ``knowledge_entropy/layer_{i}``, ``facts/{kind}``, ``facts/{scenario}/{kind}``.

    python examples/trainer_callbacks.py --out runs/trainer    # then: tensorboard --logdir runs/trainer
    python examples/trainer_callbacks.py --tiny --out /tmp/run  # the seconds-long version the tests run
"""
from __future__ import annotations

import argparse

import torch
from transformers import DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from kacq_hooks import facts
from kacq_hooks.corpus import pack_documents, train_bpe_tokenizer
from kacq_hooks.training import FactTrackingCallback, InjectionCallback, KnowledgeEntropyCallback


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/trainer_callbacks")
    parser.add_argument("--tiny", action="store_true", help="a few steps of a tiny model")
    args = parser.parse_args(argv)
    steps, n_facts, width = (8, 4, 64) if args.tiny else (400, 40, 256)

    fact_set = facts.assign_scenarios(facts.generate_facts(n_facts, seed=0, n_paraphrases=3),
                                      {"paraphrase": 0.5, "duplication": 0.25, "once": 0.25})
    background = [r.train_context for r in facts.generate_facts(4 * n_facts, seed=1, n_paraphrases=1,
                                                                avoid=[r.train_context for r in fact_set])]
    tokenizer = train_bpe_tokenizer(background + [r.train_context for r in fact_set], vocab_size=800)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    train = [{"input_ids": row.tolist()} for row in pack_documents(background, tokenizer, seq_len=128)]

    trainer = Trainer(
        model=model, train_dataset=train, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        args=TrainingArguments(output_dir=args.out, max_steps=steps, per_device_train_batch_size=4,
                               learning_rate=1e-3, report_to=["tensorboard"], logging_steps=max(1, steps // 8),
                               save_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=args.tiny),
    )
    schedule = facts.InjectionSchedule(fact_set, interval=max(2, steps // 4), rounds=3, max_per_step=4)
    trainer.add_callback(InjectionCallback(schedule, tokenizer))
    tracker = facts.FactTracker(model, tokenizer, fact_set, store=f"{args.out}/facts.jsonl")
    FactTrackingCallback(tracker, every=max(1, steps // 8)).attach(trainer)
    entropy = KnowledgeEntropyCallback(every=max(1, steps // 8)).attach(trainer)
    trainer.train()

    for step, h in entropy.history:
        print(f"step {step:4d}  knowledge entropy {h.total:.4f}")
    print(f"TensorBoard event files and facts.jsonl are in {args.out}")


if __name__ == "__main__":
    main()
