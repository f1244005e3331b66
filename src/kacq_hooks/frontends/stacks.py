"""What one call of a stack received, and which rows of its coefficients C are real tokens.

Every front end describes a stack by a :class:`StackReader`: the module whose forward receives the
stack's tokens, the names of the arguments that carry them (:class:`Arguments`) and the layout of C
at the stack's sites. The reader is the one place where a call's arguments become a
:class:`StackInputs` (its padding mask, read from a 2-D mask or from each token's own entry in a 4-D
one; its token grid; whether it continues a KV cache; where packed documents or a tower's images begin;
the labels that select counted tokens) and where those inputs become the rows of C that count and their
document weights; the capture only asks it.

A new kind of input (packed documents, another mask form, a token selection, a tower with its own
token grid) is a new argument name here and a new case in :meth:`StackReader.rows`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from ..errors import ConfigError, LocateError, ShapeError

_MISSING = object()


@dataclass
class StackInputs:
    """What one call of a stack (or of the root) was given."""

    mask: torch.Tensor | None = None          # a 2-D [batch, positions] padding mask, or None (all valid)
    shape: tuple[int, int] | None = None      # (batch, new positions) of the tokens of this call
    continuation: bool = False                # positions before this call's tokens sit in a KV cache
    mask_unusable: bool = False               # a mask was given but it is not 2-D (a 4-D or per-layer dict mask)
    tokens: object = None                     # the token ids (or embeddings) tensor of the call, to match stacks
    positions: torch.Tensor | None = None     # [batch, positions] position ids: a restart begins a packed document
    cu_seq_lens: torch.Tensor | None = None   # [documents + 1] cumulative lengths over the flattened tokens
    seq_idx: torch.Tensor | None = None       # [batch, positions] each token's packed document (a change begins one)
    labels: torch.Tensor | None = None        # [batch, positions] the call's labels (-100: not a loss target)
    shift_labels: torch.Tensor | None = None  # labels already shifted by the caller (label t scores position t)
    unread: tuple[str, ...] = ()              # mask arguments given that kacq_hooks cannot interpret
    mask_starts: torch.Tensor | None = None   # [batch, positions] documents a 4-D mask keeps apart (block-diagonal)


@dataclass(frozen=True)
class Arguments:
    """Which forward arguments of a stack's module carry what kacq_hooks reads."""

    mask: str | None = "attention_mask"                            # the 2-D padding mask (1 = token)
    inverted_mask: str | None = None                               # a mask with 1 for padding (XLNet's input_mask)
    grid: tuple[str, ...] = ("input_ids", "inputs_embeds")          # the first >= 2-D one gives (batch, positions)
    tokens: tuple[str, ...] = ("input_ids", "inputs_embeds")        # the call's tokens, to match a stack to its root
    cache: str | None = "past_key_values"                          # a KV cache: positions before this call's
    refuse: tuple[tuple[str, str], ...] = ()                       # arguments whose use is refused, and why
    positions: str | None = "position_ids"                         # position ids (packed rows restart them)
    cu_seq_lens: tuple[str, ...] = ("cu_seq_lens_q",)              # flash-attention packing: document boundaries
    seq_idx: str | None = "seq_idx"                                # Mamba-2 style packing: a document index per token
    labels: str | None = "labels"                                  # what a loss is computed on (the root's call)
    unread_masks: tuple[str, ...] = ()                             # masks of unknown convention: refused if given
    images: str | None = "grid_thw"                                # a tower's (frames, rows, columns) per image


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
            if bound.get(key) is not None:  # by keyword or by position
                raise LocateError(f"{self.name} stack: {key}= is not supported: {reason}")
        mask = bound.get(names.mask) if names.mask else None
        if mask is None and names.inverted_mask and bound.get(names.inverted_mask) is not None:
            mask = 1 - bound[names.inverted_mask]
        grid = next((value for value in (bound.get(n) for n in names.grid)
                     if isinstance(value, torch.Tensor) and value.dim() >= 2), None)
        if grid is not None and grid.dim() == 2 and grid.is_floating_point():
            shape = (1, int(grid.shape[0]))  # features of flat tokens [tokens, features] (a tower's patches)
        else:
            shape = None if grid is None else (int(grid.shape[0]), int(grid.shape[1]))
        tokens = next((bound[n] for n in names.tokens if isinstance(bound.get(n), torch.Tensor)), None)
        past = _cached_positions(bound.get(names.cache)) if names.cache else 0
        unusable, mask_starts = False, None
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            # a 4-D mask (static caches, custom attention) or one per layer type: its padding, if readable
            read = _read_attention(mask, past, shape)
            unusable = read is None
            mask, mask_starts = (None, None) if read is None else read
        wider = isinstance(mask, torch.Tensor) and shape is not None and mask.shape[1] > shape[1]
        positions = bound.get(names.positions) if names.positions else None
        labels = bound.get(names.labels) if names.labels else None
        shift_labels = bound.get("shift_labels") if names.labels else None
        seq_idx = bound.get(names.seq_idx) if names.seq_idx else None
        return StackInputs(mask=mask, shape=shape, mask_unusable=unusable, tokens=tokens,
                           continuation=past > 0 or wider,
                           positions=positions if isinstance(positions, torch.Tensor) and positions.dim() == 2 else None,
                           cu_seq_lens=_boundaries(bound, names),
                           seq_idx=seq_idx if isinstance(seq_idx, torch.Tensor) and seq_idx.dim() == 2 else None,
                           labels=labels if isinstance(labels, torch.Tensor) else None, mask_starts=mask_starts,
                           shift_labels=shift_labels if isinstance(shift_labels, torch.Tensor) else None,
                           unread=tuple(n for n in names.unread_masks if bound.get(n) is not None))

    def check(self, inputs: StackInputs, *, mask_padding: bool, weighting: str, root: StackInputs | None = None,
              count: str | None = None) -> None:
        """Refuse inputs whose tokens cannot be counted as asked, before any site runs."""
        if inputs.continuation and weighting == "document":
            raise ConfigError("document weighting needs each document whole in one forward, but this call continues "
                              "sequences from a KV cache (cached generation). Measure with use_cache=False, or use "
                              "instrument(model, weighting='token')")
        if inputs.unread and mask_padding:
            raise ShapeError(f"the {self.name} stack ({type(self.module).__name__}) was given "
                             f"{', '.join(inputs.unread)}=, a mask kacq_hooks cannot read (it takes attention_mask "
                             "with 1 for tokens and 0 for padding), so its padding would be counted as tokens. Pass "
                             "the padding as attention_mask=, or instrument(model, mask_padding=False) on batches "
                             "without padding")
        if count is not None:
            self._selection(inputs, root or StackInputs(), count)  # refuses a call without (fitting) labels
        if weighting == "document" and inputs.cu_seq_lens is not None:
            total = inputs.shape[0] * inputs.shape[1] if inputs.shape is not None else None
            cu = inputs.cu_seq_lens
            if cu.dim() != 1 or cu.numel() < 2 or (total is not None and int(cu[-1]) != total):
                raise ShapeError(f"cu_seq_lens of shape {tuple(cu.shape)} do not describe the "
                                 f"{total if total is not None else 'unknown number of'} tokens of this call of the "
                                 f"{self.name} stack: they must be the cumulative document lengths [0, l1, l1 + l2, "
                                 "..., batch * positions] over the flattened tokens")
        mask = inputs.mask
        if mask is None or not mask_padding:
            return
        if inputs.shape is not None and (mask.shape[0] != inputs.shape[0] or mask.shape[1] < inputs.shape[1]):
            raise ShapeError(f"attention_mask of shape {tuple(mask.shape)} does not fit inputs of shape "
                             f"{inputs.shape} (expected [{inputs.shape[0]}, >= {inputs.shape[1]}]) in the "
                             f"{self.name} stack")

    # -- which rows of C count
    def rows(self, inputs: StackInputs, root: StackInputs, c: torch.Tensor, *, mask_padding: bool, weighting: str,
             count: str | None = None):
        """(valid rows [N] bool or None, document weights [N] fp32 or None, documents or None) for C.

        ``inputs`` are the stack's own, ``root`` those of the call of the whole model it runs in. A row
        counts when it is not padding and, with ``count``, is selected by the call's labels. With
        document weighting a document is a batch row, cut further where the position ids restart, at
        ``cu_seq_lens`` boundaries, where ``seq_idx`` changes, and where a mask carrying document ids (1, 2, 3, ...) changes id;
        each counted row weighs 1 / the counted rows of its document.
        """
        mask = self._mask(inputs, root) if mask_padding else None
        selection = self._selection(inputs, root, count) if count is not None else None
        valid = window = None
        if mask is not None or selection is not None or weighting == "document":
            batch, steps = self._grid(inputs, mask, c)
            if mask is not None:
                window = mask[:, mask.shape[1] - steps:].to(device=c.device)  # cached generation: the last positions
                valid = window != 0
            if selection is not None:
                selection = selection.to(device=c.device)
                valid = selection if valid is None else valid & selection
        seq_first = c.dim() == 3 and self.layout == "seq_first"
        rows = None if valid is None else (valid.t() if seq_first else valid).reshape(-1)
        if weighting != "document":
            return rows, None, None
        if valid is None:
            valid = torch.ones(batch, steps, dtype=torch.bool, device=c.device)
        if window is None and not mask_padding:  # documents are still told apart by a document-id mask
            window = self._document_ids(inputs, root, steps, c.device)
        starts = self._starts(inputs, window, batch, steps, c.device).reshape(-1)
        document = starts.long().cumsum(0) - 1  # each position's document, numbered over the flattened rows
        counted = valid.reshape(-1).float()
        sizes = torch.zeros(batch * steps, device=c.device).scatter_add_(0, document, counted)
        weight = (counted / sizes[document].clamp_min(1)).view(batch, steps)
        if seq_first:
            weight = weight.t()
        return rows, weight.reshape(-1), (sizes > 0).sum()

    def _starts(self, inputs: StackInputs, window, batch: int, steps: int, device) -> torch.Tensor:
        """[batch, steps] bool: where a document begins (each row's first position, and see :meth:`rows`)."""
        starts = torch.zeros(batch, steps, dtype=torch.bool, device=device)
        starts[:, 0] = True
        positions = inputs.positions
        if positions is not None and positions.shape[-1] == steps and positions.shape[0] in (1, batch):
            positions = positions.to(device).expand(batch, steps)
            # packed rows restart their position ids at 0 (the positions of padding only repeat or step back)
            starts[:, 1:] |= (positions[:, 1:] == 0) | (positions[:, 1:] < positions[:, :-1])
        seq_idx = inputs.seq_idx
        if seq_idx is not None and seq_idx.shape[-1] == steps and seq_idx.shape[0] in (1, batch):
            seq_idx = seq_idx.to(device).expand(batch, steps)
            starts[:, 1:] |= seq_idx[:, 1:] != seq_idx[:, :-1]
        if inputs.cu_seq_lens is not None:  # checked to end at batch * steps
            flat = starts.view(-1)
            flat.index_fill_(0, inputs.cu_seq_lens[:-1].to(device=device, dtype=torch.long).clamp(0, flat.numel() - 1),
                             True)
        if inputs.mask_starts is not None and tuple(inputs.mask_starts.shape) == (batch, steps):
            starts |= inputs.mask_starts.to(device)
        if window is not None:  # a mask with document ids: a new id after the last token's begins a document
            token = window != 0
            where = torch.arange(steps, device=device).expand(batch, steps)
            last = torch.where(token, where, torch.full_like(where, -1)).cummax(1).values
            before = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], 1)
            previous = window.gather(1, before.clamp_min(0))
            starts |= token & (before >= 0) & (window != previous)
        return starts

    def _document_ids(self, inputs: StackInputs, root: StackInputs, steps: int, device):
        """The call's 2-D mask, where one is readable, to tell documents apart when padding is counted."""
        try:
            mask = self._mask(inputs, root)
        except ShapeError:
            return None
        return None if mask is None else mask[:, mask.shape[1] - steps:].to(device=device)

    def _selection(self, inputs: StackInputs, root: StackInputs, count: str) -> torch.Tensor:
        """[batch, steps] bool: the positions ``count`` selects from the call's labels (see ``instrument``)."""
        labels = root.shift_labels if count == "shifted_labels" and root.shift_labels is not None else root.labels
        if labels is None:
            raise ShapeError(f"instrument(count={count!r}) counts positions by the call's labels, but this call of the "
                             "model was given none: pass labels= to the model (as Trainer does), or instrument it "
                             "without count=")
        shape = inputs.shape or root.shape
        if labels.dim() != 2 or (shape is not None and tuple(labels.shape) != shape):
            raise ShapeError(f"labels of shape {tuple(labels.shape)} do not fit the {shape} tokens of this call of the "
                             f"{self.name} stack: count={count!r} needs one label per position")
        selected = labels != -100
        if count == "shifted_labels" and labels is root.labels:
            # a causal-LM loss scores position t's prediction against label t + 1; the last position scores nothing
            selected = torch.cat([selected[:, 1:], torch.zeros_like(selected[:, :1])], 1)
        return selected

    def _mask(self, inputs: StackInputs, root: StackInputs) -> torch.Tensor | None:
        outer = root.mask
        if (inputs.mask is None and not inputs.mask_unusable and isinstance(outer, torch.Tensor)
                and inputs.tokens is not None and inputs.tokens is root.tokens):
            # the stack runs on the call's own tokens but was not handed its mask (a model that ignores the
            # mask, as RWKV and FNet do): those positions are still padding the caller marked
            return outer
        if inputs.mask_unusable:  # an unreadable 4-D or per-layer mask: the call's own 2-D padding mask, if it fits
            if isinstance(outer, torch.Tensor) and outer.dim() == 2 and (inputs.shape is None
                                                                          or outer.shape[0] == inputs.shape[0]):
                return outer
            raise ShapeError(f"the {self.name} stack was given an attention mask that is not a 2-D padding mask and "
                             "cannot be read as one (a 4-D mask needs one query row per token of the call, each "
                             "attending to itself unless it is padding), and the call has no 2-D mask to use instead; "
                             "pass attention_mask [batch, seq] to the model, or instrument(model, mask_padding=False)")
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


