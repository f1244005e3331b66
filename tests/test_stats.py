"""The statistics table (kacq_hooks.stats): one declaration per statistic drives every kernel, and a running
sum that overflows fp32 is refused when read, never reported as a number."""
from __future__ import annotations

import pytest
import torch

import kacq_hooks as kh
from kacq_hooks import kernels, stats
from kacq_hooks.errors import KacqError, StatisticsOverflowError
from kacq_hooks.kernels import native
from kacq_hooks.stats import CoefficientStats, LayerStats
from tiny_models import tiny_model

BACKENDS = ["auto", "eager", "torch"]  # the one-pass C kernel (where it builds), eager passes, the reference


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sum_that_overflows_in_one_block_is_refused_naming_the_layer(monkeypatch, backend):
    monkeypatch.setenv("KACQ_KERNELS", backend)
    both = CoefficientStats([4, 4])
    c = torch.full((3, 4), 3e38).to(torch.bfloat16)  # finite in bf16 (max 3.39e38), three of them are not in fp32
    c[:, 0] = 1.0
    kernels.accumulate_forward(c, None, None, both[1])
    kernels.accumulate_forward(torch.ones(2, 4), None, None, both[0])
    assert both.nonfinite_per_layer() == [0, 0]  # no NaN/Inf was seen: only the sum is wrong
    with pytest.raises(StatisticsOverflowError, match=r"layer 1.*sum_abs.*neurons \[1, 2, 3\]"):
        both[1].mean_abs()
    with pytest.raises(StatisticsOverflowError, match=r"layer 1.*sum_abs"):
        kh.knowledge_entropy(both)
    assert issubclass(StatisticsOverflowError, KacqError)
    assert torch.equal(both[0].mean_abs(), torch.ones(4))  # the other layer reads as before


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sum_that_overflows_across_forwards_is_refused(monkeypatch, backend):
    monkeypatch.setenv("KACQ_KERNELS", backend)
    layer = LayerStats(2)
    for _ in range(2):  # each block's sum is finite; the running sum is not
        kernels.accumulate_forward(torch.tensor([[2e38, 1.0]]), None, None, layer)
    with pytest.raises(StatisticsOverflowError, match=r"sum_abs.*neurons \[0\]"):
        layer.mean_abs()


def test_an_overflowed_square_sum_is_refused_where_it_is_read():
    pytest.importorskip("pandas")
    model = tiny_model("llama")
    inst = kh.instrument(model)
    with torch.no_grad():
        model(torch.arange(12).reshape(2, 6))
    inst.remove()
    d_ff = inst.sites[0].d_ff
    huge = torch.zeros(1, d_ff)
    huge[0, 3] = 1e20  # its square is past fp32's range, its sum is not
    kernels.reference.accumulate_forward(huge, None, None, inst.stats[0])
    assert torch.isfinite(inst.stats[0].mean_abs()).all()  # mean |C| does not read sum_sq: still right
    inst.knowledge_entropy()
    with pytest.raises(StatisticsOverflowError, match=r"layer 0.*sum_sq.*neurons \[3\]"):
        inst.stats.check_finite()
    with pytest.raises(StatisticsOverflowError, match="sum_sq"):
        kh.saving.to_dataframe(inst)
