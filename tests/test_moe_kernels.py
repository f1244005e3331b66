"""The fused CPU reduction of routed experts' coefficients equals the reference, including NaN/Inf and padding."""
from __future__ import annotations

import pytest
import torch

from kacq_hooks.errors import ShapeError
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


# -- the one-pass C kernel over routed rows (kernels/native.c: kacq_routed) ----------------------------------------

def _native_or_skip():
    from kacq_hooks.kernels import native
    if native.library() is None:
        pytest.skip("no C compiler here: " + str(native.unavailable_reason()))


def _assert_equal_stats(got, want):
    for (name, a), (_, b) in zip(want.buffers(), got.buffers()):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)
        else:
            assert torch.equal(b, a), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("order", ["tokens", "sorted", "one"])
def test_c_kernel_reduces_routed_rows_as_the_reference_without_inductor(monkeypatch, order, docs, dtype):
    """Routed rows in any order go through one C pass: the same statistics, and the compiler runtime (~60 MiB)
    is never loaded."""
    from kacq_hooks.kernels import cpu
    _native_or_skip()
    monkeypatch.setattr(cpu, "_run_compiled", lambda *a: pytest.fail("Inductor ran"))
    c, ids, weight, keep, doc = batch(300, order, dtype=dtype)
    doc = doc if docs else None
    want, got = LayerStats(E * M + SHARED), LayerStats(E * M + SHARED)
    for part in (slice(0, 170), slice(170, 300)):  # two calls accumulate
        args = (c[part], ids[part], weight[part], keep[part], None if doc is None else doc[part])
        reference.accumulate_experts(*args, want, E)
        experts_cpu.accumulate_experts(*args, got, E)
    _assert_equal_stats(got, want)
    assert int(got.routed_tokens[:M].sum()) > 0 or order == "one"


def test_c_kernel_reads_token_order_rows_in_place_and_strided_rows(monkeypatch):
    """batched_mm hands rows in token order: the kernel reads them through their grouped order (no copy of C),
    and rows of a wider buffer (a row stride) are read where they are."""
    from kacq_hooks.kernels import native
    _native_or_skip()
    c, ids, weight, keep, doc = batch(257, "tokens")
    wide = torch.randn(257, 2 * M)
    wide[:, 3:3 + M] = c
    strided = wide[:, 3:3 + M]
    seen = []
    real = native.routed
    monkeypatch.setattr(native, "routed", lambda lib, c, *rest: seen.append(c) or real(lib, c, *rest))
    monkeypatch.setattr(torch.Tensor, "index_select", lambda *a, **k: pytest.fail("C was copied"))
    want, got = LayerStats(E * M), LayerStats(E * M)
    reference.accumulate_experts(c, ids, weight, keep, doc, want, E)
    experts_cpu.accumulate_experts(strided, ids, weight, keep, doc, got, E)
    _assert_equal_stats(got, want)
    [passed] = seen
    assert passed.data_ptr() == strided.data_ptr() and passed.stride() == strided.stride()


def test_c_kernel_counts_nonfinite_rows_through_the_reference(monkeypatch):
    """A NaN or Inf on a valid row: the kernel adds nothing and the reference counts it, keeping it out of the sums;
    one on a padded row is not counted."""
    from kacq_hooks.kernels import native
    _native_or_skip()
    statuses = []
    real = native._check
    monkeypatch.setattr(native, "_check", lambda status: statuses.append(status) or real(status))
    c, ids, weight, keep, doc = batch(200, "tokens", bad=True)
    want, got = LayerStats(E * M), LayerStats(E * M)
    reference.accumulate_experts(c, ids, weight, keep, doc, want, E)
    experts_cpu.accumulate_experts(c, ids, weight, keep, doc, got, E)
    _assert_equal_stats(got, want)
    assert statuses == [1] and int(got.nonfinite.sum()) == 2 and torch.isfinite(got.sum_abs).all()


def test_c_kernel_results_do_not_depend_on_the_thread_count():
    _native_or_skip()
    c, ids, weight, keep, doc = batch(2000, "tokens", seed=3)
    c = c.repeat(1, 40)  # wide enough that the kernel splits columns among threads
    m = c.shape[1]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            out = LayerStats(E * m)
            experts_cpu.accumulate_experts(c, ids, weight, keep, doc, out, E)
            results.append(out)
    finally:
        torch.set_num_threads(threads)
    for (name, a), (_, b) in zip(results[0].buffers(), results[1].buffers()):
        assert torch.equal(a, b), name


