"""Top-k access counts on a ReLU model, by hand in float64: a slot whose C is exactly 0 is not accessed."""
from __future__ import annotations

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
