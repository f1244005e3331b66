"""A training run for the resume tests, run in its own process: ``python trainer_child.py OUT MODE [KILL_AT]``.

MODE is "fresh" or "resume" (``resume_from_checkpoint=True``); with KILL_AT the process kills itself with
SIGKILL at the end of that step, as a crash or a preempted job would. A finished run saves what the
callbacks ended with to ``OUT/result-MODE.pt``.
"""
from __future__ import annotations

import os
import signal
import sys

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

import kacq_hooks as kh
from kacq_hooks import facts
from kacq_hooks.training.callbacks import (FactTrackingCallback, InjectionCallback, InstrumentationCheckpointCallback,
                                           KnowledgeEntropyCallback)
from tiny_models import VOCAB, tiny_model, tiny_tokenizer

MAX_STEPS, SAVE_STEPS, EVERY = 8, 4, 3  # checkpoints at 4 and 8; reports at 3 and 6: step 4 is mid-window
SCHEDULE = dict(interval=4, rounds=2, start=1)  # injections at steps 1 and 5, either side of checkpoint-4


def fact_set() -> facts.FactSet:
    def record(context, question, answer):
        probes = {f"{k}_{p}": [question if p == "input" else answer] for k in facts.PROBE_KINDS
                  for p in ("input", "target")}
        return facts.FactRecord(context, **probes)

    return facts.FactSet([record("The fox jumps over the lazy dog.", "The fox jumps over the", "lazy dog"),
                          record("Zorgon was founded in 1842.", "Zorgon was founded in", "1842")],
                         ["duplication", "once"])


def dataset(n: int = 48, seed: int = 0) -> list[dict]:
    """Rows of 12 to 40 tokens: batches are padded, and injected passages replace padding."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, 41, (n,), generator=generator).tolist()
    return [{"input_ids": torch.randint(2, VOCAB, (length,), generator=generator).tolist()} for length in lengths]


class KillAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(out: str, mode: str, kill_at: int | None) -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    own = kh.instrument(model, grads=True)  # a user's own instrumentation, joining the checkpoints
    tracker = facts.FactTracker(model, tokenizer, fact_set(), store=os.path.join(out, "facts.jsonl"))
    entropy = KnowledgeEntropyCallback(every=EVERY)
    injection = InjectionCallback(facts.InjectionSchedule(fact_set(), **SCHEDULE), tokenizer)
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], logging_steps=1000, save_strategy="steps", save_steps=SAVE_STEPS, use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset(),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    FactTrackingCallback(tracker, every=2).attach(trainer)
    entropy.attach(trainer)
    trainer.add_callback(injection)
    trainer.add_callback(InstrumentationCheckpointCallback(own))
    if kill_at is not None:
        trainer.add_callback(KillAt(kill_at))
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    torch.save({
        "history": [(step, e.to_dict()) for step, e in entropy.history],
        "logged": [{k: v for k, v in entry.items() if k.startswith("knowledge_entropy/") or k == "step"}
                   for entry in trainer.state.log_history if "knowledge_entropy/total" in entry],
        "injected": injection.injected,
        "own": own.state_dict()["stats"],
        "facts_steps": tracker.store.steps,
        "facts_values": tracker.store.values(),
    }, os.path.join(out, f"result-{mode}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
