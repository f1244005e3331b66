"""What each stack of a model received, read through the one path every front end shares: the StackReaders of
``frontends.bind`` (their module is the locator's stack root). Real tiny models from their configs."""
from __future__ import annotations

import pytest
import torch

import kacq_hooks as kh
from kacq_hooks.frontends import bind
from model_zoo import build


def _readers(model, **options) -> dict:
    return {reader.name: reader for reader in bind(model, **options).stacks}


def test_encoder_and_decoder_stacks_read_their_own_mask_and_token_grid():
    model = build("t5")
    readers = _readers(model)
    assert readers["encoder"].module is model.encoder and readers["decoder"].module is model.decoder
    seen = {}
    handles = [reader.module.register_forward_pre_hook(
        lambda m, a, k, r=reader: seen.update({r.name: r.read(a, k)}), with_kwargs=True)
        for reader in readers.values()]
    ids, dec = torch.randint(3, 100, (2, 7)), torch.randint(3, 100, (2, 5))
    mask, dec_mask = torch.ones(2, 7, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    mask[1, -2:], dec_mask[0, -1:] = 0, 0
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(seen["encoder"].mask, mask) and seen["encoder"].shape == (2, 7)
    assert torch.equal(seen["decoder"].mask, dec_mask) and seen["decoder"].shape == (2, 5)
    assert not seen["encoder"].continuation and not seen["decoder"].continuation


def test_xlnet_refuses_its_query_stream_and_inverts_its_input_mask():
    reader = _readers(build("xlnet"))["decoder"]
    assert reader.layout == "seq_first"
    with pytest.raises(kh.LocateError, match="target_mapping"):
        reader.read((), {"input_ids": torch.zeros(1, 3, dtype=torch.long), "target_mapping": torch.zeros(1)})
    inputs = reader.read((), {"input_ids": torch.zeros(1, 2, dtype=torch.long), "input_mask": torch.tensor([[0, 1]])})
    assert torch.equal(inputs.mask, torch.tensor([[1, 0]])) and inputs.shape == (1, 2)


def test_a_positional_mask_is_read_as_a_keyword_one():
    model = build("llama")
    reader = _readers(model)["decoder"]
    ids, mask = torch.randint(3, 100, (2, 6)), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    positional = reader.read((ids, mask), {})
    assert torch.equal(positional.mask, mask) and positional.shape == (2, 6)
    assert torch.equal(reader.read((), {"input_ids": ids, "attention_mask": mask}).mask, mask)
