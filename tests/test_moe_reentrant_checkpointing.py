"""grads=True on mixture-of-experts layers under activation checkpointing: the dL/dC statistics equal those of the
same step without checkpointing. With use_reentrant=True the recomputed forward handed the experts module's input
(hidden states, not C) to the dense gradient hook, which raised a ShapeError inside backward."""
from __future__ import annotations

import copy

import pytest
import torch

import kacq_hooks as kh
from tiny_models import random_batch, tiny_model

torch.set_num_threads(1)


def _step(model, ids, mask, checkpointing):
    model = copy.deepcopy(model).train()
    model.config.use_cache = False
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    inst = kh.instrument(model, grads=True)
    inst.loss_scale(None)
    try:
        model(ids, attention_mask=mask, labels=ids).loss.backward()
    finally:
        inst.remove()
    return inst


@pytest.mark.parametrize("model_type,impl", [("mixtral", "eager"), ("qwen2_moe", "eager"), ("olmoe", "grouped_mm")])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_statistics_under_checkpointing_equal_the_plain_step(model_type, impl, reentrant):
    model = tiny_model(model_type, seed=0)
    model.set_experts_implementation(impl)
    ids, mask = random_batch(batch=2, seq=7, padding="right", seed=3)
    plain = _step(model, ids, mask, None)
    checkpointed = _step(model, ids, mask, reentrant)
    experts_sites = [i for i, s in enumerate(plain.sites) if s.kind == "experts"]
    assert experts_sites
    for i in range(len(plain.sites)):
        torch.testing.assert_close(checkpointed.mean_abs_coefficients()[i], plain.mean_abs_coefficients()[i],
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(checkpointed.mean_abs_gradients()[i], plain.mean_abs_gradients()[i],
                                   rtol=1e-6, atol=0)
    for i in experts_sites:
        assert float(plain.mean_abs_gradients()[i].sum()) > 0
