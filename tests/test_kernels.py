"""Kernel dispatch, and the Triton kernels checked against the reference under Triton's CPU interpreter.

The kernel comparisons live in ``kernels_interpreted.py``: ``TRITON_INTERPRET=1`` has to be set before
triton is first imported, so they run in a subprocess and the rest of the suite is unaffected.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kacq_hooks import kernels
from kacq_hooks.errors import KacqError, MissingExtraError
from kacq_hooks.stats import LayerStats

TESTS = Path(__file__).parent
REPO = TESTS.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not HAS_TRITON, reason="the triton extra is not installed")
def test_triton_kernels_match_the_reference_under_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    env.pop("KACQ_KERNELS", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(TESTS / "kernels_interpreted.py"), "-o", "addopts=", "-q", "-x",
         "-p", "no:cacheprovider"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary


@pytest.mark.parametrize("setting, device, expected", [
    ("torch", "cpu", "torch"), ("triton", "cpu", "triton"), ("auto", "cpu", "cpu"), ("auto", "meta", "torch"),
])
def test_backend_follows_kacq_kernels(monkeypatch, setting, device, expected):
    monkeypatch.setenv("KACQ_KERNELS", setting)
    assert kernels.backend_for(torch.device(device)) == expected


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("KACQ_KERNELS", "cuda")
    with pytest.raises(ValueError, match="KACQ_KERNELS='cuda'"):
        kernels.backend_for(torch.device("cpu"))


def test_forcing_triton_without_triton_names_the_extra(monkeypatch):
    monkeypatch.setenv("KACQ_KERNELS", "triton")
    monkeypatch.setattr(kernels, "_triton_available", lambda: False)
    with pytest.raises(MissingExtraError, match=r"kacq_hooks\[triton\]"):
        kernels.accumulate_forward(torch.ones(2, 3), None, None, LayerStats(3))


@pytest.mark.skipif(not HAS_TRITON, reason="the triton extra is not installed")
def test_forcing_triton_on_cpu_tensors_says_how_to_run(monkeypatch):
    monkeypatch.setenv("KACQ_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    stats = LayerStats(3)
    with pytest.raises(KacqError, match="TRITON_INTERPRET=1"):
        kernels.accumulate_forward(torch.ones(2, 3), None, None, stats)
    assert int(stats.tokens) == 0


def test_kernel_benchmark_explains_that_it_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels.py")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr


def _ptx_for_hopper(kernel, signature: dict[str, str], constexprs: dict, divisible: list[str]) -> str:
    """Compile ``kernel`` for an H100 (sm_90) without a GPU, specialised the way Triton's launcher does it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    index = kernel.arg_names.index
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(index(name),): value for name, value in constexprs.items()},
                       attrs={(index(name),): [["tt.divisibility", 16]] for name in divisible})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


