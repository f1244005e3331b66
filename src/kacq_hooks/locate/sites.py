"""Coefficient sites: the FFN output projection of every wanted block, and one site per mixture-of-experts
layer."""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field

from torch import nn

from ..errors import ExpertsError, LocateError
from .families import (_ATTENTION, _FFN_CLASS, FFN_OUT_PATTERNS, MLP_OUT_BY_MODEL_TYPE, REFUSED_MODEL_TYPES,
                       REFUSED_STACKS)
from .moe import (TAPPABLE, MoeLayer, SharedExpert, _d_model, _routed_output_scale, experts_implementation,
                  find_moe_layers, read_experts_layer)
from .paths import _hidden_size, _match, _sample_paths, clean_name, find_config, projection_shape, submodule_at
from .stacks import LANGUAGE_STACKS, Stack, _has_mixers, _under_mixer, _wanted, find_stacks

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Site:
    """One place where memory coefficients are captured: the input of a layer's MLP output projection."""

    layer: int
    path: str
    d_ff: int
    d_model: int
    module: nn.Module
    stack: str = "decoder"   # "decoder", "encoder", "vision", ...: sites of one stack share that stack's mask
    kind: str = "dense"      # "dense" (one MLP) or "experts" (E routed experts x m slots, then shared slots)
    experts: int = 0         # routed experts (0 for a dense MLP)
    expert_d_ff: int = 0     # neurons per routed expert; d_ff = experts * expert_d_ff + shared slots
    experts_layer: object = field(default=None, repr=False)  # kind "experts": the kacq_hooks.experts.ExpertsLayer
    routed_scale: float = 1.0  # kind "experts": a factor the layer applies to the routed experts' summed output

    @property
    def label(self) -> str:
        """The name results use for this site: the model's own layer number, with its stack."""
        return f"{self.stack}.layer_{self.layer}"

    def __repr__(self) -> str:
        extra = f", experts={self.experts}x{self.expert_d_ff}" if self.kind == "experts" else ""
        return (f"Site({self.stack}, layer={self.layer}, path={self.path!r}, kind={self.kind}, d_ff={self.d_ff}, "
                f"d_model={self.d_model}{extra})")


def _experts_sites(model: nn.Module, moe: list[MoeLayer], dense: list[Site]) -> list[Site]:
    """One site per mixture-of-experts layer: E x m routed slots, then the shared experts' slots.

    A dense FFN beside the experts in the same block (GraniteMoeShared's ``shared_mlp``) is a shared
    expert of that layer: its slots join the layer's, and its dense site is dropped from ``dense``.
    """
    sites = []
    d_model = _d_model(find_config(model))
    for found in moe:
        layer = read_experts_layer(model, found.experts_path, found.experts_module, found.layer, d_model)
        implementation = experts_implementation(layer.module)
        if layer.layout == "fused" and implementation not in TAPPABLE:
            raise ExpertsError(f"'{layer.path}' runs the experts implementation {implementation!r}, which keeps C inside "
                               "a fused kernel where no hook can see it. Switch to one kacq_hooks can tap, e.g. "
                               "model.set_experts_implementation('grouped_mm') (or 'eager', 'batched_mm')")
        stack, block = found.stack, found.module
        beside = [s for s in dense if s.stack == stack and s.layer == layer.layer]
        for site in beside:
            dense.remove(site)
            owner = submodule_at(model, site.path.rpartition(".")[0])
            if not _FFN_CLASS.search(type(owner).__name__):  # another projection of the block (a hyper-connection)
                log.debug("dropped %s beside the experts of %s: not an FFN", site.path, layer.path)
                continue
            # a dense FFN in the same block is one more group of this layer's slots (GraniteMoeShared)
            layer = dataclasses.replace(layer, shared=(*layer.shared, SharedExpert(
                path=site.path, module=site.module, down=site.module, d_ff=site.d_ff)))
        sites.append(Site(layer=layer.layer, path=layer.path, d_ff=layer.slots, d_model=layer.d_model, module=block,
                          stack=stack, kind="experts", experts=layer.experts, expert_d_ff=layer.d_ff,
                          experts_layer=layer, routed_scale=_routed_output_scale(block, layer)))
    return sites



def _match_in_blocks(stack: Stack, regex: re.Pattern) -> dict[int, list[tuple[str, nn.Module]]]:
    found: dict[int, list[tuple[str, nn.Module]]] = {}
    for i, block in enumerate(stack.blocks):
        for rel, module in block.named_modules():
            rel = clean_name(rel, block)
            if rel and regex.fullmatch(rel) and not _under_mixer(rel, block) and projection_shape(module):
                found.setdefault(i, []).append((rel, module))
    return found


