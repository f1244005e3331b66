"""TransformerLens front end: ``HookedTransformer`` and ``TransformerBridge``.

TransformerLens names the memory coefficients C with a hook point (docs/science.md, "Memory coefficients"):

=====================  =============================  ================================
model                  site (a ``HookPoint`` module)  C
=====================  =============================  ================================
``HookedTransformer``  ``blocks.{i}.mlp.hook_post``   ``act(x W_in)`` (gated: ``* x W_gate``)
``TransformerBridge``  ``blocks.{i}.mlp.out.hook_in``  the input of the wrapped HF down projection
=====================  =============================  ================================

**How our hooks live with TransformerLens's.** kacq registers plain torch forward *pre*-hooks on
those ``HookPoint`` modules. TransformerLens keeps its own hooks in ``HookPoint.fwd_hooks`` /
``bwd_hooks`` (``LensHandle`` lists) and ``reset_hooks()``, ``remove_all_hook_fns()``, the
``hooks()`` context and ``run_with_hooks`` only ever remove handles from those lists. So:

- ``reset_hooks()`` (even ``including_permanent=True``) leaves kacq's capture attached; only
  ``inst.remove()`` (or leaving ``with inst:``) detaches it. Instrumenting and removing leaves
  TransformerLens's own hooks where they were.
- TransformerLens hooks are *forward* hooks on the hook point, so they always run after kacq's
  pre-hook: kacq records C as the model computed it, **before** a TransformerLens hook on that same
  hook point edits it (e.g. an ablation of ``hook_post``). Edits made at earlier hook points
  (``hook_pre``, the residual stream, attention) do reach C and are recorded.
- ``TransformerBridge.enable_compatibility_mode()`` keeps the same ``HookPoint`` objects (it adds
  the HookedTransformer names as aliases), so capture keeps working across it.

**Padding.** kacq uses the mask TransformerLens itself settles on, read where it is finally
applied: the keyword arguments of the first block (HookedTransformer) or of the wrapped HF model
(bridge). That covers an explicit ``attention_mask=``, the mask TransformerLens derives for
left-padded batches (strings, and for a HookedTransformer also token ids when its tokenizer pads
left), the growing mask of cached generation, ``run_with_hooks`` / ``run_with_cache`` (which call
``forward`` directly) and ``TransformerBridge.hf_generate``. One gap follows from it: a batch of
strings padded on the **right** gets no mask from TransformerLens (causal attention makes one
unnecessary for the outputs), so its pad positions are counted. Pass ``attention_mask=`` with the
tokens, or ``padding_side="left"``, to leave them out. ``HookedTransformer`` runs with
``start_at_layer > 0`` skip the first block and are not supported: pause the instrumentation.

The builders :func:`hooked_transformer_from_hf` and :func:`bridge_from_hf` make either model from a
Hugging Face model already in memory (no hub access).
"""
from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, LocateError, MissingExtraError
from ..experts import ExpertsLayer
from ..locate import Site
from . import hf
from .binding import Binding
from .stacks import Arguments, StackReader

log = logging.getLogger(__name__)

HOOKED_TRANSFORMER_SITE = "blocks.{i}.mlp.hook_post"
BRIDGE_SITE = "blocks.{i}.mlp.out.hook_in"


def _require():
    """The ``transformer_lens`` package, or a :class:`MissingExtraError` that says how to get it."""
    try:
        import transformer_lens  # the transformer-lens extra
    except ImportError as err:
        raise MissingExtraError("transformer-lens", "transformer-lens", "Instrumenting a TransformerLens model") from err
    return transformer_lens


def is_bridge(model: Any) -> bool:
    """True for a ``TransformerBridge`` (TransformerLens 3's wrapper around a Hugging Face model)."""
    return any(cls.__name__ == "TransformerBridge" for cls in type(model).__mro__)


# -- binding -------------------------------------------------------------------------------------
def bind(model: nn.Module, mlp_out: str | None = None) -> Binding:
    """Bind a ``HookedTransformer`` or ``TransformerBridge``: sites are hook points (see the module notes).

    ``mlp_out`` is a hook-point name template such as ``"blocks.{i}.mlp.hook_post"`` (the default for
    a HookedTransformer; ``"blocks.{i}.mlp.out.hook_in"`` for a bridge).
    """
    _require()
    bridge = is_bridge(model)
    if not hasattr(model, "hook_dict") or not hasattr(model, "cfg"):
        raise LocateError(f"{type(model).__name__} comes from transformer_lens but has no hook_dict/cfg: kacq_hooks "
                          "instruments HookedTransformer and TransformerBridge models")
    sites = _sites(model, mlp_out or (BRIDGE_SITE if bridge else HOOKED_TRANSFORMER_SITE))
    log.debug("bound %s: %d sites at %s", type(model).__name__, len(sites), sites[0].path)
    if bridge:  # every path into the wrapped HF model (forward, generate, hf_generate) passes its mask there
        hf_model = model.original_model
        stacks = [StackReader(name="decoder", module=hf_model)]
        return Binding(root=hf_model, sites=sites, stacks=stacks, site_stack=[0] * len(sites),
                       root_reader=hf.root_reader(hf_model), name="transformer_lens.bridge")
    # HookedTransformer: the first block gets the mask TransformerLens settled on, however forward was reached
    # (run_with_hooks calls forward directly, skipping hooks on the model itself), so a call opens at the first
    # block and ends after the last one
    first = model.blocks[0]
    stacks = [StackReader(name="decoder", module=first, arguments=BLOCK_ARGUMENTS)]
    return Binding(root=first, closer=model.blocks[-1], frame_owner=model, sites=sites, stacks=stacks,
                   site_stack=[0] * len(sites), root_reader=stacks[0], name="transformer_lens")


