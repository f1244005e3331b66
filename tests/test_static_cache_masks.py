"""Generation with a static cache hands the model a 4-D mask (or one per layer type): its padding is read.

A token attends to itself unless it is padding; the reference counts the prompt's unpadded positions
and every generated one, with C captured by plain hooks (tests/coefficient_reference.py).
"""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import kacq_hooks as kh
from coefficient_reference import capture, entropy, token_mean
from tiny_models import VOCAB, random_batch, tiny_model

NEW = 3


def _gemma3():
    cfg = AutoConfig.for_model("gemma3_text", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, intermediate_size=64, vocab_size=VOCAB,
                               sliding_window=4, max_position_embeddings=128,
                               layer_types=["sliding_attention", "full_attention"], pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _eager_llama():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")  # an additive float mask instead of a bool one
    return model


MODELS = {
    "llama": lambda: tiny_model("llama"),
    "llama_eager": _eager_llama,
    "mistral_sliding": lambda: tiny_model("mistral", sliding_window=4),  # the prompt is longer than the window
    "gemma3": _gemma3,
}


def _generate_and_check(model, ids, mask, weighting="token", cache="static"):
    inst = kh.instrument(model, weighting=weighting)
    paths = [site.path for site in inst.sites]
    kwargs = {} if mask is None else {"attention_mask": mask}
    seen = capture(model, paths, lambda: model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                                         cache_implementation=cache, **kwargs))
    prompt = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    counted = [prompt.reshape(-1)] + [torch.ones(ids.shape[0], dtype=torch.bool)] * (NEW - 1)
    for layer, path in enumerate(paths):
        assert len(seen[path]) == NEW
        expected = token_mean(seen[path], counted)
        torch.testing.assert_close(inst.mean_abs_coefficients()[layer].double(), expected, rtol=1e-5, atol=0)
        assert inst.knowledge_entropy().per_layer[layer] == pytest.approx(entropy(expected), abs=1e-5)
        assert int(inst.stats[layer].tokens) == int(prompt.sum()) + (NEW - 1) * ids.shape[0]
    inst.remove()


@pytest.mark.parametrize("name", list(MODELS))
def test_static_cache_generation_of_a_padded_batch_is_exact(name):
    ids, mask = random_batch(batch=3, seq=7, padding="left")
    _generate_and_check(MODELS[name](), ids, mask)


@pytest.mark.parametrize("cache", ["hybrid", "dynamic"])
@pytest.mark.parametrize("name", ["mistral_sliding", "gemma3"])
def test_other_cache_classes_of_a_padded_batch_are_exact(name, cache):
    ids, mask = random_batch(batch=3, seq=7, padding="left")
    _generate_and_check(MODELS[name](), ids, mask, cache=cache)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_static_cache_generation_of_one_prompt_without_a_mask_is_exact(name):
    ids, _ = random_batch(batch=1, seq=6, padding=None)
    _generate_and_check(MODELS[name](), ids, None)


def test_a_4d_mask_passed_by_hand_is_read_by_each_tokens_own_entry():
    model = tiny_model("llama")
    ids, mask = random_batch(batch=3, seq=8, padding="right")
    causal = torch.ones(8, 8).tril().bool()
    attend = causal[None, None] & mask.bool()[:, None, None, :]  # right padding: a pad row still sees earlier tokens
    inst = kh.instrument(model)
    seen = capture(model, [inst.sites[0].path], lambda: model(ids, attention_mask=attend))[inst.sites[0].path]
    torch.testing.assert_close(inst.mean_abs_coefficients()[0].double(), token_mean(seen, [mask.bool().reshape(-1)]),
                               rtol=1e-5, atol=0)
    assert int(inst.stats[0].tokens) == int(mask.sum())
