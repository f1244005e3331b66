"""Find the coefficient sites of a model: the FFN output projection of every layer, whose input is C.

A model is read as stacks: its outermost numbered block lists (a decoder, an encoder, a vision tower).
In each block of a wanted stack the FFN output projection is found three ways, in order:

1. a table keyed by ``config.model_type``;
2. name patterns shared by most families (so new dense models need no code here);
3. a shape check: the one projection per block from d_ff down to the stack width outside attention.

Nothing inside attention or a sequence mixer (state-space ``mixer``/``mamba``, linear attention,
recurrences) is ever a site, so hybrids get sites on their FFN blocks only and a model without any
FFN (Mamba) is refused. Mixture-of-experts layers are found by :func:`find_moe_layers`.
:func:`stack_specs` tells, per stack, which module receives the stack's own tokens and mask.

Attention output projections share class and sometimes name with MLP ones (GPT-2's ``attn.c_proj``):
every way refuses a path that goes through an attention module. Wrapper prefixes added by DDP,
FSDP, ``torch.compile`` and activation checkpointing are seen through.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import LocateError

log = logging.getLogger(__name__)

# model_type -> the output projection's path inside one block (a regex over the block-relative path).
MLP_OUT_BY_MODEL_TYPE: dict[str, str] = {
    **dict.fromkeys(
        ["llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "olmo3", "gemma", "gemma2", "gemma3_text",
         "stablelm", "granite", "cohere", "cohere2", "phi3", "smollm3", "helium", "glm", "ministral"],
        r"mlp\.down_proj"),
    "gpt2": r"mlp\.c_proj",
    "gpt_neo": r"mlp\.c_proj",
    "gpt_neox": r"mlp\.dense_4h_to_h",
    "falcon": r"mlp\.dense_4h_to_h",
    "bloom": r"mlp\.dense_4h_to_h",
    "phi": r"mlp\.fc2",
    "gptj": r"mlp\.fc_out",
    "codegen": r"mlp\.fc_out",
    "opt": r"fc2",
    "recurrent_gemma": r"mlp_block\.down_proj",
    "rwkv": r"feed_forward\.value",          # channel mixing: value(relu(key x)^2), C = relu(key x)^2
    "xlstm": r"ffn\.proj_down",
    "xlnet": r"ff\.layer_2",
    "t5": r"layer\.\d+\.DenseReluDense\.wo",
}

# Block-relative regexes tried in order when the table has no entry; the first that matches any
# block of a stack is used for all its blocks (blocks without it, e.g. a hybrid's mixer-only
# blocks, get no site).
FFN_OUT_PATTERNS = (
    r"mlp\.down_proj", r"mlp\.c_proj", r"mlp\.dense_4h_to_h", r"mlp\.fc2", r"mlp\.fc_out", r"mlp\.w2",
    r"mlp\.out_proj", r"mlp\.proj_out", r"mlp\.output_linear", r"mlp\.down", r"mlp\.wo", r"mlp\.linear_fc2",
    r"mlp\.fc_2", r"mlp\.dense_out", r"mlp\.linear_2", r"mlp_block\.down_proj", r"shared_mlp\.output_linear",
    r"feed_forward\.w2", r"feed_forward\.down_proj", r"feed_forward\.output", r"feed_forward\.fc2",
    r"feed_forward\.output_dense", r"feed_forward\.layer_2", r"ffn\.down_proj", r"ffn\.fc2", r"ffn\.w2",
    r"ffn\.lin2", r"ffn\.proj_down", r"ffn\.output", r"ffn\.layer_2", r"ffn\.ffn\.w_out", r"ffn\.w_out",
    r"ffn\.dense_out", r"ff\.layer_2", r"ff\.fc2", r"(?:layer\.\d+\.)?DenseReluDense\.wo",
    r"(?:layer\.\d+\.)?DenseGatedActDense\.wo", r"output\.dense", r"fc2", r"mixer\.down_proj",
)

_WRAPPER_PARTS = {"_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module", "_forward_module"}
_FFN_CLASS = re.compile(r"MLP|Mlp|FeedForward|FFN|Ffn|DenseReluDense|DenseGatedActDense|ChannelMix|SparseMoe|"
                        r"Experts|MoeBlock|SparseMLP|DenseActDense", re.I)  # class names that mean "an FFN"
_ATTENTION = re.compile(r"(^|\.)[^.]*(attn|attention)[^.]*(\.|$)", re.IGNORECASE)


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


# -- stacks ------------------------------------------------------------------------------------------
_VISION = re.compile(r"vision|visual|image|vit$|patch", re.I)
_AUDIO = re.compile(r"audio|speech|acoustic|sound", re.I)
LANGUAGE_STACKS = ("decoder", "encoder")
# Block-relative paths inside these are never an FFN: attention and sequence mixers (state-space,
# linear attention, recurrences, convolutions). Matched on path parts and on module class names.
_MIXER_PART = re.compile(r"^(mixer|mamba|ssm|linear_attn|temporal_block|time_mix|mlstm_layer|slstm_layer|"
                         r"short_conv|conv|recurrent|rnn|lru|token_mixer)$", re.I)
_MIXER_CLASS = re.compile(r"Attention|Attn|Mamba|Mixer|Ssm|SSM|DeltaNet|Recurrent|Rglru|LSTMLayer|ShortConv|"
                          r"TimeMix|SelfAtt", re.I)
_MLP_CLASS = re.compile(r"MLP|Mlp|FeedForward|FFN|Ffn|DenseReluDense|DenseGatedActDense|ChannelMix", re.I)

# Models whose FFN is there but whose layout kacq_hooks cannot yet attribute per layer and position:
# refused by name before any forward, with the reason.
REFUSED_MODEL_TYPES: dict[str, str] = {
    "cpmant": "CPM-Ant prepends prompt positions inside the model, so each FFN sees more positions than "
              "input_ids has and no padding mask lines up with them",
    "albert": "ALBERT applies one shared layer at every depth, so one module's input mixes all layers",
    "hrm_text": "HRM runs its layers recurrently, several times per forward, so one module's input mixes "
                "those steps",
    "longformer": "Longformer pads the sequence to a multiple of its attention window inside the model, so each "
                  "FFN sees more positions than input_ids has",
    "led": "LED pads the sequence to a multiple of its attention window inside the model, so each FFN sees more "
           "positions than input_ids has",
    "funnel": "Funnel pools the sequence between blocks, so later FFNs see fewer positions than the mask covers",
    "pegasus_x": "PEGASUS-X runs each encoder FFN twice per forward (local and global tokens)",
    "zamba": "Zamba applies one shared transformer block (with its FFN) at several depths, so one module's "
             "input mixes those layers",
    "zamba2": "Zamba2 applies shared transformer blocks (with their FFN) at several depths, so one module's "
              "input mixes those layers",
}
# Stacks refused by model type (the rest of the model can still be measured with stacks=...).
REFUSED_STACKS: dict[tuple[str, str], str] = {
    ("prophetnet", "decoder"): "ProphetNet's decoder runs a main stream and n-gram prediction streams through "
                               "the same FFN in one call, so its positions are not the decoder's tokens",
    ("fsmt", "decoder"): "FSMT's decoder takes a padding mask of its own making (decoder_padding_mask), not an "
                         "attention_mask kacq_hooks can read",
    ("xlm-prophetnet", "decoder"): "XLM-ProphetNet's decoder runs a main stream and n-gram prediction streams "
                                   "through the same FFN in one call, so its positions are not the decoder's tokens",
}
# How C is laid out when it is not [batch, seq, d_ff].
LAYOUT_BY_MODEL_TYPE = {"xlnet": "seq_first", "fsmt": "seq_first", "opt": "flat"}


@dataclass(frozen=True)
class Stack:
    """One numbered block list of a model: its stack name, path, blocks and width."""

    name: str
    path: str
    blocks: nn.ModuleList
    d_model: int | None


def _base_stack_name(path: str, encoder_only: bool) -> str:
    parts = path.split(".")
    if any(_VISION.search(p) for p in parts):
        return "vision"
    if any(_AUDIO.search(p) for p in parts):
        return "audio"
    for part in parts:  # the outermost name decides: EncoderDecoderModel's decoder is a BERT *encoder* inside
        if "encoder" in part.lower():
            return "encoder"
        if "decoder" in part.lower():
            return "decoder"
    return "encoder" if encoder_only else "decoder"


def _is_encoder_only(model: nn.Module, config) -> bool:
    name = type(model).__name__
    if re.search(r"MaskedLM|ForSequenceClassification|ForTokenClassification|ForQuestionAnswering|ForPreTraining",
                 name):
        return True
    if name.endswith(("ForCausalLM", "LMHeadModel")) or getattr(config, "is_decoder", False):
        return False
    model_type = getattr(config, "model_type", None)
    # A base model of a type with a masked-LM head and no causal-LM head is an encoder (BERT-like).
    from transformers.models.auto import modeling_auto  # transformers is only needed for HF models

    return (model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and model_type not in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    return all(projection_shape(b) is None and not isinstance(b, (nn.Embedding, nn.LayerNorm)) for b in module)


def find_stacks(model: nn.Module) -> list[Stack]:
    """Every outermost numbered block list of ``model``, named by stack ("decoder", "encoder", "vision", ...).

    Two lists that get the same name are told apart by a suffix: "decoder", "decoder_2", ...
    """
    config = find_config(model)
    encoder_only = _is_encoder_only(model, config)
    lists: list[tuple[str, nn.ModuleList]] = []
    for raw, module in model.named_modules():
        name = clean_name(raw, model)
        if _is_block_list(module) and not any(name.startswith(p + ".") for p, _ in lists):
            lists.append((name, module))
    stacks, seen = [], {}
    for path, blocks in lists:
        base = _base_stack_name(path, encoder_only)
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}_{seen[base]}"
        stacks.append(Stack(name, path, blocks, _stack_width(blocks, config, base)))
    return stacks


def _stack_width(blocks: nn.ModuleList, config, base: str) -> int | None:
    """The width of a stack's residual stream: the size its blocks' own norms normalise."""
    sizes: dict[int, int] = {}
    for name, module in blocks[0].named_modules():
        weight = getattr(module, "weight", None)
        if ("norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1
                and not _ATTENTION.search(name) and not _under_mixer(name, blocks[0])):
            sizes[weight.numel()] = sizes.get(weight.numel(), 0) + 1
    if sizes:
        return max(sizes, key=sizes.get)
    sub = getattr(config, f"{base}_config", None) or (getattr(config, "text_config", None)
                                                       if base in LANGUAGE_STACKS else None)
    return _hidden_size(sub or config, [])


def _wanted(stack: Stack, stacks) -> bool:
    base = stack.name.split("_")[0] if re.fullmatch(r"[a-z]+_\d+", stack.name) else stack.name
    wanted = set(LANGUAGE_STACKS) if stacks is None else set(stacks)
    if "language" in wanted:
        wanted |= set(LANGUAGE_STACKS)
    return stack.name in wanted or base in wanted


# -- one block -----------------------------------------------------------------------------------------
def _ancestors(rel: str, block: nn.Module) -> list[nn.Module]:
    out, module = [], block
    for part in rel.split(".")[:-1]:
        module = getattr(module, part)
        out.append(module)
    return out


def _under_mixer(rel: str, block: nn.Module) -> bool:
    """Whether the block-relative path ``rel`` lies inside attention or a sequence mixer."""
    if not rel:
        return False
    parts = rel.split(".")
    for part, module in zip(parts[:-1], _ancestors(rel, block)):
        cls = type(module).__name__
        if _MLP_CLASS.search(cls):
            continue  # Nemotron-H names its MLPs "mixer" too: the class says what it is
        if _MIXER_PART.match(part) or _MIXER_CLASS.search(cls) or _ATTENTION.search(part):
            return True
    return False


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


def _experts_sites(model: nn.Module, moe: list[MoeLayer], dense: list[Site]) -> list[Site]:
    """One site per mixture-of-experts layer: E x m routed slots, then the shared experts' slots.

    A dense FFN beside the experts in the same block (GraniteMoeShared's ``shared_mlp``) is a shared
    expert of that layer: its slots join the layer's, and its dense site is dropped from ``dense``.
    """
    from .experts import TAPPABLE, ExpertsError, SharedExpert, experts_implementation, find_experts  # a cycle

    sites = []
    by_path = {m.experts_path: m for m in moe}
    for layer in find_experts(model):
        if layer.kind != "experts":
            continue  # dense layers of an MoE model are found like any dense FFN
        implementation = experts_implementation(layer.module)
        if layer.layout == "fused" and implementation not in TAPPABLE:
            raise ExpertsError(f"'{layer.path}' runs the experts implementation {implementation!r}, which keeps C inside "
                               "a fused kernel where no hook can see it. Switch to one kacq_hooks can tap, e.g. "
                               "model.set_experts_implementation('grouped_mm') (or 'eager', 'batched_mm')")
        found = by_path.get(layer.path)
        stack = found.stack if found is not None else "decoder"
        parent = layer.path.rpartition(".")[0]
        block = found.module if found is not None else submodule_at(model, parent)
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


def _has_mixers(stack: Stack) -> bool:
    return any(_MIXER_CLASS.search(type(m).__name__) or _MIXER_PART.match(rel.split(".")[-1])
               for block in stack.blocks for rel, m in block.named_modules() if rel)


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
    moe_paths = {m.path for m in moe}
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


# -- stack roots: where each stack's own tokens and mask arrive ------------------------------------
_IDS_NAMES = ("input_ids", "inputs_embeds", "hidden_states", "pixel_values", "input_features", "input_values")


@dataclass(frozen=True, eq=False)
class StackSpec:
    """How to read one stack's padding mask and token grid from its root module's forward call.

    ``root`` is the module whose ``forward`` receives the stack's own tokens and 2-D padding mask
    (a decoder-only LM's base model, a T5/BART encoder or decoder, BERT's base model, a vision
    tower). ``read_inputs(args, kwargs)`` returns (mask [batch, seq] or None, (batch, seq) or None)
    from a pre-hook's (args, kwargs) on ``root``. ``layout`` says how the sites of this stack see C:
    "batch_first" [batch, seq, d_ff], "seq_first" [seq, batch, d_ff] (XLNet) or "flat"
    [batch * seq, d_ff] (OPT). ``refuse_kwargs`` maps call arguments that make the stack's FFN
    positions differ from its tokens to the reason: ``read_inputs`` raises a LocateError for them.
    """

    name: str
    root: nn.Module
    path: str
    layout: str = "batch_first"
    mask_name: str | None = "attention_mask"
    mask_position: int | None = None
    inverted_mask_name: str | None = None   # a mask with 1 for padding (XLNet's input_mask)
    ids_names: tuple[tuple[str, int | None], ...] = ()
    refuse_kwargs: tuple[tuple[str, str], ...] = ()

    def read_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, tuple[int, int] | None]:
        for key, reason in self.refuse_kwargs:
            if kwargs.get(key) is not None:
                raise LocateError(f"{self.name} stack: {key}= is not supported: {reason}")
        mask = _argument(args, kwargs, self.mask_name, self.mask_position)
        if mask is None and self.inverted_mask_name and kwargs.get(self.inverted_mask_name) is not None:
            mask = 1 - kwargs[self.inverted_mask_name]
        shape = None
        for name, position in self.ids_names:
            value = _argument(args, kwargs, name, position)
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                shape = tuple(value.shape[:2])
                break
        return mask, shape


def _argument(args, kwargs, name, position):
    if name is None:
        return None
    if name in kwargs:
        return kwargs[name]
    if position is not None and position < len(args):
        return args[position]
    return None


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
        if any(n in _forward_params(module) for n in ("input_ids", "inputs_embeds", "pixel_values")):
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
        position = {n: i for i, n in enumerate(params)}
        refuse = ()
        inverted = None
        if model_type == "xlnet":
            inverted = "input_mask"
            refuse = (("target_mapping", "XLNet's query stream runs the FFN a second time on the predicted "
                                         "positions"),
                      ("perm_mask", "XLNet's permutation mode runs a query stream through the FFN too"))
        specs[name] = StackSpec(
            name=name, root=root, path=path, layout=LAYOUT_BY_MODEL_TYPE.get(model_type, "batch_first"),
            mask_name="attention_mask" if "attention_mask" in position else None,
            mask_position=position.get("attention_mask"), inverted_mask_name=inverted,
            ids_names=tuple((n, position.get(n)) for n in _IDS_NAMES if n in position), refuse_kwargs=refuse)
    return specs


def find_stack_roots(model: nn.Module, sites: list[Site]) -> dict[str, nn.Module]:
    """For each stack that ``sites`` use, the module whose forward receives that stack's tokens and mask."""
    return {name: spec.root for name, spec in stack_specs(model, sites).items()}


def _sample_paths(named, limit: int = 6) -> str:
    leaves = [n for n, m in named if n and projection_shape(m) is not None]
    return ", ".join(repr(n) for n in leaves[:limit]) or "(no Linear-like modules)"
