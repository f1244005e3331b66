"""Counting only the tokens a loss is computed on: instrument(count="labels" | "shifted_labels").

"labels" counts position t when labels[t] != -100 (the positions holding the target tokens);
"shifted_labels" counts position t when labels[t + 1] != -100 (the positions whose predictions a causal-LM
loss scores). Checked against a float64 reference with the counted positions written out by hand, through
instrument, measure, and the KnowledgeEntropyCallback of a real Trainer.
"""
import pytest
import torch
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments, default_data_collator

import kacq_hooks as kh
from kacq_hooks.errors import ConfigError, NoTokensError
from coefficient_reference import capture, document_mean, entropy, token_mean
from kacq_hooks.training.callbacks import KnowledgeEntropyCallback
from tiny_models import VOCAB, random_batch, tiny_model

PROMPT = 4  # the first positions of each row are the question: their labels are -100


def _batch():
    ids, mask = random_batch(batch=3, seq=10, padding="right")
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :PROMPT] = -100
    return ids, mask, labels


def _check(model, inst, run, counted):
    paths = [site.path for site in inst.sites]
    seen = capture(model, paths, run)
    for layer, path in enumerate(paths):
        expected = token_mean(seen[path], counted)
        torch.testing.assert_close(inst.mean_abs_coefficients()[layer].double(), expected, rtol=1e-5, atol=0)
        assert inst.knowledge_entropy().per_layer[layer] == pytest.approx(entropy(expected), abs=1e-5)
        assert int(inst.stats[layer].tokens) == sum(int(k.sum()) for k in counted)


def test_count_labels_counts_the_positions_holding_target_tokens():
    model = tiny_model("llama")
    ids, mask, labels = _batch()
    inst = kh.instrument(model, count="labels")
    _check(model, inst, lambda: model(ids, attention_mask=mask, labels=labels), [(labels != -100).reshape(-1)])


def test_count_shifted_labels_counts_the_positions_whose_prediction_the_loss_scores():
    model = tiny_model("llama")
    ids, mask, labels = _batch()
    scored = torch.zeros_like(labels, dtype=torch.bool)
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            scored[row, t] = bool(labels[row, t + 1] != -100)  # logits[t] are compared with labels[t + 1]
    inst = kh.instrument(model, count="shifted_labels")
    _check(model, inst, lambda: model(ids, attention_mask=mask, labels=labels), [scored.reshape(-1)])
    # a caller that shifts the labels itself (shift_labels=) has them used as given
    inst.reset()
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    _check(model, inst, lambda: model(ids, attention_mask=mask, shift_labels=shifted), [scored.reshape(-1)])


def test_count_with_packed_documents_weighs_each_document_by_its_counted_tokens():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    batch = DataCollatorWithFlattening()([{"input_ids": torch.randint(2, 300, (n,), generator=g).tolist()}
                                          for n in (5, 7, 4)])
    # the collator leaves each document's first label out: documents' counted rows are all but their first
    documents = [[1, 2, 3, 4], [6, 7, 8, 9, 10, 11], [13, 14, 15]]
    inst = kh.instrument(model, count="labels", weighting="document")
    seen = capture(model, [s.path for s in inst.sites], lambda: model(**batch))
    for layer, site in enumerate(inst.sites):
        torch.testing.assert_close(inst.mean_abs_coefficients()[layer].double(),
                                   document_mean(seen[site.path], [documents]), rtol=1e-5, atol=0)
        assert int(inst.stats[layer].documents) == 3 and int(inst.stats[layer].tokens) == 13


def test_measure_passes_the_labels_and_counts_by_them():
    model = tiny_model("llama")
    ids, mask, labels = _batch()
    inst = kh.measure(model, [{"input_ids": ids, "attention_mask": mask, "labels": labels}], count="labels")
    _check(model, inst, lambda: model(ids, attention_mask=mask), [(labels != -100).reshape(-1)])


def test_a_call_without_labels_is_refused_before_any_work():
    model = tiny_model("llama")
    ids, mask, _ = _batch()
    inst = kh.instrument(model, count="labels")
    with pytest.raises(kh.ShapeError, match="labels"):
        model(ids, attention_mask=mask)
    with pytest.raises(kh.ShapeError, match="do not fit"):
        model(ids, attention_mask=mask, labels=ids[:, :5])
    assert all(int(s.tokens) == 0 for s in inst.stats)
    with pytest.raises(kh.ShapeError, match="labels"):
        kh.measure(model, [{"input_ids": ids, "attention_mask": mask}], count="labels")


def test_count_is_refused_where_labels_do_not_name_the_positions():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8))
    with pytest.raises(ConfigError, match="decoder"):
        kh.instrument(t5, count="labels")
    with pytest.raises(ConfigError, match="count must be one of"):
        kh.instrument(tiny_model("llama"), count="answers")


def test_saved_statistics_counted_otherwise_do_not_merge(tmp_path):
    model = tiny_model("llama")
    ids, mask, labels = _batch()
    counted = kh.measure(model, [{"input_ids": ids, "attention_mask": mask, "labels": labels}], count="labels")
    every = kh.measure(model, [{"input_ids": ids, "attention_mask": mask}])
    with pytest.raises(kh.ShapeError, match="count"):
        every.merge(counted)
    counted.save(tmp_path / "counted.safetensors")
    with pytest.raises(kh.ShapeError, match="count"):
        kh.Instrumentation.load(tmp_path / "counted.safetensors", model)
    kh.Instrumentation.load(tmp_path / "counted.safetensors", model, count="labels").remove()


