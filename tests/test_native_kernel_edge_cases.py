"""Hostile review of the one-pass CPU kernel (kernels/native.c via kernels/cpu.py).

Each test holds the CPU path to the library's rule: the number it adds is the reference's, or it refuses
with a KacqError; never a crash, never memory it was not handed. Cases that crashed the interpreter run
in a subprocess so the suite survives them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kacq_hooks.errors import KacqError
from kacq_hooks.kernels import cpu, native, reference
from kacq_hooks.stats import LayerStats

HAS_CC = native._compiler() is not None
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine: the eager passes are used")
SRC = Path(__file__).resolve().parents[1] / "src"



def _run(code: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("KACQ_KERNELS", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)


@needs_cc
def test_zero_columns_on_one_thread_do_not_kill_the_process(tmp_path):
    # tile_width divided by zero tiles: SIGFPE (rc -8) with torch.set_num_threads(1) and d == 0
    done = _run("""
        import torch
        from kacq_hooks.kernels import cpu, native
        from kacq_hooks.stats import LayerStats
        assert native.library() is not None
        torch.set_num_threads(1)
        out = LayerStats(0)
        cpu.accumulate_forward(torch.randn(5, 0), None, None, out)
        cpu.accumulate_backward(torch.randn(5, 0), torch.randn(5, 0), None, out)
        assert out.tokens.item() == 5 and out.grad_tokens.item() == 5
        print("ok")
    """, {"KACQ_CACHE": str(tmp_path)})
    assert done.returncode == 0 and "ok" in done.stdout, (done.returncode, done.stderr[-2000:])


@needs_cc
def test_stats_narrower_than_c_are_refused_not_overrun(tmp_path):
    # the kernel wrote d floats into every buffer of a 4-wide LayerStats: sum_abs ran into sum_sq (the arena's
    # next field) and the arena's last fields past its end ("corrupted size vs. prev_size", abort). In a
    # subprocess: the overrun corrupts the heap of whatever process runs it
    done = _run("""
        import torch
        from kacq_hooks.errors import KacqError
        from kacq_hooks.kernels import cpu, native, reference
        from kacq_hooks.stats import LayerStats
        assert native.library() is not None
        c = torch.ones(5, 8)
        try:
            reference.accumulate_forward(c, None, None, LayerStats(4))
            raise SystemExit("the reference accepted it")
        except RuntimeError:
            pass
        for call in (lambda out: cpu.accumulate_forward(c, None, None, out),
                     lambda out: cpu.accumulate_backward(c, c, None, out)):
            out = LayerStats(4)
            try:
                call(out)
            except KacqError:
                pass
            else:
                raise SystemExit(f"accepted: sum_abs {out.sum_abs.tolist()} sum_sq {out.sum_sq.tolist()}")
            assert not out.sum_sq.any() and not out.sum_abs.any() and not out.grad_sum_cg.any()
        print("ok")
    """, {"KACQ_CACHE": str(tmp_path)})
    assert done.returncode == 0 and "ok" in done.stdout, (done.returncode, done.stdout[-500:], done.stderr[-2000:])


@needs_cc
@pytest.mark.parametrize("what", ["rows", "doc_weight"])
@pytest.mark.parametrize("length", [3, 12])
def test_a_row_mask_or_document_weights_of_the_wrong_length_are_refused(tmp_path, what, length):
    # too short: the kernel read past the end of the mask / weights (rows of garbage counted, e.g. sum |C| of
    # 34749 for 3 valid rows of ones); too long: the reference raises, the kernel counted tokens past n.
    # In a subprocess: the short case reads memory it was not handed
    done = _run(f"""
        import torch
        from kacq_hooks.errors import KacqError
        from kacq_hooks.kernels import cpu, native, reference
        from kacq_hooks.stats import LayerStats
        assert native.library() is not None
        n, length, what = 100000, {length}, {what!r}
        c = torch.ones(n if length < 10 else 10, 8)
        extra = torch.ones(length, dtype=torch.bool) if what == "rows" else torch.ones(length)
        args = (extra, None) if what == "rows" else (None, extra)
        try:
            reference.accumulate_forward(c, *args, LayerStats(8))
            raise SystemExit("the reference accepted it")
        except RuntimeError:
            pass
        calls = [lambda out: cpu.accumulate_forward(c, *args, out)]
        if what == "rows":
            calls.append(lambda out: cpu.accumulate_backward(c, c, extra, out))
        for call in calls:
            out = LayerStats(8)
            try:
                call(out)
            except KacqError:
                pass
            else:
                raise SystemExit(f"accepted: tokens {{out.tokens.item()}} sum_abs {{out.sum_abs[:2].tolist()}}")
            assert out.tokens.item() == 0 and out.grad_tokens.item() == 0
        print("ok")
    """, {"KACQ_CACHE": str(tmp_path)})
    assert done.returncode == 0 and "ok" in done.stdout, (done.returncode, done.stdout[-500:], done.stderr[-2000:])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32])
def test_a_row_mask_that_is_not_bool_is_refused_or_read_as_a_mask(fresh_build, dtype):
    # native.supports sends non-bool masks to the eager passes, whose ~mask is a bitwise not: ~1 and ~0 are both
    # non-zero, so every row was taken for padding and the block silently added nothing (tokens 0)
    c = torch.randn(10, 6)
    rows = torch.ones(10, dtype=dtype)
    rows[3] = 0
    out = LayerStats(6)
    try:
        cpu.accumulate_forward(c, rows, None, out)
    except KacqError:
        return
    want = LayerStats(6)
    reference.accumulate_forward(c, rows.bool(), None, want)
    assert out.tokens.item() == want.tokens.item() == 9
    torch.testing.assert_close(out.sum_abs, want.sum_abs)


@needs_cc
def test_a_negative_view_is_not_read_as_its_raw_memory(fresh_build):
    # a tensor with the neg bit set stores -x: the kernel read x, so sum C*g came out with the wrong sign
    c = torch.randn(300, 40)
    g = torch._neg_view(torch.randn(300, 40))
    assert g.is_neg()
    want, got = LayerStats(40), LayerStats(40)
    reference.accumulate_backward(c, g, None, want)
    cpu.accumulate_backward(c, g, None, got)
    torch.testing.assert_close(got.grad_sum_cg, want.grad_sum_cg, rtol=1e-5, atol=1e-4)


@needs_cc
def test_a_zero_tensor_gradient_does_not_segfault(tmp_path):
    # torch's efficient zero tensor has data_ptr() == 0: the kernel dereferenced NULL (SIGSEGV)
    done = _run("""
        import torch
        from kacq_hooks.kernels import cpu, native
        from kacq_hooks.stats import LayerStats
        assert native.library() is not None
        c, z = torch.randn(300, 40), torch._efficientzerotensor((300, 40))
        out = LayerStats(40)
        cpu.accumulate_backward(c, z, None, out)
        assert out.grad_tokens.item() == 300 and not out.grad_sum_abs.any() and not out.grad_sum_cg.any()
        print("ok")
    """, {"KACQ_CACHE": str(tmp_path)})
    assert done.returncode == 0 and "ok" in done.stdout, (done.returncode, done.stderr[-2000:])


@needs_cc
@pytest.mark.parametrize("keep", [1000, 8000])
def test_a_truncated_cached_build_is_rebuilt_not_loaded(tmp_path, keep):
    # a cut-short .so in the cache (an interrupted copy of a shared cache, a crash before the rename reached
    # the disk) passed target.exists() and was dlopen()ed: SIGBUS (rc -7) on load, in every later process
    first = _run("""
        from kacq_hooks.kernels import native
        print(native._build(native._compiler()))
    """, {"KACQ_CACHE": str(tmp_path)})
    assert first.returncode == 0, first.stderr[-2000:]
    target = Path(first.stdout.strip().splitlines()[-1])
    target.write_bytes(target.read_bytes()[:keep])
    done = _run("""
        import torch
        from kacq_hooks.kernels import cpu, native, reference
        from kacq_hooks.stats import LayerStats
        assert native.library() is not None, native._state
        c = torch.randn(300, 70)
        got, want = LayerStats(70), LayerStats(70)
        cpu.accumulate_forward(c, None, None, got)
        reference.accumulate_forward(c, None, None, want)
        torch.testing.assert_close(got.sum_abs, want.sum_abs)
        print("ok")
    """, {"KACQ_CACHE": str(tmp_path), "KACQ_KERNELS": "native"})
    assert done.returncode == 0 and "ok" in done.stdout, (done.returncode, done.stderr[-2000:])
