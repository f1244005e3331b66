"""The reductions of :mod:`.reference` on the CPU: one pass over C in :mod:`.native`, else a few eager passes.

The one-pass kernel takes fp32 and bf16 blocks with contiguous rows and a bool row mask; anything else
(fp16, strided columns), or a machine where it cannot be built, takes the eager passes below. In them,
|C| of a block goes into one fp32 buffer, reduced for the sum and the max, then squared in place and
summed again; the active count is free when the block holds no zero (checked with one global min).
dL/dC uses one buffer holding |g| and C*g side by side, so one column sum gives both. Padded rows are
set to zero in the buffer (host checks are free on the CPU). NaN and Inf are not tested per element:
they make a column sum non-finite, and only then is the block handed to the reference, which counts
them and keeps them out of the sums. Buffers are allocated per block (no state shared between models
or threads).

Why not Inductor (which routed experts, :mod:`.experts_cpu`, use only where the C kernel cannot run): its runtime holds ~60 MiB of
resident memory once loaded, and its one generated loop over a 2048 x 1536 C took ~3.6 ms on the
benchmark machine, against ~2 ms for these passes when the machine is idle. Under load the passes lose
(each op is a parallel region whose barrier waits for a descheduled thread).
"""
from __future__ import annotations

import logging
import os

import torch

from .. import stats as S
from ..errors import ShapeError
from . import native, reference

log = logging.getLogger(__name__)

_BLOCK_ELEMENTS = 1 << 22  # bounds the fp32 buffer of a block: |C| (16 MiB), or [|g| | C*g] (32 MiB)
# The statistics the eager passes below compute by hand; any other in the table (one added without eager code
# here) is computed from its specification on the same block, so it is never silently left at zero.
_EAGER_FORWARD = {"sum_abs", "sum_sq", "active", "max_abs", "nonfinite", "tokens", "doc_sum_abs"}
_EAGER_BACKWARD = {"grad_sum_abs", "grad_sum_cg", "grad_tokens"}
_REST_FORWARD = tuple(s for s in S.FORWARD if s.name not in _EAGER_FORWARD)
_REST_BACKWARD = tuple(s for s in S.BACKWARD if s.name not in _EAGER_BACKWARD)
_compiled: dict[str, object] = {}
_compile_failed = False


# -- compiled (Inductor), for the routed experts of experts_cpu.py ------------------------------------------------

def _run_compiled(name: str, fn, *args):
    """fn(*args) through Inductor, or None when compilation is unavailable (then the caller's fallback runs)."""
    global _compile_failed
    if _compile_failed or os.environ.get("KACQ_KERNELS", "").lower() == "eager":
        return None
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    try:
        return _compiled[name](*args)
    except Exception as err:  # no C++ toolchain, or an Inductor limitation on this platform
        _compile_failed = True
        log.warning("kacq_hooks: the fused routed-experts reduction could not be compiled (%s: %s); using the "
                    "reference, which costs more per forward", type(err).__name__, err)
        return None


def _padding(valid: torch.Tensor | None) -> torch.Tensor | None:
    """Indices of the padded rows, or None when there are none."""
    if valid is None:
        return None
    pad = (~valid).nonzero().squeeze(1)
    return pad if pad.numel() else None


def _abs_into(out: torch.Tensor, x: torch.Tensor) -> None:
    if x.dtype == torch.float32:
        torch.abs(x, out=out)
    else:  # abs has no out= of another dtype
        out.copy_(x).abs_()


def _checked(c: torch.Tensor, rows: torch.Tensor | None, doc_weight: torch.Tensor | None, out) -> torch.Tensor | None:
    """Refuses shapes that do not fit together (before anything is added); returns ``rows`` as a bool mask."""
    if c.dim() != 2 or out.sum_abs.numel() != c.shape[1]:
        raise ShapeError(f"coefficients of shape {tuple(c.shape)} do not fit statistics of {out.sum_abs.numel()} "
                         "slots: pass [tokens, d_ff] blocks of the layer the statistics belong to")
    for name, extra in (("row mask", rows), ("document weights", doc_weight)):
        if extra is not None and tuple(extra.shape) != (c.shape[0],):
            raise ShapeError(f"the {name} has shape {tuple(extra.shape)} for {c.shape[0]} rows of coefficients: "
                             "pass one value per row")
    if rows is not None and rows.dtype != torch.bool:
        rows = rows != 0  # a 0/1 mask of another dtype: ~mask below would be a bitwise not
    return rows


