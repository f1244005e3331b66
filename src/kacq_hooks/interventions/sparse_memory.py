"""Sparse memory finetuning (Lin et al. 2025) on FFN memory slots: train only the slots new data uses far more.

Lin et al. finetune a memory-layer model on new facts but update only the t memory slots with the highest
TF-IDF of usage (the batch's use of a slot against pretraining data's, see :mod:`kacq_hooks.usage`),
chosen afresh for every batch; they report far less forgetting of held-out abilities than full
finetuning or LoRA for the same acquisition. Here the slots are FFN neurons: slot i of a layer is row i
of its up (and gate) projection, their biases' entry i, and column i of its output projection
(:func:`~kacq_hooks.interventions.slots.slot_parameters`; per expert for mixture-of-experts layers).

:func:`sparse_memory` returns a handle that, while active, makes every optimizer step change only the
chosen slots' entries of those parameters and, unless ``train_rest=True``, nothing else:

- the gradient of a slot parameter is masked to the chosen slots before it is accumulated (a tensor hook
  per backward, so gradient accumulation sums each micro-batch's own masked gradient);
- a parameter outside every slot gets no gradient at all (``grad`` is set to None after accumulation), so
  torch's optimizers skip it: no weight decay, no moment update;
- around every ``Optimizer.step`` (a global step hook: it works for any optimizer, a Trainer's
  included), the entries of slot parameters that no micro-batch of the step chose are written back to
  their values before the step, and so are the optimizer's per-entry state tensors (AdamW's moments).
  AdamW decays every entry it holds and moves moments that are not zero even where the gradient is 0:
  a masked gradient alone would not freeze them. Only a per-parameter scalar (AdamW's ``step``)
  advances for the whole parameter.

Slots are chosen per batch by default, from the C that the batch's own training forward computes (hooks
on that forward: no extra pass; forwards without gradient, such as evaluation, do not choose), or once
from ``new`` statistics, or given outright with ``slots=``. ``remove()`` takes every hook away: training
is then exactly as without the handle.
"""
from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from .._hooks import HookSet, OwnerHook
from ..errors import ArgumentTypeError, ConfigError, ShapeError, StateError
from ..locate import find_sites
from ..saving import load_stats
from ..usage import (METHODS, SlotUsage, slot_distribution, check_same_source, check_top, describe_source, slot_means,
                     slot_scores, tfidf, top_slots, torch_module)
from .slots import SlotSlice, slot_parameters

log = logging.getLogger(__name__)

# Active handles: a second one on the same model would write back the first one's slots after every step (and
# the first the second's), so only their intersection would train while each .slots names its own choice.
_ACTIVE: "weakref.WeakSet[SparseMemory]" = weakref.WeakSet()


