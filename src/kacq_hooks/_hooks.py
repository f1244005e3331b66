"""The hooks kacq_hooks places on a model, and the one owner that registers and removes them.

Copying or pickling a model copies the hooks registered on it. A copy of an :class:`OwnerHook` (or
:class:`FunctionHook`) is an inert hook that removes itself from the copied module at its first
call, so a deep copy (or ``torch.save``) of an instrumented model is an uninstrumented model, never
one whose forwards feed a hidden instrumentation.

A :class:`HookSet` holds every hook one owner placed (torch handles, or taps with ``remove()``) and
removes them all at once, idempotently; it is also a context manager. Besides module forward hooks it places
a parameter's gradient hooks and torch's global optimizer step hooks. Those are never copied: torch copies
and pickles a parameter without its hooks, and the step hooks are global, so they also fire for a copied
optimizer, whose copied parameters their owner must then not recognise as its own (it keys by identity). Plain callables given to it
are wrapped in a :class:`FunctionHook`, so they are inert in a copy too, unless registered with
``travels=True``: a self-contained edit of the model (a scale that holds no outside state) that a
copy of the model keeps, as torch's own hooks are kept. An owner that edits the forward but cannot
travel (a hook that replaces mixture-of-experts coefficients, shared by every tap of its module) says so
through ``copy_refusal()``: its copied hooks refuse to run, since an unedited copy would measure another model.
"""
from __future__ import annotations

import torch
import torch.optim.optimizer as optim_hooks
from torch import nn

from .errors import StateError


_between_graphs = 0  # how many hooks are running eagerly between torch.compile's graphs (nested: more than one)


def _call(hook: "OwnerHook", args: tuple):
    global _between_graphs
    _between_graphs += 1
    try:
        return hook._run(args)
    finally:
        _between_graphs -= 1


def running_between_graphs() -> bool:
    """Whether the hook now running was called from a forward that torch.compile traced (see below)."""
    return _between_graphs > 0


# The hooks keep per-call Python state (which call is open, which sites fired), which torch.compile must not
# trace into a graph. The disabled wrapper costs a few percent of a forward per call, so it is only taken
# while compiling. Dynamo prints the reason when fullgraph=True refuses the break.
_call_eagerly = torch.compiler.disable(
    _call, reason="kacq_hooks' hooks keep per-call Python state and run between compiled graphs: an instrumented "
                  "model cannot be one full graph; compile it without fullgraph=True")


class OwnerHook:
    """Calls ``getattr(owner, method)(*bound, *hook_args)``; the owner lives as long as the hook is registered."""

    def __init__(self, owner, method: str, *bound):
        self._owner = owner
        self._method = method
        self._bound = bound

    def _run(self, args: tuple):
        return getattr(self._owner, self._method)(*self._bound, *args)

    def __call__(self, *args):
        if torch.compiler.is_compiling():  # inside a graph torch.compile traces: run eagerly between its graphs
            return _call_eagerly(self, args)
        return getattr(self._owner, self._method)(*self._bound, *args)

    def _copied(self):
        refusal = getattr(self._owner, "copy_refusal", None)
        message = refusal() if callable(refusal) else None
        return (RefusingHook, (message,)) if message else (InertHook, ())

    def __deepcopy__(self, memo):
        kind, args = self._copied()
        return kind(*args)

    def __reduce__(self):
        return self._copied()


class FunctionHook(OwnerHook):
    """Calls ``function(*bound, *hook_args)``: a closure's state is the original's, so a copy is inert."""

    def __init__(self, function, *bound):
        super().__init__(function, "__call__", *bound)

    def _run(self, args: tuple):
        return self._owner(*self._bound, *args)

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return _call_eagerly(self, args)
        return self._owner(*self._bound, *args)


class InertHook:
    """What a copied :class:`OwnerHook` becomes: it does nothing and removes itself from its module."""

    def __call__(self, *args):
        module = args[0] if args else None
        if not isinstance(module, nn.Module):  # a callback copied inside a tap: nothing to remove
            return None
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                if hook is self:
                    del hooks[key]
                    for extra in (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs,
                                  module._forward_hooks_always_called):
                        extra.pop(key, None)
        return None


class RefusingHook:
    """What a copied hook of an edit that cannot travel becomes: the copy's forward is refused."""

    def __init__(self, message: str):
        self.message = message

    def __call__(self, *args):
        raise StateError(self.message)


class HookSet:
    """Registers hooks and removes every one of them together (see the module notes).

    >>> from torch import nn
    >>> layer, seen = nn.Linear(2, 2), []
    >>> with HookSet() as hooks:
    ...     _ = hooks.pre(layer, lambda module, args: seen.append(args[0].shape))
    ...     _ = layer(torch.zeros(1, 2))
    >>> seen, len(hooks), len(layer._forward_pre_hooks)
    ([torch.Size([1, 2])], 0, 0)
    """

    def __init__(self):
        self._handles: list = []

    def pre(self, module: nn.Module, hook, *, with_kwargs: bool = False, prepend: bool = False,
            travels: bool = False):
        """A forward pre-hook on ``module``; returns torch's handle (its ``id`` orders hooks)."""
        return self.add(module.register_forward_pre_hook(_live(hook, travels), with_kwargs=with_kwargs,
                                                         prepend=prepend))

    def post(self, module: nn.Module, hook, *, with_kwargs: bool = False, always_call: bool = False,
             travels: bool = False):
        """A forward hook on ``module``; returns torch's handle."""
        return self.add(module.register_forward_hook(_live(hook, travels), with_kwargs=with_kwargs,
                                                     always_call=always_call))

    def grad(self, parameter: torch.Tensor, hook):
        """A hook on ``parameter``'s gradient before it is accumulated (it may return a replacement)."""
        return self.add(parameter.register_hook(_live(hook, False)))

    def accumulated(self, parameter: torch.Tensor, hook):
        """A hook called with ``parameter`` once its gradient has been accumulated into ``.grad``."""
        return self.add(parameter.register_post_accumulate_grad_hook(_live(hook, False)))

    def optimizer_step(self, before, after):
        """Global hooks around every ``Optimizer.step`` (any optimizer's): ``before`` and ``after`` are called
        with ``(optimizer, args, kwargs)``."""
        self.add(optim_hooks.register_optimizer_step_pre_hook(_live(before, False)))
        self.add(optim_hooks.register_optimizer_step_post_hook(_live(after, False)))

    def tap(self, tap):
        """Attach a tap (an :class:`~kacq_hooks.experts.ExpertsTap`, a SharedTap) and own what it returns."""
        return self.add(tap.attach())

    def add(self, handle):
        """Own ``handle`` (anything with ``remove()``): it goes with the others."""
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        """Remove every hook; a second call does nothing."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __bool__(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _live(hook, travels: bool):
    return hook if travels or isinstance(hook, (OwnerHook, InertHook)) else FunctionHook(hook)