def _stack_sites(stack: Stack, model_type, moe_paths: set[str], width: int | None) -> tuple[list[tuple[int, str, nn.Module]], str]:
    """(layer, full path, module) of each FFN output projection in ``stack``, and how they were found."""
    def outside_moe(found):
        return {i: [(r, m) for r, m in v if not any(f"{stack.path}.{i}.{r}".startswith(p + ".") for p in moe_paths)]
                for i, v in found.items()}

    tries = []
    if model_type in MLP_OUT_BY_MODEL_TYPE:
        tries.append((MLP_OUT_BY_MODEL_TYPE[model_type], f"table entry for {model_type!r}"))
    tries += [(p, f"name pattern {p!r}") for p in FFN_OUT_PATTERNS]
    for pattern, how in tries:
        found = {i: v for i, v in outside_moe(_match_in_blocks(stack, re.compile(pattern))).items() if v}
        if found:
            return [(i, f"{stack.path}.{i}.{v[0][0]}", v[0][1]) for i, v in sorted(found.items())], how
    return _by_shape(stack, moe_paths, width), "shape check"


def _by_shape(stack: Stack, moe_paths: set[str], width: int | None) -> list[tuple[int, str, nn.Module]]:
    if width is None:
        return []
    out = []
    for i, block in enumerate(stack.blocks):
        cands = []
        for rel, module in block.named_modules():
            shape = projection_shape(module)
            full = f"{stack.path}.{i}.{rel}"
            if (shape and shape[1] == width and shape[0] > width and not _under_mixer(rel, block)
                    and not _ATTENTION.search(rel) and not any(full.startswith(p + ".") for p in moe_paths)):
                cands.append((rel, module))
        if len(cands) > 1:
            return []  # ambiguous: never guess
        if cands:
            out.append((i, f"{stack.path}.{i}.{cands[0][0]}", cands[0][1]))
    return out



def find_sites(model: nn.Module, mlp_out: str | None = None, stacks=None) -> list[Site]:
    """The coefficient sites of ``model``: one per FFN layer of each wanted stack, ordered by stack and layer.

    Args:
        model: any Hugging Face model (decoder-only, encoder, encoder-decoder, multimodal, hybrid), wrapped or not.
        mlp_out: a path template such as ``"model.layers.{i}.mlp.down_proj"`` that overrides the search
            (matched as a suffix of the module paths, wrappers seen through).
        stacks: which stacks to measure: None (the language model: "decoder" and "encoder" stacks), or
            names such as ``("vision",)`` or ``("language", "vision")``.

    ``Site.layer`` is the model's own block number (a hybrid with FFNs in blocks 1 and 3 gives layers
    1 and 3); ``Site.stack`` names the block list it sits in.
    """
    named = [(clean_name(n, model), m) for n, m in model.named_modules()]
    config = find_config(model)
    model_type = getattr(config, "model_type", None)
    d_model = _hidden_size(config, named)

    if mlp_out is not None:
        found = _match(named, mlp_out)
        if not found:
            raise LocateError(f"no module path matches mlp_out={mlp_out!r}. Paths look like: {_sample_paths(named)}")
        all_stacks = find_stacks(model)
        sites = []
        for stack_name, group in _group_by_stack(found, all_stacks).items():
            width = next((s.d_model for s in all_stacks if s.name == stack_name), None) or d_model
            sites += _to_sites(group, f"mlp_out={mlp_out!r}", width, stack_name)
        return sites
    if model_type in REFUSED_MODEL_TYPES:
        raise LocateError(f"model_type {model_type!r} is not supported: {REFUSED_MODEL_TYPES[model_type]}. "
                          "A number for it would be wrong, so none is given.")
    all_stacks = find_stacks(model)
    wanted = [s for s in all_stacks if _wanted(s, stacks)]
    for stack in wanted:
        reason = REFUSED_STACKS.get((model_type, stack.name))
        if reason:
            others = [s.name for s in all_stacks if s is not stack and _wanted(s, stacks)]
            raise LocateError(f"the {stack.name} stack of {model_type!r} is not supported: {reason}. "
                              + (f"Measure the other stacks with stacks={tuple(others)}." if others else ""))
    moe = [m for m in find_moe_layers(model, stacks) if any(m.stack == s.name for s in wanted)]
    # what lies inside a MoE block is the experts' (a router, shared experts); where the experts sit in the
    # decoder layer itself (Gemma 4), only the experts module is: the layer's dense MLP is found as usual
    # and joins the experts' slots (_experts_sites)
    blocks = {id(b) for s in wanted for b in s.blocks}
    moe_paths = {m.experts_path if id(m.module) in blocks else m.path for m in moe}
    sites: list[Site] = []
    hows = []
    for stack in wanted:
        found, how = _stack_sites(stack, model_type, moe_paths, stack.d_model or d_model)
        if found:
            hows.append(how)
            sites += _to_sites(found, how, stack.d_model or d_model, stack.name)
    _refuse_shared(model, sites)
    if moe:
        sites += _experts_sites(model, moe, sites)
        sites.sort(key=lambda s: ([st.name for st in wanted].index(s.stack) if s.stack in
                                  [st.name for st in wanted] else 0, s.layer))
    if not sites:
        _raise_not_found(model, model_type, d_model, named, all_stacks, wanted, stacks)
    log.debug("found %d coefficient sites by %s", len(sites), ", ".join(sorted(set(hows))))
    return sites


