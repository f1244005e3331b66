"""Fused Triton kernels for the coefficient reductions specified by :mod:`.reference`.

One pass over C (and dL/dC) of shape [N, d_ff], in any float dtype and any strides, adds every
statistic into the layer's fp32/int64 buffers. The grid splits columns into ``BLOCK_D`` blocks and
rows into a few spans, so a tall input (N = 8192 tokens and more) still fills the device; each
program reduces its span in registers and folds the result into the buffers with one atomic per
column (float max of non-negative values for ``max_abs``). The token count is added by the programs
of the first column block, so nothing waits on the host.

Both reductions are ``torch.library.triton_op`` custom ops (``kacq::accumulate_forward`` and
``kacq::accumulate_backward``) declaring the buffers they mutate, so an instrumented model can be
compiled with ``torch.compile``: Inductor sees the kernels themselves. (Under the interpreter they
are opaque ``custom_op``s instead, since interpreted kernels cannot run on fake tensors.)

The buffers an op mutates, and the order its callers pass them in, come from the statistics table
(:data:`kacq_hooks.stats.FORWARD` and :data:`~kacq_hooks.stats.BACKWARD`); an op whose parameters do not
name exactly those buffers is refused at import, so a statistic added to the table cannot be left unwritten.

On the CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
first imported); that is how the tests compare them with the reference without a GPU.
"""
from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import stats as S
from ..errors import ConfigError, ShapeError

BLOCK_N = 64    # rows per tile: 64 x 128 values per step, 16 KiB of bf16 in flight per program (4 warps)
BLOCK_D = 128   # columns per program: a bf16 row segment of 256 bytes, loaded in 16-byte vectors
PROGRAMS_PER_SM = 8  # enough resident programs to hide memory latency on a bandwidth-bound reduction
_INTERPRETER_PROGRAMS = 4  # a few row spans under the interpreter, so the tests cross span borders


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _forward_kernel(c_ptr, rows_ptr, weight_ptr,
                    sum_abs_ptr, sum_sq_ptr, active_ptr, max_abs_ptr, nonfinite_ptr, tokens_ptr, doc_sum_abs_ptr,
                    n_rows, d, stride_cn, stride_cd, stride_rows, stride_weight, rows_per_program,
                    HAS_ROWS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    row_begin = tl.program_id(1) * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, n_rows)

    sum_abs = tl.zeros([BLOCK_D], dtype=tl.float32)
    sum_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    doc_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    max_abs = tl.zeros([BLOCK_D], dtype=tl.float32)
    active = tl.zeros([BLOCK_D], dtype=tl.int32)
    nonfinite = tl.zeros([BLOCK_D], dtype=tl.int32)
    tokens = tl.zeros([BLOCK_N], dtype=tl.int32)
    for start in range(row_begin, row_end, BLOCK_N):
        r = start + tl.arange(0, BLOCK_N)
        row_ok = r < row_end
        if HAS_ROWS:
            row_ok = row_ok & (tl.load(rows_ptr + r * stride_rows, mask=row_ok, other=0) != 0)
        tokens += row_ok.to(tl.int32)
        inside = row_ok[:, None] & col_ok[None, :]
        ptrs = c_ptr + r[:, None].to(tl.int64) * stride_cn + cols[None, :].to(tl.int64) * stride_cd
        a = tl.abs(tl.load(ptrs, mask=inside, other=0.0).to(tl.float32))
        finite = a < float("inf")  # false for Inf and for NaN
        nonfinite += tl.sum((inside & (finite == 0)).to(tl.int32), axis=0)
        a = tl.where(inside & finite, a, 0.0)
        sum_abs += tl.sum(a, axis=0)
        sum_sq += tl.sum(a * a, axis=0)
        active += tl.sum((a > 0).to(tl.int32), axis=0)
        max_abs = tl.maximum(max_abs, tl.max(a, axis=0))
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + r * stride_weight, mask=row_ok, other=0.0).to(tl.float32)
            doc_sum += tl.sum(w[:, None] * a, axis=0)

    tl.atomic_add(sum_abs_ptr + cols, sum_abs, mask=col_ok)
    tl.atomic_add(sum_sq_ptr + cols, sum_sq, mask=col_ok)
    tl.atomic_add(active_ptr + cols, active.to(tl.int64), mask=col_ok)
    tl.atomic_max(max_abs_ptr + cols, max_abs, mask=col_ok)  # all values >= 0: float max is exact
    tl.atomic_add(nonfinite_ptr + cols, nonfinite.to(tl.int64), mask=col_ok & (nonfinite > 0))
    if HAS_WEIGHT:
        tl.atomic_add(doc_sum_abs_ptr + cols, doc_sum, mask=col_ok)
    if tl.program_id(0) == 0:  # one column block counts the rows of its span
        tl.atomic_add(tokens_ptr, tl.sum(tokens, axis=0).to(tl.int64))


