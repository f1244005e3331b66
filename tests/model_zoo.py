"""Every model type the installed transformers registers, built tiny from its default config, no download.

``build(model_type)`` shrinks ``AutoConfig.for_model(model_type)`` (and every sub-config: text,
vision, encoder, decoder) by setting the width, depth, FFN, head, vocabulary and expert keys it
has to small values, then builds the model with the most specific auto class the type is
registered under (seq2seq LM, so both stacks are built, then causal LM, then masked LM, then the base model).
``OVERRIDES`` holds what the generic shrink cannot guess (hybrid layer patterns, odd key names).
"""
from __future__ import annotations

import functools
import warnings

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto import modeling_auto

HIDDEN, FF, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB, EXPERTS = 32, 64, 4, 2, 8, 2, 320, 4

MAPPINGS = {  # family -> (name mapping, auto class name), in the order a type's class is chosen
    "seq2seq_lm": (modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "AutoModelForSeq2SeqLM"),
    "causal_lm": (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "AutoModelForCausalLM"),
    "masked_lm": (modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, "AutoModelForMaskedLM"),
    "base": (modeling_auto.MODEL_MAPPING_NAMES, "AutoModel"),
}

_WIDTH = ("hidden_size", "n_embd", "d_model", "embed_dim", "dim", "model_dim", "hidden_dim", "word_embed_proj_dim",
          "embedding_size", "text_embed_dim", "projection_dim", "d_embed")
_FFN = ("intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_hidden_size",
        "moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size", "d_inner",
        "ff_intermediate_size", "dim_ff", "lru_width", "mlp_dim", "hidden_ff_size", "feed_forward_size", "n_inner_ff", "dim_feedforward",
        "encoder_intermediate_size", "decoder_intermediate_size", "mlp_hidden_size", "block_d_ff")
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers", "num_decoder_layers",
           "n_layers", "num_encoder_layers", "depth", "encoder_num_layers", "decoder_num_layers")
_HEADS = ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", "decoder_attention_heads",
          "n_heads", "num_decoder_attention_heads", "encoder_num_attention_heads", "decoder_num_attention_heads")
_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_routed")
_TOPK = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_k")

# What the generic shrink gets wrong; applied to the top-level config after it.
OVERRIDES: dict[str, dict] = {
    "jamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, mamba_d_state=4, mamba_dt_rank=4, mamba_expand=2),
    "zamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4,
                  mamba_dt_rank=4, n_mamba_heads=2, attention_hidden_size=64, attention_head_dim=16),
    "xlnet": dict(d_head=8),
    "deepseek_v3": dict(first_k_dense_replace=1),  # block 0 dense, block 1 MoE
    "rwkv": dict(attention_hidden_size=HIDDEN),
    "xlstm": dict(num_blocks=LAYERS),
    "nemotron_h": dict(num_hidden_layers=4),  # layer types: mamba, moe, attention, mlp
    "zamba2": dict(num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
                   hybrid_layer_ids=[1, 3], num_mem_blocks=1),
    "reformer": dict(attn_layers=["local", "lsh"], axial_pos_shape=[8, 16], axial_pos_embds_dim=[16, 16],
                     num_buckets=4, lsh_attn_chunk_length=8, local_attn_chunk_length=8),
    "funnel": dict(block_sizes=[1, 1], d_head=8),
}


def mapping_types() -> dict[str, str]:
    """model_type -> family (the first mapping, in MAPPINGS order, that registers it)."""
    out: dict[str, str] = {}
    for family, (names, _) in MAPPINGS.items():
        for model_type in names:
            out.setdefault(model_type, family)
    return out


def _sub_configs(cfg: PretrainedConfig) -> list[PretrainedConfig]:
    return [v for v in vars(cfg).values() if isinstance(v, PretrainedConfig)]


def _set_if_int(cfg, keys, value, cap: bool = False) -> None:
    for key in keys:
        current = vars(cfg).get(key)
        if isinstance(current, int) and not isinstance(current, bool) and current > 0:
            setattr(cfg, key, min(current, value) if cap else value)


def shrink(cfg: PretrainedConfig, layers: int = LAYERS) -> PretrainedConfig:
    """Set every size key ``cfg`` and its sub-configs carry to a tiny value (in place)."""
    _set_if_int(cfg, _WIDTH, HIDDEN)
    _set_if_int(cfg, _FFN, FF)
    _set_if_int(cfg, _LAYERS, layers, cap=True)
    _set_if_int(cfg, _HEADS, HEADS, cap=True)
    _set_if_int(cfg, ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"), KV_HEADS, cap=True)
    _set_if_int(cfg, ("head_dim", "d_head", "kv_channels", "attention_head_size", "qk_nope_head_dim",
                      "v_head_dim", "qk_rope_head_dim", "qk_head_dim"), HEAD_DIM)
    _set_if_int(cfg, ("kv_lora_rank", "q_lora_rank"), 16)
    _set_if_int(cfg, _EXPERTS, EXPERTS, cap=True)
    _set_if_int(cfg, _TOPK, 2, cap=True)
    _set_if_int(cfg, ("n_group", "topk_group"), 1, cap=True)
    _set_if_int(cfg, ("vocab_size", "n_vocab"), VOCAB)
    _set_if_int(cfg, ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"), 128, cap=False)
    _set_if_int(cfg, ("image_size",), 32, cap=True)
    _set_if_int(cfg, ("patch_size",), 8, cap=True)
    _set_if_int(cfg, ("num_channels",), 3, cap=True)
    _set_if_int(cfg, ("state_size", "d_state", "ssm_state_size", "mamba_d_state"), 4, cap=True)
    _set_if_int(cfg, ("time_step_rank", "mamba_dt_rank"), 4, cap=True)
    _set_if_int(cfg, ("mamba_n_heads", "ssm_num_heads"), 4, cap=True)
    _set_if_int(cfg, ("mamba_d_head", "mamba_head_dim"), 16, cap=True)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
                "cls_token_id", "mask_token_id", "unk_token_id"):
        if isinstance(vars(cfg).get(key), int) and vars(cfg)[key] >= VOCAB:
            setattr(cfg, key, 1)
    for key in ("layer_types", "layers_block_type", "block_types", "hybrid_override_pattern", "mlp_layer_types"):
        value = vars(cfg).get(key)
        if isinstance(value, (list, tuple)) and len(value) > layers:
            n = vars(cfg).get("num_hidden_layers", layers)
            setattr(cfg, key, list(value[:n]))
        elif isinstance(value, str) and len(value) > layers:
            setattr(cfg, key, value[: vars(cfg).get("num_hidden_layers", layers)])
    for sub in _sub_configs(cfg):
        shrink(sub, layers)
    return cfg


@functools.lru_cache(maxsize=None)
def tiny_config(model_type: str) -> PretrainedConfig:
    cfg = AutoConfig.for_model(model_type)
    layers = OVERRIDES.get(model_type, {}).get("num_hidden_layers", LAYERS)
    shrink(cfg, layers)
    for key, value in OVERRIDES.get(model_type, {}).items():
        setattr(cfg, key, value)
    return cfg


def auto_class(model_type: str, family: str | None = None):
    import transformers

    family = family or mapping_types()[model_type]
    return getattr(transformers, MAPPINGS[family][1])


def build(model_type: str, family: str | None = None, seed: int = 0):
    """The tiny model of ``model_type`` in eval mode (raises whatever transformers raises)."""
    import copy

    cfg = copy.deepcopy(tiny_config(model_type))
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto_class(model_type, family).from_config(cfg)
    return model.eval()


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
