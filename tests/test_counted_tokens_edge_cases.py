"""instrument(count=...) in the training setups people use for answer-only losses, against a float64 reference.

A real Trainer with DataCollatorForSeq2Seq (rows padded to the longest, labels padded with -100), gradient
accumulation, and micro-batches whose labels are all -100: the statistics of a step must be those of exactly
the positions whose labels (or next labels) are not -100, over every micro-batch of the step.
"""
import pytest
import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

import kacq_hooks as kh
from coefficient_reference import entropy, token_mean
from kacq_hooks.training.callbacks import KnowledgeEntropyCallback
from tiny_models import VOCAB, tiny_model, tiny_tokenizer

PATHS = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]


def _rows(n=8, seed=0):
    """Rows of varied length; the first two (the first micro-batch) have no answer at all."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length, prompt = 6 + i % 4, 3 + i % 2
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        labels = [-100] * length if i < 2 else [-100] * prompt + ids[prompt:]
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    return rows


def _train(tmp_path, count, accumulation):
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-3, report_to=[],
                             save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                             train_sampling_strategy="sequential")  # the all-ignored rows form one micro-batch
    trainer = Trainer(model=model, args=args, train_dataset=_rows(),
                      data_collator=DataCollatorForSeq2Seq(tok, model=model, padding="longest"))
    callback = KnowledgeEntropyCallback(every=1, count=count)
    callback.attach(trainer)
    seen = {p: [] for p in PATHS}
    calls = []
    modules = dict(model.named_modules())
    handles = [modules[p].register_forward_pre_hook(
        lambda m, a, p=p: seen[p].append(a[0].detach().double().reshape(-1, a[0].shape[-1]).clone())
        if m.training else None) for p in PATHS]
    handles.append(model.register_forward_pre_hook(
        lambda m, a, k: calls.append((k["labels"].clone(), k["attention_mask"].clone())) if m.training else None,
        with_kwargs=True))
    try:
        trainer.train()
    finally:
        for h in handles:
            h.remove()
    return callback, seen, calls


def _selected(labels, mask, count):
    held = labels != -100
    if count == "shifted_labels":
        held = torch.cat([held[:, 1:], torch.zeros_like(held[:, :1])], 1)
    return (held & mask.bool()).reshape(-1)


@pytest.mark.parametrize("count", ["labels", "shifted_labels"])
def test_accumulated_steps_count_every_micro_batch_and_an_all_ignored_one_adds_nothing(tmp_path, count):
    callback, seen, calls = _train(tmp_path, count, accumulation=2)
    assert [step for step, _ in callback.history] == [1, 2] and len(calls) == 4
    assert not _selected(*calls[0], count).any() and _selected(*calls[1], count).any()
    for step, (_, value) in enumerate(callback.history):
        micro = range(2 * step, 2 * step + 2)
        counted = [_selected(*calls[i], count) for i in micro]
        assert value.tokens == sum(int(k.sum()) for k in counted)
        for layer, path in enumerate(PATHS):
            expected = token_mean([seen[path][i] for i in micro], counted)
            assert value.per_layer[layer] == pytest.approx(entropy(expected), abs=1e-5)


def test_a_measure_over_batches_one_of_which_selects_nothing_counts_the_others_exactly():
    model = tiny_model("llama")
    rows = _rows()
    tok = tiny_tokenizer()
    collate = DataCollatorForSeq2Seq(tok, padding="longest")
    batches = [collate(rows[i:i + 2]) for i in range(0, 8, 2)]
    seen = {p: [] for p in PATHS}
    modules = dict(model.named_modules())
    handles = [modules[p].register_forward_pre_hook(
        lambda m, a, p=p: seen[p].append(a[0].detach().double().reshape(-1, a[0].shape[-1]).clone())) for p in PATHS]
    try:
        inst = kh.measure(model, batches, count="labels")
    finally:
        for h in handles:
            h.remove()
    counted = [_selected(b["labels"], b["attention_mask"], "labels") for b in batches]
    assert not counted[0].any()
    assert int(inst.stats[0].tokens) == sum(int(k.sum()) for k in counted)
    for layer, path in enumerate(PATHS):
        expected = token_mean(seen[path], counted)
        torch.testing.assert_close(inst.mean_abs_coefficients()[layer].double(), expected, rtol=1e-5, atol=0)


def test_a_step_with_no_answer_token_does_not_stop_training(tmp_path):
    callback, seen, calls = _train(tmp_path, "labels", accumulation=1)  # step 1 is the all -100 micro-batch
    assert len(calls) == 2 and not _selected(*calls[0], "labels").any()
    values = dict(callback.history)
    assert 2 in values and not (1 in values and all(v == v for v in values[1].per_layer))  # none, or NaN, for step 1
    counted = _selected(*calls[1], "labels")
    assert values[2].tokens == int(counted.sum())
    for layer, path in enumerate(PATHS):
        assert values[2].per_layer[layer] == pytest.approx(entropy(token_mean([seen[path][1]], [counted])), abs=1e-5)
