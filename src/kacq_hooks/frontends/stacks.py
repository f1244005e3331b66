"""What one call of a stack received, and which rows of its coefficients C are real tokens.

Every front end describes a stack by a :class:`StackReader`: the module whose forward receives the
stack's tokens, the names of the arguments that carry them (:class:`Arguments`) and the layout of C
at the stack's sites. The reader is the one place where a call's arguments become a
:class:`StackInputs` (its padding mask, its token grid, whether it continues a KV cache) and where
those inputs become the rows of C that count and their document weights; the capture only asks it.

A new kind of input (packed documents, another mask form, a token selection, a tower with its own
token grid) is a new argument name here and a new case in :meth:`StackReader.rows`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from ..errors import KacqError, LocateError, ShapeError

_MISSING = object()


@dataclass
class StackInputs:
    """What one call of a stack (or of the root) was given."""

    mask: torch.Tensor | None = None          # a 2-D [batch, positions] padding mask, or None (all valid)
    shape: tuple[int, int] | None = None      # (batch, new positions) of the tokens of this call
    continuation: bool = False                # positions before this call's tokens sit in a KV cache
    mask_unusable: bool = False               # a mask was given but it is not 2-D (a 4-D or per-layer dict mask)
    tokens: object = None                     # the token ids (or embeddings) tensor of the call, to match stacks


@dataclass(frozen=True)
class Arguments:
    """Which forward arguments of a stack's module carry what kacq_hooks reads."""

    mask: str | None = "attention_mask"                            # the 2-D padding mask (1 = token)
    inverted_mask: str | None = None                               # a mask with 1 for padding (XLNet's input_mask)
    grid: tuple[str, ...] = ("input_ids", "inputs_embeds")          # the first >= 2-D one gives (batch, positions)
    tokens: tuple[str, ...] = ("input_ids", "inputs_embeds")        # the call's tokens, to match a stack to its root
    cache: str | None = "past_key_values"                          # a KV cache: positions before this call's
    refuse: tuple[tuple[str, str], ...] = ()                       # arguments whose use is refused, and why


@lru_cache(maxsize=512)
def _parameters(forward_type: type, name: str) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(getattr(forward_type, name)).parameters)[1:]  # without self
    except (TypeError, ValueError):
        return ()


def bind_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """``module``'s forward arguments by name, positional and keyword alike."""
    bound = dict(zip(_parameters(type(module), "forward"), args))
    bound.update(kwargs)
    return bound


def _cached_positions(cache) -> int:
    if cache is None:
        return 0
    keys = getattr(cache, "past_keys", _MISSING)  # a TransformerLens cache entry
    if keys is not _MISSING:
        return 0 if keys is None else int(keys.shape[1])
    try:
        return int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else len(cache)
    except (TypeError, AttributeError):  # a legacy tuple cache of an unexpected shape: assume it holds tokens
        return 1


