"""Random models for the benchmarks, built from configs (no downloads)."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

# --size cpu: a ~20M-parameter Llama-style model, batch 8 x 256.
CPU = dict(config=dict(vocab_size=8192, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                       num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=512),
           batch=8, seq=256, dtype=torch.float32)
# --size gpu: OLMo-1B-shaped (16 layers, d_model 2048, d_ff 8192) in the Llama layout, which every front end
# converts in memory; bf16, batch 8 x 1024.
GPU = dict(config=dict(vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
           batch=8, seq=1024, dtype=torch.bfloat16)
SIZES = {"cpu": CPU, "gpu": GPU}


def build(size: str, device: str | None = None, seed: int = 0):
    """(model, input_ids, attention_mask) for a benchmark size, on ``device`` (cuda for "gpu")."""
    spec = SIZES[size]
    device = device or ("cuda" if size == "gpu" else "cpu")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**spec["config"]), dtype=spec["dtype"]).to(device)
    ids = torch.randint(0, spec["config"]["vocab_size"], (spec["batch"], spec["seq"]), device=device)
    mask = torch.ones_like(ids)
    mask[1::2, -spec["seq"] // 8:] = 0  # half the rows padded: the masked path is the one measured
    return model, ids, mask


def n_params(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6