def _sites(model, template: str) -> list[Site]:
    if "{i}" not in template:
        raise LocateError(f"mlp_out={template!r} must contain '{{i}}' where the layer index goes, "
                          f"e.g. {HOOKED_TRANSFORMER_SITE!r}")
    pattern = re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)"))
    by_layer: dict[int, tuple[str, nn.Module]] = {}
    for hook_name, hook_point in model.hook_dict.items():
        match = pattern.fullmatch(hook_name)
        if match:
            by_layer.setdefault(int(match.group(1)), (hook_name, hook_point))
    cfg = model.cfg
    if not by_layer and template == HOOKED_TRANSFORMER_SITE and getattr(cfg, "num_experts", None):
        return _experts_sites(model)
    if not by_layer:
        sample = [n for n in model.hook_dict if n.startswith("blocks.0.")][:8]
        raise LocateError(
            f"no hook point of {type(model).__name__} matches {template!r} (attention-only or mixture-of-experts "
            f"models have no single MLP output projection per layer). Hook points of block 0: {sample}. Pass "
            "mlp_out= with the name of the hook point whose input is the MLP output projection's input")
    d_ff, d_model = getattr(cfg, "d_mlp", None), getattr(cfg, "d_model", None)
    if not isinstance(d_ff, int) or d_ff <= 0:
        raise LocateError(f"{type(model).__name__}.cfg.d_mlp is {d_ff!r}: kacq_hooks needs the MLP width to size "
                          "its statistics")
    return [Site(layer=layer, path=name, d_ff=d_ff, d_model=d_model, module=hook_point)
            for layer, (name, hook_point) in sorted(by_layer.items())]


HOOKED_TRANSFORMER_EXPERTS_SITE = "blocks.{i}.mlp.experts.{e}.hook_post"


def _experts_sites(model) -> list[Site]:
    """One experts site per MoE block of a HookedTransformer: C of expert e is the input of
    ``blocks.{i}.mlp.experts.{e}.hook_post``; the routing is read from the MoE block's forward."""
    cfg = model.cfg
    sites = []
    for i, block in enumerate(model.blocks):
        moe = block.mlp
        experts = getattr(moe, "experts", None)
        posts = [getattr(expert, "hook_post", None) for expert in experts] if isinstance(experts, nn.ModuleList) else []
        if not posts or any(p is None for p in posts):
            raise LocateError(f"blocks.{i}.mlp ({type(moe).__name__}) of a mixture-of-experts HookedTransformer has no "
                              f"per-expert {HOOKED_TRANSFORMER_EXPERTS_SITE!r} hook points; pass mlp_out= with the hook "
                              "point whose input is C")
        layer = ExpertsLayer(layer=i, path=f"blocks.{i}.mlp.experts", kind="experts", module=experts,
                             experts=len(posts), d_ff=cfg.d_mlp, d_model=cfg.d_model, downs=tuple(posts), block=moe)
        sites.append(Site(layer=i, path=layer.path, d_ff=layer.slots, d_model=cfg.d_model, module=moe, kind="experts",
                          experts=layer.experts, expert_d_ff=layer.d_ff, experts_layer=layer))
    return sites


# A ``TransformerBlock(resid_pre, ..., past_kv_cache_entry=..., attention_mask=...)`` call: the residual
# stream gives (batch, seq), and a cache entry holding keys means the call continues cached positions.
BLOCK_ARGUMENTS = Arguments(grid=("resid_pre",), tokens=(), cache="past_kv_cache_entry")


