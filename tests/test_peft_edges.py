"""PEFT LoRA edges of the gradient capture: a layer whose C needs no gradient, and a merged adapter."""
from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch

import kacq_hooks as kh
from kacq_hooks.errors import LocateError, NoTokensError
from tiny_models import random_batch, tiny_model

peft = pytest.importorskip("peft")


def _lora(targets):
    model = tiny_model("llama").train()
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                                      init_lora_weights=False))


def _reference_grads(model, ids, mask, paths):
    """float64 sum over valid tokens of |dL/dC| per path, or None where C needs no gradient."""
    ref = copy.deepcopy(model).double()
    seen = {}

    def keep(path, module, args):
        if args[0].requires_grad:
            args[0].retain_grad()
        seen[path] = args[0]

    for path in paths:
        ref.get_submodule(path).register_forward_pre_hook(functools.partial(keep, path))
    ref(ids, attention_mask=mask, labels=ids).loss.backward()
    rows = mask.bool()
    return [None if seen[p].grad is None else seen[p].grad.abs()[rows].sum(0) for p in paths]


def test_lora_on_the_output_projection_only_leaves_the_first_layer_without_gradients(caplog):
    model = _lora(["down_proj"])
    inst = kh.instrument(model, grads=True)
    ids, mask = random_batch(batch=3, seq=10)
    with caplog.at_level(logging.WARNING, logger="kacq_hooks"):
        model(ids, attention_mask=mask, labels=ids).loss.backward()
    paths = [site.path for site in inst.sites]
    assert paths[0] in caplog.text and "did not require a gradient" in caplog.text
    assert paths[1] not in caplog.text  # layer 1's C depends on layer 0's adapter
    with pytest.raises(NoTokensError, match=r"decoder\.layer_0.*LoRA"):
        inst.mean_abs_gradients()
    means = inst.mean_abs_gradients(allow_missing=True)
    assert torch.isnan(means[0]).all()
    ref = _reference_grads(model, ids, mask, paths)
    assert ref[0] is None  # the reference agrees: no gradient reaches layer 0's C
    tokens = int(mask.sum())
    torch.testing.assert_close(means[1].double(), ref[1] / tokens, rtol=2e-4, atol=1e-10)
    torch.testing.assert_close(inst.stats[1].grad_sum_abs.double(), ref[1], rtol=2e-4, atol=1e-9)


def test_lora_on_every_projection_gives_every_layer_gradients(caplog):
    model = _lora(["gate_proj", "up_proj", "down_proj"])
    inst = kh.instrument(model, grads=True)
    ids, mask = random_batch(batch=3, seq=10)
    with caplog.at_level(logging.WARNING, logger="kacq_hooks"):
        model(ids, attention_mask=mask, labels=ids).loss.backward()
    assert "did not require a gradient" not in caplog.text
    ref = _reference_grads(model, ids, mask, [site.path for site in inst.sites])
    for mean, expected in zip(inst.mean_abs_gradients(), ref):
        torch.testing.assert_close(mean.double(), expected / int(mask.sum()), rtol=2e-4, atol=1e-10)


def test_forwards_after_merge_and_unload_are_refused():
    model = _lora(["down_proj", "up_proj"])
    inst = kh.instrument(model)
    ids, mask = random_batch(batch=2, seq=8)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    before = int(inst.stats[0].tokens)
    merged = model.merge_and_unload()
    with torch.no_grad(), pytest.raises(LocateError, match="merge_and_unload.*instrument"):
        merged(ids, attention_mask=mask)
    with torch.no_grad(), pytest.raises(LocateError, match="no longer in the model"):
        model(ids, attention_mask=mask)
    assert int(inst.stats[0].tokens) == before  # what was measured before the merge stays readable
    inst.remove()
    with kh.instrument(merged) as fresh, torch.no_grad():
        merged(ids, attention_mask=mask)
    assert int(fresh.stats[0].tokens) == int(mask.sum())


def test_an_instrumentation_made_before_wrapping_follows_the_adapter_and_the_merge():
    """Instrumented before get_peft_model, the hooked projection becomes the adapter's base layer, and
    merge_and_unload puts it back: it stays in the model and is measured throughout."""
    model = tiny_model("llama")
    inst = kh.instrument(model)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False))
    ids, mask = random_batch(batch=2, seq=8)
    with torch.no_grad():
        wrapped(ids, attention_mask=mask)
        merged = wrapped.merge_and_unload()
        before = inst.stats[1].sum_abs.clone()
        merged(ids, attention_mask=mask)
    assert int(inst.stats[0].tokens) == 2 * int(mask.sum())
    after_merge = inst.stats[1].sum_abs - before
    inst.remove()
    with kh.instrument(merged) as fresh, torch.no_grad():
        merged(ids, attention_mask=mask)
    torch.testing.assert_close(after_merge, fresh.stats[1].sum_abs, rtol=1e-5, atol=1e-6)
