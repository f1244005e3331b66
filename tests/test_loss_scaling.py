"""Gradient statistics under a loss scaler: of the unscaled loss, and nothing from the steps the scaler skips.

The reference is independent of kacq_hooks: a float64 copy of the model at each step's weights, the
unscaled loss, and dL/dC read with ``retain_grad`` on the output projection's input.
"""
from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

import kacq_hooks as kh
from kacq_hooks.errors import ArgumentTypeError, NoTokensError
from kacq_hooks.training import InstrumentationCheckpointCallback, LossScaleCallback
from tiny_models import random_batch, tiny_model


def _reference(model, batches) -> list[tuple[torch.Tensor, int]]:
    """Per site: (sum over valid tokens of |dL/dC| in float64, tokens) of the unscaled losses of ``batches``."""
    ref = copy.deepcopy(model).double()
    sites = [ref.get_submodule(f"model.layers.{i}.mlp.down_proj") for i in range(ref.config.num_hidden_layers)]
    seen: dict[int, torch.Tensor] = {}

    def keep(index, module, args):
        args[0].retain_grad()
        seen[index] = args[0]

    handles = [site.register_forward_pre_hook(functools.partial(keep, i)) for i, site in enumerate(sites)]
    sums = [torch.zeros(site.in_features, dtype=torch.float64) for site in sites]
    tokens = 0
    for ids, mask in batches:
        ref.zero_grad()
        ref(ids, attention_mask=mask, labels=ids).loss.backward()
        rows = mask.bool()
        for i in range(len(sites)):
            sums[i] += seen[i].grad.abs()[rows].sum(0)
        tokens += int(rows.sum())
    for handle in handles:
        handle.remove()
    return [(s, tokens) for s in sums]


