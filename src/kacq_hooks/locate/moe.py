"""Mixture-of-experts layers of a model's stacks."""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

from torch import nn

from ..errors import LocateError
from .stacks import _under_mixer, _wanted, find_stacks


@dataclass(frozen=True, eq=False)
class MoeLayer:
    """A mixture-of-experts layer found in a block: where its experts and shared experts are."""

    stack: str
    layer: int
    path: str              # the MoE block (router + experts), full path
    experts_path: str      # the experts module (fused 3-D weights or a ModuleList of experts)
    layout: str            # "fused" or "module_list"
    experts: int
    shared_paths: tuple[str, ...]
    module: nn.Module


def _moe_in_block(block: nn.Module) -> tuple[str, str, nn.Module, str, int, tuple[str, ...]] | None:
    for rel, module in block.named_modules():
        leaf = rel.split(".")[-1]
        if not rel or _under_mixer(rel, block) and not leaf.lower().startswith("expert"):
            continue
        fused = [p for p in module.parameters(recurse=False) if p.dim() == 3]
        if leaf.lower() == "experts" and (fused or isinstance(module, nn.ModuleList)):
            layout = "fused" if fused else "module_list"
            n = fused[0].shape[0] if fused else len(module)
            parent = rel.rpartition(".")[0]
            parent_mod = block.get_submodule(parent) if parent else block
            shared = tuple(f"{parent}.{n_}".lstrip(".") for n_, _ in parent_mod.named_children()
                           if re.search(r"shared", n_, re.I))
            return parent, rel, module, layout, int(n), shared
        if fused and type(module).__name__.endswith("Experts"):
            parent = rel.rpartition(".")[0]
            return parent, rel, module, "fused", int(fused[0].shape[0]), ()
    return None


def find_moe_layers(model: nn.Module, stacks=None) -> list[MoeLayer]:
    """The mixture-of-experts layers of ``model``'s wanted stacks: fused 3-D experts or per-expert lists."""
    out = []
    for stack in find_stacks(model):
        if not _wanted(stack, stacks):
            continue
        for i, block in enumerate(stack.blocks):
            found = _moe_in_block(block)
            if found:
                parent, rel, module, layout, n, shared = found
                prefix = f"{stack.path}.{i}"
                out.append(MoeLayer(stack.name, i, f"{prefix}.{parent}".rstrip("."), f"{prefix}.{rel}", layout, n,
                                    tuple(f"{prefix}.{s}" for s in shared), block.get_submodule(parent) if parent
                                    else block))
    return out



def _routed_output_scale(block: nn.Module, layer) -> float:
    """The factor a MoE block multiplies its routed experts' output by after the experts ran (Laguna's
    ``routed_scaling_factor``), read from the block's forward; 1 when it applies none (most models scale
    the routing weights themselves, which the taps already see)."""
    try:
        source = inspect.getsource(type(block).forward)
    except (OSError, TypeError):
        return 1.0
    name = layer.path.rpartition(".")[2]
    out = re.search(rf"(\w+)\s*=\s*self\.{re.escape(name)}\(", source)
    if out is None:
        return 1.0
    var = re.escape(out.group(1))
    scaled = re.search(rf"{var}\s*(?:\*=|=\s*{var}\s*\*)\s*self\.(?:config\.)?(\w*scal\w*)\b", source[out.end():])
    if scaled is None:
        return 1.0
    value = getattr(block, scaled.group(1), None)
    if value is None:
        value = getattr(getattr(block, "config", None), scaled.group(1), None)
    if not isinstance(value, (int, float)):
        raise LocateError(f"'{layer.path}': its block multiplies the experts' output by self.{scaled.group(1)}, "
                          "whose value kacq_hooks cannot read; the routed slots' coefficients would be off by it")
    return float(value)
