"""The specification of the coefficient reductions, in plain torch.

Sync-free (no ``.item()``, no data-dependent shapes) and device-agnostic: this is what the fused
kernels must match, and the path used on GPUs without Triton and under ``torch.compile``.

Shapes: ``c`` and ``g`` are [N, d_ff] (any float dtype, any strides); ``rows`` is a bool [N] of
valid (unpadded) rows or None; ``doc_weight`` is a fp32 [N] holding 1/len(document) on each valid
row, or None when document weighting is off. Results are added into the fp32/int64 buffers of
``out`` (a :class:`kacq_hooks.stats.LayerStats`).
"""
from __future__ import annotations

import torch


def accumulate_forward(c: torch.Tensor, rows: torch.Tensor | None, doc_weight: torch.Tensor | None, out) -> None:
    a = c.abs().float()
    finite = torch.isfinite(a)
    keep = finite if rows is None else finite & rows[:, None]
    a = torch.where(keep, a, 0.0)
    out.sum_abs.add_(a.sum(0))
    out.sum_sq.add_((a * a).sum(0))
    out.active.add_((a > 0).sum(0))
    if a.shape[0]:
        torch.maximum(out.max_abs, a.amax(0), out=out.max_abs)
    bad = ~finite if rows is None else ~finite & rows[:, None]
    out.nonfinite.add_(bad.sum(0))
    out.tokens.add_(c.shape[0] if rows is None else rows.sum())
    if doc_weight is not None:
        out.doc_sum_abs.add_(doc_weight @ a)


def accumulate_backward(c: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None, out) -> None:
    cf, gf = c.float(), g.float()
    keep = torch.isfinite(cf) & torch.isfinite(gf)
    if rows is not None:
        keep = keep & rows[:, None]
    out.grad_sum_abs.add_(torch.where(keep, gf.abs(), 0.0).sum(0))
    out.grad_sum_cg.add_(torch.where(keep, cf * gf, 0.0).sum(0))
    out.grad_tokens.add_(c.shape[0] if rows is None else rows.sum())
