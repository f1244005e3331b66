"""What a stack received beyond a causal LM's mask: a vision tower's own patches, and a mask of unknown convention.

Qwen2-VL's vision tower takes flat patches of its own images; its rows are all real and its documents are
its images, whatever the padding of the text batch. A custom model whose mask argument is ``padding_mask``
is refused rather than having its padding counted. References: float64, plain hooks.
"""
import pytest
import torch
from torch import nn
from transformers import Qwen2VLModel

import kacq_hooks as kh
from coefficient_reference import capture, document_mean, entropy, token_mean
from model_zoo import tiny_config

IMAGE = 300  # the image token id, inside the tiny vocabulary


def _qwen2_vl():
    cfg = tiny_config("qwen2_vl")
    cfg.text_config.rope_parameters["mrope_section"] = [2, 1, 1]  # sums to the tiny head_dim / 2
    cfg.image_token_id, cfg.vision_start_token_id, cfg.video_token_id = IMAGE, 301, 302
    cfg.text_config.image_token_id = IMAGE
    torch.manual_seed(0)
    return Qwen2VLModel(cfg).eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 299, (2, 12), generator=g)
    ids[:, 2:6] = IMAGE  # 4 merged tokens per 4 x 4-patch image
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(32, 3 * 2 * 8 * 8, generator=g),
                  image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]), mm_token_type_ids=(ids == IMAGE).long())
    return inputs, mask


@pytest.mark.parametrize("weighting", ["token", "document"])
def test_a_vision_tower_beside_a_padded_language_stack_is_exact(weighting):
    model = _qwen2_vl()
    inputs, mask = _inputs()
    inst = kh.instrument(model, stacks=("decoder", "vision"), weighting=weighting)
    assert {site.stack for site in inst.sites} == {"decoder", "vision"}
    seen = capture(model, [site.path for site in inst.sites], lambda: model(**inputs))
    for layer, site in enumerate(inst.sites):
        cs = seen[site.path]
        if site.stack == "vision":
            assert cs[0].shape[0] == 32  # every patch of both images
            counted, documents = [torch.ones(32, dtype=torch.bool)], [[list(range(16)), list(range(16, 32))]]
        else:
            counted = [mask.bool().reshape(-1)]
            documents = [[list(range(12)), list(range(12, 21))]]
        expected = token_mean(cs, counted) if weighting == "token" else document_mean(cs, documents)
        torch.testing.assert_close(inst.mean_abs_coefficients()[layer].double(), expected, rtol=1e-5, atol=0)
        assert inst.knowledge_entropy().per_layer[layer] == pytest.approx(entropy(expected), abs=1e-5)
        assert int(inst.stats[layer].tokens) == int(counted[0].sum())
        if weighting == "document":
            assert int(inst.stats[layer].documents) == 2


def test_pixtral_images_in_one_row_are_documents_by_its_block_diagonal_mask():
    from model_zoo import build

    model = build("mistral3").eval()
    tower = model.vision_tower
    patch = tower.config.patch_size
    pixels = torch.randn(2, 3, 2 * patch, 3 * patch, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[2 * patch, 2 * patch], [2 * patch, 3 * patch]])  # 4 and 6 patches, packed in one row
    inst = kh.instrument(model, stacks=("vision",), weighting="document")
    seen = capture(model, [site.path for site in inst.sites], lambda: tower(pixels, image_sizes=sizes))
    for layer, site in enumerate(inst.sites):
        expected = document_mean(seen[site.path], [[list(range(4)), list(range(4, 10))]])
        torch.testing.assert_close(inst.mean_abs_coefficients()[layer].double(), expected, rtol=1e-5, atol=0)
        assert int(inst.stats[layer].documents) == 2 and int(inst.stats[layer].tokens) == 10


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return x + self.down_proj(torch.relu(self.up_proj(x)))


class _PaddingMaskModel(nn.Module):
    """A custom model whose mask argument is named padding_mask (1 for padding, as torch's key_padding_mask)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, input_ids, padding_mask=None):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_mask_named_padding_mask_is_refused_not_counted_as_tokens():
    torch.manual_seed(0)
    model = _PaddingMaskModel()
    ids = torch.randint(64, (2, 6))
    pads = torch.zeros(2, 6, dtype=torch.bool)
    pads[1, 4:] = True
    inst = kh.instrument(model, mlp_out="layers.{i}.down_proj")
    with pytest.raises(kh.ShapeError, match="padding_mask"):
        model(ids, padding_mask=pads)
    with pytest.raises(kh.ShapeError, match="padding_mask"):
        model(ids, pads)  # positionally too
    assert all(int(s.tokens) == 0 for s in inst.stats)
    model(ids)  # no mask given: every position counts
    assert int(inst.stats[0].tokens) == 12
    inst.remove()
    with kh.instrument(model, mlp_out="layers.{i}.down_proj", mask_padding=False) as every:
        model(ids, padding_mask=pads)  # counting padding was asked for
    assert int(every.stats[0].tokens) == 12
