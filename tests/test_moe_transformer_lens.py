"""A mixture-of-experts HookedTransformer through the TransformerLens front end: per-slot statistics equal an
independent capture of ``blocks.{i}.mlp.experts.{e}.hook_post`` with the block's routing, outputs bit-identical."""
from __future__ import annotations

import warnings

import pytest
import torch

import kacq_hooks as kh

transformer_lens = pytest.importorskip("transformer_lens")

E, K, M = 4, 2, 16


@pytest.fixture(scope="module")
def hooked():
    cfg = transformer_lens.HookedTransformerConfig(
        n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=M, d_vocab=64, n_ctx=32, act_fn="silu", gated_mlp=True,
        num_experts=E, experts_per_token=K, normalization_type="RMS", positional_embedding_type="rotary",
        init_weights=True, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return transformer_lens.HookedTransformer(cfg).eval()


def independent(model, ids, mask):
    """Mean |w_e C_e| per slot over unpadded tokens, from TransformerLens's own hook points, in float64."""
    names = lambda n: "experts" in n and n.endswith("hook_post") or n.endswith("hook_expert_weights")  # noqa: E731
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=names)
    valid = mask.reshape(-1).bool()
    out = []
    for i in range(model.cfg.n_layers):
        probs = cache[f"blocks.{i}.mlp.hook_expert_weights"].double()
        w, chosen = torch.topk(probs, K, dim=-1)
        if model.cfg.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        sums = torch.zeros(E * M, dtype=torch.float64)
        for e in range(E):
            # the block gathers expert e's rows in the order of torch.where over [top-k position, token]
            pos, tokens = torch.where((chosen == e).T)
            c = cache[f"blocks.{i}.mlp.experts.{e}.hook_post"].double()
            keep = valid[tokens]
            sums[e * M:(e + 1) * M] = (w[tokens, pos, None] * c)[keep].abs().sum(0)
        out.append(sums / int(valid.sum()))
    return out


@pytest.mark.parametrize("padding", ["right", "left"])
def test_moe_hooked_transformer_slots_equal_an_independent_capture(hooked, padding):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    for row in (1, 2):
        if padding == "right":
            mask[row, 10 - 3 * row:] = 0
        else:
            mask[row, :3 * row] = 0
    with torch.no_grad():
        plain = hooked(ids, attention_mask=mask)
    inst = kh.instrument(hooked)
    assert [(s.kind, s.experts, s.expert_d_ff, s.d_ff) for s in inst.sites] == [("experts", E, M, E * M)] * 2
    with torch.no_grad():
        captured = hooked(ids, attention_mask=mask)
    inst.remove()
    assert torch.equal(plain, captured)
    for got, want in zip(inst.mean_abs_coefficients(), independent(hooked, ids, mask)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    for split in kh.entropy.experts_entropy(inst):  # every unpadded token is routed to K experts
        assert sum(split.load) == K * int(mask.sum())
        assert split.which_expert + split.within_experts == pytest.approx(split.total, abs=1e-9)
