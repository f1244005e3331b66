"""SavedStats.merge refuses what Instrumentation.merge refuses: statistics measured another way.

Merged files are read by knowledge_entropy with the receiving file's settings: a document-weighted file that
took in a token-only file would give the document entropy of its own documents only, and files measured with
other padding or count= rules would be summed as one measurement.
"""
from __future__ import annotations

import pytest
import torch

import kacq_hooks as kh
from kacq_hooks.errors import ShapeError
from kacq_hooks.saving import load_stats, save_stats
from tiny_models import random_batch, tiny_model


def _file(tmp_path, name: str, seed: int = 0, **kwargs):
    model = tiny_model("llama")
    ids, mask = random_batch(4, 16, "right", seed=seed)
    with kh.instrument(model, **kwargs) as inst, torch.no_grad():
        model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    return inst, save_stats(inst, tmp_path / f"{name}.safetensors")


@pytest.mark.parametrize("mine, theirs", [
    ({"weighting": "document"}, {"weighting": "token"}),
    ({"mask_padding": True}, {"mask_padding": False}),
    ({"count": "labels"}, {}),
])
def test_saved_statistics_measured_another_way_are_not_merged(tmp_path, mine, theirs):
    inst_a, a = _file(tmp_path, "a", 1, **mine)
    inst_b, b = _file(tmp_path, "b", 2, **theirs)
    with pytest.raises(ShapeError):
        inst_a.merge(inst_b)  # what an instrumentation refuses ...
    saved = load_stats(a)
    tokens = [int(layer.tokens) for layer in saved.stats]
    with pytest.raises(ShapeError):
        saved.merge(load_stats(b))  # ... a file refuses too
    assert [int(layer.tokens) for layer in saved.stats] == tokens  # and nothing was added


def test_saved_statistics_measured_the_same_way_merge_into_the_instrumentations_answer(tmp_path):
    inst_a, a = _file(tmp_path, "a", 1, weighting="document")
    inst_b, b = _file(tmp_path, "b", 2, weighting="document")
    merged = load_stats(a).merge(load_stats(b))
    assert kh.knowledge_entropy(merged).per_layer == inst_a.merge(inst_b).knowledge_entropy().per_layer


def _older(path, out):
    """``path`` as an earlier kacq_hooks wrote it: another version string, no mask_padding nor weighting entry."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["kacq_hooks"])
    header = {k: v for k, v in header.items() if k not in ("mask_padding", "weighting")} | {"kacq_version": "0.1.0"}
    save_file(load_file(str(path)), str(out), metadata={"kacq_hooks": json.dumps(header)})
    return out


def test_a_file_written_by_an_earlier_version_loads_reads_and_merges_both_ways(tmp_path):
    inst_a, a = _file(tmp_path, "a", 1)
    inst_b, b = _file(tmp_path, "b", 2)
    old = _older(a, tmp_path / "old.safetensors")
    want = kh.knowledge_entropy(inst_a.stats).per_layer
    assert kh.knowledge_entropy(load_stats(old)).per_layer == want
    both = inst_a.merge(inst_b).knowledge_entropy().per_layer
    assert load_stats(old).merge(load_stats(b)).knowledge_entropy().per_layer == both
    assert load_stats(b).merge(load_stats(old)).knowledge_entropy().per_layer == both
