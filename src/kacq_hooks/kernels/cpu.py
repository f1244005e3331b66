"""The reductions of :mod:`.reference`, made cheap on the CPU.

On the CPU a host-side check costs nothing, so this path drops padded rows up front, reuses one
fp32 workspace for |C| and runs the few passes over cache-sized row blocks. A block holding a
non-finite value falls back to the reference for that block, so NaN and Inf are still counted
and kept out of the sums exactly as the specification says.
"""
from __future__ import annotations

import torch

from . import reference

_BLOCK_ELEMENTS = 1 << 18  # 1 MiB of fp32: the passes over one block stay in cache

_workspace: torch.Tensor | None = None


def _scratch(numel: int) -> torch.Tensor:
    global _workspace
    if _workspace is None or _workspace.numel() < numel:
        _workspace = torch.empty(numel, dtype=torch.float32)
    return _workspace[:numel]


def accumulate_forward(c: torch.Tensor, rows: torch.Tensor | None, doc_weight: torch.Tensor | None, out) -> None:
    if rows is not None and not bool(rows.all()):
        keep = rows.nonzero().squeeze(1)
        c = c.index_select(0, keep)
        doc_weight = None if doc_weight is None else doc_weight.index_select(0, keep)
    n, d = c.shape
    out.tokens.add_(n)
    block = max(1, _BLOCK_ELEMENTS // max(d, 1))
    for start in range(0, n, block):
        chunk = c[start:start + block]
        w = None if doc_weight is None else doc_weight[start:start + block]
        a = _scratch(chunk.numel()).view(chunk.shape)
        if chunk.dtype == torch.float32:
            torch.abs(chunk, out=a)
        else:
            a.copy_(chunk).abs_()
        col_sum = a.sum(0)
        if not bool(torch.isfinite(col_sum).all()):
            out.tokens.sub_(chunk.shape[0])  # the reference counts these rows itself
            reference.accumulate_forward(chunk, None, w, out)
            continue
        out.sum_abs.add_(col_sum)
        if w is not None:
            out.doc_sum_abs.add_(w @ a)
        torch.maximum(out.max_abs, a.amax(0), out=out.max_abs)
        out.sum_sq.add_(a.square_().sum(0))
        out.active.add_(a.sign_().sum(0).to(torch.int64))


def accumulate_backward(c: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None, out) -> None:
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
