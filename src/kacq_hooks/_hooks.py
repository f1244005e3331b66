"""Hooks that call a method of their owner, and that a copied model does not keep.

Copying or pickling a model copies the hooks registered on it. A copy of an :class:`OwnerHook` is an
inert hook that removes itself from the copied module at its first call, so a deep copy (or
``torch.save``) of an instrumented model is an uninstrumented model, never one whose forwards feed a
hidden instrumentation.
"""
from __future__ import annotations

import torch
from torch import nn


def _call(hook: "OwnerHook", args: tuple):
    return getattr(hook._owner, hook._method)(*hook._bound, *args)


# The hooks keep per-call Python state (which call is open, which sites fired), which torch.compile must not
# trace into a graph. The disabled wrapper costs a few percent of a forward per call, so it is only taken
# while compiling.
_call_eagerly = torch.compiler.disable(_call)


class OwnerHook:
    """Calls ``getattr(owner, method)(*bound, *hook_args)``; the owner lives as long as the hook is registered."""

    def __init__(self, owner, method: str, *bound):
        self._owner = owner
        self._method = method
        self._bound = bound

    def __call__(self, *args):
        if torch.compiler.is_compiling():  # inside a graph torch.compile traces: run eagerly between its graphs
            return _call_eagerly(self, args)
        return getattr(self._owner, self._method)(*self._bound, *args)

    def __deepcopy__(self, memo):
        return InertHook()

    def __reduce__(self):
        return (InertHook, ())


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
