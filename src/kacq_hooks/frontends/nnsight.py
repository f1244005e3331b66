"""nnsight front end: ``NNsight``, ``LanguageModel`` and ``TransformersModel`` wrappers.

An nnsight model is an envoy around an ordinary torch module (``model._module``); kacq binds that
module with the front end it would get on its own (the Hugging Face one for a transformers model,
the TransformerLens one for a HookedTransformer) and puts its hooks there. nnsight calls that
module through ``nn.Module.__call__`` both inside ``with model.trace(...)`` and for a plain
``model(...)``, so statistics are collected either way, and the attention mask nnsight builds when
it tokenizes prompts reaches kacq's root hook like any other keyword argument.

**Order against nnsight's interventions.** nnsight 0.8 intervenes by replacing each module's
``forward`` with a controller that hands ``.input`` / ``.output`` to the trace; it registers no
torch hooks. Torch runs forward pre-hooks before ``forward``, so kacq sees C **before** a trace edits
it at the same place: after ``down_proj.input = torch.zeros_like(...)`` the model multiplies zeros,
but kacq records the coefficients the MLP produced. An edit upstream (``up_proj.output[:] = 0``,
``act_fn.output``, the residual stream) changes what the MLP produces, and kacq records that. To
record C after an edit at the projection itself, edit an upstream output instead.

Instrumenting and removing leaves nnsight's controllers and the envoy tree as they were; only
torch hooks are added and removed.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ..errors import LocateError, MissingExtraError


def _require():
    try:
        import nnsight  # the nnsight extra
    except ImportError as err:
        raise MissingExtraError("nnsight", "nnsight", "Instrumenting an nnsight model") from err
    return nnsight


def underlying_module(model) -> nn.Module:
    """The torch module an nnsight envoy wraps (``_module`` in nnsight 0.5+, ``_model`` before)."""
    for attribute in ("_module", "_model"):
        module = vars(model).get(attribute) if hasattr(model, "__dict__") else None
        if isinstance(module, nn.Module):
            return module
    raise LocateError(f"{type(model).__name__} does not wrap a torch module (no _module attribute); kacq_hooks "
                    "instruments nnsight.NNsight / LanguageModel / TransformersModel wrappers of torch models")


def bind(model, mlp_out: str | None = None, stacks=None, *, bind_inner):
    """Bind the module inside an nnsight envoy with the front end that module would get on its own:
    ``bind_inner`` is :func:`kacq_hooks.frontends.bind`, which picks it (and calls this function)."""
    _require()
    inner = bind_inner(underlying_module(model), mlp_out, stacks)
    return dataclasses.replace(inner, name=f"nnsight+{inner.name}")
