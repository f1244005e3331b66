"""The refusal of a NaN running sum says why truly. sum C * dL/dC is signed: finite C and dL/dC whose products
pass fp32's range with opposite signs sum to NaN (inf + -inf), an fp32 overflow, not a NaN that "did not come
from C" nor one of a routing weight (a dense layer has none)."""
from __future__ import annotations

import pytest
import torch

from kacq_hooks import kernels
from kacq_hooks.errors import StatisticsOverflowError
from kacq_hooks.stats import LayerStats


def test_a_nan_signed_gradient_sum_of_finite_values_is_refused_as_an_overflow():
    stats = LayerStats(4)
    c = torch.tensor([[1e20, 1.0, 1.0, 1.0], [1e20, 1.0, 1.0, 1.0]])
    g = torch.tensor([[1e20, 1.0, 1.0, 1.0], [-1e20, 1.0, 1.0, 1.0]])
    assert bool(torch.isfinite(c).all() and torch.isfinite(g).all())
    kernels.accumulate_backward(c, g, None, stats)
    assert bool(stats.grad_sum_cg[0].isnan())
    with pytest.raises(StatisticsOverflowError, match="grad_sum_cg") as refused:
        stats.check_finite()
    message = str(refused.value)
    assert "did not come from C" not in message
    assert "fp32" in message and "opposite signs" in message