def _answer_dataset(n=8, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (seq,), generator=g)
        rows.append({"input_ids": ids, "labels": torch.cat([torch.full((PROMPT,), -100), ids[PROMPT:]])})
    return rows


def test_the_entropy_callback_counts_only_answer_tokens_of_training_batches(tmp_path):
    model = tiny_model("llama")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_answer_dataset(), data_collator=default_data_collator)
    callback = KnowledgeEntropyCallback(every=1, count="labels")
    callback.attach(trainer)
    paths = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    seen = {p: [] for p in paths}
    labels_seen = []
    modules = dict(model.named_modules())
    handles = [modules[p].register_forward_pre_hook(
        lambda m, a, p=p: seen[p].append(a[0].detach().double().reshape(-1, a[0].shape[-1]).clone())
        if m.training else None) for p in paths]
    handles.append(model.register_forward_pre_hook(
        lambda m, a, k: labels_seen.append(k["labels"].clone()) if m.training else None, with_kwargs=True))
    try:
        trainer.train()
    finally:
        for h in handles:
            h.remove()
    assert [step for step, _ in callback.history] == [1, 2]
    for step, (_, value) in enumerate(callback.history):
        counted = (labels_seen[step] != -100).reshape(-1)
        assert value.tokens == int(counted.sum()) == 4 * (12 - PROMPT)
        for layer, path in enumerate(paths):
            expected = token_mean([seen[path][step]], [counted])
            assert value.per_layer[layer] == pytest.approx(entropy(expected), abs=1e-5)


def test_the_entropy_callback_counts_only_answer_tokens_of_a_calibration_set(tmp_path):
    model = tiny_model("llama")
    ids, mask, labels = _batch()
    calibration = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    callback = KnowledgeEntropyCallback(every=1, calibration=calibration, count="labels")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_answer_dataset(), data_collator=default_data_collator)
    seen = capture(model, [f"model.layers.{i}.mlp.down_proj" for i in range(2)],
                   lambda: model(ids, attention_mask=mask))
    callback.attach(trainer)
    trainer.train()
    first = callback.history[0][1]
    assert callback.history[0][0] == 0 and first.tokens == int((labels != -100).sum())
    for layer in range(2):
        expected = token_mean(seen[f"model.layers.{layer}.mlp.down_proj"], [(labels != -100).reshape(-1)])
        assert first.per_layer[layer] == pytest.approx(entropy(expected), abs=1e-5)


def test_count_labels_selects_the_routed_tokens_of_experts_layers():
    from b2_ref import moe_reference

    model = tiny_model("olmoe")
    ids, mask, labels = _batch()
    inst = kh.instrument(model, count="labels")
    with torch.no_grad():
        model(ids, attention_mask=mask, labels=labels)
    inst.remove()
    counted = (labels != -100).reshape(-1)
    experts = [(i, site) for i, site in enumerate(inst.sites) if site.kind == "experts"]
    assert experts
    for index, site in experts:
        [(routed_sum, _)] = moe_reference(model, [site.experts_layer.module],
                                          lambda: model(ids, attention_mask=mask), counted)
        expected = routed_sum / int(counted.sum())
        torch.testing.assert_close(inst.mean_abs_coefficients()[index].double(), expected, rtol=1e-5, atol=1e-7)
        assert int(inst.stats[index].tokens) == int(counted.sum())
        assert inst.knowledge_entropy().per_layer[index] == pytest.approx(entropy(expected), abs=1e-5)


@pytest.mark.parametrize("count", ["labels", "shifted_labels"])
def test_calls_whose_labels_select_no_position_say_so_not_that_nothing_ran(count):
    model = tiny_model("llama")
    ids, mask, _ = _batch()
    nothing = torch.full_like(ids, -100)
    inst = kh.instrument(model, count=count)
    model(ids, attention_mask=mask, labels=nothing)
    for read in (inst.knowledge_entropy, inst.mean_abs_coefficients, lambda: kh.knowledge_entropy(inst)):
        with pytest.raises(NoTokensError, match=f"count={count!r} selected no position") as caught:
            read()
        assert "-100" in str(caught.value) and "padding" not in str(caught.value)
    with pytest.raises(NoTokensError, match=f"count={count!r} selected no position"):
        kh.measure(model, [{"input_ids": ids, "attention_mask": mask, "labels": nothing}],
                   count=count).knowledge_entropy()
    if count == "labels":  # labels only on padding select nothing either (shifted, they select the last tokens)
        inst.reset()
        model(ids, attention_mask=mask, labels=ids.masked_fill(mask != 0, -100))
        with pytest.raises(NoTokensError, match=f"count={count!r} selected no position.*masked out"):
            inst.knowledge_entropy()
    # once a call selects positions the statistics read as usual; reset() forgets the earlier calls
    model(ids, attention_mask=mask, labels=ids)
    assert inst.knowledge_entropy().tokens > 0
    inst.reset()
    with pytest.raises(NoTokensError, match="no tokens have been recorded"):
        inst.knowledge_entropy()
    inst.remove()