@pytest.mark.skipif(not HAS_TRITON, reason="the triton extra is not installed")
@pytest.mark.parametrize("dtype, masked", [("bf16", True), ("fp16", False), ("fp32", True)])
def test_kernels_compile_for_hopper_with_vector_loads(monkeypatch, dtype, masked):
    """The GPU code path, compiled for real (the interpreter skips codegen): 16-byte loads of C, fp32/int64 atomics."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    from kacq_hooks.kernels import triton as fused

    blocks = {"BLOCK_N": fused.BLOCK_N, "BLOCK_D": fused.BLOCK_D}
    buffers = {"sum_abs_ptr": "*fp32", "sum_sq_ptr": "*fp32", "active_ptr": "*i64", "max_abs_ptr": "*fp32",
               "nonfinite_ptr": "*i64", "tokens_ptr": "*i64", "doc_sum_abs_ptr": "*fp32"}
    forward = _ptx_for_hopper(
        fused._forward_kernel,
        {"c_ptr": f"*{dtype}", "rows_ptr": "*u8", "weight_ptr": "*fp32", **buffers, "n_rows": "i32", "d": "i32",
         "stride_cn": "i32", "stride_cd": "constexpr", "stride_rows": "i32", "stride_weight": "i32",
         "rows_per_program": "i32", "HAS_ROWS": "constexpr", "HAS_WEIGHT": "constexpr", "BLOCK_N": "constexpr",
         "BLOCK_D": "constexpr"},
        {"stride_cd": 1, "HAS_ROWS": masked, "HAS_WEIGHT": masked, **blocks},
        ["c_ptr", "rows_ptr", "weight_ptr", *buffers, "d", "stride_cn", "rows_per_program"])
    assert "ld.global.v4.b32" in forward  # C is read in 16-byte vectors
    for atomic in ("add.f32", "add.u64"):
        assert atomic in forward
    assert "max.s32" in forward or "max.f32" in forward  # max |C| of non-negative floats
    backward = _ptx_for_hopper(
        fused._backward_kernel,
        {"c_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "rows_ptr": "*u8", "grad_sum_abs_ptr": "*fp32",
         "grad_sum_cg_ptr": "*fp32", "grad_tokens_ptr": "*i64", "n_rows": "i32", "d": "i32", "stride_cn": "i32",
         "stride_cd": "constexpr", "stride_gn": "i32", "stride_gd": "constexpr", "stride_rows": "i32",
         "rows_per_program": "i32", "HAS_ROWS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"},
        {"stride_cd": 1, "stride_gd": 1, "HAS_ROWS": masked, **blocks},
        ["c_ptr", "g_ptr", "rows_ptr", "grad_sum_abs_ptr", "grad_sum_cg_ptr", "grad_tokens_ptr", "d", "stride_cn",
         "stride_gn", "rows_per_program"])
    assert backward.count("ld.global.v4.b32") >= 2 and "add.u64" in backward


@pytest.mark.skipif(not HAS_TRITON, reason="the triton extra is not installed")
def test_kernel_benchmark_runs_its_code_on_the_cpu_in_smoke_mode(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--smoke"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| forward") or line.startswith("| backward")]
    assert len(rows) >= 8 and all(line.split("|")[-2].strip() == "ok" for line in rows), result.stdout


# -- the CPU reductions (kernels/cpu.py) against the specification --------------------------------------------

def _reference_stats(c, rows, doc_weight, repeats=1):
    out = LayerStats(c.shape[1])
    for _ in range(repeats):
        kernels.reference.accumulate_forward(c, rows, doc_weight, out)
    return out


def _assert_stats_equal(got, want, rtol=1e-5):
    for name, buf in want.buffers():
        torch.testing.assert_close(getattr(got, name), buf, rtol=rtol, atol=1e-3, msg=name)


@pytest.mark.parametrize("mode", ["auto", "eager"])
def test_cpu_reductions_of_two_models_in_two_threads_do_not_share_scratch(monkeypatch, mode):
    """Two models of different dtypes measured at the same time in two threads each get their own statistics:
    nothing in the CPU path is process-wide mutable state."""
    import threading

    monkeypatch.setenv("KACQ_KERNELS", mode)
    gen = torch.Generator().manual_seed(0)
    # one eager block each (4M elements), so both threads are inside a block at the same time
    inputs = {torch.float32: torch.randn(4096, 1024, generator=gen),
              torch.bfloat16: (torch.randn(4096, 1024, generator=gen) * 3).to(torch.bfloat16)}
    rows = torch.rand(4096, generator=gen) > 0.2
    want = {dtype: _reference_stats(c, rows, None, repeats=12) for dtype, c in inputs.items()}
    got = {dtype: LayerStats(1024) for dtype in inputs}
    start = threading.Barrier(len(inputs))
    errors = []

    def worker(dtype):
        try:
            start.wait()
            for _ in range(12):
                kernels.cpu.accumulate_forward(inputs[dtype], rows, None, got[dtype])
        except Exception as err:  # reported below: a failure in a thread must fail the test
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(dtype,)) for dtype in inputs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for dtype in inputs:
        _assert_stats_equal(got[dtype], want[dtype])


def test_cpu_module_holds_no_process_wide_scratch():
    mutable = [name for name, value in vars(kernels.cpu).items() if isinstance(value, torch.Tensor)]
    assert mutable == []


@pytest.mark.parametrize("mode", ["auto", "eager"])
def test_cpu_reductions_count_tiny_values_as_active(monkeypatch, mode):
    """|C| of 1e-25 is active even though its square underflows to zero in fp32."""
    monkeypatch.setenv("KACQ_KERNELS", mode)
    c = torch.full((6, 3), 1e-25)
    c[:, 1] = 0.0
    out = LayerStats(3)
    kernels.cpu.accumulate_forward(c, None, None, out)
    assert out.active.tolist() == [6, 0, 6]


@pytest.mark.parametrize("mode", ["auto", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_reductions_match_the_reference_with_padding_nonfinite_and_documents(monkeypatch, mode, dtype):
    monkeypatch.setenv("KACQ_KERNELS", mode)
    gen = torch.Generator().manual_seed(1)
    c = (torch.randn(64, 40, generator=gen) * 4).to(dtype)
    rows = torch.ones(64, dtype=torch.bool)
    rows[10:14] = False
    rows[60:] = False
    c[11, 3] = float("nan")  # padded: neither counted nor summed
    c[62, 5] = float("inf")
    c[20, 7] = float("inf")  # valid: counted as non-finite, kept out of the sums
    c[30, 8] = float("nan")
    weight = rows.float() / 7.0
    for r, w in ((rows, None), (rows, weight), (None, None)):
        want = _reference_stats(c, r, w)
        got = LayerStats(40)
        kernels.cpu.accumulate_forward(c, r, w, got)
        _assert_stats_equal(got, want)
    g = (torch.randn(64, 40, generator=gen)).to(dtype)
    want, got = LayerStats(40), LayerStats(40)
    kernels.reference.accumulate_backward(c, g, rows, want)
    kernels.cpu.accumulate_backward(c, g, rows, got)
    _assert_stats_equal(got, want)


def test_dense_cpu_reductions_compile_nothing():
    """The dense CPU path runs eagerly: compiling it loaded Inductor's runtime (~60 MiB of resident memory)."""
    before = dict(kernels.cpu._compiled)
    c = torch.randn(32, 8)
    out = LayerStats(8)
    kernels.cpu.accumulate_forward(c, torch.rand(32) > 0.3, None, out)
    kernels.cpu.accumulate_backward(c, torch.randn(32, 8), None, out)
    assert kernels.cpu._compiled == before


def test_cpu_reductions_over_several_blocks_match_the_reference(monkeypatch):
    """C larger than one buffer is reduced block by block; a NaN in one block leaves the others on the fast path."""
    monkeypatch.setattr(kernels.cpu, "_BLOCK_ELEMENTS", 7 * 10)  # blocks of 7 rows
    gen = torch.Generator().manual_seed(2)
    c = torch.randn(40, 10, generator=gen)
    c[9, 2] = float("nan")
    c[30, 4] = 0.0
    rows = torch.rand(40, generator=gen) > 0.25
    rows[9] = True
    weight = rows.float() / 3.0
    for r, w in ((rows, None), (rows, weight), (None, None)):
        got = LayerStats(10)
        kernels.cpu.accumulate_forward(c, r, w, got)
        _assert_stats_equal(got, _reference_stats(c, r, w))
    g = torch.randn(40, 10, generator=gen)
    g[20, 1] = float("inf")
    want, got = LayerStats(10), LayerStats(10)
    kernels.reference.accumulate_backward(c, g, rows, want)
    kernels.cpu.accumulate_backward(c, g, rows, got)
    _assert_stats_equal(got, want)
