"""The float64 reference of counted-token entropy for the sweep's ``--count`` tests, and their checkpoints.

Each test file decides which tokens a record holds and which of them belong to the completion (its own,
independent reading of the record); this module selects the positions ``count`` measures, captures C on
each record alone (no padding) and averages |C| over them, per token or per record.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny_models import tiny_model

from coefficient_reference import capture

PATHS = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]


def counted_c_bar(model, examples, count: str, weighting: str = "token") -> tuple[list[torch.Tensor], int]:
    """(c̄ per layer in float64, counted positions) of ``examples``: per record its token ids and, per token,
    whether it holds the completion. "labels" counts those positions, "shifted_labels" the positions whose
    next token holds the completion (logits at t are scored against the token at t + 1)."""
    sums, tokens, means = [0.0 for _ in PATHS], 0, [[] for _ in PATHS]
    for ids, holds in examples:
        keep = holds if count == "labels" else [t + 1 < len(ids) and holds[t + 1] for t in range(len(ids))]
        keep = torch.tensor(keep, dtype=torch.bool)
        seen = capture(model, PATHS, lambda: model(torch.tensor([ids])))
        for layer, path in enumerate(PATHS):
            c = seen[path][0].abs()[keep]
            sums[layer] += c.sum(0)
            means[layer].append(c.mean(0))
        tokens += int(keep.sum())
    if weighting == "document":
        return [torch.stack(m).mean(0) for m in means], tokens
    return [s / tokens for s in sums], tokens


def save_checkpoint(folder: Path, tok, seed: int) -> Path:
    """A tiny Llama of ``seed`` and ``tok`` saved as a checkpoint folder."""
    tiny_model("llama", seed=seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def saved_c_bar(out, row: dict) -> list[torch.Tensor]:
    """c̄ per layer in float64 from the statistics file a sweep saved for ``row`` (``--save-stats``)."""
    stats = load_file(Path(out) / row["stats_file"])
    return [stats[f"{i}.sum_abs"].double() / int(stats[f"{i}.tokens"]) for i in range(row["layers"])]
