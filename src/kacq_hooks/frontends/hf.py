"""Plain Hugging Face (or any torch) models: sites from the locator, the mask from ``forward``'s arguments."""
from __future__ import annotations

import torch
from torch import nn

from ..locate import find_sites
from . import Binding


def call_inputs(args: tuple, kwargs: dict):
    """(attention_mask, (batch, seq)) of a ``forward(input_ids, attention_mask, ...)`` call."""
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if ids is None and isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
        ids = kwargs["inputs_embeds"][..., 0]
    shape = tuple(ids.shape[:2]) if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else None
    return mask, shape


def bind(model: nn.Module, mlp_out: str | None = None) -> Binding:
    return Binding(root=model, sites=find_sites(model, mlp_out), call_inputs=call_inputs, name="hf")
