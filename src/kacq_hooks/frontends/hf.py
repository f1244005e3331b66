"""Plain Hugging Face (or any torch) models: sites from the locator, each stack's mask from its own forward.

A stack's module is the one the locator names (:func:`kacq_hooks.locate.stack_specs`): the nearest
module above the stack's blocks whose forward takes its tokens, e.g. the base model of a causal LM, or
the encoder and the decoder of a seq2seq model (whose decoder is called with ``decoder_attention_mask``).
Arguments are read by the forward's signature, so positional and keyword calls read the same.
"""
from __future__ import annotations

from torch import nn

from ..locate import Site, StackSpec, find_sites, stack_specs
from .binding import Binding
from .stacks import Arguments, StackReader, _parameters

# Mask arguments whose convention (1 for tokens, or 1 for padding as torch's key_padding_mask) cannot be told:
# a call that passes one, with no attention_mask, is refused rather than counting its padding.
_UNREAD_MASKS = ("padding_mask", "key_padding_mask", "src_key_padding_mask")


def root_reader(module: nn.Module) -> StackReader:
    """A reader of ``module``'s calls: its ``attention_mask`` and the grid of its token ids or embeddings."""
    return StackReader(name="root", module=module)


def _reader(spec: StackSpec) -> StackReader:
    params = _parameters(type(spec.root), "forward")
    unread = () if spec.mask_name else tuple(name for name in _UNREAD_MASKS if name in params)
    names = Arguments(mask=spec.mask_name, inverted_mask=spec.inverted_mask_name,
                      grid=spec.ids_names, refuse=spec.refuse_kwargs, unread_masks=unread)
    return StackReader(name=spec.name, module=spec.root, arguments=names, layout=spec.layout)


def find_stacks(model: nn.Module, sites: list[Site]) -> tuple[list[StackReader], list[int]]:
    """One reader per stack the sites use, from the locator's stack specs (see the module notes)."""
    specs = stack_specs(model, sites)
    names = list(specs)
    return [_reader(specs[name]) for name in names], [names.index(site.stack) for site in sites]


def bind(model: nn.Module, mlp_out: str | None = None, stacks=None) -> Binding:
    sites = find_sites(model, mlp_out, stacks=stacks)
    readers, site_stack = find_stacks(model, sites)
    return Binding(root=model, sites=sites, stacks=readers, site_stack=site_stack, root_reader=root_reader(model),
                   name="hf")
