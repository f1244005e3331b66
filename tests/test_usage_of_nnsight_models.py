"""Slot usage and sparse memory finetuning of an nnsight-wrapped model, as kh.instrument takes one: they read and
edit the torch module inside the envoy. Before, both failed with nnsight's own TypeError
(Envoy.named_modules() got an unexpected keyword argument), not a KacqError.
"""
from __future__ import annotations

import copy

import pytest
import torch

from kacq_hooks.interventions import sparse_memory
from kacq_hooks.usage import measure_usage
from test_sparse_memory import expected_mask, snapshot
from tiny_models import random_batch, tiny_model

nnsight = pytest.importorskip("nnsight")


def test_usage_of_an_envoy_is_the_usage_of_its_module():
    hf = tiny_model("llama")
    ids, mask = random_batch()
    with measure_usage(hf, k=2) as want, torch.no_grad():
        hf(ids, attention_mask=mask)
    envoy = nnsight.NNsight(copy.deepcopy(hf))
    with measure_usage(envoy, k=2) as got, torch.no_grad():
        with envoy.trace(ids, attention_mask=mask):
            pass
    assert got.tokens == want.tokens == [int(mask.sum())] * 2
    for a, b in zip(got.means(), want.means()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert [c.tolist() for c in got.counts()] == [c.tolist() for c in want.counts()]


def test_sparse_memory_of_an_envoy_trains_only_the_chosen_slots_of_its_module():
    envoy = nnsight.NNsight(tiny_model("llama").train())
    module = envoy._module
    slots = [torch.tensor([1, 5, 9]), torch.tensor([0, 2])]
    handle = sparse_memory(envoy, slots=slots, top=3)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    before = snapshot(module)
    ids, mask = random_batch(4, 16, "right", seed=1)
    module(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    optimizer.step()
    chosen = [set(s.tolist()) for s in slots]
    moved = 0
    for name, p in module.named_parameters():
        allowed = expected_mask("llama", name, p, chosen, [s.d_ff for s in handle.sites])
        assert torch.equal(p[~allowed], before[name][~allowed]), name
        moved += int((p[allowed] != before[name][allowed]).sum())
    assert moved > 0
    handle.remove()
