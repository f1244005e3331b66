"""experts_entropy refuses an overflowed running sum instead of reading it as a number.

The routed-slot sum is of unweighted |C| while the slot sums are weighted by the routing weights, so the
routed sum can pass fp32's 3.4e38 while the slot sums stay finite. The test leaves the buffer as such an
overflow leaves it (a real forward, then the routed sum pushed past fp32's range) and reads the split.
"""
from __future__ import annotations

import math

import pytest
import torch
from tiny_models import random_batch, tiny_model

import kacq_hooks as kh
from kacq_hooks.entropy import experts_entropy
from kacq_hooks.errors import StatisticsOverflowError


def test_an_overflowed_routed_sum_is_refused_naming_the_field():
    model = tiny_model("mixtral")
    ids, mask = random_batch()
    with kh.instrument(model) as inst, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert all(all(math.isfinite(e) for e in split.per_expert if e is not None) for split in experts_entropy(inst))
    layer = inst.stats[0]
    layer.routed_sum_abs.mul_(1e40)  # what a window of huge coefficients leaves: fp32 Inf where the expert ran
    assert bool(torch.isfinite(layer.sum_abs).all()) and not bool(torch.isfinite(layer.routed_sum_abs).all())
    with pytest.raises(StatisticsOverflowError, match="routed_sum_abs"):
        experts_entropy(inst)
