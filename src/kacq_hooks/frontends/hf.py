"""Plain Hugging Face (or any torch) models: sites from the locator, each stack's mask from its own forward.

A stack's module is the one the locator names (:func:`kacq_hooks.locate.stack_specs`): the nearest
module above the stack's blocks whose forward takes its tokens, e.g. the base model of a causal LM, or
the encoder and the decoder of a seq2seq model (whose decoder is called with ``decoder_attention_mask``).
Arguments are read by the forward's signature, so positional and keyword calls read the same.
"""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from torch import nn

from ..locate import Site, StackSpec, find_sites, stack_specs
from . import Binding, StackBinding, StackInputs

_TOKENS = ("input_ids", "inputs_embeds")


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


def _cached_positions(bound: dict) -> int:
    cache = bound.get("past_key_values")
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else len(cache)
    except (TypeError, AttributeError):  # a legacy tuple cache of an unexpected shape: assume it holds tokens
        return 1


def _tokens(bound: dict):
    return next((bound[k] for k in _TOKENS if isinstance(bound.get(k), torch.Tensor)), None)


def _inputs(mask, shape, bound: dict) -> StackInputs:
    unusable = mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2)
    wider = (not unusable and isinstance(mask, torch.Tensor) and shape is not None and mask.shape[1] > shape[1])
    return StackInputs(mask=None if unusable else mask, shape=shape, mask_unusable=unusable, tokens=_tokens(bound),
                       continuation=_cached_positions(bound) > 0 or wider)


def read_call(module: nn.Module):
    """A reader of ``module``'s calls by its forward's signature: its ``attention_mask`` and token grid."""
    def read(args: tuple, kwargs: dict) -> StackInputs:
        bound = _arguments(module, args, kwargs)
        tokens = _tokens(bound)
        shape = (int(tokens.shape[0]), int(tokens.shape[1])) if tokens is not None and tokens.dim() >= 2 else None
        return _inputs(bound.get("attention_mask"), shape, bound)
    return read


def _read_spec(spec: StackSpec):
    def read(args: tuple, kwargs: dict) -> StackInputs:
        mask, shape = spec.read_inputs(args, kwargs)
        return _inputs(mask, shape, _arguments(spec.root, args, kwargs))
    return read


def find_stacks(model: nn.Module, sites: list[Site]) -> tuple[list[StackBinding], list[int]]:
    """One binding per stack the sites use, from the locator's stack specs (see the module notes)."""
    specs = stack_specs(model, sites)
    names = list(specs)
    stacks = [StackBinding(name=name, module=specs[name].root, read=_read_spec(specs[name]),
                           layout=specs[name].layout) for name in names]
    return stacks, [names.index(site.stack) for site in sites]


def bind(model: nn.Module, mlp_out: str | None = None, stacks=None) -> Binding:
    sites = find_sites(model, mlp_out, stacks=stacks)
    bindings, site_stack = find_stacks(model, sites)
    return Binding(root=model, sites=sites, stacks=bindings, site_stack=site_stack, read_root=read_call(model),
                   name="hf")