def _train(model, inst, scaler, steps, accumulate=1, poison=()):
    """A plain GradScaler loop; in the steps listed in ``poison`` one parameter gradient is made inf.

    Returns, per step, the micro-batches and whether the optimizer really stepped.
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    history = []
    for step in range(steps):
        before = copy.deepcopy(model)
        batches = [random_batch(batch=3, seq=10, seed=10 * step + k) for k in range(accumulate)]
        for ids, mask in batches:
            loss = model(ids, attention_mask=mask, labels=ids).loss / accumulate
            scaler.scale(loss).backward()
        if step in poison:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        weights = next(model.parameters()).detach().clone()
        scaler.step(opt)
        scaler.update()
        stepped = not torch.equal(weights, next(model.parameters()).detach())
        history.append((before, batches, stepped))
        opt.zero_grad()
    return history


def _expected(history, accumulate):
    total = None
    for before, batches, stepped in history:
        if not stepped:
            continue
        ref = _reference(before, batches)
        part = [(s / accumulate, n) for s, n in ref]
        total = part if total is None else [(a + s, m + n) for (a, m), (s, n) in zip(total, part)]
    return total


@pytest.mark.parametrize("accumulate", [1, 2])
def test_grad_scaler_statistics_are_of_the_unscaled_loss_and_skip_skipped_steps(accumulate):
    model = tiny_model("llama").train()
    inst = kh.instrument(model, grads=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)  # 1024, 2048, then halved ...
    inst.loss_scale(scaler)
    history = _train(model, inst, scaler, steps=4, accumulate=accumulate, poison=(1,))
    assert [stepped for *_, stepped in history] == [True, False, True, True]
    assert inst.skipped_steps == 1
    expected = _expected(history, accumulate)
    for layer, (ref_sum, ref_tokens) in zip(inst.stats, expected):
        assert int(layer.grad_tokens) == ref_tokens  # the skipped step's tokens are not counted
        torch.testing.assert_close(layer.grad_sum_abs.double(), ref_sum, rtol=2e-4, atol=1e-9)
    # the forward statistics count every forward: the skip only concerns the gradients
    assert int(inst.stats[0].tokens) == sum(int(m.sum()) for _, batches, _ in history for _, m in batches)
    means = inst.mean_abs_gradients()
    torch.testing.assert_close(means[0].double(), expected[0][0] / expected[0][1], rtol=2e-4, atol=1e-9)


def test_without_the_scaler_the_statistics_would_be_scaled():
    """The defect this guards against: an undeclared scaler multiplies every gradient statistic."""
    model = tiny_model("llama").train()
    inst = kh.instrument(model, grads=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    history = _train(model, inst, scaler, steps=1)
    (ref_sum, _), = _expected(history, 1)[:1]
    torch.testing.assert_close(inst.stats[0].grad_sum_abs.double() / 1024, ref_sum, rtol=2e-4, atol=1e-9)


def test_a_step_is_staged_until_update():
    model = tiny_model("llama").train()
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    inst = kh.instrument(model, grads=True).loss_scale(scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: steps are comparable
    ids, mask = random_batch(batch=2, seq=8)
    scaler.scale(model(ids, attention_mask=mask, labels=ids).loss).backward()
    assert int(inst.stats[0].grad_tokens) == 0
    with pytest.raises(NoTokensError, match="scaler.update"):
        inst.mean_abs_gradients()
    scaler.step(opt)
    scaler.update()
    assert int(inst.stats[0].grad_tokens) == int(mask.sum())
    inst.remove()  # the scaler is the user's again
    assert "update" not in vars(scaler)
    inst.attach()  # and followed again: a re-attached instrumentation never adds scaled gradients
    scaler.scale(model(ids, attention_mask=mask, labels=ids).loss).backward()
    scaler.step(opt)
    scaler.update()
    assert int(inst.stats[0].grad_tokens) == 2 * int(mask.sum())
    one = inst.stats[0].grad_sum_abs.clone()
    plain = kh.instrument(model, grads=True)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    torch.testing.assert_close(one / 2, plain.stats[0].grad_sum_abs, rtol=1e-5, atol=1e-10)  # not x64


def test_loss_scale_takes_a_grad_scaler():
    inst = kh.instrument(tiny_model("llama"), grads=True)
    with pytest.raises(ArgumentTypeError, match="GradScaler"):
        inst.loss_scale(1024.0)


def test_fp16_training_without_a_declared_scale_warns_and_the_accessor_refuses(caplog):
    model = tiny_model("llama").train()
    inst = kh.instrument(model, grads=True)
    ids, mask = random_batch(batch=2, seq=8)
    with caplog.at_level(logging.WARNING, logger="kacq_hooks"):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
    assert "loss_scale" in caplog.text
    with pytest.raises(kh.KacqError, match="loss_scale"):
        inst.mean_abs_gradients()
    inst.reset()
    inst.loss_scale(None)  # declared: the loss is not scaled
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert all(torch.isfinite(m).all() for m in inst.mean_abs_gradients())


# -- the Trainer: accelerate's scaler, read by LossScaleCallback -----------------------------------------------------

def _trainer_dataset(n=12):
    rows = []
    for k in range(n):
        ids, mask = random_batch(batch=1, seq=10, seed=100 + k)
        ids, mask = ids[0], mask[0]
        if k % 3 == 1:  # some padded rows
            mask[7:] = 0
            ids = ids.masked_fill(mask == 0, 0)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


class _Recorder(TrainerCallback):
    """The weights before each step and each training forward's inputs; an inf gradient in the steps to poison."""

    def __init__(self, model, poison):
        self.model, self.poison, self.steps, self.step = model, poison, [], None
        self.model.register_forward_pre_hook(self._inputs, with_kwargs=True)
        first = next(p for p in model.parameters() if p.requires_grad)
        first.register_hook(self._maybe_poison)

    def _inputs(self, module, args, kwargs):
        if torch.is_grad_enabled():
            self.steps[-1][1].append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    def _maybe_poison(self, grad):
        if self.step in self.poison:
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
        return grad

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step
        self.steps.append(({k: v.detach().clone() for k, v in self.model.state_dict().items()}, []))


def _trainer_reference(weights, calls):
    ref = tiny_model("llama").train()
    ref.load_state_dict(weights)
    ref.double()
    seen = {}

    def keep(index, module, args):
        args[0].retain_grad()
        seen[index] = args[0]

    sites = [ref.get_submodule(f"model.layers.{i}.mlp.down_proj") for i in range(ref.config.num_hidden_layers)]
    for i, site in enumerate(sites):
        site.register_forward_pre_hook(functools.partial(keep, i))
    sums = [torch.zeros(site.in_features, dtype=torch.float64) for site in sites]
    tokens = 0
    for kwargs in calls:
        ref.zero_grad()
        ref(**kwargs).loss.backward()
        rows = kwargs["attention_mask"].bool()
        for i in range(len(sites)):
            sums[i] += seen[i].grad.abs()[rows].sum(0)
        tokens += int(rows.sum())
    return sums, tokens


@pytest.mark.parametrize("fp16, callback", [(False, LossScaleCallback), (True, LossScaleCallback),
                                             (True, InstrumentationCheckpointCallback)])
