"""Tiny random Hugging Face models built from configs: the one place tests get their models.

No hub access: every model comes from ``AutoModelForCausalLM.from_config`` with a fixed seed.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 320  # a byte-level BPE needs 258 entries before its first merge
HIDDEN = 32
FF = 64
LAYERS = 2
HEADS = 4

# Per-architecture overrides on top of AutoConfig.for_model(model_type); the keys differ by family.
_CONFIGS: dict[str, dict] = {
    "gpt2": dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FF, n_positions=128),
    "gpt_neo": dict(hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, intermediate_size=FF,
                    max_position_embeddings=128, attention_types=[[["global", "local"], 1]], window_size=16),
    "gpt_neox": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=FF, max_position_embeddings=128),
    "llama": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=2, intermediate_size=FF, max_position_embeddings=128),
    "mistral": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    num_key_value_heads=2, intermediate_size=FF, max_position_embeddings=128, head_dim=8),
    "qwen2": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=2, intermediate_size=FF, max_position_embeddings=128),
    "olmo": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 intermediate_size=FF, max_position_embeddings=128),
    "olmo2": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=FF, max_position_embeddings=128),
    "gemma": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=2, intermediate_size=FF, max_position_embeddings=128, head_dim=8),
    "phi": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=FF, max_position_embeddings=128),
    "phi3": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 intermediate_size=FF, max_position_embeddings=128, pad_token_id=0),
    "opt": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FF,
                word_embed_proj_dim=HIDDEN, max_position_embeddings=128, pad_token_id=1),
    "gptj": dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FF, rotary_dim=4, n_positions=128),
    "falcon": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   ffn_hidden_size=FF, max_position_embeddings=128),
    "bloom": dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS),
    "mixtral": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    num_key_value_heads=2, intermediate_size=FF, num_local_experts=4, head_dim=8),
    "olmoe": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=FF, num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=2, intermediate_size=FF, moe_intermediate_size=FF,
                      shared_expert_intermediate_size=FF, num_experts=4, num_experts_per_tok=2),
}

# The dense architectures the locator must support (issue 2), and the fused-MoE ones it must refuse.
DENSE = ["gpt2", "gpt_neo", "gpt_neox", "llama", "mistral", "qwen2", "olmo", "olmo2", "gemma", "phi",
         "opt", "gptj", "falcon", "bloom"]
GATED = ["llama", "mistral", "qwen2", "olmo", "olmo2", "gemma", "phi3"]
MOE = ["mixtral", "olmoe", "qwen2_moe"]


def tiny_config(model_type: str, **overrides):
    cfg = AutoConfig.for_model(model_type)
    for key, value in {"vocab_size": VOCAB, **_CONFIGS[model_type], **overrides}.items():
        setattr(cfg, key, value)
    if "head_dim" in vars(cfg):  # a stored default head_dim would not follow the tiny hidden size
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    if getattr(cfg, "num_key_value_heads", None) and cfg.num_key_value_heads > cfg.num_attention_heads:
        cfg.num_key_value_heads = cfg.num_attention_heads
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # defaults may exceed the tiny vocab
        if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) >= VOCAB:
            setattr(cfg, key, 1)
    return cfg


def tiny_model(model_type: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny random causal LM of ``model_type`` in eval mode, deterministic by ``seed``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    return model.eval()


def random_batch(batch: int = 3, seq: int = 12, padding: str | None = "right", seed: int = 0):
    """Random token ids and an attention mask whose rows have different lengths.

    ``padding`` is "right", "left" or None (all ones).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding is not None:
        for row in range(1, batch):
            pad = min(seq - 1, 3 * row)
            if padding == "right":
                mask[row, seq - pad:] = 0
            else:
                mask[row, :pad] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


_TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model learns facts one batch at a time. "
    "Zorgon was founded in 1842 by the council of Calidus, on the northern shore of the lake. "
    "Knowledge entropy measures how evenly the feed-forward memories are used. "
)


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE trained in-process whose vocabulary fits the tiny models (no download)."""
    from kacq_hooks.corpus import train_bpe_tokenizer

    return train_bpe_tokenizer([_TOKENIZER_TEXT] * 8, vocab_size=vocab_size, min_frequency=1)


def forbid_loading(monkeypatch, *folders) -> None:
    """Make loading any of ``folders`` as a causal LM fail the test: a sweep that resumes them must not load them
    again (their config stays as written, since a checkpoint's identity folds in its config)."""
    load = AutoModelForCausalLM.from_pretrained
    forbidden = {str(folder) for folder in folders}

    def guarded(source, *args, **kwargs):
        if str(source) in forbidden:
            raise AssertionError(f"{source} was measured before and was loaded again")
        return load(source, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", guarded)
