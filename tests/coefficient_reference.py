"""An independent float64 reference for what a stack received: C captured by plain hooks, counted by hand.

Nothing here imports kacq_hooks: the positions that count and the documents they belong to are given
explicitly by each test, so the reference does not share the library's reading of masks or labels.
"""
from __future__ import annotations

import torch


def capture(model, paths, run) -> dict[str, list[torch.Tensor]]:
    """Per module path, the float64 input of that module in each call during ``run()``, flattened to [rows, d]."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    handles = [modules[p].register_forward_pre_hook(
        lambda m, a, p=p: seen[p].append(a[0].detach().double().reshape(-1, a[0].shape[-1]).clone())) for p in paths]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


def token_mean(cs, counted) -> torch.Tensor:
    """Mean |C| over the counted rows of every call: ``counted`` holds one [rows] bool per call."""
    total = sum(c.abs()[keep].sum(0) for c, keep in zip(cs, counted))
    return total / sum(int(keep.sum()) for keep in counted)


def document_mean(cs, documents) -> torch.Tensor:
    """Mean over documents of each document's mean |C|: ``documents`` holds, per call, row-index lists."""
    means = [c.abs()[torch.as_tensor(rows)].mean(0) for c, docs in zip(cs, documents) for rows in docs if len(rows)]
    return torch.stack(means).mean(0)


def entropy(cbar: torch.Tensor) -> float:
    p = cbar.detach() / cbar.detach().sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())
