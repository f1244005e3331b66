"""The call transaction: which forward of the model is running, and whether its statistics count.

One forward of the model is a :class:`Call`. Its root's forward pre-hook opens it, each stack's
pre-hook records what that stack received (read by the stack's
:class:`~kacq_hooks.frontends.stacks.StackReader`), and the closer's forward hook ends it. The
capture (:mod:`kacq_hooks.capture`) stages the call's statistics in :attr:`Calls.pending`; the call
commits them into the instrumentation's statistics only when it ends normally with every site of
every stack that ran fired exactly once. A call that raises, that an interrupt abandons (its
forward's frame is gone), or whose retried attempt cannot be told apart from an earlier one, adds
nothing and is counted in ``discarded_calls``.
"""
from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from ._hooks import HookSet, OwnerHook
from .errors import ConfigError, KacqError, LocateError, StateError
from .frontends import StackInputs
from .stats import CoefficientStats

log = logging.getLogger("kacq_hooks.instrumentation")  # the name these warnings have always had


class Call:
    """One forward of the model: the inputs each stack was called with, and which sites have fired."""

    __slots__ = ("opener", "stacks", "fired", "rows", "committed", "discarded", "root", "incomplete", "routing",
                 "layer_tokens", "grad_counted", "frame", "handling", "training", "marks", "staged", "recomputable",
                 "__weakref__")

    def __init__(self, opener: nn.Module, root: StackInputs, frame, handling):
        self.opener = opener
        self.root = root
        self.frame = frame            # the frame of the forward this call belongs to: alive while it runs
        self.handling = handling      # the exception being handled when the call began (a retry inside except)
        self.training = torch.is_grad_enabled()
        self.recomputable = False     # sites ran without grad inside a training call: reentrant checkpointing
        self.marks: list = []         # modules between the root and a stack that are running, and what was staged
        self.staged = False
        self.stacks: dict[int, StackInputs] = {}
        self.fired: dict[int, int] = {}
        self.rows: dict = {}
        self.committed = False
        self.discarded = False
        self.incomplete = False
        self.routing: dict = {}       # experts sites: (valid rows, document weights) of the layer's tokens
        self.layer_tokens: dict = {}  # experts sites: the layer's tokens in this call (int or 0-d tensor)
        self.grad_counted: set = set()


