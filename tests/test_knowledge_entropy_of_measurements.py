"""kh.knowledge_entropy(x) on every kind of measurement a user passes gives the measurement's own answer.

An Instrumentation, a SavedStats read from a file, a merged SavedStats, a removed instrumentation and a
TransformerLens one: the free function must return what ``x.knowledge_entropy()`` returns (same weighting,
same labels), and refuse what that method refuses (a tensor-parallel rank's slice of a layer).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kacq_hooks as kh
from kacq_hooks.errors import ConfigError, StateError
from kacq_hooks.saving import load_stats, save_stats
from tiny_models import random_batch, tiny_model


def _measured(weighting: str, model_type: str = "llama", seed: int = 0) -> kh.Instrumentation:
    model = tiny_model(model_type)
    ids, mask = random_batch(4, 16, "right", seed=seed)
    with kh.instrument(model, weighting=weighting) as inst, torch.no_grad():
        model(ids, attention_mask=mask)
    return inst


def _same(got: kh.KnowledgeEntropy, want: kh.KnowledgeEntropy, labels: bool = True) -> None:
    assert got.weighting == want.weighting
    assert got.per_layer == want.per_layer  # the same sums read the same way: bit-identical
    if labels:
        assert got.labels == want.labels


def test_a_document_weighted_instrumentation_keeps_its_weighting():
    inst = _measured("document")
    method = inst.knowledge_entropy()
    assert method.weighting == "document"
    token = kh.knowledge_entropy(inst.stats, "token")
    assert token.total != method.total  # the two weightings differ on this batch: a test that can fail
    _same(kh.knowledge_entropy(inst), method)
    _same(kh.knowledge_entropy(inst, "token"), inst.knowledge_entropy("token"))  # asked for outright: obeyed


def test_a_token_instrumentation_refuses_document_weighting_as_its_method_does():
    inst = _measured("token")
    with pytest.raises(ConfigError, match="document"):
        inst.knowledge_entropy("document")
    with pytest.raises(ConfigError, match="document"):
        kh.knowledge_entropy(inst, "document")


def test_saved_statistics_keep_their_weighting(tmp_path):
    inst = _measured("document")
    saved = load_stats(save_stats(inst, tmp_path / "doc.safetensors"))
    want = inst.knowledge_entropy()
    _same(saved.knowledge_entropy(), want, labels=False)
    _same(kh.knowledge_entropy(saved), want, labels=False)


def test_saved_statistics_keep_their_layer_labels(tmp_path):
    inst = _measured("token")
    saved = load_stats(save_stats(inst, tmp_path / "token.safetensors"))
    assert [site["label"] for site in saved.sites] == inst.labels  # the file does hold them
    assert kh.knowledge_entropy(saved).labels == inst.labels


def test_a_token_file_refuses_document_weighting(tmp_path):
    saved = load_stats(save_stats(_measured("token"), tmp_path / "token.safetensors"))
    with pytest.raises(ConfigError, match="document"):
        kh.knowledge_entropy(saved, "document")


def test_merged_saved_statistics_are_the_merged_instrumentations(tmp_path):
    a, b = _measured("document", seed=1), _measured("document", seed=2)
    merged = load_stats(save_stats(a, tmp_path / "a.safetensors")).merge(load_stats(save_stats(b, tmp_path / "b.safetensors")))
    want = a.merge(b).knowledge_entropy()
    _same(kh.knowledge_entropy(merged), want, labels=False)
    _same(merged.knowledge_entropy(), want, labels=False)


def test_a_removed_and_a_transformer_lens_instrumentation():
    inst = _measured("token")
    inst.remove()
    _same(kh.knowledge_entropy(inst), inst.knowledge_entropy())
    from kacq_hooks.frontends.transformer_lens import hooked_transformer_from_hf

    hooked = hooked_transformer_from_hf(tiny_model("gpt2"))
    ids, mask = random_batch()
    with kh.instrument(hooked, weighting="document") as tl, torch.no_grad():
        hooked(ids, attention_mask=mask)
    assert tl.binding.name == "transformer_lens"
    _same(kh.knowledge_entropy(tl), tl.knowledge_entropy())


# -- a tensor-parallel rank's slice: refused by the free function as by the method ----------------------------
WORLD = 2


def _tp_slice_worker(rank, init_file, results, saved):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(saved)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        parallelize_module(layer.mlp, mesh, {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                             "down_proj": RowwiseParallel()})
    inst = kh.instrument(model)
    ids, mask = random_batch(batch=3, seq=8)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for name, call in (("method", inst.knowledge_entropy), ("function", lambda: kh.knowledge_entropy(inst))):
        try:
            results[rank, name] = call().total
        except kh.KacqError as error:
            results[rank, name] = type(error).__name__
    dist.destroy_process_group()


def test_a_tensor_parallel_slice_is_refused_by_the_free_function(tmp_path):
    saved = str(tmp_path / "tiny_llama")
    tiny_model("llama").save_pretrained(saved)
    results = mp.Manager().dict()
    mp.spawn(_tp_slice_worker, args=(str(tmp_path / "pg"), results, saved), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        assert results[rank, "method"] == StateError.__name__
        assert results[rank, "function"] == StateError.__name__, results[rank, "function"]
