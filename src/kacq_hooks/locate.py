"""Find the coefficient sites of a model: the MLP output projection of every layer, whose input is C.

Three ways, in order (SCIENCE.md §1):

1. a table keyed by ``config.model_type``;
2. name patterns shared by most decoder families (so new dense models need no code here);
3. a shape check: the one projection per block from d_ff down to d_model outside attention.

Attention output projections share class and sometimes name with MLP ones (GPT-2's ``attn.c_proj``):
every way refuses a path that goes through an attention module. Wrapper prefixes added by DDP,
FSDP, ``torch.compile`` and activation checkpointing are seen through.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LocateError

log = logging.getLogger(__name__)

# model_type -> path of the output projection, relative to whatever holds the numbered blocks.
MLP_OUT_BY_MODEL_TYPE: dict[str, str] = {
    **dict.fromkeys(
        ["llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "olmo3", "gemma", "gemma2", "gemma3_text",
         "stablelm", "granite", "cohere", "cohere2", "phi3", "smollm3", "helium", "glm", "ministral"],
        "layers.{i}.mlp.down_proj"),
    "gpt2": "h.{i}.mlp.c_proj",
    "gpt_neo": "h.{i}.mlp.c_proj",
    "gpt_neox": "layers.{i}.mlp.dense_4h_to_h",
    "falcon": "h.{i}.mlp.dense_4h_to_h",
    "bloom": "h.{i}.mlp.dense_4h_to_h",
    "phi": "layers.{i}.mlp.fc2",
    "gptj": "h.{i}.mlp.fc_out",
    "codegen": "h.{i}.mlp.fc_out",
    "opt": "layers.{i}.fc2",
}

# Fallback suffixes, tried in order; "{i}" is the block index.
MLP_OUT_PATTERNS = (
    "{i}.mlp.down_proj", "{i}.mlp.c_proj", "{i}.mlp.dense_4h_to_h", "{i}.mlp.fc2", "{i}.mlp.fc_out",
    "{i}.mlp.w2", "{i}.mlp.out_proj", "{i}.mlp.proj_out", "{i}.feed_forward.w2", "{i}.feed_forward.down_proj",
    "{i}.ffn.down_proj", "{i}.ffn.fc2", "{i}.ffn.w2", "{i}.fc2",
)

_WRAPPER_PARTS = {"_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module", "_forward_module"}
_ATTENTION = re.compile(r"(^|\.)[^.]*(attn|attention)[^.]*(\.|$)", re.IGNORECASE)
_MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


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

    @property
    def label(self) -> str:
        """The name results use for this site: the model's own layer number, with its stack."""
        return f"{self.stack}.layer_{self.layer}"

    def __repr__(self) -> str:
        extra = f", experts={self.experts}x{self.expert_d_ff}" if self.kind == "experts" else ""
        return (f"Site({self.stack}, layer={self.layer}, path={self.path!r}, kind={self.kind}, d_ff={self.d_ff}, "
                f"d_model={self.d_model}{extra})")


def clean_name(name: str, root: nn.Module) -> str:
    """A module path with the parts added by DDP, FSDP, torch.compile and checkpoint wrappers removed."""
    parts = [p for p in name.split(".") if p and p not in _WRAPPER_PARTS]
    if parts and parts[0] == "module" and _is_data_parallel(root):
        parts = parts[1:]
    return ".".join(parts)


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


def _check_moe(config, named) -> None:
    experts = [(n, type(m).__name__) for n, m in named if re.search(r"experts?$", n.split(".")[-1], re.I)
               or type(m).__name__.endswith(("Experts", "SparseMoeBlock", "MoeBlock"))]
    n_experts = next((getattr(config, k) for k in _MOE_CONFIG_KEYS
                      if config is not None and isinstance(getattr(config, k, None), int) and getattr(config, k) > 1),
                     None)
    if experts or n_experts:
        where = f" ({experts[0][1]} at '{experts[0][0]}')" if experts else ""
        raise LocateError(
            f"this is a mixture-of-experts model{where}: its experts are fused into one module with 3-D weights, "
            "so there is no per-expert output projection whose input could be hooked, and knowledge entropy per "
            "expert (over routed tokens only) is not supported yet. Use a dense model, or pass "
            "mlp_out='path.{i}.to.a.dense.projection' for layers that are dense (e.g. a shared expert)."
        )


def find_sites(model: nn.Module, mlp_out: str | None = None) -> list[Site]:
    """The coefficient sites of ``model``, one per layer, ordered by layer.

    ``mlp_out`` overrides the search with a path template such as ``"model.layers.{i}.mlp.down_proj"``
    (matched as a suffix of the module paths, wrappers seen through).
    """
    named = [(clean_name(n, model), m) for n, m in model.named_modules()]
    config = find_config(model)
    model_type = getattr(config, "model_type", None)
    d_model = _hidden_size(config, named)

    if mlp_out is not None:
        found, how = _match(named, mlp_out), f"mlp_out={mlp_out!r}"
        if not found:
            raise LocateError(f"no module path matches {how}. Paths look like: {_sample_paths(named)}")
    else:
        _check_moe(config, named)
        found, how = [], ""
        if model_type in MLP_OUT_BY_MODEL_TYPE:
            found, how = _match(named, MLP_OUT_BY_MODEL_TYPE[model_type]), f"table entry for {model_type!r}"
        for pattern in MLP_OUT_PATTERNS if not found else ():
            found, how = _match(named, pattern), f"name pattern {pattern!r}"
            if found:
                break
        if not found:
            found, how = _by_shape(named, d_model), "shape check"
        if not found:
            raise LocateError(
                f"no MLP output projection found in {type(model).__name__} (model_type={model_type!r}). Searched: "
                f"the model_type table ({len(MLP_OUT_BY_MODEL_TYPE)} types), the name patterns "
                f"{', '.join(p.replace('{i}.', '') for p in MLP_OUT_PATTERNS)}, and a shape check for one "
                f"d_ff -> d_model={d_model} projection per block outside attention. Pass the path yourself, e.g. "
                f"instrument(model, mlp_out='model.layers.{{i}}.mlp.down_proj'). Paths look like: {_sample_paths(named)}"
            )
    sites = _to_sites(found, how, d_model)
    log.debug("found %d coefficient sites by %s", len(sites), how)
    return sites


def _to_sites(found, how: str, d_model: int | None) -> list[Site]:
    by_layer: dict[int, tuple[str, nn.Module]] = {}
    for layer, name, module in found:
        if layer in by_layer and by_layer[layer][1] is not module:
            raise LocateError(f"{how} matches two modules for layer {layer}: '{by_layer[layer][0]}' and '{name}'; "
                              "pass a more specific mlp_out= template")
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
        sites.append(Site(layer=layer, path=name, d_ff=d_ff, d_model=out, module=module))
    return sites


def _by_shape(named, d_model: int | None) -> list[tuple[int, str, nn.Module]]:
    if d_model is None:
        return []
    per_block: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in named:
        shape = projection_shape(module)
        block = re.search(r"\.(\d+)\.", f".{name}")
        if shape and block and shape[1] == d_model and shape[0] > d_model and not _ATTENTION.search(name):
            per_block.setdefault(int(block.group(1)), []).append((name, module))
    if not per_block or any(len(v) != 1 for v in per_block.values()):
        return []
    return [(layer, *v[0]) for layer, v in per_block.items()]


def _sample_paths(named, limit: int = 6) -> str:
    leaves = [n for n, m in named if n and projection_shape(m) is not None]
    return ", ".join(repr(n) for n in leaves[:limit]) or "(no Linear-like modules)"
