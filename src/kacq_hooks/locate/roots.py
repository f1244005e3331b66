"""Stack roots: where each stack's own tokens and padding mask arrive, and how C is laid out there."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

from .families import LAYOUT_BY_MODEL_TYPE
from .paths import find_config, submodule_at
from .sites import Site
from .stacks import Stack, find_stacks

_IDS_NAMES = ("input_ids", "inputs_embeds", "hidden_states", "pixel_values", "input_features", "input_values")


@dataclass(frozen=True, eq=False)
class StackSpec:
    """Where one stack's padding mask and token grid arrive: its root module and the names of those arguments.

    ``root`` is the module whose ``forward`` receives the stack's own tokens and 2-D padding mask
    (a decoder-only LM's base model, a T5/BART encoder or decoder, BERT's base model, a vision
    tower). ``layout`` says how the sites of this stack see C: "batch_first" [batch, seq, d_ff],
    "seq_first" [seq, batch, d_ff] (XLNet) or "flat" [batch * seq, d_ff] (OPT). ``refuse_kwargs`` maps
    call arguments that make the stack's FFN positions differ from its tokens to the reason. The spec only
    names things: a call's arguments are read by :class:`kacq_hooks.frontends.stacks.StackReader`, built from it.
    """

    name: str
    root: nn.Module
    path: str
    layout: str = "batch_first"
    mask_name: str | None = "attention_mask"
    inverted_mask_name: str | None = None   # a mask with 1 for padding (XLNet's input_mask)
    ids_names: tuple[str, ...] = ()         # the forward's token arguments, in order: the first >= 2-D gives the grid
    refuse_kwargs: tuple[tuple[str, str], ...] = ()


def _forward_params(module: nn.Module) -> list[str]:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _root_of(model: nn.Module, stack: Stack) -> tuple[str, nn.Module]:
    """The nearest module at or above the stack's block list whose forward takes its tokens (and mask)."""
    parts = stack.path.split(".")
    candidates = [".".join(parts[:k]) for k in range(len(parts) - 1, -1, -1)]
    for path in candidates:
        module = submodule_at(model, path)
        # The nearest module that takes token ids (or embeddings, or pixels) is the stack's own entry point:
        # above it (a seq2seq model) the arguments belong to another stack too.
        params = _forward_params(module)
        if any(n in params for n in ("input_ids", "inputs_embeds", "pixel_values")):
            return path, module
        if stack.name == "vision" and "hidden_states" in params and path:
            # a tower fed its own patches (Qwen2-VL's visual): above it the multimodal model's text mask would bind
            return path, module
    parent = ".".join(parts[:-1])
    return parent, submodule_at(model, parent)


def stack_specs(model: nn.Module, sites: list[Site]) -> dict[str, StackSpec]:
    """A :class:`StackSpec` for every stack that ``sites`` use, keyed by stack name."""
    model_type = getattr(find_config(model), "model_type", None)
    by_name = {s.name: s for s in find_stacks(model)}
    specs = {}
    for name in dict.fromkeys(s.stack for s in sites):
        stack = by_name.get(name)
        if stack is None:  # sites outside any block list (a custom mlp_out=): the model itself is the root
            path, root = "", model
        else:
            path, root = _root_of(model, stack)
        params = _forward_params(root)
        refuse = ()
        inverted = None
        if model_type == "xlnet":
            inverted = "input_mask"
            refuse = (("target_mapping", "XLNet's query stream runs the FFN a second time on the predicted "
                                         "positions"),
                      ("perm_mask", "XLNet's permutation mode runs a query stream through the FFN too"))
        specs[name] = StackSpec(
            name=name, root=root, path=path, layout=LAYOUT_BY_MODEL_TYPE.get(model_type, "batch_first"),
            mask_name="attention_mask" if "attention_mask" in params else None, inverted_mask_name=inverted,
            ids_names=tuple(n for n in _IDS_NAMES if n in params), refuse_kwargs=refuse)
    return specs


def find_stack_roots(model: nn.Module, sites: list[Site]) -> dict[str, nn.Module]:
    """For each stack that ``sites`` use, the module whose forward receives that stack's tokens and mask."""
    return {name: spec.root for name, spec in stack_specs(model, sites).items()}
