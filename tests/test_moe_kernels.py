"""The fused CPU reduction of routed experts' coefficients equals the reference, including NaN/Inf and padding."""
from __future__ import annotations

import pytest
import torch

from kacq_hooks.kernels import experts_cpu, reference
from kacq_hooks.stats import LayerStats

E, M, SHARED = 5, 12, 4


def batch(n: int, order: str, seed: int = 0, bad: bool = False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, M, generator=g).to(dtype)
    c[c.abs() < 0.1] = 0  # exact zeros: counted as inactive
    ids = torch.randint(0, E - 1, (n,), generator=g)  # the last expert gets no row
    if order == "sorted":
        ids = ids.sort().values
    elif order == "one":
        ids = torch.full((n,), 2)
    weight = torch.rand(n, generator=g)
    weight[::7] = 0  # input-scaled layouts hand unrouted pairs with weight 0
    keep = torch.rand(n, generator=g) > 0.2
    doc = torch.rand(n, generator=g)
    if bad:
        c[3, 1], c[5, 2], c[8, 0] = float("nan"), float("inf"), float("-inf")
        keep[3] = keep[5] = True
        keep[8] = False  # a non-finite value on a padded row is not counted
    return c, ids, weight, keep, doc


@pytest.mark.parametrize("bad", [False, True])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("order", ["tokens", "sorted", "one"])
def test_fused_equals_reference(order, docs, bad):
    c, ids, weight, keep, doc = batch(200, order, bad=bad)
    doc = doc if docs else None
    want, got = LayerStats(E * M + SHARED), LayerStats(E * M + SHARED)
    for out, kernel in ((want, reference), (got, experts_cpu)):
        for part in (slice(0, 120), slice(120, 200)):  # two calls accumulate
            kernel.accumulate_experts(c[part], ids[part], weight[part], keep[part],
                                      None if doc is None else doc[part], out, E)
    for (name, a), (_, b) in zip(want.buffers(), got.buffers()):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)
        else:
            assert torch.equal(b, a), name
    assert int(got.nonfinite.sum()) == (2 if bad else 0)


def test_bf16_coefficients_reduce_in_fp32():
    c, ids, weight, keep, _ = batch(64, "tokens", dtype=torch.bfloat16)
    want, got = LayerStats(E * M), LayerStats(E * M)
    reference.accumulate_experts(c, ids, weight, keep, None, want, E)
    experts_cpu.accumulate_experts(c, ids, weight, keep, None, got, E)
    assert got.sum_abs.dtype == torch.float32
    torch.testing.assert_close(got.sum_abs, want.sum_abs, rtol=1e-5, atol=1e-6)


def test_empty_call_changes_nothing():
    out = LayerStats(E * M)
    experts_cpu.accumulate_experts(torch.zeros(0, M), torch.zeros(0, dtype=torch.long), torch.zeros(0),
                                   torch.zeros(0, dtype=torch.bool), None, out, E)
    assert all(not bool(b.any()) for _, b in out.buffers())
