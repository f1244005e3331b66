"""The specification of the coefficient reductions, in plain torch, driven by the table of :mod:`kacq_hooks.stats`.

Each statistic's arithmetic is declared once there (:meth:`kacq_hooks.stats.Statistic.term`); this
module applies every statistic of a phase to one block, densely, to a slice of slots, or scattered to
the slots of routed experts. Sync-free (no ``.item()``, no data-dependent shapes) and device-agnostic:
this is what the fused kernels must match, and the path used on GPUs without Triton and under
``torch.compile``.

Shapes: ``c`` and ``g`` are [N, d_ff] (any float dtype, any strides); ``rows`` is a bool [N] of
valid (unpadded) rows or None; ``doc_weight`` is a fp32 [N] holding 1/len(document) on each valid
row, or None when document weighting is off. Results are added into the fp32/int64 buffers of
``out`` (a :class:`kacq_hooks.stats.LayerStats`).
"""
from __future__ import annotations

import torch

from .. import stats as S


def accumulate_forward(c: torch.Tensor, rows: torch.Tensor | None, doc_weight: torch.Tensor | None, out) -> None:
    block = S.coefficients(c, rows, doc_weight)
    for stat in S.FORWARD:
        stat.update(getattr(out, stat.name), block)


def accumulate_backward(c: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None, out) -> None:
    block = S.gradients(c, g, rows)
    for stat in S.BACKWARD:
        stat.update(getattr(out, stat.name), block)


def accumulate_experts(c: torch.Tensor, expert_ids: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
                       doc_weight: torch.Tensor | None, out, experts: int) -> None:
    """Routed rows of a mixture-of-experts layer into the first ``experts * m`` slots of ``out``.

    ``c`` [n, m] holds C of row r's expert ``expert_ids[r]``, ``weight`` [n] its routing weight (the
    effective coefficient is ``weight * c``), ``keep`` [n] bool whether the row's token is valid, and
    ``doc_weight`` [n] its document weight or None. Token counts are the caller's: a layer's tokens are
    counted once per forward, not once per routed pair.
    """
    m = c.shape[1]
    block = S.routed_coefficients(c, weight, keep, doc_weight)
    ids = expert_ids.to(device=c.device, dtype=torch.long)
    for stat in S.ROUTED:
        stat.scatter(getattr(out, stat.name)[: experts * m].view(experts, m), ids, block)


def accumulate_experts_backward(c: torch.Tensor, g: torch.Tensor, expert_ids: torch.Tensor, keep: torch.Tensor,
                                out, experts: int) -> None:
    """dL/dC of routed rows (see :func:`accumulate_experts`) into the first ``experts * m`` slots."""
    m = c.shape[1]
    block = S.gradients(c, g, keep)
    ids = expert_ids.to(device=c.device, dtype=torch.long)
    for stat in S.SLOT_BACKWARD:
        stat.scatter(getattr(out, stat.name)[: experts * m].view(experts, m), ids, block)


def accumulate_slice(c: torch.Tensor, rows: torch.Tensor | None, scale: torch.Tensor | None,
                     doc_weight: torch.Tensor | None, out, start: int) -> None:
    """A dense block of slots (a shared expert) into ``out[start:start + m]``: |scale * C| per slot.

    Token counts are the caller's, as for routed experts.
    """
    block = S.coefficients(c, rows, doc_weight, scale)
    part = slice(start, start + c.shape[1])
    for stat in S.SLOT_FORWARD:
        stat.update(getattr(out, stat.name)[part], block)


def accumulate_slice_backward(c: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None, out, start: int) -> None:
    block = S.gradients(c, g, rows)
    part = slice(start, start + c.shape[1])
    for stat in S.SLOT_BACKWARD:
        stat.update(getattr(out, stat.name)[part], block)