def _native_for(out, *blocks: torch.Tensor, rows: torch.Tensor | None):
    """The one-pass kernel library when it can read these blocks and write ``out``'s buffers, else None."""
    if not native.supports(*blocks) or (rows is not None and rows.dtype != torch.bool):
        return None
    if not (out.sum_abs.is_contiguous() and out.sum_abs.device.type == "cpu"):
        return None
    return native.library()


def accumulate_forward(c: torch.Tensor, rows: torch.Tensor | None, doc_weight: torch.Tensor | None, out) -> None:
    rows = _checked(c, rows, doc_weight, out)
    if c.numel() == 0:  # no rows or no slots: only the tokens count
        out.tokens.add_(c.shape[0] if rows is None else int(rows.sum()))
        return
    lib = _native_for(out, c, rows=rows)
    if lib is not None:
        if not native.forward(lib, c, rows, doc_weight, out):  # a NaN or Inf in C: counted exactly
            reference.accumulate_forward(c, rows, doc_weight, out)
        return
    n, d = c.shape
    block = max(1, _BLOCK_ELEMENTS // max(d, 1))
    for start in range(0, n, block):
        chunk = c[start:start + block]
        valid = None if rows is None else rows[start:start + block]
        w = None if doc_weight is None else doc_weight[start:start + block]
        a = chunk.abs() if chunk.dtype == torch.float32 else chunk.float().abs_()
        # no zero anywhere (padded rows included): every valid entry is active, no count needed; a zero or a
        # NaN sends the block to the exact count below
        no_zero = bool(a.amin() > 0)
        pad = _padding(valid)
        if pad is not None:
            a.index_fill_(0, pad, 0.0)  # a zero adds nothing to any statistic, max included (entries are >= 0)
        col_sum = a.sum(0)
        if not bool(col_sum.sum().isfinite()):  # a NaN or Inf among the valid rows (or an overflow): counted exactly
            reference.accumulate_forward(chunk, valid, w, out)
            continue
        tokens = chunk.shape[0] if pad is None else chunk.shape[0] - pad.shape[0]
        out.sum_abs.add_(col_sum)
        out.tokens.add_(tokens)
        if w is not None:
            out.doc_sum_abs.add_(w @ a)
        torch.maximum(out.max_abs, a.amax(0), out=out.max_abs)
        out.active.add_(tokens if no_zero else (a > 0).sum(0))  # before squaring: a tiny |C| squares to 0
        out.sum_sq.add_(a.square_().sum(0))
        _rest(_REST_FORWARD, out, S.coefficients, chunk, valid, w)


def accumulate_backward(c: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None, out) -> None:
    rows = _checked(c, rows, None, out)
    if g.shape != c.shape:
        raise ShapeError(f"dL/dC of shape {tuple(g.shape)} does not match C of shape {tuple(c.shape)}")
    if c.numel() == 0:
        out.grad_tokens.add_(c.shape[0] if rows is None else int(rows.sum()))
        return
    lib = _native_for(out, c, g, rows=rows)
    if lib is not None:
        if not native.backward(lib, c, g, rows, out):
            reference.accumulate_backward(c, g, rows, out)
        return
    n, d = c.shape
    block = max(1, _BLOCK_ELEMENTS // max(d, 1))
    for start in range(0, n, block):
        cb, gb = c[start:start + block], g[start:start + block]
        valid = None if rows is None else rows[start:start + block]
        both = torch.empty(cb.shape[0], 2 * d)  # [|g| | C*g]: one column sum for both
        _abs_into(both[:, :d], gb)
        if cb.dtype == gb.dtype == torch.float32:
            torch.mul(cb, gb, out=both[:, d:])
        else:  # multiplied in fp32, as the reference does, not in the model's dtype
            both[:, d:].copy_(cb).mul_(gb)
        pad = _padding(valid)
        if pad is not None:
            both.index_fill_(0, pad, 0.0)
        sums = both.sum(0)
        if not bool(sums.sum().isfinite()):
            reference.accumulate_backward(cb, gb, valid, out)
            continue
        out.grad_sum_abs.add_(sums[:d])
        out.grad_sum_cg.add_(sums[d:])
        out.grad_tokens.add_(cb.shape[0] if pad is None else cb.shape[0] - pad.shape[0])
        _rest(_REST_BACKWARD, out, S.gradients, cb, gb, valid)


def _rest(statistics, out, view, *block) -> None:
    """Statistics without eager code here, from their specification (nothing to do for the table as shipped)."""
    if statistics:
        seen = view(*block)
        for stat in statistics:
            stat.update(getattr(out, stat.name), seen)
