"""Setups of the kinds issue 24 fixed but did not name, each against an independent float64 reference.

Other collators (``seq_idx`` packing, ``DataCollatorForSeq2Seq`` prompts, padded label positions), other
cache classes and beam search, adapters other than LoRA (IA3, LoHa, LoKr, DoRA, ``disable_adapter``), and
loss-scaler loops beyond the plain one. The reference is tests/coefficient_reference.py (plain hooks,
float64, the counted positions written out by hand) or a float64 copy of the model with ``retain_grad``.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, PreTrainedTokenizerFast

import kacq_hooks as kh
from kacq_hooks.errors import ConfigError
from coefficient_reference import capture, document_mean, token_mean
from tiny_models import random_batch, tiny_model

LENGTHS = (5, 7, 4)
DOCUMENTS = [list(range(0, 5)), list(range(5, 12)), list(range(12, 16))]


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, 300, (n,), generator=g).tolist()} for n in LENGTHS]


def _assert_means(model, inst, run, counted, documents=None, weighting="token"):
    """c̄ of every site against the reference; ``counted``/``documents`` give per call rows / row lists."""
    paths = [site.path for site in inst.sites]
    seen = capture(model, paths, run)
    for layer, path in enumerate(paths):
        cs = seen[path]
        keep = counted(cs) if callable(counted) else counted
        expected = token_mean(cs, keep) if weighting == "token" else document_mean(cs, documents)
        torch.testing.assert_close(inst.mean_abs_coefficients(weighting)[layer].double(), expected, rtol=1e-5, atol=0)
        assert int(inst.stats[layer].tokens) == sum(int(k.sum()) for k in keep)
        if weighting == "document":
            assert int(inst.stats[layer].documents) == sum(len(d) for d in documents)


# -- packing collators ---------------------------------------------------------------------------

def test_packed_rows_that_carry_only_seq_idx_are_weighted_per_document():
    """DataCollatorWithFlattening(return_seq_idx=True, return_position_ids=False): seq_idx alone says where
    each document is (the packing signal of Mamba-2 style kernels); one packed row is not one document."""
    model = tiny_model("llama")
    batch = DataCollatorWithFlattening(return_position_ids=False, return_seq_idx=True)(_features())
    assert set(batch) == {"input_ids", "labels", "seq_idx"} and batch["seq_idx"].tolist() == [[0] * 5 + [1] * 7 + [2] * 4]
    inst = kh.instrument(model, weighting="document")
    _assert_means(model, inst, lambda: model(**batch), [torch.ones(16, dtype=torch.bool)], [DOCUMENTS], "document")


@pytest.mark.parametrize("flags", [dict(return_seq_idx=True), dict(return_flash_attn_kwargs=True, return_seq_idx=True)])
def test_packed_rows_with_seq_idx_beside_positions_or_cu_seq_lens_agree(flags):
    model = tiny_model("llama")
    batch = DataCollatorWithFlattening(**flags)(_features())
    inst = kh.instrument(model, weighting="document")
    _assert_means(model, inst, lambda: model(**batch), [torch.ones(16, dtype=torch.bool)], [DOCUMENTS], "document")


def test_a_packed_row_whose_last_document_is_cut_weights_the_cut_part_as_a_document():
    model = tiny_model("llama")
    batch = {k: v[:, :14] for k, v in DataCollatorWithFlattening()(_features()).items()}
    inst = kh.instrument(model, weighting="document")
    _assert_means(model, inst, lambda: model(**batch), [torch.ones(14, dtype=torch.bool)],
                  [[list(range(0, 5)), list(range(5, 12)), [12, 13]]], "document")


def _word_tokenizer(side):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", unk_token="w1", eos_token="w2")
    fast.padding_side = side
    return fast


def _prompt_answer_batch(side, label_pad=-100):
    g = torch.Generator().manual_seed(5)
    features = []
    for n, prompt in [(6, 3), (9, 5), (4, 1)]:
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        features.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * prompt + ids[prompt:]})
    return DataCollatorForSeq2Seq(_word_tokenizer(side), padding=True, return_tensors="pt",
                                  label_pad_token_id=label_pad)(features)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("count", ["labels", "shifted_labels"])
def test_seq2seq_collator_prompts_are_left_out_on_either_padding_side(side, count):
    model = tiny_model("llama")
    batch = _prompt_answer_batch(side)
    labels, mask = batch["labels"], batch["attention_mask"].bool()
    if count == "labels":
        keep = (labels != -100) & mask
    else:
        keep = torch.cat([labels[:, 1:] != -100, torch.zeros(3, 1, dtype=torch.bool)], 1) & mask
    inst = kh.instrument(model, count=count)
    _assert_means(model, inst, lambda: model(**batch), [keep.reshape(-1)])


def test_padded_positions_whose_labels_are_set_stay_out_of_count_labels():
    """A collator padding labels with the pad id (not -100): the mask still says they are padding."""
    model = tiny_model("llama")
    batch = _prompt_answer_batch("right", label_pad=0)
    mask = batch["attention_mask"].bool()
    assert ((batch["labels"] != -100) & ~mask).any()
    inst = kh.instrument(model, count="labels")
    _assert_means(model, inst, lambda: model(**batch), [((batch["labels"] != -100) & mask).reshape(-1)])


# -- caches and generation -----------------------------------------------------------------------

@pytest.mark.parametrize("cache", [None, "static"])
def test_beam_search_over_left_padded_prompts_counts_each_beam_once_per_step(cache):
    model = tiny_model("llama").eval()
    ids = torch.randint(2, 300, (2, 6), generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    inst = kh.instrument(model)
    options = dict(max_new_tokens=4, do_sample=False, num_beams=3, pad_token_id=0)
    if cache:
        options["cache_implementation"] = cache

    def counted(cs):  # the prompt's padding is left out in every beam; each new token counts
        return [mask.repeat_interleave(3, 0).reshape(-1).bool() if i == 0 else torch.ones(c.shape[0], dtype=torch.bool)
                for i, c in enumerate(cs)]
    _assert_means(model, inst, lambda: model.generate(ids, attention_mask=mask, **options), counted)


# -- adapters other than LoRA --------------------------------------------------------------------

peft = pytest.importorskip("peft")


def _adapted(config, before):
    torch.manual_seed(0)
    model = tiny_model("llama")
    inst = kh.instrument(model) if before else None
    wrapped = peft.get_peft_model(model, config)
    inst = inst or kh.instrument(wrapped)
    with torch.no_grad():  # adapters start as the identity: move them so that they matter
        for name, p in wrapped.named_parameters():
            if any(k in name for k in ("lora_", "ia3_", "hada_", "lokr_")):
                p.add_(torch.randn_like(p) * 0.3)
    return wrapped, inst


def _down_proj_inputs(model):
    """The output projections as the model applies them: the (possibly adapted) down_proj modules."""
    return [name for name, _ in model.named_modules() if name.endswith("mlp.down_proj")]


_ADAPTERS = {
    "loha": lambda: peft.LoHaConfig(target_modules=["down_proj"], r=4),
    "lokr": lambda: peft.LoKrConfig(target_modules=["down_proj"], r=4),
    "dora": lambda: peft.LoraConfig(target_modules=["down_proj", "up_proj"], r=4, use_dora=True),
    "lora_gate_up": lambda: peft.LoraConfig(target_modules=["gate_proj", "up_proj"], r=4),
    "ia3_up": lambda: peft.IA3Config(target_modules=["up_proj"], feedforward_modules=["up_proj"]),
}


@pytest.mark.parametrize("before", [False, True], ids=["wrapped_first", "instrumented_first"])
@pytest.mark.parametrize("adapter", sorted(_ADAPTERS))
def test_adapters_other_than_lora_are_measured_exactly(adapter, before):
    model, inst = _adapted(_ADAPTERS[adapter](), before)
    ids, mask = random_batch(batch=2, seq=8, seed=3)
    paths = _down_proj_inputs(model)
    seen = capture(model, paths, lambda: model(ids, attention_mask=mask))
    for layer, path in enumerate(paths):
        expected = token_mean(seen[path], [mask.bool().reshape(-1)])
        torch.testing.assert_close(inst.mean_abs_coefficients()[layer].double(), expected, rtol=1e-5, atol=0)


def _ia3_on_down_proj():
    return peft.IA3Config(target_modules=["down_proj", "up_proj"], feedforward_modules=["down_proj"])


def test_ia3_scaling_the_output_projections_input_after_instrument_is_refused_not_measured_as_c():
    """IA3 with down_proj among its feed-forward modules multiplies C by its vector l inside the wrapper: the
    hook made before get_peft_model sits on the base layer and would see l * C, while the same model
    instrumented after wrapping, or merged, gives C. Found by review: measured l * C without a word."""
    ids, mask = random_batch(batch=2, seq=8, seed=3)
    model, inst = _adapted(_ia3_on_down_proj(), before=True)
    with pytest.raises(ConfigError, match="IA3"):
        model(ids, attention_mask=mask)
    assert all(int(s.tokens) == 0 for s in inst.stats)  # the refused call added nothing
    inst.remove()
    again = kh.instrument(model)  # what the message says to do: C as the wrapper receives it
    paths = _down_proj_inputs(model)
    seen = capture(model, paths, lambda: model(ids, attention_mask=mask))
    for layer, path in enumerate(paths):
        torch.testing.assert_close(again.mean_abs_coefficients()[layer].double(),
                                   token_mean(seen[path], [mask.bool().reshape(-1)]), rtol=1e-5, atol=0)


def test_ia3_on_the_output_projection_instrumented_after_wrapping_matches_the_merged_model():
    ids, mask = random_batch(batch=2, seq=8, seed=3)
    model, inst = _adapted(_ia3_on_down_proj(), before=False)
    model(ids, attention_mask=mask)
    wrapped = inst.mean_abs_coefficients()
    inst.remove()  # the merge takes the hooked wrappers out of the model
    merged = model.merge_and_unload()
    plain = kh.instrument(merged)
    merged(ids, attention_mask=mask)
    for a, b in zip(wrapped, plain.mean_abs_coefficients()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_disable_adapter_and_a_second_adapter_are_measured_as_run():
    model, inst = _adapted(peft.LoraConfig(target_modules=["up_proj"], r=4), before=False)
    model.add_adapter("second", peft.LoraConfig(target_modules=["up_proj"], r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "second" in name:
                p.add_(torch.randn_like(p))
    ids, mask = random_batch(batch=2, seq=8, seed=3)
    keep = [mask.bool().reshape(-1)]

    def without():
        with model.disable_adapter():
            model(ids, attention_mask=mask)
    _assert_means(model, inst, without, keep)
    inst.reset()
    model.set_adapter("second")
    _assert_means(model, inst, lambda: model(ids, attention_mask=mask), keep)


# -- loss scaling beyond the plain loop ----------------------------------------------------------

def _grad_reference(model, batches, divide=1):
    """Per site, float64 sum over valid tokens of |dL/dC| of each batch's unscaled loss / ``divide``."""
    ref = copy.deepcopy(model).double()
    sites = [ref.get_submodule(f"model.layers.{i}.mlp.down_proj") for i in range(ref.config.num_hidden_layers)]
    seen = {}

    def keep(i):
        def hook(module, args):
            args[0].retain_grad()
            seen[i] = args[0]
        return hook
    handles = [site.register_forward_pre_hook(keep(i)) for i, site in enumerate(sites)]
    sums = [torch.zeros(site.in_features, dtype=torch.float64) for site in sites]
    for ids, mask in batches:
        ref.zero_grad()
        (ref(ids, attention_mask=mask, labels=ids).loss / divide).backward()
        for i in range(len(sites)):
            sums[i] += seen[i].grad.abs()[mask.bool()].sum(0)
    for h in handles:
        h.remove()
    return sums


