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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_routing_weight_is_named_as_the_cause_not_an_overflow_of_c(bad):
    """C is finite; the router's weight of one row is NaN or Inf (a diverged router). The layer is refused, and the
    refusal says the routing weight may be the cause: a NaN sum cannot come from summing finite |C| past fp32."""
    from kacq_hooks.errors import StatisticsOverflowError
    from kacq_hooks.kernels import experts_cpu
    from kacq_hooks.stats import LayerStats
    experts, m = 3, 4
    c = torch.rand(6, m)
    weight = torch.rand(6)
    weight[2] = bad
    out = LayerStats(experts * m)
    experts_cpu.accumulate_experts(c, torch.tensor([0, 0, 1, 1, 2, 2]), weight, torch.ones(6, dtype=torch.bool), None,
                                   out, experts)
    with pytest.raises(StatisticsOverflowError, match="routing weight") as refused:
        out.mean_abs()
    assert ("sum_abs is NaN" if bad != bad else "overflowed to inf") in str(refused.value)