@dataclass
class StackReader:
    """One stack of a model: where its calls are read and how its C maps to their tokens (module notes)."""

    name: str
    module: nn.Module
    arguments: Arguments = Arguments()
    layout: str = "batch_first"              # C is [batch, seq, d], [seq, batch, d] ("seq_first") or flat

    # -- what a call received
    def read(self, args: tuple, kwargs: dict) -> StackInputs:
        """The inputs of one call of :attr:`module`, from a forward pre-hook's ``(args, kwargs)``."""
        names = self.arguments
        bound = bind_arguments(self.module, args, kwargs)
        for key, reason in names.refuse:
            if kwargs.get(key) is not None:
                raise LocateError(f"{self.name} stack: {key}= is not supported: {reason}")
        mask = bound.get(names.mask) if names.mask else None
        if mask is None and names.inverted_mask and bound.get(names.inverted_mask) is not None:
            mask = 1 - bound[names.inverted_mask]
        grid = next((value for value in (bound.get(n) for n in names.grid)
                     if isinstance(value, torch.Tensor) and value.dim() >= 2), None)
        shape = None if grid is None else (int(grid.shape[0]), int(grid.shape[1]))
        tokens = next((bound[n] for n in names.tokens if isinstance(bound.get(n), torch.Tensor)), None)
        unusable = mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2)
        wider = not unusable and isinstance(mask, torch.Tensor) and shape is not None and mask.shape[1] > shape[1]
        cached = _cached_positions(bound.get(names.cache)) > 0 if names.cache else False
        return StackInputs(mask=None if unusable else mask, shape=shape, mask_unusable=unusable, tokens=tokens,
                           continuation=cached or wider)

    def check(self, inputs: StackInputs, *, mask_padding: bool, weighting: str) -> None:
        """Refuse inputs whose tokens cannot be counted as asked, before any site runs."""
        if inputs.continuation and weighting == "document":
            raise KacqError("document weighting needs each document whole in one forward, but this call continues "
                            "sequences from a KV cache (cached generation). Measure with use_cache=False, or use "
                            "instrument(model, weighting='token')")
        mask = inputs.mask
        if mask is None or not mask_padding:
            return
        if inputs.shape is not None and (mask.shape[0] != inputs.shape[0] or mask.shape[1] < inputs.shape[1]):
            raise ShapeError(f"attention_mask of shape {tuple(mask.shape)} does not fit inputs of shape "
                             f"{inputs.shape} (expected [{inputs.shape[0]}, >= {inputs.shape[1]}]) in the "
                             f"{self.name} stack")

    # -- which rows of C count
    def rows(self, inputs: StackInputs, root: StackInputs, c: torch.Tensor, *, mask_padding: bool, weighting: str):
        """(valid rows [N] bool or None, document weights [N] fp32 or None, documents or None) for C.

        ``inputs`` are the stack's own, ``root`` those of the call of the whole model it runs in.
        """
        mask = self._mask(inputs, root) if mask_padding else None
        rows = window = None
        if mask is not None or weighting == "document":
            batch, steps = self._grid(inputs, mask, c)
            if mask is not None:
                window = mask[:, mask.shape[1] - steps:].to(device=c.device)  # cached generation: the last positions
                if c.dim() == 3 and self.layout == "seq_first":
                    rows = window.t().reshape(-1).bool()
                else:
                    rows = window.reshape(-1).bool()
        if weighting != "document":
            return rows, None, None
        window = torch.ones(batch, steps, device=c.device) if window is None else window.float()
        lengths = window.sum(1, keepdim=True)  # a document is a batch row; its weight is 1 / its token count
        weight = window / lengths.clamp_min(1)
        if c.dim() == 3 and self.layout == "seq_first":
            weight = weight.t()
        return rows, weight.reshape(-1), (lengths > 0).sum()

    def _mask(self, inputs: StackInputs, root: StackInputs) -> torch.Tensor | None:
        outer = root.mask
        if (inputs.mask is None and not inputs.mask_unusable and isinstance(outer, torch.Tensor)
                and inputs.tokens is not None and inputs.tokens is root.tokens):
            # the stack runs on the call's own tokens but was not handed its mask (a model that ignores the
            # mask, as RWKV and FNet do): those positions are still padding the caller marked
            return outer
        if inputs.mask_unusable:  # a 4-D or per-layer mask: the call's own 2-D padding mask, if it fits
            if isinstance(outer, torch.Tensor) and outer.dim() == 2 and (inputs.shape is None
                                                                          or outer.shape[0] == inputs.shape[0]):
                return outer
            raise ShapeError(f"the {self.name} stack was given an attention mask that is not a 2-D padding mask, and "
                             "the call has no 2-D mask to use instead; pass attention_mask [batch, seq] to the model, "
                             "or instrument(model, mask_padding=False)")
        return inputs.mask

    def _grid(self, inputs: StackInputs, mask, c: torch.Tensor) -> tuple[int, int]:
        """(batch, positions) of C, checked against the stack's inputs so that no layout passes transposed."""
        shape = inputs.shape
        if shape is None and mask is not None:
            shape = (int(mask.shape[0]), int(mask.shape[1]))
        where = f"{self.name} stack"
        if shape is None:
            raise ShapeError(f"kacq_hooks cannot tell the batch layout of coefficients {tuple(c.shape)} in the {where}: "
                             "the call passed neither token ids nor a mask it could read")
        batch, seq = shape
        if c.dim() == 3:
            lead = (int(c.shape[1]), int(c.shape[0])) if self.layout == "seq_first" else (int(c.shape[0]),
                                                                                             int(c.shape[1]))
            if lead != (batch, seq):
                raise ShapeError(f"coefficients of shape {tuple(c.shape)} ({self.layout}) do not cover the "
                                 f"{batch} x {seq} tokens of this call of the {where}: the model adds or drops "
                                 "positions inside (prompt or n-gram streams), so kacq_hooks cannot match them to the "
                                 "padding mask. Use instrument(model, mask_padding=False) on unpadded batches")
            return batch, seq
        if c.dim() == 2 and c.shape[0] == batch * seq:  # OPT flattens to (batch * seq, d_ff)
            return batch, seq
        raise ShapeError(f"coefficients of shape {tuple(c.shape)} cannot be split into the {batch} x {seq} tokens of "
                         f"this call of the {where}; pass instrument(..., mask_padding=False) to count every position")