class _BatchUsage(SlotUsage):
    """Usage of the latest training forward only: reset at the start of each one."""

    def __init__(self, owner: "SparseMemory", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._owner = owner

    def on_forward(self) -> None:
        self.reset()
        self._owner._stale = True


class SparseMemory:
    """An active sparse memory finetuning; see :func:`sparse_memory`. ``remove()`` ends it (also a context manager).

    ``slots``: the chosen slots per layer (ascending long tensors; per batch, the latest training
    forward's), None before the first training forward in per-batch mode. ``sites``: the layers, in order.
    """

    def __init__(self, model: nn.Module, sites, slices: list[list[SlotSlice]], *, top: int, method: str,
                 reference_p: list[torch.Tensor] | None, fixed: list[torch.Tensor] | None, train_rest: bool,
                 k: int | None):
        self.model = model
        self.sites = sites
        self.top = top
        self.method = method
        self.train_rest = train_rest
        self.per_batch = fixed is None
        self._reference_p = reference_p
        self._slots: list[torch.Tensor] | None = fixed
        self._slices = slices
        params: dict[int, nn.Parameter] = {}
        for site_slices in slices:
            for s in site_slices:
                params[id(s.parameter)] = s.parameter
        self._partial = params
        self._slot_names = {name: p for name, p in model.named_parameters() if id(p) in params}
        self._masks: dict[int, torch.Tensor] = {}
        self._chosen: dict[int, torch.Tensor] = {key: torch.zeros_like(p, dtype=torch.bool) for key, p in params.items()}
        self._frozen = {} if train_rest else {id(p): p for p in model.parameters()
                                              if p.requires_grad and id(p) not in params}
        self._saved: dict[int, tuple] = {}
        self._hooks = HookSet()
        self._stale = False
        self._usage = None
        if self.per_batch:
            self._usage = _BatchUsage(self, model, k=k, sites=sites, grad_only=True)
        else:
            self._build_masks()
        self.active = False

    # -- public

    @property
    def slots(self) -> list[torch.Tensor] | None:
        if self.per_batch and self._stale:
            self._select()
        return None if self._slots is None else [s.clone() for s in self._slots]

    @property
    def trainable(self) -> int:
        """How many parameter entries the current choice lets train (the rest of the model excluded)."""
        if self.per_batch and self._stale:
            self._select()
        return sum(int(m.sum()) for m in self._masks.values())

    def remove(self) -> None:
        """End sparse finetuning: every hook removed, training is as without the handle. A second call does nothing."""
        _ACTIVE.discard(self)
        self._hooks.remove()
        if self._usage is not None:
            self._usage.remove()
        self._saved.clear()
        self.active = False

    def __getstate__(self) -> dict:
        # a copy (copy.deepcopy, pickle) of the handle places no hooks, so it is a removed handle, not an active one
        state = dict(self.__dict__)
        state.update(active=False, _hooks=HookSet(), _usage=None, _saved={})
        return state

    def __enter__(self) -> "SparseMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        how = "per batch" if self.per_batch else "fixed"
        state = "active" if self.active else "removed"
        return (f"SparseMemory(top={self.top}, {how}, method={self.method!r}, train_rest={self.train_rest}, "
                f"layers={len(self.sites)}, {state})")

    # -- setup

    def _attach(self) -> None:
        try:
            for key, p in self._partial.items():
                self._hooks.grad(p, OwnerHook(self, "_mask_grad", key))
            for p in self._frozen.values():
                self._hooks.accumulated(p, OwnerHook(self, "_drop_grad"))
            self._hooks.optimizer_step(OwnerHook(self, "_before_step"), OwnerHook(self, "_after_step"))
            if self._usage is not None:
                self._usage.attach()
        except BaseException:  # no handle reaches the caller: leave no hook that it could not remove
            self.remove()
            raise
        self.active = True
        _ACTIVE.add(self)

    def _select(self) -> None:
        """Choose this batch's slots from the usage its training forward measured."""
        usage = self._usage
        values = usage.counts() if self.method == "count" else [s.clone() for s in usage._sum]
        chosen = []
        for p_ref, v in zip(self._reference_p, values):
            total = float(v.sum())
            if total <= 0:  # the layer saw no real token in this batch: nothing of it is used, nothing trains
                chosen.append(torch.zeros(0, dtype=torch.long))
                continue
            chosen.append(_used_top(tfidf(v / total, p_ref), self.top))
        self._slots = chosen
        self._stale = False
        self._build_masks()

    def _build_masks(self) -> None:
        masks = {key: torch.zeros_like(p, dtype=torch.bool) for key, p in self._partial.items()}
        for slots, site_slices in zip(self._slots, self._slices):
            for s in site_slices:
                s.mark(masks[id(s.parameter)], slots)
        self._masks = masks

    # -- hooks

    def _mask_grad(self, key: int, grad: torch.Tensor) -> torch.Tensor:
        if self.per_batch:
            if self._stale:
                self._select()
            if self._slots is None:
                raise StateError("sparse_memory chooses each batch's slots from its training forward, but this "
                                 "backward follows no forward with gradients enabled since sparse_memory() was called")
        mask = self._masks[key]
        held = self._partial[key].grad
        if held is None or not bool(held.any()):
            # the first backward since zero_grad (to None or to zeros): slots of a batch that was backpropagated
            # and then dropped (zero_grad without a step) hold no gradient any more and must not train now
            self._chosen[key].zero_()
        self._chosen[key] |= mask
        return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))

    def _drop_grad(self, param: torch.Tensor) -> None:
        param.grad = None

    def _held(self, optimizer) -> list[nn.Parameter]:
        return [p for group in optimizer.param_groups for p in group["params"]]

    def _before_step(self, optimizer, args, kwargs) -> None:
        saved = {}
        # this model's parameters now (one made trainable after the handle included); an optimizer of another
        # model (a copy of this one) steps untouched
        current = dict(self.model.named_parameters())
        held = self._held(optimizer)
        replaced = [name for name, p in self._slot_names.items() if current.get(name) is not p]
        if replaced and {id(p) for p in held} & ({id(p) for p in current.values()} | set(self._partial)):
            # the gradient hooks are on the old tensors: the new ones would train unmasked, or not at all
            raise StateError(f"{replaced[:3]} were replaced by new tensors after sparse_memory() (e.g. "
                             "load_state_dict(assign=True)), so its hooks no longer reach them: remove() the handle and "
                             "call sparse_memory on the model as it is now")
        mine = set() if self.train_rest else {id(p) for p in current.values()}
        for p in held:
            key = id(p)
            if key in self._frozen or (key in mine and key not in self._partial):
                # a stale gradient tensor (zero_grad(set_to_none=False)) would still decay it; a parameter that
                # only required a gradient after the handle was made is outside every slot all the same
                p.grad = None
            elif key in self._partial:
                state = optimizer.state.get(p, {})
                tensors = {name: t.detach().clone() for name, t in state.items()
                           if isinstance(t, torch.Tensor) and t.shape == p.shape}
                saved[key] = (p.detach().clone(), tensors)
        self._saved[id(optimizer)] = saved

    def _after_step(self, optimizer, args, kwargs) -> None:
        saved = self._saved.pop(id(optimizer), {})
        # a step inside another's (a wrapper such as ZeroRedundancyOptimizer runs its inner optimizer's step): the
        # chosen entries stay chosen until the outer step has written back too, else it would undo their update
        still_open = {key for other in self._saved.values() for key in other}
        with torch.no_grad():
            for key, (before, tensors) in saved.items():
                p = self._partial[key]
                keep = self._chosen[key]
                p.copy_(torch.where(keep, p, before))
                for name, t in optimizer.state.get(p, {}).items():
                    if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                        continue
                    old = tensors.get(name)  # state the step created starts at zero on the frozen entries
                    t.copy_(torch.where(keep, t, old if old is not None else torch.zeros_like(t)))
                if key not in still_open:
                    keep.zero_()