@triton.jit
def _backward_kernel(c_ptr, g_ptr, rows_ptr, grad_sum_abs_ptr, grad_sum_cg_ptr, grad_tokens_ptr,
                     n_rows, d, stride_cn, stride_cd, stride_gn, stride_gd, stride_rows, rows_per_program,
                     HAS_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    row_begin = tl.program_id(1) * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, n_rows)

    sum_abs = tl.zeros([BLOCK_D], dtype=tl.float32)
    sum_cg = tl.zeros([BLOCK_D], dtype=tl.float32)
    tokens = tl.zeros([BLOCK_N], dtype=tl.int32)
    for start in range(row_begin, row_end, BLOCK_N):
        r = start + tl.arange(0, BLOCK_N)
        row_ok = r < row_end
        if HAS_ROWS:
            row_ok = row_ok & (tl.load(rows_ptr + r * stride_rows, mask=row_ok, other=0) != 0)
        tokens += row_ok.to(tl.int32)
        inside = row_ok[:, None] & col_ok[None, :]
        r64, c64 = r[:, None].to(tl.int64), cols[None, :].to(tl.int64)
        c = tl.load(c_ptr + r64 * stride_cn + c64 * stride_cd, mask=inside, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + r64 * stride_gn + c64 * stride_gd, mask=inside, other=0.0).to(tl.float32)
        keep = inside & (tl.abs(c) < float("inf")) & (tl.abs(g) < float("inf"))
        sum_abs += tl.sum(tl.where(keep, tl.abs(g), 0.0), axis=0)
        sum_cg += tl.sum(tl.where(keep, c * g, 0.0), axis=0)

    tl.atomic_add(grad_sum_abs_ptr + cols, sum_abs, mask=col_ok)
    tl.atomic_add(grad_sum_cg_ptr + cols, sum_cg, mask=col_ok)
    if tl.program_id(0) == 0:
        tl.atomic_add(grad_tokens_ptr, tl.sum(tokens, axis=0).to(tl.int64))


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_PROGRAMS


def _grid(n_rows: int, d: int, device: torch.device) -> tuple[tuple[int, int], int]:
    """(grid, rows per program): every column block, and as many row spans as fill the device."""
    col_blocks = triton.cdiv(d, BLOCK_D)
    row_tiles = triton.cdiv(n_rows, BLOCK_N)
    spans = max(1, min(row_tiles, triton.cdiv(_target_programs(device), col_blocks)))
    rows_per_program = triton.cdiv(row_tiles, spans) * BLOCK_N
    return (col_blocks, triton.cdiv(n_rows, rows_per_program)), rows_per_program


def _custom_op(name: str, statistics: tuple):
    """Register ``fn`` as a ``triton_op`` mutating the buffers of ``statistics``, whose kernels ``torch.compile``
    traces and Inductor schedules.

    Under the interpreter the kernels read real data, so they cannot be traced with fake tensors: the
    same function is then an opaque ``custom_op`` that compiled graphs call as it is.
    """
    names = tuple(stat.name for stat in statistics)
    mutates_args = set(names)

    def register(fn):
        buffers = tuple(inspect.signature(fn).parameters)[-len(names):]
        if buffers != names:  # the table's order is the order callers pass buffers in
            raise ShapeError(f"{name} takes the buffers {buffers} but the statistics table has {names}: "
                              "write the missing statistics in kernels/triton.py")
        if not interpreting():
            return triton_op(name, fn, mutates_args=mutates_args)
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        op.register_fake(lambda *args, **kwargs: None)
        return op

    return register