class Calls:
    """The calls of one instrumentation's model: opened, checked, committed or discarded (module notes)."""

    def __init__(self, inst, widths: list[int], devices: list[torch.device]):
        self.inst = inst
        self.binding = binding = inst.binding
        self.pending = CoefficientStats(widths, devices)  # the open call's statistics, until it commits
        self.current: Call | None = None
        self.last: Call | None = None       # the last committed call (reentrant checkpointing recomputes it)
        self._exit_handle = None
        self._training_calls = 0            # counted training forwards since the last backward began
        self.committed = 0                  # calls added to the statistics since the last reset
        self._backward_task, self._backward_calls = None, 0
        self._stack_of_module = {id(stack.module): k for k, stack in enumerate(binding.stacks)}
        self.sites_of_stack = [[i for i, k in enumerate(binding.site_stack) if k == stack]
                               for stack in range(len(binding.stacks))]

    def unselected(self, count: str | None, stats: CoefficientStats) -> str | None:
        """Why nothing was recorded when calls did commit but ``count`` selected none of their positions (None
        when that is not the reason)."""
        if count is None or self.committed == 0 or any(int(s.tokens) for s in stats):
            return None
        shifted = (" (with 'shifted_labels' position t counts when labels[t + 1] != -100, so a label on the first "
                   "position alone selects nothing)") if count == "shifted_labels" else ""
        return (f"count={count!r} selected no position: in each of the {self.committed} forward pass(es) "
                f"recorded, every label count reads was -100{shifted}, or the positions it selected were all masked "
                "out by the attention mask, so no token was counted. Give labels that are not -100 on the unmasked "
                "positions to measure (e.g. the answer's tokens), or instrument without count= to count every token")

    def attach(self, hooks: HookSet) -> None:
        """Place the hooks that open, follow and end calls."""
        root, closer = self.binding.root, self.binding.closer or self.binding.root
        hooks.pre(root, OwnerHook(self, "on_enter"), with_kwargs=True)
        for stack in self.binding.stacks:
            if stack.module is not root:
                hooks.pre(stack.module, OwnerHook(self, "on_enter"), with_kwargs=True)
                hooks.post(stack.module, OwnerHook(self, "on_exit"), with_kwargs=True, always_call=True)
        self._exit_handle = hooks.post(closer, OwnerHook(self, "on_exit"), with_kwargs=True, always_call=True)
        for module in _between(root, [stack.module for stack in self.binding.stacks]):
            # an attempt that fails inside the root's forward, and is retried there, must leave nothing behind
            hooks.pre(module, OwnerHook(self, "on_attempt"))
            hooks.post(module, OwnerHook(self, "on_attempt_end"), always_call=True)

    def close(self) -> None:
        """The hooks are gone: a call still open adds nothing."""
        if self.current is not None:
            self.discard(self.current)
        self.current = None

    # -- hooks
    def on_enter(self, module, args, kwargs):
        inst = self.inst
        if inst._pause_depth:
            return
        if inst.reduced:
            raise StateError("these statistics were combined across ranks (all_reduce); read them, then call "
                             "inst.reset() before measuring again, or every rank's earlier tokens would count twice")
        call = self.current
        if call is not None and not _alive(call.frame):
            self.discard(call, "it never finished (an interrupt, or a run stopped before the last layer)")
            call = None
        binding = self.binding
        if call is None:
            owner = (binding.frame_owner or module) if module is binding.root else module
            call = self.current = Call(module, binding.root_reader.read(args, kwargs) if module is binding.root
                                       else StackInputs(), _frame_of(owner), sys.exc_info()[1])
            if module is binding.root:  # commit after every other forward hook on the closer has run
                closer = binding.closer or binding.root
                closer._forward_hooks.move_to_end(self._exit_handle.id)
        stack = self._stack_of_module.get(id(module))
        if stack is not None:
            inputs = binding.stacks[stack].read(args, kwargs)
            binding.stacks[stack].check(inputs, mask_padding=inst.mask_padding, weighting=inst.weighting,
                                        root=call.root, count=inst.count)
            if stack in call.stacks:  # the stack runs again inside one call (a model that calls its body twice)
                if any(call.fired.get(i, 0) != 1 for i in self.sites_of_stack[stack]):
                    call.incomplete = True
                for i in self.sites_of_stack[stack]:
                    call.fired.pop(i, None)
                call.rows = {}
            call.stacks[stack] = inputs

    def on_attempt(self, module, args):
        call = self.current
        if call is not None and not self.inst._pause_depth:
            call.marks.append((module, call.staged, sys.exc_info()[1]))

    def on_attempt_end(self, module, args, output):
        call = self.current
        if call is None or not call.marks or call.marks[-1][0] is not module:
            return
        _, staged_before, handling = call.marks.pop()
        if not _failing(handling):
            return
        if staged_before:  # what this attempt staged cannot be told apart from what came before it
            call.incomplete = True
            return
        self.pending.reset()  # the failed attempt was all there was: forget it, keep the call for a retry
        call.fired.clear()
        call.stacks.clear()
        call.routing.clear()
        call.layer_tokens.clear()
        call.rows = {}

    def on_exit(self, module, args, kwargs, output):
        call = self.current
        binding = self.binding
        if call is None or module is not (call.opener if call.opener is not binding.root
                                          else (binding.closer or binding.root)):
            return
        self.current = None
        call.frame = None  # a finished frame holds the forward's locals (its outputs): never keep it
        if _failing(call.handling):  # torch runs always-called hooks while the forward's exception propagates
            self.discard(call)
            return
        missing = [binding.sites[i].label for k in call.stacks for i in self.sites_of_stack[k]
                   if call.fired.get(i, 0) != 1]
        if missing or not call.fired or self.inst.sites_rewrapped():  # taken out of (or wrapped in) the model?
            try:
                self.inst.check_sites_in_place()
            except KacqError:
                self.discard(call)
                raise
        if missing or call.incomplete or not call.fired:
            self.discard(call, f"sites {missing[:4]} did not run once each in it" if missing else
                         "an attempt inside it failed after an earlier one had run" if call.incomplete
                         else "no site ran in it")
            return
        self.inst.stats.merge(self.pending)
        self.pending.reset()
        call.committed = True
        self.committed += 1
        self.last = call
        if call.recomputable:
            self._training_calls += 1

    def discard(self, call: Call, why: str | None = None) -> None:
        call.discarded = True
        call.frame = None
        self.pending.reset()
        if call.fired:
            self.inst.discarded_calls += 1
            if why:
                log.warning("kacq_hooks: a forward of %s was left out of the statistics because %s (a partial "
                            "forward, e.g. an early exit or a stop_at_layer run): every layer must see every "
                            "token of a counted call", type(self.inst.model).__name__, why)

    # -- what the capture asks
    def fire(self, index: int) -> Call:
        """The running call in which site ``index`` fires now, counted; refused outside its stack's call."""
        call = self.current
        stack = self.binding.site_stack[index]
        if call is not None and not _alive(call.frame):
            self.discard(call, "it never finished (an interrupt, or a run stopped before the last layer)")
            call = self.current = None
        site, reader = self.binding.sites[index], self.binding.stacks[stack]
        if call is None or stack not in call.stacks:
            raise StateError(f"{site.path} ran outside a call of the {reader.name} stack it "
                             f"belongs to (a layer called on its own?), so kacq_hooks does not know which positions "
                             f"are padding. Call the model (or its {type(reader.module).__name__}), "
                             "or run this inside inst.pause()")
        count = call.fired.get(index, 0) + 1
        call.fired[index] = count
        if count > 1:
            raise LocateError(f"{site.path} ran {count} times in one forward (a layer shared across depth, as in "
                              "ALBERT, or a module called twice): kacq_hooks does not pool the statistics of "
                              "different depths into one layer. Instrument a model whose layers are distinct, or "
                              "pass mlp_out= naming modules that run once per forward")
        return call

    def recomputed(self, task: int) -> Call | None:
        """The call whose forward reentrant checkpointing re-runs in backward ``task``, or None.

        None also for non-reentrant checkpointing, whose recomputed coefficients are not on the backward
        path (the original forward's tensor hooks see dL/dC).

        One backward can only be matched to one counted training forward: with several (gradient
        accumulation summed into one backward) the recomputed coefficients could belong to any of them.
        """
        if task != self._backward_task:
            self._backward_task, self._backward_calls, self._training_calls = task, self._training_calls, 0
        if self._backward_calls == 0:
            return None  # the forward was paused (or not counted): neither are its gradients
        if self._backward_calls > 1:
            raise ConfigError(f"one backward pass recomputes {self._backward_calls} counted forwards "
                              "(reentrant activation checkpointing with gradient accumulation): kacq_hooks cannot tell "
                              "whose padding mask a recomputed layer had. Use gradient_checkpointing_kwargs="
                              "{'use_reentrant': False} (the default), or call backward after each forward")
        return self.last


