"""The one-pass CPU kernel (kernels/native.c, built at first use) against the reference, and its fallbacks."""
from __future__ import annotations

import logging

import pytest
import torch

from kacq_hooks import kernels
from kacq_hooks.kernels import native, reference
from kacq_hooks.stats import LayerStats

HAS_CC = native._compiler() is not None
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine: the eager passes are used")


def _assert_same(got: LayerStats, want: LayerStats, rtol=1e-5):
    for name, buf in want.buffers():
        torch.testing.assert_close(getattr(got, name), buf, rtol=rtol, atol=1e-3, msg=name)


@needs_cc
def test_the_kernel_is_built_into_the_cache_and_used_by_default(fresh_build, monkeypatch):
    lib = native.library()
    assert lib is not None
    assert list(fresh_build.glob("native/*/libkacq_reduce.so"))
    calls = []
    monkeypatch.setattr(native, "forward", lambda *a: calls.append(a) or True)
    kernels.accumulate_forward(torch.randn(8, 4), None, None, LayerStats(4))
    assert len(calls) == 1


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 7), (1, 1), (33, 17), (300, 4099), (2048, 96)])
def test_kernel_matches_the_reference_at_awkward_shapes(fresh_build, dtype, shape):
    gen = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    c = (torch.randn(*shape, generator=gen) * 5).to(dtype)
    if c.numel():
        c.view(-1)[:: 7] = 0.0  # exact zeros: inactive
    rows = torch.rand(shape[0], generator=gen) > 0.3
    weight = rows.float() / 3.0
    for r, w in ((rows, weight), (rows, None), (None, None)):
        want, got = LayerStats(shape[1]), LayerStats(shape[1])
        reference.accumulate_forward(c, r, w, want)
        kernels.cpu.accumulate_forward(c, r, w, got)
        _assert_same(got, want)
    g = torch.randn(*shape, generator=gen).to(dtype)
    want, got = LayerStats(shape[1]), LayerStats(shape[1])
    reference.accumulate_backward(c, g, rows, want)
    kernels.cpu.accumulate_backward(c, g, rows, got)
    _assert_same(got, want)


@needs_cc
def test_kernel_reads_rows_with_a_stride_and_leaves_strided_columns_to_the_eager_path(fresh_build):
    base = torch.randn(64, 50)
    rows_view = base[:, 5:45]           # row stride 50: the kernel reads it as it is
    cols_view = base.t()[:40]           # column stride 50: not the kernel's layout
    assert native.supports(rows_view) and not native.supports(cols_view)
    for c in (rows_view, cols_view):
        want, got = LayerStats(c.shape[1]), LayerStats(c.shape[1])
        reference.accumulate_forward(c, None, None, want)
        kernels.cpu.accumulate_forward(c, None, None, got)
        _assert_same(got, want)


@needs_cc
def test_a_nan_makes_the_kernel_write_nothing_and_the_reference_count_it(fresh_build):
    c = torch.randn(40, 300)
    c[3, 299] = float("nan")
    c[7, 0] = float("-inf")
    out = LayerStats(300)
    before = {name: buf.clone() for name, buf in out.buffers()}
    assert native.forward(native.library(), c, None, None, out) is False
    for name, buf in out.buffers():
        assert torch.equal(buf, before[name]), name
    got, want = LayerStats(300), LayerStats(300)
    kernels.cpu.accumulate_forward(c, None, None, got)
    reference.accumulate_forward(c, None, None, want)
    _assert_same(got, want)
    assert got.nonfinite.sum().item() == 2
    c, g = torch.randn(40, 300), torch.randn(40, 300)
    g[5, 5] = float("inf")
    c[6, 9] = float("nan")  # where g is 0: only C * g sees it
    g[6, 9] = 0.0
    untouched = LayerStats(300)
    assert native.backward(native.library(), c, g, None, untouched) is False
    assert untouched.grad_tokens.item() == 0 and not untouched.grad_sum_abs.any()
    got, want = LayerStats(300), LayerStats(300)
    kernels.cpu.accumulate_backward(c, g, None, got)
    reference.accumulate_backward(c, g, None, want)
    _assert_same(got, want)


@needs_cc
def test_kernel_results_do_not_depend_on_the_thread_count(fresh_build):
    c = torch.randn(1024, 1000)
    rows = torch.rand(1024) > 0.2
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = LayerStats(1000)
            kernels.cpu.accumulate_forward(c, rows, None, out)
            results.append(out)
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for name, buf in results[0].buffers():
            assert torch.equal(getattr(other, name), buf), name


def test_without_a_compiler_the_eager_passes_give_the_same_statistics(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-compiler"))
    with caplog.at_level(logging.INFO, logger="kacq_hooks.kernels.native"):
        assert native.library() is None
    assert "eager torch passes" in caplog.text
    c = torch.randn(50, 30)
    rows = torch.rand(50) > 0.4
    want, got = LayerStats(30), LayerStats(30)
    reference.accumulate_forward(c, rows, None, want)
    kernels.cpu.accumulate_forward(c, rows, None, got)
    _assert_same(got, want)


def test_forcing_the_kernel_without_a_compiler_is_an_error_that_says_what_to_do(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-compiler"))
    monkeypatch.setenv("KACQ_KERNELS", "native")
    with pytest.raises(native.NativeBuildError, match="Install a C compiler"):
        kernels.cpu.accumulate_forward(torch.randn(4, 3), None, None, LayerStats(3))


def test_kacq_kernels_eager_builds_nothing(fresh_build, monkeypatch):
    monkeypatch.setenv("KACQ_KERNELS", "eager")
    kernels.cpu.accumulate_forward(torch.randn(4, 3), None, None, LayerStats(3))
    assert not (fresh_build / "native").exists()


@needs_cc
def test_a_cached_build_is_reused_not_rebuilt(fresh_build, monkeypatch):
    assert native.library() is not None
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native.subprocess, "run", _only_version_queries(native.subprocess.run))
    assert native.library() is not None


def _only_version_queries(run):
    def guarded(cmd, *args, **kwargs):
        assert "--version" in cmd, f"the cached kernel was rebuilt: {cmd}"
        return run(cmd, *args, **kwargs)
    return guarded


def test_benchmarks_can_say_which_cpu_kernels_ran(fresh_build, monkeypatch):
    expected = "cpu: one-pass C kernel" if HAS_CC else "cpu: eager torch passes"
    assert kernels.describe(torch.device("cpu")).startswith(expected)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CC", str(fresh_build / "no-such-compiler"))
    assert "no-such-compiler" in kernels.describe(torch.device("cpu"))
