"""The routed-experts reduction of :func:`.reference.accumulate_experts` on the CPU, one fused pass per expert.

The reference scatters a dozen ``[n, m]`` temporaries into ``[E, m]`` with ``index_add_``, which
costs as much as the experts' own matmuls. Here the rows are grouped by expert (already so in
eager, one expert per call, and in grouped_mm, sorted by expert; batched_mm's token order is sorted
once), and each expert's block is reduced by one Inductor-generated loop (the same compile path as
:mod:`.cpu`), whose column sums are added to that expert's slots. The sums equal the reference's up
to the order of float additions. As in :mod:`.cpu`, NaN and Inf are not tested in the hot loop: a
non-finite column sum sends that block to the reference, which counts them.
"""
from __future__ import annotations

import torch

from . import cpu, reference


def _block_partials(c: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, doc_weight: torch.Tensor | None):
    raw = torch.where(keep[:, None], c.abs().float(), 0.0)
    eff = raw * weight.abs().float()[:, None]
    routed = keep & (weight != 0)
    doc = None if doc_weight is None else (eff * doc_weight[:, None]).sum(0)
    return (eff.sum(0), (eff * eff).sum(0), (eff > 0).sum(0), eff.amax(0),
            torch.where(routed[:, None], raw, 0.0).sum(0), routed.sum(), doc)


def accumulate_experts(c: torch.Tensor, expert_ids: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
                       doc_weight: torch.Tensor | None, out, experts: int) -> None:
    """Same contract as :func:`.reference.accumulate_experts`, for CPU tensors."""
    n, m = c.shape
    if n == 0:
        return
    ids = expert_ids.to(torch.long)
    weight = weight.detach()
    if n > 1 and not bool((ids[1:] >= ids[:-1]).all()):  # batched_mm: token order; group the rows once
        order = torch.argsort(ids, stable=True)
        ids, c, weight, keep = ids[order], c.index_select(0, order), weight[order], keep[order]
        doc_weight = None if doc_weight is None else doc_weight[order]
    counts = torch.bincount(ids, minlength=experts).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        block = slice(start, start + count)
        start += count
        args = (c[block], weight[block], keep[block], None if doc_weight is None else doc_weight[block])
        partials = cpu._run_compiled("experts", _block_partials, *args)
        if partials is None:  # no compiler here: the reference's scatter, on this block
            reference.accumulate_experts(args[0], ids[block], *args[1:], out, experts)
            continue
        sum_abs, sum_sq, active, max_abs, routed_abs, routed, doc = partials
        if not (bool(torch.isfinite(sum_sq).all()) and bool(torch.isfinite(routed_abs).all())):
            reference.accumulate_experts(args[0], ids[block], *args[1:], out, experts)
            continue
        slots = slice(expert * m, (expert + 1) * m)
        out.sum_abs[slots] += sum_abs
        out.sum_sq[slots] += sum_sq
        out.active[slots] += active
        torch.maximum(out.max_abs[slots], max_abs, out=out.max_abs[slots])
        out.routed_sum_abs[slots] += routed_abs
        out.routed_tokens[slots] += routed
        if doc is not None:
            out.doc_sum_abs[slots] += doc
