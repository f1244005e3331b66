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


def accumulate_experts(c: torch.Tensor, expert_ids: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
                       doc_weight: torch.Tensor | None, out, experts: int) -> None:
    """Routed rows of a mixture-of-experts layer into the first ``experts * m`` slots of ``out``.

    ``c`` [n, m] holds C of row r's expert ``expert_ids[r]``, ``weight`` [n] its routing weight (the
    effective coefficient is ``weight * c``), ``keep`` [n] bool whether the row's token is valid, and
    ``doc_weight`` [n] its document weight or None. Token counts are the caller's: a layer's tokens are
    counted once per forward, not once per routed pair.
    """
    m = c.shape[1]
    a = c.abs().float()
    finite = torch.isfinite(a)
    ok = finite & keep[:, None]
    raw = torch.where(ok, a, 0.0)
    eff = raw * weight.detach().abs().float()[:, None]
    ids = expert_ids.to(device=c.device, dtype=torch.long)
    view = lambda buf: buf[: experts * m].view(experts, m)  # noqa: E731
    view(out.sum_abs).index_add_(0, ids, eff)
    view(out.sum_sq).index_add_(0, ids, eff * eff)
    view(out.active).index_add_(0, ids, (eff > 0).long())
    view(out.max_abs).scatter_reduce_(0, ids[:, None].expand(-1, m), eff, "amax", include_self=True)
    view(out.nonfinite).index_add_(0, ids, (~finite & keep[:, None]).long())
    routed = keep & (weight != 0)  # input-scaled layouts pass every pair, with weight 0 where not routed
    view(out.routed_sum_abs).index_add_(0, ids, torch.where(routed[:, None], raw, 0.0))
    view(out.routed_tokens).index_add_(0, ids, routed.long()[:, None].expand(-1, m))
    if doc_weight is not None:
        view(out.doc_sum_abs).index_add_(0, ids, eff * doc_weight[:, None])


def accumulate_experts_backward(c: torch.Tensor, g: torch.Tensor, expert_ids: torch.Tensor, keep: torch.Tensor,
                                out, experts: int) -> None:
    """dL/dC of routed rows (see :func:`accumulate_experts`) into the first ``experts * m`` slots."""
    m = c.shape[1]
    cf, gf = c.float(), g.float()
    ok = torch.isfinite(cf) & torch.isfinite(gf) & keep[:, None]
    ids = expert_ids.to(device=c.device, dtype=torch.long)
    out.grad_sum_abs[: experts * m].view(experts, m).index_add_(0, ids, torch.where(ok, gf.abs(), 0.0))
    out.grad_sum_cg[: experts * m].view(experts, m).index_add_(0, ids, torch.where(ok, cf * gf, 0.0))


def accumulate_slice(c: torch.Tensor, rows: torch.Tensor | None, scale: torch.Tensor | None,
                     doc_weight: torch.Tensor | None, out, start: int) -> None:
    """A dense block of slots (a shared expert) into ``out[start:start + m]``: |scale * C| per slot.

    Token counts are the caller's, as for routed experts.
    """
    m = c.shape[1]
    a = c.abs().float()
    finite = torch.isfinite(a)
    keep = finite if rows is None else finite & rows[:, None]
    a = torch.where(keep, a, 0.0)
    if scale is not None:
        a = a * scale.detach().abs().float().reshape(-1, 1)
    part = slice(start, start + m)
    out.sum_abs[part] += a.sum(0)
    out.sum_sq[part] += (a * a).sum(0)
    out.active[part] += (a > 0).sum(0)
    if a.shape[0]:
        torch.maximum(out.max_abs[part], a.amax(0), out=out.max_abs[part])
    out.nonfinite[part] += (~finite if rows is None else ~finite & rows[:, None]).sum(0)
    if doc_weight is not None:
        out.doc_sum_abs[part] += doc_weight @ a


def accumulate_slice_backward(c: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None, out, start: int) -> None:
    cf, gf = c.float(), g.float()
    keep = torch.isfinite(cf) & torch.isfinite(gf)
    if rows is not None:
        keep = keep & rows[:, None]
    part = slice(start, start + c.shape[1])
    out.grad_sum_abs[part] += torch.where(keep, gf.abs(), 0.0).sum(0)
    out.grad_sum_cg[part] += torch.where(keep, cf * gf, 0.0).sum(0)