def test_expert_ids_outside_the_layer_are_refused_not_written_past_the_slots():
    c, ids, weight, keep, doc = batch(50, "tokens")
    ids[7] = E  # one past the last expert
    out = LayerStats(E * M)
    with pytest.raises((IndexError, RuntimeError)):
        experts_cpu.accumulate_experts(c, ids, weight, keep, doc, out, E)


def test_inductor_path_equals_reference_where_the_c_kernel_is_unavailable(monkeypatch):
    """Without the one-pass C kernel the routed rows take the compiled (or eager) path, with the same sums."""
    from kacq_hooks.kernels import cpu
    monkeypatch.setattr(cpu, "_native_for", lambda *a, **k: None)
    for bad in (False, True):
        c, ids, weight, keep, doc = batch(200, "tokens", bad=bad)
        want, got = LayerStats(E * M), LayerStats(E * M)
        reference.accumulate_experts(c, ids, weight, keep, doc, want, E)
        experts_cpu.accumulate_experts(c, ids, weight, keep, doc, got, E)
        _assert_equal_stats(got, want)


def test_statistics_with_fewer_slots_than_the_experts_are_refused_not_overrun():
    """The C kernel writes experts x m slots through raw pointers: a narrower statistics buffer is refused first."""
    from kacq_hooks.errors import ShapeError
    c, ids, weight, keep, doc = batch(50, "tokens")
    out = LayerStats(E * M - 1)
    with pytest.raises(ShapeError, match="do not fit"):
        experts_cpu.accumulate_experts(c, ids, weight, keep, doc, out, E)
    assert all(not bool(b.any()) for _, b in out.buffers())


# -- eager's rows, one expert at a time, as (token, top-k position) pairs (native.routed_rows) ----------------------

def _eager_rows(n_tokens: int, k: int, expert: int, seed: int, dtype=torch.float32, bad: bool = False):
    """One expert's rows as an eager forward hands them, and the per-token routing they index."""
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, k, generator=g).to(dtype)
    weights[::5, 0] = 0
    top_k_pos, token_index = torch.where((index == expert).t())  # the loop's own where, on the permuted mask
    c = torch.randn(token_index.shape[0], M, generator=g)
    c[c.abs() < 0.1] = 0
    if bad and c.shape[0] > 2:
        c[1, 3] = float("nan")
    keep = torch.rand(n_tokens, generator=g) > 0.25
    doc = torch.rand(n_tokens, generator=g)
    return c.to(dtype), token_index, top_k_pos, weights, keep, doc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keep_docs", ["none", "keep", "keep_docs"])
@pytest.mark.parametrize("bad", [False, True])
def test_expert_rows_read_per_token_equal_the_gathered_rows(monkeypatch, dtype, keep_docs, bad):
    """The kernel gathers each row's weight, mask and document weight from the per-token routing itself: the same
    statistics as the per-row tensors through accumulate_experts (a NaN on a valid row: counted, as there)."""
    from kacq_hooks.kernels import native
    _native_or_skip()
    calls = []
    real = native.routed_rows
    monkeypatch.setattr(native, "routed_rows", lambda *a: calls.append(1) or real(*a))
    want, got = LayerStats(E * M + SHARED), LayerStats(E * M + SHARED)
    for expert, seed in ((2, 0), (0, 1), (2, 2)):  # several calls accumulate, one expert twice
        c, token_index, top_k_pos, weights, keep, doc = _eager_rows(40, 2, expert, seed, dtype, bad)
        keep = None if keep_docs == "none" else keep
        doc = doc if keep_docs == "keep_docs" else None
        rows = (torch.full_like(token_index, expert), weights[token_index, top_k_pos],
                torch.ones_like(token_index, dtype=torch.bool) if keep is None else keep[token_index],
                None if doc is None else doc[token_index])
        reference.accumulate_experts(c, rows[0], rows[1], rows[2], rows[3], want, E)
        experts_cpu.accumulate_expert_rows(c, expert, token_index, top_k_pos, weights, keep, doc, got, E)
    assert len(calls) == 3
    _assert_equal_stats(got, want)
    assert int(got.nonfinite.sum()) == int(want.nonfinite.sum())