def _used_top(scores: torch.Tensor, top: int) -> torch.Tensor:
    """The top slots of one layer with a positive score: a slot the new data did not use (score 0) is never
    chosen by its tie order, which would let weight decay move slots that got no gradient (unrouted experts)."""
    chosen = top_slots([scores], top)[0]
    return chosen[scores[chosen] > 0]


def sparse_memory(model: nn.Module, new=None, reference=None, *, top: int, method: str = "tfidf",
                  slots: Sequence[torch.Tensor] | None = None, train_rest: bool = False, mlp_out: str | None = None,
                  weighting: str = "token") -> SparseMemory:
    """Train only ``top`` memory slots per layer (Lin et al.'s sparse memory finetuning); returns the handle.

    Args:
        new: statistics of the new data (an Instrumentation, saved statistics or their path, a SlotUsage):
            the slots are chosen once from them. None (default): chosen afresh for every batch from the C its
            training forward computes, as Lin et al. do.
        reference: statistics of the reference (pretraining-like) corpus, measured on this model.
        top: slots per layer that train (the t of Lin et al.; per MoE layer, over its E x m + shared slots);
            fewer where fewer have a positive score: a slot the new data (the batch) did not use is never chosen.
        method: "tfidf" (mean |C|) or "count" (top-k accesses: ``reference`` and ``new`` from
            ``kh.usage.measure_usage(model, k=...)``; per batch the same k is used). See :mod:`kacq_hooks.usage`.
        slots: the slots outright (one long tensor per layer); ``new`` and ``reference`` are then not used
            (e.g. :func:`kacq_hooks.usage.least_used_slots` for resuscitation's choice).
        train_rest: also train every parameter outside the FFN slot parameters (default: nothing else trains).

    Create it before the first backward of the finetuning. Works in a plain loop or a Trainer, with any
    torch optimizer (its ``step`` is watched through torch's global step hooks).

    >>> handle = sparse_memory(model, reference=ref_inst, top=64)   # doctest: +SKIP
    >>> ...; loss.backward(); optimizer.step()                       # doctest: +SKIP
    >>> handle.slots; handle.remove()                                # doctest: +SKIP
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, not {method!r}")
    if not isinstance(train_rest, bool):
        raise ArgumentTypeError(f"train_rest must be True or False, not {train_rest!r}")
    model = torch_module(model)  # an nnsight envoy: the module inside it trains
    if any(other.model is model for other in _ACTIVE):
        raise ConfigError("this model already has an active sparse_memory: remove() it before starting another "
                          "(two would each freeze the other's slots, so only their intersection would train)")
    sites = find_sites(model, mlp_out)
    widths = [s.d_ff for s in sites]
    check_top(top, widths)
    slices = [slot_parameters(model, site) for site in sites]  # refuses layouts it cannot split before any hook
    held = {id(p) for other in _ACTIVE for p in other._partial.values()}
    if any(id(s.parameter) in held for site_slices in slices for s in site_slices):
        raise ConfigError("these FFN parameters are already under an active sparse_memory (of a module that holds "
                          "them, such as a wrapper or the inner model): remove() it before starting another (two "
                          "would each freeze the other's slots, so only their intersection would train)")
    names = {id(p): name for name, p in model.named_parameters()}
    frozen = sorted({names.get(id(s.parameter), s.role) for site_slices in slices for s in site_slices
                     if not s.parameter.requires_grad})
    if frozen:  # torch refuses a gradient hook on them, and nothing of them could train
        raise ConfigError(f"sparse_memory trains the chosen slots of every FFN layer, but {frozen[:4]} do not require "
                          "gradients: unfreeze them (requires_grad_(True)) before sparse_memory()")
    k = None
    reference_p = None
    fixed = None
    if slots is not None:
        fixed = [torch.as_tensor(s, dtype=torch.long).flatten().unique() for s in slots]
        if len(fixed) != len(sites):
            raise ShapeError(f"slots= has {len(fixed)} layers, the model {len(sites)}")
        for i, (s, w) in enumerate(zip(fixed, widths)):
            if s.numel() and (int(s.min()) < 0 or int(s.max()) >= w):
                raise ShapeError(f"slots= layer {i}: indices must lie in 0..{w - 1}")
    else:
        if reference is None:
            raise ConfigError("sparse_memory needs reference= statistics (the corpus whose usage is discounted), "
                              "or slots= outright")
        if isinstance(reference, (str, os.PathLike)):
            reference = load_stats(reference)
        check_same_source(model, reference, "this model", "reference")
        if new is None and describe_source(reference).get("mask_padding") is False:
            raise ShapeError("the per-batch usage leaves padded positions out, the reference was measured with "
                             "mask_padding=False: their usage is not comparable. Measure the reference with "
                             "mask_padding=True")
        if method == "count":
            if not isinstance(reference, SlotUsage) or reference.k is None:
                raise ArgumentTypeError("method='count' needs reference= from kh.usage.measure_usage(model, k=...)")
            k = reference.k
            ref_values = reference.counts()
        else:
            ref_values = slot_means(reference, weighting)
        if [v.numel() for v in ref_values] != widths:
            raise ShapeError(f"the reference statistics have layers of {[v.numel() for v in ref_values]} slots, "
                             f"this model {widths}: measure the reference on this model")
        reference_p = slot_distribution(ref_values, "reference")
        if new is not None:
            fixed = [_used_top(s, top) for s in slot_scores(new, reference, method=method, weighting=weighting)]
    handle = SparseMemory(model, sites, slices, top=top, method=method, reference_p=reference_p, fixed=fixed,
                          train_rest=train_rest, k=k)
    handle._attach()
    log.info("%r", handle)
    return handle
