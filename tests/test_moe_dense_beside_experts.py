"""A dense MLP beside the routed experts in one decoder layer (Gemma 4 with ``enable_moe_block=True``): one FFN
layer whose slots are E x m routed, then the dense MLP's neurons, against C computed by hand in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma4ForCausalLM, Gemma4TextConfig

import kacq_hooks as kh
from kacq_hooks import locate
from tiny_models import random_batch

E, M, D_FF, TOP_K = 4, 16, 64, 2


def gemma4_moe(seed: int = 0) -> Gemma4ForCausalLM:
    config = Gemma4TextConfig(vocab_size=320, hidden_size=32, intermediate_size=D_FF, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, enable_moe_block=True,
                              num_experts=E, top_k_experts=TOP_K, moe_intermediate_size=M,
                              hidden_size_per_layer_input=0, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(config).eval()
    with torch.no_grad():  # per-expert scales start at 1: other values test that they reach the routed weights
        for layer in model.model.layers:
            layer.router.per_expert_scale.uniform_(0.5, 2.0)
    return model


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def reference(model, ids, mask) -> list[torch.Tensor]:
    """Per layer, float64 mean |effective coefficient| per slot over real tokens: routed slots w_e * C_e, then
    the dense MLP's C (weight 1: its output is added beside the experts' after each branch's own norm)."""
    seen = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__((i, "mlp"), a[0])))
        handles.append(layer.experts.register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__((i, "experts"), [t.detach() for t in a])))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    valid = mask.reshape(-1).bool()
    out = []
    for i, layer in enumerate(model.model.layers):
        x = seen[(i, "mlp")].double().reshape(-1, 32)[valid]
        dense = gelu_tanh(x @ layer.mlp.gate_proj.weight.double().T) * (x @ layer.mlp.up_proj.weight.double().T)
        hidden, top_k_index, top_k_weights = seen[(i, "experts")]
        routed = torch.zeros(E, M, dtype=torch.float64)
        for e in range(E):
            tokens, pos = (top_k_index == e).nonzero(as_tuple=True)
            keep = valid[tokens]
            tokens, pos = tokens[keep], pos[keep]
            w = layer.experts.gate_up_proj[e].double()
            h = hidden[tokens].double()
            c = gelu_tanh(h @ w[:M].T) * (h @ w[M:].T)
            routed[e] = (top_k_weights[tokens, pos].double()[:, None] * c).abs().sum(0)
        n = int(valid.sum())
        out.append(torch.cat([routed.reshape(-1), dense.abs().sum(0)]) / n)
    return out


def entropy(cbar: torch.Tensor) -> float:
    p = cbar / cbar.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def test_gemma4_dense_mlp_is_a_slot_group_of_its_moe_layer():
    model = gemma4_moe()
    sites = locate.find_sites(model)
    assert [(s.kind, s.label, s.d_ff, s.experts, s.expert_d_ff) for s in sites] == [
        ("experts", f"decoder.layer_{i}", E * M + D_FF, E, M) for i in range(2)]
    for site, layer in zip(sites, model.model.layers):
        [dense] = site.experts_layer.shared
        assert dense.down is layer.mlp.down_proj and dense.gate is None and dense.d_ff == D_FF


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_gemma4_layer_statistics_match_float64_and_outputs_are_bit_identical(impl, padding):
    model = gemma4_moe()
    model.set_experts_implementation(impl)
    ids, mask = random_batch(3, 10, padding, seed=2)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        inst = kh.instrument(model)
        logits = model(input_ids=ids, attention_mask=mask).logits
    inst.remove()
    assert torch.equal(plain, logits)
    want = reference(model, ids, mask)
    got = inst.mean_abs_coefficients()
    for i in range(2):
        torch.testing.assert_close(got[i].double(), want[i], rtol=1e-5, atol=1e-7)
        assert inst.knowledge_entropy().per_layer[i] == pytest.approx(entropy(want[i]), abs=1e-5)
