"""The routed-experts reduction of :func:`.reference.accumulate_experts` on the CPU, one fused pass per expert.

The reference scatters a dozen ``[n, m]`` temporaries into ``[E, m]`` with ``index_add_``, which
costs as much as the experts' own matmuls. Here the rows are grouped by expert (already so in
eager, one expert per call, and in grouped_mm, sorted by expert; batched_mm's token order is sorted
once), and each expert's block is reduced by one Inductor-generated loop (the same compile path as
:mod:`.cpu`) into named per-slot partials, one per statistic of :data:`kacq_hooks.stats.ROUTED`, which
are folded into that expert's slots. The sums equal the reference's up to the order of float additions.
NaN and Inf are counted in the same loop, exactly as the reference counts them.
"""
from __future__ import annotations

import torch

from .. import stats as S
from . import cpu, reference


def _block_partials(c: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
                    doc_weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per statistic (by name), one expert block's partial result per slot; absent where it adds nothing."""
    block = S.routed_coefficients(c, weight, keep, doc_weight)
    partials = {}
    for stat in S.ROUTED:
        partial = stat.column(block)
        if partial is not None:
            partials[stat.name] = partial
    return partials


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
        slots = slice(expert * m, (expert + 1) * m)
        for name, partial in partials.items():
            S.BY_NAME[name].fold(getattr(out, name)[slots], partial)
