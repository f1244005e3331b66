"""Trainer callbacks with a real transformers.Trainer: fact tracking, knowledge entropy, injection."""
from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

import kacq_hooks as kh
from kacq_hooks import facts
from kacq_hooks.errors import CheckpointError, ConfigError
from kacq_hooks.facts.injection import InjectionCollator
from kacq_hooks.training.callbacks import (FactTrackingCallback, InjectionCallback, InstrumentationCheckpointCallback,
                                           KnowledgeEntropyCallback)
from tiny_models import VOCAB, tiny_model

SEQ = 48  # longer than the injected passages


def _record(context, inputs, targets):
    probes = {f"{k}_{p}": list(inputs if p == "input" else targets) for k in facts.PROBE_KINDS for p in ("input", "target")}
    return facts.FactRecord(context, **probes)


@pytest.fixture(scope="module")
def fact_set():
    return facts.FactSet(
        [_record("The fox jumps over the lazy dog.", ["The fox jumps over the"], ["lazy dog"]),
         _record("Zorgon was founded in 1842.", ["Zorgon was founded in"], ["1842"])],
        ["duplication", "once"],
    )


def _dataset(n=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, VOCAB, (SEQ,), generator=generator).tolist()} for _ in range(n)]


def _trainer(model, tokenizer, tmp_path, max_steps=4, callbacks=None, collator=None, **extra):
    settings = dict(
        output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], logging_steps=1000, save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
        disable_tqdm=True,
    )
    args = TrainingArguments(**{**settings, **extra})
    return Trainer(model=model, args=args, train_dataset=_dataset(),
                   data_collator=collator or DataCollatorForLanguageModeling(tokenizer, mlm=False),
                   callbacks=callbacks)


