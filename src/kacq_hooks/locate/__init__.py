"""Model discovery: the coefficient sites of a model, the FFN output projection of every layer, whose input is C.

A model is read as stacks: its outermost numbered block lists (a decoder, an encoder, a vision tower).
In each block of a wanted stack the FFN output projection is found three ways, in order:

1. a table keyed by ``config.model_type``;
2. name patterns shared by most families (so new dense models need no code here);
3. a shape check: the one projection per block from d_ff down to the stack width outside attention.

Nothing inside attention or a sequence mixer (state-space ``mixer``/``mamba``, linear attention,
recurrences) is ever a site, so hybrids get sites on their FFN blocks only and a model without any
FFN (Mamba) is refused. Mixture-of-experts layers are found by :func:`find_moe_layers`.
:func:`stack_specs` tells, per stack, which module receives the stack's own tokens and mask.

Attention output projections share class and sometimes name with MLP ones (GPT-2's ``attn.c_proj``):
every way refuses a path that goes through an attention module. Wrapper prefixes added by DDP,
FSDP, ``torch.compile`` and activation checkpointing are seen through.

The package: :mod:`.families` (what is known by model type and name), :mod:`.paths` (module paths,
wrappers, projection shapes), :mod:`.stacks` (block lists and mixers), :mod:`.moe` (mixture-of-experts
layers), :mod:`.sites` (:func:`find_sites`) and :mod:`.roots` (stack roots and specs).
"""
from __future__ import annotations

from .families import FFN_OUT_PATTERNS, LAYOUT_BY_MODEL_TYPE, MLP_OUT_BY_MODEL_TYPE, REFUSED_MODEL_TYPES, REFUSED_STACKS
from .moe import MoeLayer, find_moe_layers
from .paths import clean_name, find_config, projection_shape, submodule_at
from .roots import StackSpec, _forward_params, find_stack_roots, stack_specs  # noqa: F401  (_forward_params)
from .sites import Site, find_sites
from .stacks import LANGUAGE_STACKS, Stack, find_stacks

__all__ = [
    "FFN_OUT_PATTERNS", "LANGUAGE_STACKS", "LAYOUT_BY_MODEL_TYPE", "MLP_OUT_BY_MODEL_TYPE",
    "REFUSED_MODEL_TYPES", "REFUSED_STACKS", "MoeLayer", "Site", "Stack", "StackSpec",
    "clean_name", "find_config", "find_moe_layers", "find_sites", "find_stack_roots", "find_stacks",
    "projection_shape", "stack_specs", "submodule_at",
]