def _boundaries(bound: dict, names: Arguments) -> torch.Tensor | None:
    """Cumulative document lengths: flash-attention ``cu_seq_lens``, or one document per image of a tower."""
    cu = next((bound[n] for n in names.cu_seq_lens if isinstance(bound.get(n), torch.Tensor)), None)
    grid = bound.get(names.images) if names.images else None
    if cu is None and isinstance(grid, torch.Tensor) and grid.dim() == 2:
        sizes = grid.prod(-1).cumsum(0)  # an image's patches, all its frames: t * h * w
        cu = torch.cat([sizes.new_zeros(1), sizes])
    return cu


def _read_attention(mask, past: int, shape) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(padding [batch, queries], document starts [batch, queries]) read from a 4-D attention mask (or a
    dict of them), or None where it cannot be read.

    Every token attends to itself unless it is padding (causal, sliding-window and bidirectional masks
    alike). Query ``i`` of a call sits at key ``past + i``, or, where the keys are fewer (a sliding
    window's rolling cache keeps its last keys), at ``keys - queries + i``. A token that does not see the
    key just before its own begins a document (a block-diagonal mask of packed documents or images). A
    bool mask is True where attended; a float mask is additive (0 attended, negative masked) when it holds
    a negative value, else multiplicative (1 attended).
    """
    if isinstance(mask, dict):  # one mask per layer type (Gemma 3: full and sliding): the diagonal is shared
        masks = [mask.get("full_attention")] + list(mask.values())
        mask = next((m for m in masks if isinstance(m, torch.Tensor) and m.dim() == 4), None)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    queries, keys = int(mask.shape[-2]), int(mask.shape[-1])
    if queries > keys or (shape is not None and (queries != shape[1] or mask.shape[0] not in (1, shape[0]))):
        return None
    query = torch.arange(queries, device=mask.device)
    key = (past if past + queries <= keys else keys - queries) + query
    own, before = mask[:, 0, query, key], mask[:, 0, query, (key - 1).clamp_min(0)]
    if mask.dtype == torch.bool:
        seen_own, seen_before = own, before
    elif mask.is_floating_point():
        low, high = mask.amin(), mask.amax()
        seen_own, seen_before = (torch.where(low < 0, v > low / 2, (v > 0) | (high == 0)) for v in (own, before))
    else:
        seen_own, seen_before = own != 0, before != 0
    starts = seen_own & ~seen_before
    starts[:, 0] = True
    if shape is not None and own.shape[0] != shape[0]:
        seen_own, starts = seen_own.expand(shape[0], queries), starts.expand(shape[0], queries)
    return seen_own.long(), starts