def test_a_disabled_scaler_declared_leaves_the_gradients_as_they_are():
    model = tiny_model("llama").train()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    inst = kh.instrument(model, grads=True).loss_scale(scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = random_batch(batch=3, seq=10, seed=1)
    expected = _grad_reference(model, [batch])
    scaler.scale(model(batch[0], attention_mask=batch[1], labels=batch[0]).loss).backward()
    scaler.step(opt)
    scaler.update()
    for layer, ref in zip(inst.stats, expected):
        torch.testing.assert_close(layer.grad_sum_abs.double(), ref, rtol=2e-4, atol=1e-9)


def test_a_scale_lowered_between_micro_batches_is_undone_per_micro_batch():
    model = tiny_model("llama").train()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    inst = kh.instrument(model, grads=True).loss_scale(scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = [random_batch(batch=3, seq=10, seed=s) for s in (1, 2)]
    expected = _grad_reference(model, batches, divide=2)
    for k, (ids, mask) in enumerate(batches):
        scaler.scale(model(ids, attention_mask=mask, labels=ids).loss / 2).backward()
        if k == 0:
            scaler.update(256.0)  # the user sets a new scale mid-window
    scaler.step(opt)
    scaler.update()
    for layer, ref in zip(inst.stats, expected):
        torch.testing.assert_close(layer.grad_sum_abs.double(), ref, rtol=2e-4, atol=1e-9)


@pytest.mark.parametrize("probe_first", [True, False])
def test_an_unscaled_backward_under_a_declared_scaler_is_not_divided_by_the_scale(probe_first):
    """A plain loss.backward() (a gradient probe in the loop) beside the scaled step's backward: found by review,
    it was staged with the step and divided by the scale at update(), 1/512 of its true size."""
    model = tiny_model("llama").train()
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    inst = kh.instrument(model, grads=True).loss_scale(scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probe, step = random_batch(batch=3, seq=10, seed=1), random_batch(batch=3, seq=10, seed=2)
    expected = _grad_reference(model, [probe, step])

    def plain():
        loss = model(probe[0], attention_mask=probe[1], labels=probe[0]).loss  # not scaled
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    if probe_first:
        plain()
    scaler.scale(model(step[0], attention_mask=step[1], labels=step[0]).loss).backward()
    if not probe_first:
        plain()
        scaler.scale(torch.zeros((), requires_grad=True))  # a scale() call that is never backpropagated
    scaler.step(opt)
    scaler.update()
    for layer, ref in zip(inst.stats, expected):
        assert int(layer.grad_tokens) == int(probe[1].sum() + step[1].sum())
        torch.testing.assert_close(layer.grad_sum_abs.double(), ref, rtol=2e-4, atol=1e-9)
    inst.remove()
    assert "scale" not in vars(scaler) and "update" not in vars(scaler)  # the scaler is the user's again


def test_trainer_gradient_accumulation_across_a_skipped_step_drops_the_whole_window(tmp_path):
    """Trainer(fp16=True, gradient_accumulation_steps=2) with a CPU GradScaler handed to its accelerator (as in
    tests/test_loss_scaling.py): the skipped step's two micro-batches add nothing, the others their
    num_items_in_batch-normalised loss's dL/dC."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    from kacq_hooks.training import LossScaleCallback
    from test_loss_scaling import _Recorder, _trainer_dataset, _trainer_reference
    model = tiny_model("llama").train()
    inst = kh.instrument(model, grads=True)
    recorder = _Recorder(model, poison={1})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=0.05, report_to=[], logging_steps=1000,
                             save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                             fp16=True)
    trainer = Trainer(model=model, args=args, train_dataset=_trainer_dataset(), data_collator=default_data_collator,
                      callbacks=[recorder, LossScaleCallback(inst)])
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    trainer.train()
    assert inst.skipped_steps == 1 and [len(calls) for _, calls in recorder.steps] == [2, 2, 2]
    total, tokens = None, 0
    for step, (before, calls) in enumerate(recorder.steps):
        if step in recorder.poison:
            continue
        assert "num_items_in_batch" in calls[0]  # the reference backpropagates the Trainer's own loss
        sums, n = _trainer_reference(before, calls)
        total = sums if total is None else [a + b for a, b in zip(total, sums)]
        tokens += n
    for layer, ref in zip(inst.stats, total):
        assert int(layer.grad_tokens) == tokens
        torch.testing.assert_close(layer.grad_sum_abs.double(), ref, rtol=2e-4, atol=1e-9)