def _group_by_stack(found, all_stacks: list[Stack]) -> dict[str, list]:
    groups: dict[str, list] = {}
    for layer, name, module in found:
        stack = next((s.name for s in all_stacks if name.startswith(s.path + ".")), "decoder")
        groups.setdefault(stack, []).append((layer, name, module))
    return groups


def _refuse_shared(model: nn.Module, sites: list[Site]) -> None:
    paths: dict[int, list[str]] = {}
    for raw, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(clean_name(raw, model))
    for site in sites:
        where = sorted(set(paths.get(id(site.module), [])))
        if len(where) > 1:
            raise LocateError(f"'{site.path}' is one module used at several places ({where}): its input mixes "
                              "those layers, so per-layer statistics would be wrong. Pass mlp_out= for a "
                              "projection that belongs to one layer only.")


def _raise_not_found(model, model_type, d_model, named, all_stacks, wanted, stacks) -> None:
    if not wanted and all_stacks:
        raise LocateError(f"{type(model).__name__} has no stack of {stacks or LANGUAGE_STACKS}; its stacks are "
                          f"{[s.name for s in all_stacks]}: pass stacks=(...) with the ones to measure")
    ffn_like = [f"{s.path}.{i}.{rel}" for s in wanted for i, block in enumerate(s.blocks)
                for rel, m in block.named_modules() if rel and _FFN_CLASS.search(type(m).__name__)]
    experts = [name for name in ffn_like if re.search(r"experts?$", name)]
    if experts:
        raise LocateError(
            f"{type(model).__name__} (model_type={model_type!r}) has mixture-of-experts layers at {experts[:2]} in a "
            "layout kacq_hooks cannot read (its experts are neither one fused module with 3-D weights nor a list "
            "of expert MLPs it recognises). Pass the path of the dense FFN output projections yourself, e.g. "
            "instrument(model, mlp_out='encoder.block.{i}.layer.1.mlp.wo'), to measure the dense layers only.")
    if wanted and not ffn_like and all(_has_mixers(s) for s in wanted):
        raise LocateError(
            f"{type(model).__name__} (model_type={model_type!r}) has no FFN: its blocks are attention or "
            "state-space/recurrent mixers only, and a mixer's projections are not key-value memories. Knowledge "
            "entropy is defined over FFN memory coefficients, so this model has none to report.")
    found_ffn = f"It has FFN-like modules {ffn_like[:3]}, whose output projection was not recognised. " if ffn_like else ""
    raise LocateError(
        f"no MLP output projection found in {type(model).__name__} (model_type={model_type!r}). {found_ffn}Searched: "
        f"the model_type table ({len(MLP_OUT_BY_MODEL_TYPE)} types), the name patterns "
        f"{', '.join(FFN_OUT_PATTERNS[:8])}, ..., and a shape check for one d_ff -> d_model={d_model} projection "
        "per block outside attention. Pass the path yourself, e.g. "
        f"instrument(model, mlp_out='model.layers.{{i}}.mlp.down_proj'). Paths look like: {_sample_paths(named)}")


def _to_sites(found, how: str, d_model: int | None, stack: str = "decoder") -> list[Site]:
    by_layer: dict[int, tuple[str, nn.Module]] = {}
    for layer, name, module in found:
        if layer in by_layer and by_layer[layer][1] is not module:
            raise LocateError(f"{how} matches two modules for {stack} layer {layer}: '{by_layer[layer][0]}' and "
                              f"'{name}'; pass a more specific mlp_out= template")
        by_layer[layer] = (name, module)
    sites = []
    for layer in sorted(by_layer):
        name, module = by_layer[layer]
        shape = projection_shape(module)
        if shape is None:
            raise LocateError(f"'{name}' ({type(module).__name__}, found by {how}) is not a Linear-like projection; "
                              "pass mlp_out= with the path of the MLP output projection")
        d_ff, out = shape
        if d_model is not None and out != d_model:
            raise LocateError(f"'{name}' (found by {how}) maps {d_ff} -> {out}, but the model width is {d_model}: "
                              "it is not an MLP output projection; pass mlp_out= with the right path")
        sites.append(Site(layer=layer, path=name, d_ff=d_ff, d_model=out, module=module, stack=stack))
    return sites