class LogRecorder(TrainerCallback):
    """Stands in the place of TensorBoard or W&B: keeps every logs dict it is given."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_fact_tracking_callback_records_every_step_and_reaches_the_logs(tmp_path, tokenizer, fact_set):
    model = tiny_model("llama")
    tracker = facts.FactTracker(model, tokenizer, fact_set, store=tmp_path / "facts.jsonl")
    recorder = LogRecorder()
    trainer = _trainer(model, tokenizer, tmp_path, callbacks=[recorder])
    callback = FactTrackingCallback(tracker, every=2).attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    store = facts.TrajectoryStore.open(tmp_path / "facts.jsonl")
    assert store.steps == [0, 2, 4]
    assert not torch.equal(store.values()[0], store.values()[-1])  # the model changed, and the scores with it
    logged = [entry for entry in recorder.logs if "facts/mem" in entry]
    assert len(logged) == 2 and {"facts/duplication/gen", "facts/once/hard_gen", "loss"} <= set(logged[0])
    history = [entry for entry in trainer.state.log_history if "facts/mem" in entry]
    assert [entry["step"] for entry in history] == [2, 4]
    # the logged summary is the tracker's own mean over the stored step-4 scores
    assert history[-1]["facts/mem"] == pytest.approx(store.values()[-1][store.columns(kind="mem")].mean().item())
    assert model.training  # the Trainer's mode survives scoring


def test_fact_tracking_resumes_from_a_checkpoint(tmp_path, tokenizer, fact_set):
    model = tiny_model("llama")
    path = tmp_path / "facts.jsonl"
    trainer = _trainer(model, tokenizer, tmp_path, save_strategy="steps", save_steps=2)
    FactTrackingCallback(facts.FactTracker(model, tokenizer, fact_set, store=path)).attach(trainer)
    trainer.train()
    first_run = facts.TrajectoryStore.open(path)
    assert first_run.steps == [0, 1, 2, 3, 4]

    resumed_model = tiny_model("llama")  # as after a crash at step 4: restart from the step-2 checkpoint
    trainer = _trainer(resumed_model, tokenizer, tmp_path, save_strategy="steps", save_steps=2)
    FactTrackingCallback(facts.FactTracker(resumed_model, tokenizer, fact_set, store=path)).attach(trainer)
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    second_run = facts.TrajectoryStore.open(path)
    assert second_run.steps == [0, 1, 2, 3, 4]
    torch.testing.assert_close(second_run.values()[:3], first_run.values()[:3], atol=0, rtol=0)
    torch.testing.assert_close(second_run.values()[3:], first_run.values()[3:], atol=1e-5, rtol=0)


def test_knowledge_entropy_callback_on_training_batches(tmp_path, tokenizer, fact_set):
    model = tiny_model("llama")
    entropy = KnowledgeEntropyCallback(every=2)
    tracking = FactTrackingCallback(facts.FactTracker(model, tokenizer, fact_set))
    recorder = LogRecorder()
    trainer = _trainer(model, tokenizer, tmp_path, callbacks=[recorder])
    entropy.attach(trainer)
    tracking.attach(trainer)
    trainer.train()
    assert [step for step, _ in entropy.history] == [2, 4]
    for _, value in entropy.history:
        # two steps of 4 rows x 16 tokens: probe scoring and anything outside the steps is not counted
        assert value.tokens == 2 * 4 * SEQ
        assert 0 < value.total <= value.max_total and len(value.per_layer) == 2
    logged = [entry for entry in recorder.logs if "knowledge_entropy/total" in entry]
    assert [entry["knowledge_entropy/decoder.layer_1"] for entry in logged] == [v.per_layer[1] for _, v in entropy.history]
    assert kh.instrumentations_of(model) == []  # removed at the end of training


def test_knowledge_entropy_callback_on_a_calibration_set(tmp_path, tokenizer):
    model = tiny_model("gpt2")
    calibration = torch.randint(2, VOCAB, (6, SEQ), generator=torch.Generator().manual_seed(1))
    with kh.instrument(model) as inst:
        with torch.no_grad():
            model(calibration)
    before = inst.knowledge_entropy()
    callback = KnowledgeEntropyCallback(every=2, calibration=calibration, batch_size=4)
    trainer = _trainer(model, tokenizer, tmp_path, learning_rate=5e-2)
    callback.attach(trainer)
    trainer.train()
    assert [step for step, _ in callback.history] == [0, 2, 4]
    assert callback.history[0][1].per_layer == pytest.approx(before.per_layer, abs=1e-6)
    assert callback.history[0][1].tokens == 6 * SEQ
    assert callback.history[-1][1].total != pytest.approx(before.total, abs=1e-7)  # training moved it
    assert kh.instrumentations_of(model) == []
    with pytest.raises(ConfigError, match="calibration data must be token ids"):
        KnowledgeEntropyCallback(calibration=[torch.zeros(3)])


def test_injection_callback_puts_passages_into_the_trained_batches(tmp_path, tokenizer, fact_set):
    model = tiny_model("llama")
    schedule = facts.InjectionSchedule(fact_set, interval=3, rounds=2)  # step 0: both records, step 3: record 0
    seen = []
    handle = model.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(kwargs["input_ids"].clone()) if module.training else None,
        with_kwargs=True)
    callback = InjectionCallback(schedule, tokenizer)
    trainer = _trainer(model, tokenizer, tmp_path, max_steps=5, callbacks=[callback])
    try:
        trainer.train()
    finally:
        handle.remove()
    assert callback.injected == {0: [0, 1], 3: [0]}
    assert len(seen) == 5 and all(batch.shape == (4, SEQ) for batch in seen)
    fox = tokenizer(fact_set[0].train_context, add_special_tokens=False)["input_ids"]
    zorgon = tokenizer(fact_set[1].train_context, add_special_tokens=False)["input_ids"]
    assert seen[0][0, :len(fox)].tolist() == fox and seen[0][1, :len(zorgon)].tolist() == zorgon
    assert seen[3][0, :len(fox)].tolist() == fox
    assert seen[1][0, :len(fox)].tolist() != fox and seen[4][0, :len(fox)].tolist() != fox


def test_injection_collator_with_the_trainer(tmp_path, tokenizer, fact_set):
    model = tiny_model("llama")
    schedule = facts.InjectionSchedule(fact_set, interval=3, rounds=2)
    with pytest.warns(DeprecationWarning, match="use kacq_hooks.training.InjectionCallback"):
        collator = InjectionCollator(schedule, tokenizer, gradient_accumulation_steps=2)
    seen = []
    handle = model.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(kwargs["input_ids"].clone()) if module.training else None,
        with_kwargs=True)
    trainer = _trainer(model, tokenizer, tmp_path, max_steps=4, collator=collator, callbacks=[collator.callback()],
                       gradient_accumulation_steps=2)
    try:
        trainer.train()
    finally:
        handle.remove()
    assert collator.injected == {0: [0, 1], 3: [0]}
    fox = tokenizer(fact_set[0].train_context, add_special_tokens=False)["input_ids"]
    starts_with_fox = [batch[0, :len(fox)].tolist() == fox for batch in seen]
    assert starts_with_fox == [True, False, False, False, False, False, True, False]  # micro-batches 0 and 6


def _padded_dataset(n=32, seed=0):
    """Rows of 12 to 40 tokens, so batches are padded and injected passages replace padding."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, 41, (n,), generator=generator).tolist()
    return [{"input_ids": torch.randint(2, VOCAB, (length,), generator=generator).tolist()} for length in lengths]


