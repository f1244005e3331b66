"""Module paths and projections: wrapper prefixes seen through, path templates, Linear-like shapes."""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import LocateError
from .families import _ATTENTION

_WRAPPER_PARTS = {"_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module", "_forward_module"}


def clean_name(name: str, root: nn.Module) -> str:
    """A module path with the parts added by DDP, FSDP, torch.compile and checkpoint wrappers removed."""
    parts = [p for p in name.split(".") if p and p not in _WRAPPER_PARTS]
    if parts and parts[0] == "module" and _is_data_parallel(root):
        parts = parts[1:]
    return ".".join(parts)


def submodule_at(model: nn.Module, clean: str) -> nn.Module:
    """The module at a cleaned path (see :func:`clean_name`): wrappers put parts in between."""
    if not clean:
        return model
    for name, module in model.named_modules():
        if clean_name(name, model) == clean:
            return module
    raise LocateError(f"no module at '{clean}' in {type(model).__name__}")


def _is_data_parallel(module: nn.Module) -> bool:
    return isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel))


def find_config(model: nn.Module):
    """The Hugging Face config of ``model`` or of the model it wraps, or None."""
    for candidate in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        config = getattr(candidate, "config", None)
        if config is not None and hasattr(config, "model_type"):
            return config
    for _, sub in model.named_modules():
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "model_type"):
            return config
    return None


def projection_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear-like module (nn.Linear or HF's transposed Conv1D)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and hasattr(module, "in_features"):
        return module.in_features, module.out_features
    return None


def _template_regex(template: str) -> re.Pattern:
    if "{i}" not in template:
        raise LocateError(f"mlp_out={template!r} must contain '{{i}}' where the layer index goes, "
                          "e.g. 'model.layers.{i}.mlp.down_proj'")
    body = re.escape(template).replace(re.escape("{i}"), r"(\d+)")
    return re.compile(rf"(?:^|\.){body}$")


def _match(named: list[tuple[str, nn.Module]], template: str) -> list[tuple[int, str, nn.Module]]:
    regex = _template_regex(template)
    found = []
    for name, module in named:
        m = regex.search(name)
        if m and not _ATTENTION.search(name[: m.start(1)] + name[m.end(1):]):
            found.append((int(m.group(1)), name, module))
    return found


def _hidden_size(config, named) -> int | None:
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, int):
            return value
    for _, module in named:
        if isinstance(module, nn.Embedding):
            return module.embedding_dim
    return None



def _sample_paths(named, limit: int = 6) -> str:
    leaves = [n for n, m in named if n and projection_shape(m) is not None]
    return ", ".join(repr(n) for n in leaves[:limit]) or "(no Linear-like modules)"
