"""The gradient accessors: mean |dL/dC| and mean C * dL/dC per neuron, and what they refuse."""
from __future__ import annotations

import pytest
import torch

import kacq_hooks as kh
from kacq_hooks.errors import ConfigError, NoTokensError
from tiny_models import random_batch, tiny_model


def test_accessors_match_an_independent_float64_reference():
    model = tiny_model("llama").train()
    inst = kh.instrument(model, grads=True)
    ref = tiny_model("llama").train().double()  # same seed: the same weights, in float64
    seen = {}

    def keep(module, args):
        args[0].retain_grad()
        seen["c"] = args[0]

    ref.model.layers[1].mlp.down_proj.register_forward_pre_hook(keep)
    ids, mask = random_batch(batch=3, seq=9)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    ref(ids, attention_mask=mask, labels=ids).loss.backward()
    rows = mask.bool()
    c, g = seen["c"].detach(), seen["c"].grad
    tokens = int(rows.sum())
    torch.testing.assert_close(inst.mean_abs_gradients()[1].double(), g.abs()[rows].sum(0) / tokens,
                               rtol=2e-4, atol=1e-10)
    torch.testing.assert_close(inst.mean_coefficient_gradients()[1].double(), (c * g)[rows].sum(0) / tokens,
                               rtol=2e-3, atol=1e-9)


def test_accessors_refuse_without_gradients():
    model = tiny_model("llama").train()
    ids, mask = random_batch(batch=2, seq=8)
    with kh.instrument(model) as plain:
        model(ids, attention_mask=mask)
    with pytest.raises(ConfigError, match="grads=True"):
        plain.mean_abs_gradients()
    with kh.instrument(model, grads=True) as inst:
        with torch.no_grad():
            model(ids, attention_mask=mask)
        with pytest.raises(NoTokensError, match="backward"):
            inst.mean_coefficient_gradients()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_a_declared_scaler_gives_the_unscaled_statistics_of_experts_layers(model_type):
    """Routed and shared expert slots go through the same staging: declared-scaled equals unscaled."""
    ids, mask = random_batch(batch=2, seq=8)
    unscaled = tiny_model(model_type).train()
    with kh.instrument(unscaled, grads=True) as plain:
        unscaled(ids, attention_mask=mask, labels=ids).loss.backward()
    model = tiny_model(model_type).train()
    scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with kh.instrument(model, grads=True).loss_scale(scaler) as inst:
        scaler.scale(model(ids, attention_mask=mask, labels=ids).loss).backward()
        scaler.step(opt)
        scaler.update()
    for a, b in zip(inst.stats, plain.stats):
        assert int(a.grad_tokens) == int(b.grad_tokens) > 0
        torch.testing.assert_close(a.grad_sum_abs, b.grad_sum_abs, rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(a.grad_sum_cg, b.grad_sum_cg, rtol=1e-4, atol=1e-10)
