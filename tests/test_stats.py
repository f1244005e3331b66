"""The statistics table (kacq_hooks.stats): one declaration per statistic drives every kernel, and a running
sum that overflows fp32 is refused when read, never reported as a number."""
from __future__ import annotations

import logging

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


# -- the table drives the kernels ---------------------------------------------------------------------------------

def test_the_native_kernel_takes_the_tables_buffers_and_refuses_a_table_it_does_not_write(monkeypatch, caplog):
    lib = native.library()
    if lib is None:
        pytest.skip(f"the one-pass CPU kernel cannot be built here: {native.unavailable_reason()}")
    assert native.FORWARD_OUTPUTS == ("sum_abs", "sum_sq", "active", "max_abs", "doc_sum_abs")
    assert native.BACKWARD_OUTPUTS == ("grad_sum_abs", "grad_sum_cg")
    assert len(lib.kacq_forward.argtypes) == 7 + len(native.FORWARD_OUTPUTS) + 1
    assert len(lib.kacq_backward.argtypes) == 8 + len(native.BACKWARD_OUTPUTS) + 1
    # a statistic in the table that native.c does not write: the library is not loaded (the eager passes serve)
    monkeypatch.setattr(native, "FORWARD_OUTPUTS", native.FORWARD_OUTPUTS + ("sum_cubed",))
    with pytest.raises(RuntimeError, match=r"native\.c's kacq_forward writes .* add the missing"):
        native._load()
    # and says so aloud: unlike a missing compiler, it is a slip of whoever added the statistic
    monkeypatch.setattr(native, "_state", {})
    with caplog.at_level(logging.WARNING, logger=native.log.name):
        assert native.library() is None
    assert "add the missing statistics' lines to native.c" in caplog.text


def test_the_routed_kernel_takes_the_tables_routed_buffers_and_refuses_a_table_it_does_not_write(monkeypatch):
    lib = native.library()
    if lib is None:
        pytest.skip(f"the one-pass CPU kernel cannot be built here: {native.unavailable_reason()}")
    # the slot statistics of a forward and the routed ones, less the NaN/Inf count the reference makes
    assert native.ROUTED_OUTPUTS == tuple(s.name for s in stats.ROUTED if s.name != "nonfinite")
    assert native.ROUTED_OUTPUTS == ("sum_abs", "sum_sq", "active", "max_abs", "doc_sum_abs", "routed_sum_abs",
                                     "routed_tokens")
    # c, dtype, n, m, row stride, ids, experts, weights, mask, document weights; eager's gather (five); outputs; threads
    assert len(lib.kacq_routed.argtypes) == 10 + 5 + len(native.ROUTED_OUTPUTS) + 1
    monkeypatch.setattr(native, "ROUTED_OUTPUTS", native.ROUTED_OUTPUTS + ("routed_sum_sq",))
    with pytest.raises(RuntimeError, match=r"native\.c's kacq_routed writes .* add the missing"):
        native._load()


def test_the_triton_ops_mutate_exactly_the_tables_buffers():
    pytest.importorskip("triton")
    from kacq_hooks.kernels import triton as fused

    for op, phase in ((torch.ops.kacq.accumulate_forward.default, stats.FORWARD),
                      (torch.ops.kacq.accumulate_backward.default, stats.BACKWARD)):
        written = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert written == [s.name for s in phase]

    def wrong(c: torch.Tensor, sum_abs: torch.Tensor) -> None:
        pass
    with pytest.raises(KacqError, match="write the missing statistics in kernels/triton.py"):
        fused._custom_op("kacq::never_registered", stats.FORWARD)(wrong)


def test_the_routed_experts_partials_are_named_by_the_table():
    from kacq_hooks.kernels import experts_cpu

    c = torch.tensor([[1.0, float("nan")], [0.0, 2.0]])
    partials = experts_cpu._block_partials(c, torch.tensor([0.5, 0.0]), torch.tensor([True, True]), torch.ones(2))
    assert list(partials) == [s.name for s in stats.ROUTED]
    assert partials["nonfinite"].tolist() == [0, 1] and partials["routed_tokens"].tolist() == [1, 1]
    assert partials["routed_sum_abs"].tolist() == [1.0, 0.0] and partials["max_abs"].tolist() == [0.5, 0.0]


def test_each_statistic_combines_as_declared_in_merges():
    a, b = LayerStats(2), LayerStats(2)
    kernels.reference.accumulate_forward(torch.tensor([[3.0, 1.0]]), None, None, a)
    kernels.reference.accumulate_forward(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), None, None, b)
    a.merge(b)
    assert a.max_abs.tolist() == [3.0, 2.0] and a.sum_abs.tolist() == [4.0, 4.0]
    assert a.active.tolist() == [2, 3] and int(a.tokens) == 3
    assert stats.MAXIMA == ("max_abs",) and set(stats.COUNTERS) == {"tokens", "documents", "grad_tokens"}


def test_distributed_imports_nothing_of_the_instrumentation():
    import ast
    import inspect

    from kacq_hooks import distributed

    tree = ast.parse(inspect.getsource(distributed))
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if "instrumentation" in name]


def test_reduce_takes_statistics_and_shard_descriptions(tmp_path):
    import torch.distributed as dist

    from kacq_hooks import distributed

    one = CoefficientStats([3, 2])
    kernels.reference.accumulate_forward(torch.tensor([[1.0, 0.0, 2.0]]), None, None, one[0])
    before = one.state_dict()
    with pytest.raises(KacqError, match="initialised torch.distributed"):
        distributed.reduce(one, [None, None])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        assert distributed.reduce(one, [None, None]) is one  # one rank: the one-process answer, unchanged
        assert all(torch.equal(before[k], v) for k, v in one.state_dict().items())
        with pytest.raises(kh.errors.ShapeError, match="2 layers of statistics, 1 shard descriptions"):
            distributed.reduce(one, [None])
        model = tiny_model("llama")
        inst = kh.instrument(model)
        model(torch.arange(6).reshape(1, 6))
        tokens = int(inst.stats[0].tokens)
        assert distributed.reduce(inst) is inst and int(inst.stats[0].tokens) == tokens  # the former call form
        inst.remove()
    finally:
        dist.destroy_process_group()
