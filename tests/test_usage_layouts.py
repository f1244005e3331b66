"""Slot usage of a model whose C is sequence-first: padding left out by the same rows as instrument().

XLNet computes C as [seq, batch, d_ff]. measure_usage flattened the batch-first attention mask over those
rows, so with padding it averaged the wrong rows (40% off the instrumentation's mean |C| on a tiny XLNet).
Checked against an independent float64 reference: C captured by a plain hook, the mask transposed by hand.
"""
from __future__ import annotations

import pytest
import torch
from coefficient_reference import capture
from model_zoo import build

import kacq_hooks as kh
from kacq_hooks.errors import ConfigError
from kacq_hooks.usage import measure_usage


def test_usage_of_a_sequence_first_model_leaves_out_the_padded_rows():
    model = build("xlnet").eval()
    ids = torch.randint(3, 100, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, -2:], mask[2, -4:] = 0, 0
    with measure_usage(model) as usage, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    paths = [site.path for site in usage.sites]
    seen = capture(model, paths, lambda: model(input_ids=ids, attention_mask=mask))
    counted = mask.t().reshape(-1).bool()  # C's rows run position by position, the batch inside
    for path, got, tokens in zip(paths, usage.means(), usage.tokens):
        [c] = seen[path]
        assert tokens == int(mask.sum())
        torch.testing.assert_close(got.double(), c.abs()[counted].mean(0), rtol=1e-9, atol=1e-12)
    with kh.instrument(model) as inst, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for got, want in zip(usage.means(), inst.mean_abs_coefficients()):
        torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-7)


def test_usage_of_an_encoder_decoder_is_refused_not_measured_with_the_encoders_mask():
    # slot usage reads one padding mask, the model call's; a T5 decoder's C has the decoder's rows, so the
    # encoder's mask either missed its padding or, at equal lengths, left out the wrong rows (100% off)
    model = build("t5").eval()
    with pytest.raises(ConfigError, match="decoder"):
        measure_usage(model)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
