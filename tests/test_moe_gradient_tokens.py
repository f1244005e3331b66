"""An experts site's gradient tokens are the layer's tokens, counted once per forward, as its forward tokens are:
not the routed (token, expert) rows of the first handoff whose gradient arrives. Without an attention mask (no
row mask) they were: top-k times the tokens for batched_mm and grouped_mm and sorted rows, E times for input-scaled
layers, one expert's rows for eager and module lists, so every mean |dL/dC| of the layer was off by that factor."""
from __future__ import annotations

import pytest
import torch

import kacq_hooks as kh
from model_zoo import build
from test_moe_module_list import VOCAB, model as module_list_model


def _grad_tokens(net, ids, mask=None):
    inst = kh.instrument(net, grads=True)
    with inst:
        out = net(ids, attention_mask=mask)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        logits.float().pow(2).mean().backward()
    net.zero_grad()
    return [(int(s.tokens), int(s.grad_tokens)) for s, site in zip(inst.stats.layers, inst.sites)
            if site.kind == "experts"]


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_fused_experts_count_each_token_once_in_backward(impl):
    net = build("mixtral").train()
    net.set_experts_implementation(impl)
    ids = torch.randint(0, net.config.vocab_size, (2, 7))
    counts = _grad_tokens(net, ids)
    assert counts and all(grad == tokens == 14 for tokens, grad in counts), counts
    masked = torch.ones_like(ids)
    masked[0, :3] = 0
    counts = _grad_tokens(net, ids, masked)
    assert all(grad == tokens == 11 for tokens, grad in counts), counts


@pytest.mark.parametrize("family", ["jetmoe", "llama4_text", "qwen2_moe"])
def test_other_experts_layouts_count_each_token_once_in_backward(family):
    net = build(family).train()
    ids = torch.randint(0, net.config.vocab_size, (2, 7))
    counts = _grad_tokens(net, ids)
    assert counts and all(grad == tokens == 14 for tokens, grad in counts), counts


def test_module_list_experts_count_each_token_once_in_backward():
    net = module_list_model().train()
    ids = torch.randint(0, VOCAB, (2, 7))
    counts = _grad_tokens(net, ids)
    assert counts and all(grad == tokens == 14 for tokens, grad in counts), counts


def test_mean_gradient_is_per_token():
    """The mean |dL/dC| a slot reports is its summed |dL/dC| over the layer's tokens, with or without a mask."""
    net = build("mixtral").train()
    ids = torch.randint(0, net.config.vocab_size, (2, 7))
    runs = []
    for mask in (None, torch.ones_like(ids)):
        inst = kh.instrument(net, grads=True)
        with inst:
            net(ids, attention_mask=mask).logits.pow(2).mean().backward()
        net.zero_grad()
        runs.append(inst)
    torch.testing.assert_close(runs[0].stats.layers[0].grad_sum_abs, runs[1].stats.layers[0].grad_sum_abs)
    assert int(runs[0].stats.layers[0].grad_tokens) == int(runs[1].stats.layers[0].grad_tokens) == 14