def test_entropy_counts_exactly_the_real_tokens_the_model_saw_after_injection(tmp_path, tokenizer, fact_set):
    """The mask kacq applies is the one injection wrote (its pre-hook runs first), whatever the callback order."""
    model = tiny_model("llama")
    schedule = facts.InjectionSchedule(fact_set, interval=2, rounds=2)  # steps 0 and 2
    seen = []  # real tokens per training forward, as the model's forward received them
    handle = model.model.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(int(kwargs["attention_mask"].sum()))
        if module.training else None, with_kwargs=True)
    trainer = _trainer(model, tokenizer, tmp_path, max_steps=3)
    trainer.train_dataset = _padded_dataset()
    entropy = KnowledgeEntropyCallback(every=1)
    injection = InjectionCallback(schedule, tokenizer)
    trainer.add_callback(injection)
    entropy.attach(trainer)  # instruments the model at on_train_begin before injection registers its hook
    try:
        trainer.train()
    finally:
        handle.remove()
    assert injection.injected == {0: [0, 1], 2: [0]}
    assert len(seen) == 3
    assert [e.tokens for _, e in entropy.history] == seen


def test_instrumentation_checkpoint_callback_restores_a_users_statistics(tmp_path, tokenizer):
    model = tiny_model("llama")
    inst = kh.instrument(model, grads=True)
    trainer = _trainer(model, tokenizer, tmp_path, max_steps=2, save_strategy="steps", save_steps=2,
                       callbacks=[InstrumentationCheckpointCallback(inst, name="mine")])
    trainer.train()
    saved = inst.state_dict()["stats"]
    assert (tmp_path / "out" / "checkpoint-2" / "kacq_mine.pt").is_file()
    assert int(saved["0.tokens"]) == 2 * 4 * SEQ and int(saved["0.grad_tokens"]) == 2 * 4 * SEQ

    resumed_model = tiny_model("llama")  # a new process would start here: empty statistics
    fresh = kh.instrument(resumed_model, grads=True)
    restored = {}
    on_begin = type("OnBegin", (TrainerCallback,), {"on_train_begin": lambda self, *a, **k: restored.update(
        fresh.state_dict()["stats"])})
    trainer = _trainer(resumed_model, tokenizer, tmp_path, max_steps=3, save_strategy="steps", save_steps=2,
                       callbacks=[InstrumentationCheckpointCallback(fresh, name="mine"), on_begin()])
    trainer.train(resume_from_checkpoint=True)
    for key, value in saved.items():
        assert torch.equal(restored[key], value), key
    assert int(fresh.stats[0].tokens) == 3 * 4 * SEQ  # and step 3 is counted on top

    other = tiny_model("llama")
    trainer = _trainer(other, tokenizer, tmp_path, max_steps=2, save_strategy="steps", save_steps=2,
                       callbacks=[InstrumentationCheckpointCallback(kh.instrument(other), name="absent")])
    with pytest.raises(CheckpointError, match="has no kacq_absent.pt"):
        trainer.train(resume_from_checkpoint=True)


def test_resuming_with_other_entropy_settings_is_refused(tmp_path, tokenizer):
    model = tiny_model("llama")
    trainer = _trainer(model, tokenizer, tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    KnowledgeEntropyCallback(every=2).attach(trainer)
    trainer.train()
    assert (tmp_path / "out" / "checkpoint-2" / "kacq_knowledge_entropy.pt").is_file()
    other = tiny_model("llama")
    trainer = _trainer(other, tokenizer, tmp_path, max_steps=3, save_strategy="steps", save_steps=2)
    KnowledgeEntropyCallback(every=3).attach(trainer)  # a window of 3 cannot continue a window of 2
    with pytest.raises(CheckpointError, match="resume with the same settings"):
        trainer.train(resume_from_checkpoint=True)
