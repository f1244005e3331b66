"""The reductions of :mod:`.reference` on the CPU, fused into one pass by Inductor.

``torch.compile`` turns the reference's dozen elementwise ops into one generated C++ loop over C
(compiled once per process and dtype, shapes dynamic), which is what keeps capture within a few
percent of a forward pass. Where compilation is not possible (no C++ compiler, an unsupported
platform) or ``KACQ_KERNELS=eager`` asks for it, an eager path runs instead: |C| of one block in
fp32, allocated per call (no state shared between models or threads), padded rows set to zero
(host checks are free on the CPU), and a block holding a non-finite value handed to the reference
so NaN and Inf are still counted and kept out of the sums.
"""
from __future__ import annotations

import logging
import os

import torch

from . import reference

log = logging.getLogger(__name__)

_BLOCK_ELEMENTS = 1 << 22  # eager path: bounds |C| of one block (16 MiB of fp32), allocated per block
_compiled: dict[str, object] = {}
_compile_failed = False


# -- fused (compiled) --------------------------------------------------------------------------------------------

# No finiteness test in the hot loop: a NaN or Inf makes its column's sum non-finite, which is checked on
# the [d_ff] result (free on the CPU); only then is the call redone by the reference, which counts them.

def _forward_partials(c: torch.Tensor, rows: torch.Tensor, doc_weight: torch.Tensor | None):
    a = torch.where(rows[:, None], c.abs().float(), 0.0)
    doc = None if doc_weight is None else (a * doc_weight[:, None]).sum(0)
    return a.sum(0), (a * a).sum(0), (a > 0).sum(0), a.amax(0), doc


def _backward_partials(c: torch.Tensor, g: torch.Tensor, rows: torch.Tensor):
    cf, gf = c.float(), g.float()
    valid = rows[:, None]
    return torch.where(valid, gf.abs(), 0.0).sum(0), torch.where(valid, cf * gf, 0.0).sum(0)


def _run_compiled(name: str, fn, *args):
    """fn(*args) through Inductor, or None when compilation is unavailable (then the eager path runs)."""
    global _compile_failed
    if _compile_failed or os.environ.get("KACQ_KERNELS", "").lower() == "eager":
        return None
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    try:
        return _compiled[name](*args)
    except Exception as err:  # no C++ toolchain, or an Inductor limitation on this platform
        _compile_failed = True
        log.warning("kacq_hooks: fused CPU reductions could not be compiled (%s: %s); using the eager path, "
                    "which costs more per forward", type(err).__name__, err)
        return None


def accumulate_forward(c: torch.Tensor, rows: torch.Tensor | None, doc_weight: torch.Tensor | None, out) -> None:
    if c.shape[0] == 0:
        return
    valid = rows if rows is not None else torch.ones(c.shape[0], dtype=torch.bool)
    partials = _run_compiled("forward", _forward_partials, c, valid, doc_weight)
    if partials is None:
        return _eager_forward(c, rows, doc_weight, out)
    sum_abs, sum_sq, active, max_abs, doc = partials
    if not bool(torch.isfinite(sum_abs).all()):
        return reference.accumulate_forward(c, rows, doc_weight, out)
    out.sum_abs.add_(sum_abs)
    out.sum_sq.add_(sum_sq)
    out.active.add_(active)
    torch.maximum(out.max_abs, max_abs, out=out.max_abs)
    out.tokens.add_(c.shape[0] if rows is None else rows.sum())
    if doc is not None:
        out.doc_sum_abs.add_(doc)


def accumulate_backward(c: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None, out) -> None:
    if c.shape[0] == 0:
        return
    valid = rows if rows is not None else torch.ones(c.shape[0], dtype=torch.bool)
    partials = _run_compiled("backward", _backward_partials, c, g, valid)
    if partials is None:
        return _eager_backward(c, g, rows, out)
    if not (bool(torch.isfinite(partials[0]).all()) and bool(torch.isfinite(partials[1]).all())):
        return reference.accumulate_backward(c, g, rows, out)
    out.grad_sum_abs.add_(partials[0])
    out.grad_sum_cg.add_(partials[1])
    out.grad_tokens.add_(c.shape[0] if rows is None else rows.sum())


# -- eager fallback ----------------------------------------------------------------------------------------------

def _eager_forward(c: torch.Tensor, rows: torch.Tensor | None, doc_weight: torch.Tensor | None, out) -> None:
    n, d = c.shape
    block = max(1, _BLOCK_ELEMENTS // max(d, 1))
    for start in range(0, n, block):
        chunk = c[start:start + block]
        valid = None if rows is None else rows[start:start + block]
        w = None if doc_weight is None else doc_weight[start:start + block]
        # |C| in fp32, allocated per call: a buffer kept between calls would be shared by every model and thread
        a = chunk.abs() if chunk.dtype == torch.float32 else chunk.float().abs_()
        if valid is not None and not bool(valid.all()):
            # zero the few padded rows (NaN included) instead of copying the many valid ones: a zero adds
            # nothing to any statistic, max included, since every other entry is >= 0
            a.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)
        col_sum = a.sum(0)
        if not bool(torch.isfinite(col_sum).all()):
            reference.accumulate_forward(chunk, valid, w, out)  # counts the NaN/Inf, and the tokens itself
            continue
        out.sum_abs.add_(col_sum)
        out.tokens.add_(chunk.shape[0] if valid is None else valid.sum())
        if w is not None:
            out.doc_sum_abs.add_(w @ a)
        torch.maximum(out.max_abs, a.amax(0), out=out.max_abs)
        out.active.add_((a > 0).sum(0))  # before squaring: a tiny |C| squares to 0 but is active
        out.sum_sq.add_(a.square_().sum(0))


def _eager_backward(c: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None, out) -> None:
    if rows is not None and not bool(rows.all()):
        keep = rows.nonzero().squeeze(1)
        c, g = c.index_select(0, keep), g.index_select(0, keep)
    grad_abs = g.abs().sum(0, dtype=torch.float32)
    cg = (c.float() * g.float()).sum(0)
    if not (bool(torch.isfinite(grad_abs).all()) and bool(torch.isfinite(cg).all())):
        reference.accumulate_backward(c, g, None, out)
        return
    out.grad_sum_abs.add_(grad_abs)
    out.grad_sum_cg.add_(cg)
    out.grad_tokens.add_(c.shape[0])