def test_expert_rows_the_kernel_cannot_take_are_summed_as_gathered_rows(monkeypatch):
    """fp16 C, float64 routing weights or a float mask: the per-row tensors are gathered in torch instead, with
    the same statistics; a token outside the routing is refused, not read past it."""
    _native_or_skip()
    for change in ("fp16", "float64 weights", "float mask"):
        c, token_index, top_k_pos, weights, keep, doc = _eager_rows(30, 2, 1, 7)
        if change == "fp16":
            c = c.half()
        elif change == "float64 weights":
            weights = weights.double()
        want, got = LayerStats(E * M), LayerStats(E * M)
        reference.accumulate_experts(c, torch.full_like(token_index, 1), weights[token_index, top_k_pos],
                                     keep[token_index], doc[token_index], want, E)
        if change == "float mask":
            keep = keep.float()
        experts_cpu.accumulate_expert_rows(c, 1, token_index, top_k_pos, weights, keep, doc, got, E)
        _assert_equal_stats(got, want)
    c, token_index, top_k_pos, weights, keep, doc = _eager_rows(30, 2, 1, 7)
    out = LayerStats(E * M)
    with pytest.raises(ShapeError, match="token"):
        experts_cpu.accumulate_expert_rows(c, 1, token_index + 30, top_k_pos, weights, keep, None, out, E)
    assert all(not bool(b.any()) for _, b in out.buffers())


def test_expert_rows_with_int32_indices_are_read_as_their_values_not_as_int64_memory():
    """The C kernel reads the token and top-k position arrays as int64: int32 ones (a consumer's own index, or
    .int() of the forward's) must be widened first, not reinterpreted, which pairs two int32 tokens into one
    int64 and reads past the tensor. Here the int32 tokens [3, 0, 5, 0] sit before [7, 0, 9, 0] in storage: read as
    int64 they are tokens 3, 5, 7, 9, all in range, so nothing would flag the wrong rows."""
    _native_or_skip()
    g = torch.Generator().manual_seed(0)
    weights, c = torch.rand(10, 2, generator=g), torch.randn(4, M, generator=g)
    keep, doc = torch.rand(10, generator=g) > 0.3, torch.rand(10, generator=g)
    token_index = torch.tensor([3, 0, 5, 0, 7, 0, 9, 0], dtype=torch.int32)[:4]
    top_k_pos = torch.tensor([0, 1, 0, 1])
    tokens = token_index.long()
    want = LayerStats(E * M)
    reference.accumulate_experts(c, torch.full((4,), 1), weights[tokens, top_k_pos], keep[tokens], doc[tokens],
                                 want, E)
    for token_dtype, pos_dtype in ((torch.int32, torch.long), (torch.long, torch.int32), (torch.int32, torch.int32)):
        got = LayerStats(E * M)
        experts_cpu.accumulate_expert_rows(c, 1, token_index.to(token_dtype), top_k_pos.to(pos_dtype), weights, keep,
                                           doc, got, E)
        _assert_equal_stats(got, want)


@pytest.mark.parametrize("mode", ["auto", "eager"])
def test_expert_rows_with_a_position_or_token_outside_the_routing_are_refused(monkeypatch, mode):
    """A top-k position outside 0..k-1 (a negative one would wrap around to another position's weight), or a
    row mask / document weights shorter than the tokens named, are refused with a ShapeError, nothing added."""
    monkeypatch.setenv("KACQ_KERNELS", mode)
    c, token_index, top_k_pos, weights, keep, doc = _eager_rows(30, 2, 1, 7)
    for args in ((token_index, top_k_pos - 2, weights, keep, doc), (token_index, top_k_pos + 2, weights, keep, doc),
                 (token_index, top_k_pos, weights, keep[:3], doc), (token_index, top_k_pos, weights, keep, doc[:3]),
                 (token_index, top_k_pos, weights.reshape(-1), keep, doc)):
        out = LayerStats(E * M)
        with pytest.raises(ShapeError):
            experts_cpu.accumulate_expert_rows(c, 1, *args, out, E)
        assert all(not bool(b.any()) for _, b in out.buffers())