@_custom_op("kacq::accumulate_forward", S.FORWARD)
def _forward_op(c: torch.Tensor, rows: torch.Tensor | None, doc_weight: torch.Tensor | None,
                sum_abs: torch.Tensor, sum_sq: torch.Tensor, active: torch.Tensor, max_abs: torch.Tensor,
                nonfinite: torch.Tensor, tokens: torch.Tensor, doc_sum_abs: torch.Tensor) -> None:
    n_rows, d = c.shape
    if n_rows == 0 or d == 0:  # no program would run; rows are still tokens, as in the reference
        tokens.add_(n_rows if rows is None else rows.sum())
        return
    grid, rows_per_program = _grid(n_rows, d, c.device)
    rows_arg = c if rows is None else rows.view(torch.uint8)  # placeholder pointers are never read
    weight_arg = c if doc_weight is None else doc_weight
    wrap_triton(_forward_kernel)[grid](
        c, rows_arg, weight_arg, sum_abs, sum_sq, active, max_abs, nonfinite, tokens, doc_sum_abs,
        n_rows, d, c.stride(0), c.stride(1),
        0 if rows is None else rows.stride(0), 0 if doc_weight is None else doc_weight.stride(0), rows_per_program,
        HAS_ROWS=rows is not None, HAS_WEIGHT=doc_weight is not None,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)


@_custom_op("kacq::accumulate_backward", S.BACKWARD)
def _backward_op(c: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None,
                 grad_sum_abs: torch.Tensor, grad_sum_cg: torch.Tensor, grad_tokens: torch.Tensor) -> None:
    n_rows, d = c.shape
    if n_rows == 0 or d == 0:
        grad_tokens.add_(n_rows if rows is None else rows.sum())
        return
    grid, rows_per_program = _grid(n_rows, d, c.device)
    rows_arg = c if rows is None else rows.view(torch.uint8)
    wrap_triton(_backward_kernel)[grid](
        c, g, rows_arg, grad_sum_abs, grad_sum_cg, grad_tokens,
        n_rows, d, c.stride(0), c.stride(1), g.stride(0), g.stride(1),
        0 if rows is None else rows.stride(0), rows_per_program,
        HAS_ROWS=rows is not None, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)


def accumulate_forward(c: torch.Tensor, rows: torch.Tensor | None, doc_weight: torch.Tensor | None, out) -> None:
    """Add one forward's statistics of ``c`` [N, d_ff] into ``out`` (a LayerStats), as :mod:`.reference` does."""
    _check(c, rows, out, doc_weight=doc_weight)
    _forward_op(c, rows, doc_weight, *[getattr(out, stat.name) for stat in S.FORWARD])


def accumulate_backward(c: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None, out) -> None:
    """Add one backward's statistics of (``c``, ``g`` = dL/dC) into ``out``, as :mod:`.reference` does."""
    _check(c, rows, out, g=g)
    _backward_op(c, g, rows, *[getattr(out, stat.name) for stat in S.BACKWARD])


def _check(c: torch.Tensor, rows: torch.Tensor | None, out, *, g: torch.Tensor | None = None,
           doc_weight: torch.Tensor | None = None) -> None:
    """Host-side checks of shapes and devices only (metadata: no device sync)."""
    if c.device.type != "cuda" and not interpreting():
        raise ConfigError(f"the Triton kernels need CUDA tensors, got {c.device} ones; set KACQ_KERNELS=torch "
                        "(or unset it), or TRITON_INTERPRET=1 before triton is imported to run them on the CPU")
    if c.dim() != 2 or not c.is_floating_point():
        raise ShapeError(f"coefficients must be a float [N, d_ff] tensor, got {c.dtype} of shape {tuple(c.shape)}")
    n_rows, d = c.shape
    if out.sum_abs.shape != (d,):
        raise ShapeError(f"coefficients have d_ff={d} but the layer statistics hold {out.sum_abs.shape[0]} neurons")
    if out.sum_abs.device != c.device:
        raise ShapeError(f"coefficients are on {c.device} but the layer statistics on {out.sum_abs.device}; "
                         "move them with stats.to(device)")
    if g is not None and g.shape != c.shape:
        raise ShapeError(f"gradient of shape {tuple(g.shape)} does not match coefficients of shape {tuple(c.shape)}")
    if rows is not None and (rows.shape != (n_rows,) or rows.dtype != torch.bool):
        raise ShapeError(f"rows must be a bool [{n_rows}] mask, got {rows.dtype} of shape {tuple(rows.shape)}")
    if doc_weight is not None and doc_weight.shape != (n_rows,):
        raise ShapeError(f"doc_weight must have shape [{n_rows}], got {tuple(doc_weight.shape)}")
