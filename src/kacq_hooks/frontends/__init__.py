"""Front ends: how each kind of model object exposes its coefficient sites and its attention mask.

A front end turns a model into a :class:`Binding`; :class:`kacq_hooks.Instrumentation` does the rest
the same way for all of them, so the statistics agree across front ends by construction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..locate import Site


@dataclass
class Binding:
    """What an Instrumentation needs from a model.

    ``root`` gets a forward pre-hook (with kwargs) at every call; ``call_inputs(args, kwargs)`` returns
    that call's (attention_mask or None, (batch, seq) or None). Each site's ``module`` gets a forward
    pre-hook whose first positional input is the coefficient tensor C.
    """

    root: nn.Module
    sites: list[Site]
    call_inputs: Callable[[tuple, dict], tuple[torch.Tensor | None, tuple[int, int] | None]]
    name: str = "hf"


def bind(model, mlp_out: str | None = None) -> Binding:
    """Pick the front end for ``model`` without importing optional packages unless the model is theirs."""
    module = type(model).__module__ or ""
    if module.startswith("transformer_lens"):
        from . import transformer_lens

        return transformer_lens.bind(model, mlp_out)
    if module.startswith("nnsight"):
        from . import nnsight

        return nnsight.bind(model, mlp_out)
    from . import hf

    return hf.bind(model, mlp_out)
