"""Mixture-of-experts layers: where a model's experts are, and how each layer is laid out.

:func:`find_moe_layers` is the one search: per block of each wanted stack, the module that holds the
experts (fused 3-D weights, or an ``nn.ModuleList`` of expert MLPs) and the MoE block around it.
:func:`find_experts` reads what it found into :class:`ExpertsLayer` (E routed experts x m neurons, the
shared experts, how the routing reaches the experts) and adds the dense FFN layers of the same stacks.
The taps that read C at run time are in :mod:`kacq_hooks.experts`.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ExpertsError, LocateError
from .families import FFN_OUT_PATTERNS
from .paths import _match, clean_name, find_config, projection_shape, submodule_at
from .stacks import Stack, _under_mixer, _wanted, find_stacks

#: Experts implementations whose C :mod:`kacq_hooks.experts` can tap; anything else is refused.
TAPPABLE = ("eager", "batched_mm", "grouped_mm")

_MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_DOWN_NAMES = ("down_proj", "w2", "fc2", "c_proj", "dense_4h_to_h", "fc_out", "wo")
_BLOCK = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


@dataclass(frozen=True, eq=False)
class SharedExpert:
    """A dense expert every token goes through; its C is the input of ``down``.

    ``gate`` is the ``Linear(d_model, 1)`` whose sigmoid multiplies the shared expert's output
    (Qwen-MoE's ``shared_expert_gate``), or None: the effective coefficient is ``sigmoid(gate(x)) * C_s``.
    """

    path: str
    module: nn.Module
    down: nn.Module
    d_ff: int
    gate: nn.Module | None = None
    block: nn.Module | None = None  # the MoE block that combines experts, shared expert and gate


@dataclass(frozen=True, eq=False)
class ExpertsLayer:
    """One FFN layer of a mixture-of-experts model, as :func:`find_experts` reports it.

    ``kind`` is "experts" (``module`` is the fused experts module, or the ``nn.ModuleList`` of
    per-expert MLPs with their output projections in ``downs``; ``experts`` x ``d_ff`` routed slots,
    then ``shared``) or "dense" (a dense MLP in an MoE model, e.g. DeepSeek's first layers:
    ``module`` is its output projection, whose input is C, and ``experts`` is 0).
    ``input_scaled`` marks layouts that multiply the experts' input by the routing weight (Llama 4):
    there C is computed on the scaled input and the weight passed beside it is 1 or 0.
    ``sorted_rows`` marks experts that take their rows sorted by expert with the count per expert
    (JetMoE's ``JetMoeParallelExperts``): ``module`` is the down projection (3-D ``weight`` [E, d, m],
    input C), ``up`` the up projection ([E, 2m, d]: gate then up rows), ``router`` returns
    (sorted order, token of each row, gate of each row, counts per expert, logits).
    """

    layer: int
    path: str
    kind: str
    module: nn.Module
    experts: int
    d_ff: int
    d_model: int
    shared: tuple[SharedExpert, ...] = ()
    input_scaled: bool = False
    router: nn.Module | None = None  # input-scaled layouts only: returns (scores [T, E], logits)
    downs: tuple[nn.Module, ...] = ()  # per-expert module lists: each expert's output projection (input: C_e)
    block: nn.Module | None = None     # per-expert module lists and sorted rows: the MoE block that routes to them
    sorted_rows: bool = False
    up: nn.Module | None = None        # sorted rows only: the up projection, 3-D weight [E, 2m, d]

    @property
    def layout(self) -> str:
        """"fused" (3-D parameters), "module_list" (one module per expert), "sorted" (3-D weights taking rows
        sorted by expert, JetMoE) or "dense"."""
        if self.kind == "dense":
            return "dense"
        return "module_list" if self.downs else "sorted" if self.sorted_rows else "fused"

    @property
    def slots(self) -> int:
        """Memory slots of the layer: E x m routed, then the shared experts' neurons."""
        return self.experts * self.d_ff + sum(s.d_ff for s in self.shared) if self.kind == "experts" else self.d_ff

    def __repr__(self) -> str:
        shared = f", shared={[s.d_ff for s in self.shared]}" if self.shared else ""
        return (f"ExpertsLayer(layer={self.layer}, kind={self.kind}, path={self.path!r}, "
                f"experts={self.experts}, d_ff={self.d_ff}{shared})")


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
    module: nn.Module      # the MoE block
    experts_module: nn.Module | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------- finding


def _experts_in_block(block: nn.Module) -> tuple[str, str, nn.Module, str, int, tuple[str, ...]] | None:
    """(MoE block, experts module path, experts module, layout, E, shared paths), block-relative, or None."""
    for rel, module in block.named_modules():
        leaf = rel.split(".")[-1]
        if not rel or (_under_mixer(rel, block) and not leaf.lower().startswith("expert")
                       and not _is_fused_experts(module)):
            continue
        fused = [p for p in module.parameters(recurse=False) if p.dim() == 3]
        if (leaf.lower() == "experts" and (fused or isinstance(module, nn.ModuleList))
                or leaf.lower() == "expert" and isinstance(module, nn.ModuleList)):
            layout = "fused" if fused else "module_list"
            n = fused[0].shape[0] if fused else len(module)
            parent = rel.rpartition(".")[0]
            parent_mod = block.get_submodule(parent) if parent else block
            shared = tuple(f"{parent}.{n_}".lstrip(".") for n_, _ in parent_mod.named_children()
                           if re.search(r"shared", n_, re.I))
            return parent, rel, module, layout, int(n), shared
        if fused and (type(module).__name__.endswith("Experts") or _is_fused_experts(module)):
            parent = rel.rpartition(".")[0]
            return parent, rel, module, "fused", int(fused[0].shape[0]), ()
    return None


def _moe_layers(stacks: list[Stack]) -> list[MoeLayer]:
    out = []
    for stack in stacks:
        for i, block in enumerate(stack.blocks):
            found = _experts_in_block(block)
            if found:
                parent, rel, module, layout, n, shared = found
                prefix = f"{stack.path}.{i}"
                out.append(MoeLayer(stack.name, i, f"{prefix}.{parent}".rstrip("."), f"{prefix}.{rel}", layout, n,
                                    tuple(f"{prefix}.{s}" for s in shared),
                                    block.get_submodule(parent) if parent else block, module))
    return out


def find_moe_layers(model: nn.Module, stacks=None) -> list[MoeLayer]:
    """The mixture-of-experts layers of ``model``'s wanted stacks: fused 3-D experts or per-expert lists.

    Every search for experts in kacq_hooks goes through here; :func:`read_experts_layer` reads one of
    them (and refuses layouts it cannot read).
    """
    return _moe_layers([s for s in find_stacks(model) if _wanted(s, stacks)])


def _is_fused_experts(module: nn.Module) -> bool:
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    return (isinstance(down, torch.Tensor) and down.dim() == 3
            and isinstance(up, torch.Tensor) and up.dim() == 3)


def is_decorated_experts(module: nn.Module) -> bool:
    """True for classes wired to ``ExpertsInterface`` by transformers' ``use_experts_implementation``."""
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed")


def _fused_shape(module: nn.Module, d_model: int | None) -> tuple[int, int, int]:
    """(E, m, d_model) of a fused experts module, whatever the orientation of ``down_proj``."""
    e, a, b = module.down_proj.shape
    if getattr(module, "is_transposed", None) is True or (d_model is not None and b == d_model and a != d_model):
        return e, a, b       # [E, m, d]
    return e, b, a           # [E, d, m]


def _down_of(module: nn.Module, d_model: int | None) -> tuple[str, nn.Module] | None:
    for name in _DOWN_NAMES:
        down = getattr(module, name, None)
        shape = projection_shape(down) if isinstance(down, nn.Module) else None
        if shape and (d_model is None or shape[1] == d_model):
            return name, down
    return None


def _shared_experts(moe_block: nn.Module, experts_name: str, prefix: str, d_model: int) -> tuple[SharedExpert, ...]:
    children = dict(moe_block.named_children())
    gates = {n: m for n, m in children.items()
             if isinstance(m, nn.Linear) and m.out_features == 1 and "shared" in n}
    shared = []
    for name, child in children.items():
        if name == experts_name or isinstance(child, nn.Linear) or "shared" not in name:
            continue
        found = _down_of(child, d_model)
        fused = [n for n, p in child.named_parameters(recurse=False) if p.dim() == 3]
        if found is None and fused:
            raise ExpertsError(
                f"'{prefix}{name}' ({type(child).__name__}) holds its shared experts as 3-D weights ({', '.join(fused)}) "
                "that its own forward multiplies by matmuls, with no module whose input is their C (and any gate "
                "folded into it): kacq_hooks cannot tap these slots, so this layer is refused rather than measured "
                "without them")
        if found is None:
            raise ExpertsError(f"'{prefix}{name}' ({type(child).__name__}) looks like a shared expert but has no "
                               f"output projection named one of {_DOWN_NAMES} mapping to d_model={d_model}")
        down_name, down = found
        gate = gates.get(f"{name}_gate")
        shared.append(SharedExpert(path=f"{prefix}{name}.{down_name}", module=child, down=down,
                                   d_ff=projection_shape(down)[0], gate=gate, block=moe_block))
    if gates and not any(s.gate is not None for s in shared):
        raise ExpertsError(f"'{prefix}{next(iter(gates))}' gates a shared expert that was not found next to it")
    return tuple(shared)


def _d_model(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("hidden_size", "d_model", "n_embd"):
        if isinstance(getattr(text, key, None), int):
            return getattr(text, key)
    return None


def read_experts_layer(model: nn.Module, name: str, module: nn.Module, layer: int, d_model: int | None) -> ExpertsLayer:
    """The :class:`ExpertsLayer` of the experts ``module`` at ``name`` (block number ``layer``).

    Raises :class:`ExpertsError` for a layout kacq_hooks cannot read (the message names the module).
    """
    sorted_layer = _sorted_rows_layer(model, name, layer, d_model)
    if sorted_layer is not None:
        return sorted_layer
    if not _is_fused_experts(module):
        downs = _list_downs(module, d_model)
        if downs is None:
            raise ExpertsError(
                f"'{name}' ({type(module).__name__}) holds experts in a layout kacq_hooks cannot read: it needs either "
                "one module per layer with 3-D expert weights (down_proj [E, ., .] and gate_up_proj or up_proj), as "
                f"transformers 5 builds them, or an nn.ModuleList of expert MLPs that each end in an output projection "
                f"named one of {_DOWN_NAMES}. Pass the experts' path template, find_experts(model, "
                "experts='model.layers.{i}.mlp.experts'), or measure the layer as dense with "
                "instrument(model, mlp_out='path.{i}.to.the.projection')")
        parent_name, _, child_name = name.rpartition(".")
        parent = submodule_at(model, parent_name)
        m, d = projection_shape(downs[0])
        shared = _shared_experts(parent, child_name, f"{parent_name}." if parent_name else "", d)
        return ExpertsLayer(layer=layer, path=name, kind="experts", module=module, experts=len(downs), d_ff=m,
                            d_model=d, shared=shared, downs=downs, block=parent)
    if getattr(module, "has_post_expert_norm", False):
        raise ExpertsError(
            f"'{name}' ({type(module).__name__}) normalises each expert's output after its down projection, so "
            "the output is not a weighted sum of value vectors and its coefficients are not memory "
            "coefficients; this layer cannot be measured")
    e, m, d = _fused_shape(module, d_model)
    parent_name, _, child_name = name.rpartition(".")
    parent = submodule_at(model, parent_name)
    shared = _shared_experts(parent, child_name, f"{parent_name}." if parent_name else "", d)
    input_scaled = not is_decorated_experts(module) and _routing_free(module)
    router = getattr(parent, "router", None) if input_scaled else None
    if input_scaled and not isinstance(router, nn.Module):
        raise ExpertsError(f"'{name}' takes only hidden states (its routing is in its input) but no 'router' "
                           f"module sits next to it in '{parent_name}': the routed pairs cannot be known")
    return ExpertsLayer(layer=layer, path=name, kind="experts", module=module, experts=e, d_ff=m,
                        d_model=d, shared=shared, input_scaled=input_scaled, router=router)


def _takes_counts(module: nn.Module) -> bool:
    """A 3-D ``weight`` whose forward takes the rows sorted by expert and the count per expert (JetMoE)."""
    weight = getattr(module, "weight", None)
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 3):
        return False
    try:
        return "expert_size" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _sorted_rows_layer(model: nn.Module, name: str, layer: int, d_model: int | None) -> ExpertsLayer | None:
    """The layer of experts that take rows sorted by expert (an up and a down ``JetMoeParallelExperts``), or None."""
    parent_name = name.rpartition(".")[0]
    parent = submodule_at(model, parent_name)
    pairs = [(n, m) for n, m in parent.named_children() if _takes_counts(m)]
    if len(pairs) != 2:
        return None
    downs = [(n, m) for n, m in pairs if d_model is None or m.weight.shape[1] == d_model]
    ups = [(n, m) for n, m in pairs if (n, m) not in downs]
    router = getattr(parent, "router", None)
    if len(downs) != 1 or len(ups) != 1 or not isinstance(router, nn.Module):
        raise ExpertsError(f"'{parent_name}' ({type(parent).__name__}) holds experts that take rows sorted by expert "
                           f"({[n for n, _ in pairs]}) but kacq_hooks cannot tell their up and down projections "
                           "and router apart (it needs one mapping to d_model and a 'router' beside them)")
    (down_name, down), (_, up) = downs[0], ups[0]
    e, d, m = down.weight.shape
    if tuple(up.weight.shape) != (e, 2 * m, d):
        raise ExpertsError(f"'{parent_name}.{ups[0][0]}' has weight {tuple(up.weight.shape)}; gated sorted-row experts "
                           f"need [E, 2m, d] = {(e, 2 * m, d)} (gate rows, then up rows)")
    shared = _shared_experts(parent, down_name, f"{parent_name}." if parent_name else "", d)
    return ExpertsLayer(layer=layer, path=f"{parent_name}.{down_name}", kind="experts", module=down, experts=e,
                        d_ff=m, d_model=d, shared=shared, router=router, block=parent, sorted_rows=True, up=up)


def find_experts(model: nn.Module, experts: str | None = None) -> list[ExpertsLayer]:
    """Every FFN layer of a mixture-of-experts model, ordered by layer: experts layers and dense ones.

    ``experts`` is a path template of the fused experts modules (``"model.layers.{i}.mlp.experts"``),
    for layouts the search does not recognise. Layers of the same stack that have no experts but a
    dense MLP (DeepSeek's ``first_k_dense_replace``, Qwen-MoE's ``mlp_only_layers``) are reported as
    ``kind="dense"``; blocks with no FFN at all (a hybrid's mixer layers) are not reported.

    Per-expert module lists (an ``nn.ModuleList`` named ``experts`` whose every expert MLP ends in an
    output projection named one of ``down_proj``, ``w2``, ``fc2``, ...) are reported too, with
    ``layout == "module_list"`` and the projections in ``downs``.

    Raises :class:`ExpertsError` for a model that is not a mixture of experts, or whose experts
    module kacq_hooks cannot read (an unknown layout: the message names the module).
    """
    named = [(clean_name(n, model), m) for n, m in model.named_modules()]
    config = find_config(model)
    d_model = _d_model(config) if config is not None else None
    found: list[tuple[tuple[str, int], str, nn.Module]] = []
    if experts is not None:
        for _, name, module in _match(named, experts):
            block = _BLOCK.match(name)
            if block is None:
                raise ExpertsError(f"'{name}' is not inside a numbered block; pass experts= with a '{{i}}' template")
            found.append(((block.group(1), int(block.group(2))), name, module))
        if not found:
            raise ExpertsError(f"no module path matches experts={experts!r}")
    else:
        stacks = find_stacks(model)
        paths = {s.name: s.path for s in stacks}
        found = [((paths[m.stack], m.layer), m.experts_path, m.experts_module) for m in _moe_layers(stacks)]
    if not found:
        n_experts = next((getattr(config, k) for k in _MOE_CONFIG_KEYS if getattr(config, k, None)), None)
        what = f" although its config has {n_experts} experts" if n_experts else ""
        raise ExpertsError(
            f"no fused experts module found in {type(model).__name__}{what}. Pass the path of each layer's "
            "experts module: find_experts(model, experts='model.layers.{i}.mlp.experts')")
    layers = {key: read_experts_layer(model, name, module, key[1], d_model) for key, name, module in found}
    for container in {c for c, _ in layers}:
        _add_dense_layers(model, named, container, layers, d_model)
    return [layers[k] for k in sorted(layers, key=lambda k: (k[0], k[1]))]


def _list_downs(module: nn.Module, d_model: int | None) -> tuple[nn.Module, ...] | None:
    """The output projection of every expert of a per-expert module list (all the same shape), or None."""
    if not isinstance(module, nn.ModuleList) or not len(module):
        return None
    downs = [_down_of(expert, d_model) for expert in module]
    if any(d is None for d in downs) or len({projection_shape(d[1]) for d in downs}) != 1:
        return None
    return tuple(d[1] for d in downs)


def _routing_free(module: nn.Module) -> bool:
    """True for experts whose forward takes only the hidden states: the routing is in their input."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values() if p.name != "self"]
    except (TypeError, ValueError):
        return False
    return len(params) == 1


def _add_dense_layers(model, named, container, layers, d_model) -> None:
    numbered = {int(m.group(1)) for n, _ in named if (m := re.match(rf"^{re.escape(container)}\.(\d+)$", n))}
    for index in sorted(numbered - {i for c, i in layers if c == container}):
        prefix = f"{container}.{index}."
        inside = [(n, m) for n, m in named if n.startswith(prefix)]
        for pattern in FFN_OUT_PATTERNS:  # block-relative regexes, as the locator tries them
            hits = [(n, m) for n, m in inside if re.fullmatch(pattern, n[len(prefix):])]
            if hits:
                name, module = hits[0]
                d_ff, out = projection_shape(module) or (0, 0)
                if d_ff and (d_model is None or out == d_model):
                    layers[(container, index)] = ExpertsLayer(layer=index, path=name, kind="dense", module=module,
                                                              experts=0, d_ff=d_ff, d_model=out)
                break


def experts_implementation(module: nn.Module) -> str:
    """The implementation the fused experts ``module`` runs now ("eager" for classes with one forward)."""
    if not is_decorated_experts(module):
        return "eager"
    return getattr(getattr(module, "config", None), "_experts_implementation", None) or "eager"



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