def _between(root: nn.Module, inner: list[nn.Module]) -> list[nn.Module]:
    """Modules strictly between ``root`` and each of ``inner`` on their paths down the module tree."""
    paths = {id(m): name for name, m in root.named_modules()}
    found = {}
    for module in inner:
        path = paths.get(id(module))
        if not path:
            continue
        parts = path.split(".")
        for k in range(1, len(parts)):
            found.setdefault(".".join(parts[:k]), None)
    between = [root.get_submodule(p) for p in found]
    return [m for m in between if not isinstance(m, (nn.ModuleList, nn.ModuleDict)) and m not in inner]


def _failing(handling: BaseException | None) -> bool:
    """Whether an always-called hook runs because its forward raised, not while handling an exception the
    forward began in (a retry inside an ``except`` block)."""
    current = sys.exc_info()[1]
    return current is not None and current is not handling


def _frame_of(owner: nn.Module):
    """The innermost running frame of a method of ``owner`` (its forward, or the hook machinery calling it)."""
    frame = sys._getframe(2)
    for _ in range(_FRAME_DEPTH):
        if frame is None:
            return None
        if frame.f_locals.get("self") is owner:
            return frame
        frame = frame.f_back
    return None


def _alive(frame) -> bool:
    """Whether ``frame`` is still running, i.e. on the current thread's stack."""
    if frame is None:
        return True  # nothing to check against (a call opened where no frame of its owner was found)
    current = sys._getframe(1)
    for _ in range(_FRAME_DEPTH * 4):
        if current is None:
            return False
        if current is frame:
            return True
        current = current.f_back
    return False


_FRAME_DEPTH = 64
