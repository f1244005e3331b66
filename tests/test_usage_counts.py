"""Top-k access counts on a ReLU model, by hand in float64: a slot whose C is exactly 0 is not accessed."""
from __future__ import annotations

import pytest
import torch

from kacq_hooks import usage
from tiny_models import random_batch, tiny_model


def test_counts_leave_out_slots_with_zero_coefficient():
    """OPT's ReLU zeroes many C; with k above a token's number of active slots, topk would fill the rest with
    arbitrary zero-|C| slots (ties), counting slots the token does not use at all."""
    model = tiny_model("opt")
    down = model.model.decoder.layers[0].fc2
    seen = []
    hook = down.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    ids, mask = random_batch(3, 12, "right", seed=1)
    k = down.in_features - 4
    with usage.measure_usage(model, k=k) as used, torch.no_grad():
        model(ids, attention_mask=mask)
    hook.remove()
    c = seen[0].reshape(-1, seen[0].shape[-1])[mask.reshape(-1).bool()].abs()
    assert int((c > 0).sum(-1).max()) < k  # the case: every token has fewer than k active slots
    expected = torch.zeros(c.shape[-1], dtype=torch.float64)
    for row in c:
        top = row.topk(k)
        expected[top.indices[top.values > 0]] += 1  # accessed: among the k largest |C| and used at all
    assert used.counts()[0].tolist() == expected.tolist()


def test_a_positional_attention_mask_leaves_padding_out_as_a_keyword_one_does():
    """The model's call is read by the stack reader every instrumentation uses: model(ids, mask) passes the mask
    by position, and its padded positions must not be measured as tokens."""
    model = tiny_model("llama").eval()
    ids, mask = random_batch(3, 8, "right", seed=2)
    assert int(mask.sum()) < mask.numel()  # the case: some positions are padding
    measured = {}
    for how, call in (("keyword", lambda: model(ids, attention_mask=mask)), ("positional", lambda: model(ids, mask))):
        with usage.measure_usage(model, k=4) as used, torch.no_grad():
            call()
        measured[how] = used
    assert measured["positional"].tokens == measured["keyword"].tokens == [int(mask.sum())] * 2
    for got, want in zip(measured["positional"].means(), measured["keyword"].means()):
        assert torch.equal(got, want)
    for got, want in zip(measured["positional"].counts(), measured["keyword"].counts()):
        assert torch.equal(got, want)


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_cached_generation_counts_each_new_position_once(model_type):
    """A call that continues a KV cache gets the mask of every position so far, but computes C only for its new
    ones: those are the tokens it adds (padding among them left out), as instrument() counts them."""
    model = tiny_model(model_type).eval()
    ids, _ = random_batch(2, 7, None, seed=3)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    mask[1, -1] = 0  # the new position of row 1 is padding
    with usage.measure_usage(model) as used, torch.no_grad():
        past = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True).past_key_values
        model(ids[:, 6:], attention_mask=mask, past_key_values=past, use_cache=True)
    assert used.tokens == [int(mask.sum())] * 2
