"""Document weighting of packed rows: documents from position-id restarts, cu_seq_lens and document-id masks.

Each test checks c̄ and the knowledge entropy against a float64 reference whose documents are written
out by hand (tests/coefficient_reference.py), on a real transformers model and collator.
"""
import pytest
import torch
from transformers import DataCollatorWithFlattening

import kacq_hooks as kh
from coefficient_reference import capture, document_mean, entropy, token_mean
from tiny_models import tiny_model

LENGTHS = (5, 7, 4)
DOCUMENTS = [list(range(0, 5)), list(range(5, 12)), list(range(12, 16))]  # rows of the packed [1, 16] batch


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, 300, (n,), generator=g).tolist()} for n in LENGTHS]


def _check(model, inst, run, documents, counted):
    paths = [site.path for site in inst.sites]
    seen = capture(model, paths, run)
    for layer, path in enumerate(paths):
        expected = document_mean(seen[path], documents)
        torch.testing.assert_close(inst.mean_abs_coefficients("document")[layer].double(), expected, rtol=1e-5, atol=0)
        assert inst.knowledge_entropy("document").per_layer[layer] == pytest.approx(entropy(expected), abs=1e-5)
        assert int(inst.stats[layer].documents) == sum(len([d for d in docs if len(d)]) for docs in documents)
        assert int(inst.stats[layer].tokens) == sum(int(k.sum()) for k in counted)
        torch.testing.assert_close(inst.mean_abs_coefficients("token")[layer].double(),
                                   token_mean(seen[path], counted), rtol=1e-5, atol=0)


def test_flattening_collator_rows_are_weighted_per_document_by_position_restarts():
    model = tiny_model("llama")
    batch = DataCollatorWithFlattening()(_features())
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, 16)
    inst = kh.instrument(model, weighting="document")
    _check(model, inst, lambda: model(**batch), [DOCUMENTS], [torch.ones(16, dtype=torch.bool)])


def test_flash_attention_cu_seq_lens_give_the_documents():
    model = tiny_model("llama")
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False)(_features())
    assert "position_ids" not in batch and batch["cu_seq_lens_q"].tolist() == [0, 5, 12, 16]
    inst = kh.instrument(model, weighting="document")
    _check(model, inst, lambda: model(**batch), [DOCUMENTS], [torch.ones(16, dtype=torch.bool)])


def test_a_mask_of_document_ids_is_read_as_documents_not_as_weights():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 300, (2, 18), generator=g)
    mask = torch.tensor([[1] * 5 + [2] * 7 + [3] * 4 + [0, 0],
                         [0, 0] + [1] * 10 + [2] * 6])
    documents = [DOCUMENTS, [list(range(20, 30)), list(range(30, 36))]]  # rows over the flattened [2 * 18]
    counted = (mask != 0).reshape(-1)
    inst = kh.instrument(model, weighting="document")
    seen_calls = lambda: model(ids, attention_mask=mask)  # noqa: E731
    paths = [site.path for site in inst.sites]
    seen = capture(model, paths, seen_calls)
    for layer, path in enumerate(paths):
        c = seen[path][0]
        expected = document_mean([c], [[d for row in documents for d in row]])
        torch.testing.assert_close(inst.mean_abs_coefficients()[layer].double(), expected, rtol=1e-5, atol=0)
        assert int(inst.stats[layer].documents) == 5
        torch.testing.assert_close(inst.mean_abs_coefficients("token")[layer].double(), token_mean([c], [counted]),
                                   rtol=1e-5, atol=0)


def test_document_ids_are_read_even_when_padding_counts():
    model = tiny_model("llama")
    ids = torch.randint(2, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 5 + [2] * 7 + [3] * 4])
    inst = kh.instrument(model, weighting="document", mask_padding=False)
    _check(model, inst, lambda: model(ids, attention_mask=mask), [DOCUMENTS], [torch.ones(16, dtype=torch.bool)])


def test_token_weighting_of_packed_rows_is_unchanged():
    model = tiny_model("llama")
    batch = DataCollatorWithFlattening()(_features())
    inst = kh.instrument(model)
    seen = capture(model, [inst.sites[0].path], lambda: model(**batch))[inst.sites[0].path]
    torch.testing.assert_close(inst.mean_abs_coefficients()[0].double(), token_mean(seen, [torch.ones(16).bool()]),
                               rtol=1e-5, atol=0)


def test_cu_seq_lens_that_do_not_cover_the_tokens_are_refused_before_any_work():
    model = tiny_model("llama")
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False)(_features())
    batch["cu_seq_lens_q"] = torch.tensor([0, 5, 12], dtype=torch.int32)
    inst = kh.instrument(model, weighting="document")
    with pytest.raises(kh.ShapeError, match="cu_seq_lens"):
        model(**batch)
    assert all(int(s.tokens) == 0 for s in inst.stats)


def test_position_ids_of_a_padded_batch_do_not_cut_its_rows():
    """generate's position ids (mask cumsum, pads at 1) keep each padded row one document."""
    model = tiny_model("llama")
    ids = torch.randint(2, 300, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    inst = kh.instrument(model, weighting="document")
    _check(model, inst, lambda: model(ids, attention_mask=mask, position_ids=positions),
           [[list(range(3, 8)), list(range(8, 16))]], [mask.bool().reshape(-1)])


def test_packed_single_token_documents_are_each_a_document():
    model = tiny_model("llama")
    ids = torch.randint(2, 300, (1, 6), generator=torch.Generator().manual_seed(5))
    positions = torch.tensor([[0, 0, 0, 1, 2, 0]])
    inst = kh.instrument(model, weighting="document")
    _check(model, inst, lambda: model(ids, position_ids=positions), [[[0], [1], [2, 3, 4], [5]]],
           [torch.ones(6, dtype=torch.bool)])


def test_a_block_causal_4d_mask_keeps_its_documents_apart():
    """Packing trainers that build the 4-D mask themselves: a document's first token does not see the last one's."""
    model = tiny_model("llama")
    ids = torch.randint(2, 300, (2, 16), generator=torch.Generator().manual_seed(6))
    document = torch.tensor([0] * 5 + [1] * 7 + [2] * 4)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    packed = causal & (document[:, None] == document[None, :])
    padded = causal.clone()
    padded[:, :3] = False  # the second row: three left pads, then one document
    attend = torch.stack([packed, padded])[:, None]
    counted = torch.ones(2, 16, dtype=torch.bool)
    counted[1, :3] = False
    inst = kh.instrument(model, weighting="document")
    _check(model, inst, lambda: model(ids, attention_mask=attend),
           [DOCUMENTS + [list(range(19, 32))]], [counted.reshape(-1)])
