"""Plain Hugging Face (or any torch) models: sites from the locator, each stack's mask from its own forward.

A stack's module is the nearest module above its sites whose forward takes the stack's tokens
(``input_ids`` or ``inputs_embeds``) and ``attention_mask``: the base model of a causal LM, the encoder
and the decoder of a seq2seq model (whose decoder is called with ``decoder_attention_mask``). Arguments
are read by the forward's signature, so positional and keyword calls read the same.
"""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from torch import nn

from ..locate import Site, clean_name, find_config, find_sites
from . import Binding, StackBinding, StackInputs

_TOKENS = ("input_ids", "inputs_embeds")
_SEQ_FIRST_MODEL_TYPES = {"xlnet"}  # hidden states are [seq, batch, d]


@lru_cache(maxsize=512)
def _parameters(forward_type: type, name: str) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(getattr(forward_type, name)).parameters)[1:]  # without self
    except (TypeError, ValueError):
        return ()


def _forward_parameters(module: nn.Module) -> tuple[str, ...]:
    return _parameters(type(module), "forward")


def _arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    names = _forward_parameters(module)
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _read(module: nn.Module, args: tuple, kwargs: dict, mask_key: str = "attention_mask") -> StackInputs:
    bound = _arguments(module, args, kwargs)
    mask = bound.get(mask_key)
    unusable = mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2)
    tokens = next((bound[k] for k in _TOKENS if isinstance(bound.get(k), torch.Tensor)), None)
    shape = None
    if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2:
        shape = (int(tokens.shape[0]), int(tokens.shape[1]))
    cache = bound.get("past_key_values")
    cached = 0
    if cache is not None:
        try:
            cached = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else len(cache)
        except (TypeError, AttributeError):  # a legacy tuple cache of an unexpected shape: assume it holds tokens
            cached = 1
    continuation = cached > 0 or bool(isinstance(mask, torch.Tensor) and mask.dim() == 2 and shape is not None
                                      and mask.shape[1] > shape[1])
    return StackInputs(mask=None if unusable else mask, shape=shape, continuation=continuation, mask_unusable=unusable)


def read_call(module: nn.Module):
    """A reader of ``module``'s calls: (mask, shape, continuation) from its forward's arguments."""
    return lambda args, kwargs: _read(module, args, kwargs)


def _takes_tokens_and_mask(module: nn.Module) -> bool:
    names = _forward_parameters(module)
    return "attention_mask" in names and any(k in names for k in _TOKENS)


def find_stacks(model: nn.Module, sites: list[Site]) -> tuple[list[StackBinding], list[int]]:
    """Group ``sites`` by the module that receives their stack's tokens and mask (see the module notes)."""
    modules = {clean_name(n, model): m for n, m in model.named_modules()}
    config = find_config(model)
    layout = "seq_first" if getattr(config, "model_type", None) in _SEQ_FIRST_MODEL_TYPES else "batch_first"
    stacks: list[StackBinding] = []
    index_of: dict[int, int] = {}
    site_stack = []
    for site in sites:
        parts = site.path.split(".")
        owner = model
        for depth in range(len(parts) - 1, -1, -1):
            candidate = modules.get(".".join(parts[:depth]))
            if candidate is not None and _takes_tokens_and_mask(candidate):
                owner = candidate
                break
        if id(owner) not in index_of:
            index_of[id(owner)] = len(stacks)
            stacks.append(StackBinding(name=site.stack, module=owner, read=read_call(owner), layout=layout))
        site_stack.append(index_of[id(owner)])
    return stacks, site_stack


def bind(model: nn.Module, mlp_out: str | None = None) -> Binding:
    sites = find_sites(model, mlp_out)
    stacks, site_stack = find_stacks(model, sites)
    return Binding(root=model, sites=sites, stacks=stacks, site_stack=site_stack, read_root=read_call(model), name="hf")