# -- builders ------------------------------------------------------------------------------------
def hooked_transformer_config_from_hf(hf_config, *, dtype: torch.dtype | None = None, device=None):
    """A ``HookedTransformerConfig`` with the shapes of a GPT-2 or Llama-family HF config (no hub access).

    TransformerLens's own ``convert_hf_model_config`` looks models up by hub name and assumes, e.g.,
    GPT-2's ``d_mlp = 4 * d_model``; this reads every size from the config object instead.

    >>> from transformers import GPT2Config
    >>> cfg = hooked_transformer_config_from_hf(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=64))
    >>> cfg.d_mlp, cfg.n_layers, cfg.normalization_type
    (64, 2, 'LN')
    """
    tl = _require()
    model_type = getattr(hf_config, "model_type", None)
    common = dict(d_vocab=hf_config.vocab_size, init_weights=False, dtype=dtype or torch.float32,
                  device=str(device) if device is not None else "cpu")
    if model_type == "gpt2":
        d_model, n_heads = hf_config.n_embd, hf_config.n_head
        if getattr(hf_config, "reorder_and_upcast_attn", False):
            raise ConfigError("GPT-2 configs with reorder_and_upcast_attn=True have no HookedTransformer equivalent; "
                            "use bridge_from_hf(model) instead")
        fields = dict(
            d_model=d_model, d_head=d_model // n_heads, n_heads=n_heads, n_layers=hf_config.n_layer,
            d_mlp=hf_config.n_inner or 4 * d_model, n_ctx=hf_config.n_positions, eps=hf_config.layer_norm_epsilon,
            act_fn=hf_config.activation_function, normalization_type="LN", positional_embedding_type="standard",
            use_attn_scale=hf_config.scale_attn_weights,
            scale_attn_by_inverse_layer_idx=hf_config.scale_attn_by_inverse_layer_idx,
            original_architecture="GPT2LMHeadModel")
    elif model_type == "llama":
        if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
            raise ConfigError("Llama configs with attention_bias or mlp_bias are not converted to a HookedTransformer "
                            "(TransformerLens's llama weight conversion drops biases); use bridge_from_hf(model)")
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_type={rope.get('rope_type')!r} is not converted to a HookedTransformer here; use "
                            "bridge_from_hf(model), which runs the Hugging Face attention itself")
        n_heads = hf_config.num_attention_heads
        d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or n_heads
        fields = dict(
            d_model=hf_config.hidden_size, d_head=d_head, n_heads=n_heads, n_layers=hf_config.num_hidden_layers,
            d_mlp=hf_config.intermediate_size, n_ctx=hf_config.max_position_embeddings, eps=hf_config.rms_norm_eps,
            act_fn=hf_config.hidden_act, n_key_value_heads=kv_heads if kv_heads != n_heads else None,
            normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
            rotary_dim=d_head, rotary_base=rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)),
            final_rms=True, gated_mlp=True, original_architecture="LlamaForCausalLM")
    else:
        raise ConfigError(f"hooked_transformer_from_hf converts GPT-2 and Llama models, not model_type={model_type!r}; "
                        "use bridge_from_hf(model), which wraps any architecture TransformerLens supports")
    return tl.HookedTransformerConfig(**fields, **common)


def hooked_transformer_from_hf(hf_model: nn.Module, tokenizer=None):
    """A ``HookedTransformer`` with a copy of ``hf_model``'s weights, converted in memory (no hub access).

    Weights are loaded without TransformerLens's usual processing (no layer-norm folding, no
    centering), so its activations, C included, match the Hugging Face model's to float precision.
    GPT-2 and Llama-family models only; :func:`bridge_from_hf` covers the rest. The result is in
    ``hf_model``'s training mode and on its device.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                   num_attention_heads=4, vocab_size=64))
    >>> ht = hooked_transformer_from_hf(hf)
    >>> ht.cfg.d_mlp
    64
    """
    tl = _require()
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights  # extra

    parameter = next(hf_model.parameters())
    cfg = hooked_transformer_config_from_hf(hf_model.config, dtype=parameter.dtype, device=parameter.device)
    convert = convert_gpt2_weights if cfg.original_architecture == "GPT2LMHeadModel" else convert_llama_weights
    model = tl.HookedTransformer(cfg, tokenizer=tokenizer)
    with torch.no_grad():
        state = convert(hf_model, cfg)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.train(hf_model.training)


def bridge_from_hf(hf_model: nn.Module, tokenizer=None):
    """A ``TransformerBridge`` around ``hf_model`` itself (no hub access, no copy of the weights).

    TransformerLens wraps the model **in place**: its submodules are replaced by bridge components
    that call the original ones, so the HF model's outputs are unchanged but its module tree is not;
    pass ``copy.deepcopy(hf_model)`` to keep the original untouched. The bridge runs the Hugging
    Face forward itself, so its activations match the HF model's (same attention implementation).
    """
    _require()
    from transformer_lens.model_bridge.sources import build_bridge_from_module  # the transformer-lens extra

    architecture = (getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__])[0]
    try:
        return build_bridge_from_module(hf_model, architecture, hf_config=hf_model.config, tokenizer=tokenizer)
    except ValueError as err:
        if "architecture" not in str(err).lower():
            raise
        raise ConfigError(f"TransformerLens has no bridge adapter for {architecture}: {err}. Instrument the Hugging "
                        "Face model directly with kacq_hooks.instrument(hf_model)") from err