def test_trainer_with_accelerates_grad_scaler(tmp_path, fp16, callback):
    """Trainer semantics with a real accelerate Accelerator and a real torch.amp.GradScaler on CPU; the scaler is
    picked up by LossScaleCallback, or by the checkpoint callback of a user's own instrumentation.

    accelerate 1.16 creates no GradScaler (and no fp16 autocast) when the device is the CPU:
    ``Accelerator.__init__`` only builds one for fp16 off the CPU, so ``Trainer(fp16=True)`` on a CPU
    trains in fp32, unscaled. The test hands the Trainer's own accelerator a CPU ``GradScaler`` before
    training: ``accelerator.backward`` then scales the loss and the accelerate-wrapped optimizer steps
    through ``scaler.step``/``scaler.update`` (a skipped step is ``optimizer_step_was_skipped``), as with
    fp16 on a GPU; the computation stays fp32, so the reference can be tight.
    """
    model = tiny_model("llama").train()
    inst = kh.instrument(model, grads=True)
    recorder = _Recorder(model, poison={1})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=3,
                             learning_rate=0.05, report_to=[], logging_steps=1000, save_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, seed=0, disable_tqdm=True, fp16=fp16)
    trainer = Trainer(model=model, args=args, train_dataset=_trainer_dataset(), data_collator=default_data_collator,
                      callbacks=[recorder, callback(inst)])
    assert trainer.accelerator.mixed_precision == ("fp16" if fp16 else "no") and trainer.accelerator.scaler is None
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    trainer.train()
    assert inst.skipped_steps == 1
    assert trainer.accelerator.scaler.get_scale() != 1024.0  # the scale moved during the run
    total, tokens = None, 0
    for step, (before, calls) in enumerate(recorder.steps):
        if step in recorder.poison:
            continue
        sums, n = _trainer_reference(before, calls)
        total = sums if total is None else [a + b for a, b in zip(total, sums)]
        tokens += n
    for layer, ref in zip(inst.stats, total):
        assert int(layer.grad_tokens) == tokens
        torch.testing.assert_close(layer.grad_sum_abs.double(), ref, rtol=2e-4, atol=1e-9)
    torch.testing.assert_close(inst.mean_abs_gradients()[1].double(), total[1] / tokens, rtol=2e-4, atol=1e-9)


def test_loss_scale_callback_declares_an_unscaled_trainer_run(tmp_path):
    model = tiny_model("llama").train()
    inst = kh.instrument(model, grads=True)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=3,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=_trainer_dataset(3), data_collator=default_data_collator,
            callbacks=[LossScaleCallback(inst)]).train()
    assert inst._gradients.declared and inst._gradients.scaler is None
    assert int(inst.stats[0].grad_tokens) > 0  # committed at once without a scaler


def test_accelerate_loop_with_a_grad_scaler():
    """A plain accelerate loop: ``accelerator.backward`` scales, the wrapped optimizer steps through the scaler.

    accelerate 1.16 builds no scaler on a CPU, so the accelerator is given a real CPU GradScaler before
    ``prepare`` (see the Trainer test); ``inst.loss_scale(accelerator)`` reads it from the accelerator.
    """
    from accelerate import Accelerator

    model = tiny_model("llama").train()
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model, opt = accelerator.prepare(model, opt)
    inst = kh.instrument(model, grads=True).loss_scale(accelerator)
    first = next(model.parameters())
    history = []
    for step in range(3):
        before = copy.deepcopy(model)
        ids, mask = random_batch(batch=3, seq=10, seed=step)
        accelerator.backward(model(ids, attention_mask=mask, labels=ids).loss)
        if step == 1:
            first.grad.view(-1)[0] = float("nan")
        opt.step()
        history.append((before, [(ids, mask)], not accelerator.optimizer_step_was_skipped))
        opt.zero_grad()
    assert [stepped for *_, stepped in history] == [True, False, True]
    assert inst.skipped_steps == 1
    for layer, (ref_sum, ref_tokens) in zip(inst.stats, _expected(history, 1)):
        assert int(layer.grad_tokens) == ref_tokens
        torch.testing.assert_close(layer.grad_sum_abs.double(), ref_sum, rtol=2e-4, atol=1e-9)


def test_deepspeed_fp16_is_refused(tmp_path):
    """DeepSpeed's own fp16 loss scaler cannot be read: refused at the start of training, not measured as unscaled.

    DeepSpeed is not installed here, so the Trainer cannot be built with it: the callback is handed real
    TrainingArguments whose ``deepspeed`` setting is filled in afterwards.
    """
    inst = kh.instrument(tiny_model("llama"), grads=True)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), fp16=True, use_cpu=True, report_to=[])
    args.deepspeed = {"fp16": {"enabled": True}}
    with pytest.raises(kh.KacqError, match="DeepSpeed"):
        LossScaleCallback(inst).on_train_begin(args, None, None, optimizer=None)
