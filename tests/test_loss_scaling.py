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

import kacq_hooks as kh
from kacq_hooks.errors import ArgumentTypeError, NoTokensError
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
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
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
