"""Sharded models give the one-process answer: DDP, FSDP2 and tensor parallelism on two real gloo ranks.

Each test spawns two processes that train or measure a tiny Llama under one kind of sharding, reduce
their statistics, and compare them (token counts exactly, sums to 1e-6 relative) with one process
that runs the same data through an unsharded copy of the model.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kacq_hooks as kh
import kacq_hooks.distributed as khd
from tiny_models import random_batch, tiny_model

WORLD = 2
STEPS = 2


def _spawn(worker, tmp_path, *args) -> dict:
    results = mp.Manager().dict()
    mp.spawn(worker, args=(str(tmp_path / "pg"), results, *args), nprocs=WORLD, join=True)
    return dict(results)


def _init(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _batch(step: int, shard: int):
    """The batch of data shard ``shard`` at ``step``: ids, mask and labels that ignore the padding."""
    ids, mask = random_batch(batch=3, seq=8, seed=100 * step + shard)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _summary(inst) -> dict:
    ke = inst.knowledge_entropy()
    return {"stats": inst.stats.state_dict(), "entropy": list(ke.per_layer), "total": ke.total,
            "max_total": ke.max_total}


def _assert_same(got: dict, expected: dict, rtol: float = 1e-6) -> None:
    assert got["stats"].keys() == expected["stats"].keys()
    for key, value in expected["stats"].items():
        if value.dtype == torch.int64:  # token, document and activity counts: exact
            assert torch.equal(got["stats"][key], value), key
        else:  # a signed sum (sum C*g) cancels: its rounding is relative to the size of its terms
            scale = float(value.abs().max()) if key.endswith("grad_sum_cg") else 0.0
            torch.testing.assert_close(got["stats"][key], value, rtol=rtol, atol=rtol * scale + 1e-12, msg=key)
    assert got["max_total"] == pytest.approx(expected["max_total"], rel=1e-12)
    for h, h_ref in zip(got["entropy"], expected["entropy"]):
        assert h == pytest.approx(h_ref, rel=1e-6)


def _train_one_process(shards: list[int], model=None) -> dict:
    """The one-process answer: every data shard's batch each step, gradients averaged over the shards.

    This is what data parallelism computes: each shard's loss is backpropagated on its own (so dL/dC
    statistics are those of that shard's loss), and the update uses the mean of the shards' gradients.
    """
    model = (model or tiny_model("llama")).train()
    inst = kh.instrument(model, grads=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        for shard in shards:
            ids, mask, labels = _batch(step, shard)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        for p in model.parameters():
            p.grad.div_(len(shards))
        opt.step()
        opt.zero_grad()
    return _summary(inst)


def _train_steps(model, inst, shard: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        ids, mask, labels = _batch(step, shard)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()


# -- data parallel --------------------------------------------------------------------------------------------
def _ddp_worker(rank, init_file, results):
    _init(rank, init_file)
    model = tiny_model("llama").train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    inst = kh.instrument(ddp, grads=True)
    _train_steps(ddp, inst, shard=rank)
    local_tokens = int(inst.stats[0].tokens)
    inst.all_reduce()
    results[rank] = {**_summary(inst), "local_tokens": local_tokens}
    dist.destroy_process_group()


def test_ddp_with_grads_equals_one_process(tmp_path):
    results = _spawn(_ddp_worker, tmp_path)
    expected = _train_one_process(list(range(WORLD)))
    for rank in range(WORLD):
        assert 0 < results[rank]["local_tokens"] < int(expected["stats"]["0.tokens"])
        _assert_same(results[rank], expected)


def _measure_steps(model, shard: int) -> None:
    with torch.no_grad():
        for step in range(STEPS):
            ids, mask, _ = _batch(step, shard)
            model(input_ids=ids, attention_mask=mask)


def _fsdp_worker(rank, init_file, results):
    from torch.distributed.fsdp import fully_shard

    _init(rank, init_file)
    # One spawn for every variant: starting processes is the slow part.
    for grads, order in ((False, "after"), (True, "after"), (True, "before")):
        model = tiny_model("llama").train()
        classes_before = [type(layer).__name__ for layer in model.model.layers]
        if order == "before":  # hooks registered first must survive fully_shard's in-place class change
            inst = kh.instrument(model, grads=grads)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        if order == "after":
            inst = kh.instrument(model, grads=grads)
        if grads:
            _train_steps(model, inst, shard=rank)
        else:
            _measure_steps(model, shard=rank)
        fired = [int(s.tokens) for s in inst.stats]
        inst.all_reduce()
        results[rank, grads, order] = {**_summary(inst), "paths": [s.path for s in inst.sites], "fired": fired,
                                "classes": (classes_before, [type(layer).__name__ for layer in model.model.layers],
                                            type(model).__name__)}
    dist.destroy_process_group()


def _measure_one_process(shards: list[int], model=None) -> dict:
    model = (model or tiny_model("llama")).train()
    inst = kh.instrument(model)
    for shard in shards:
        _measure_steps(model, shard)
    return _summary(inst)


def test_fsdp2_forward_and_grads_equal_one_process(tmp_path):
    results = _spawn(_fsdp_worker, tmp_path)
    for grads, order in ((False, "after"), (True, "after"), (True, "before")):
        expected = (_train_one_process if grads else _measure_one_process)(list(range(WORLD)))
        for rank in range(WORLD):
            got = results[rank, grads, order]
            assert got["paths"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
            before, after, root = got["classes"]
            assert before == ["LlamaDecoderLayer"] * 2 and after == ["FSDPLlamaDecoderLayer"] * 2  # in place
            assert root.startswith("FSDP")
            assert all(n > 0 for n in got["fired"]) and len(set(got["fired"])) == 1  # every site fired
            _assert_same(got, expected)


# -- tensor parallel ------------------------------------------------------------------------------------------
def _tp_model(how: str, saved: str, local_output: bool = True):
    """This rank's tensor-parallel copy of the saved tiny Llama: gate/up column-, down row-parallel.

    ``local_output=False`` keeps the column-parallel outputs as DTensors, so C reaches down_proj as one.
    """
    from transformers import AutoModelForCausalLM

    if how == "transformers":
        return AutoModelForCausalLM.from_pretrained(saved, tp_plan="auto")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = AutoModelForCausalLM.from_pretrained(saved)
    mesh = init_device_mesh("cpu", (WORLD,))
    plan = {"gate_proj": ColwiseParallel(use_local_output=local_output),
            "up_proj": ColwiseParallel(use_local_output=local_output), "down_proj": RowwiseParallel()}
    for layer in model.model.layers:
        parallelize_module(layer.mlp, mesh, plan)
    return model


def _tp_variants(how: str) -> list[tuple[bool, bool]]:
    """(grads, local_output) pairs a tensor-parallel spawn runs."""
    return [(False, True), (True, True)] + ([(True, False)] if how == "torch" else [])


def _tp_worker(rank, init_file, results, how, saved):
    _init(rank, init_file)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    # Every rank of a tensor-parallel group runs the same data: data shard 0 on both.
    for grads, local_output in _tp_variants(how):
        model = _tp_model(how, saved, local_output).train()
        inst = kh.instrument(model, grads=grads)
        shards = khd.neuron_shards(inst)
        local = [s.d_ff for s in inst.stats]
        if grads:
            _train_steps(model, inst, shard=0)
        else:
            _measure_steps(model, shard=0)
            try:  # one rank's slice has no entropy of its own
                results[rank, "slice_entropy"] = inst.knowledge_entropy().total
            except kh.KacqError as error:
                results[rank, "slice_entropy"] = f"{type(error).__name__}: {error}"
        inst.all_reduce()  # slices gathered along d_ff, token counts taken once
        results[rank, grads, local_output] = {**_summary(inst), "local": local,
                                              "shards": [(s.offset, s.width, s.d_ff) for s in shards]}
        try:  # a second reduce would count every rank's tokens twice
            inst.all_reduce()
            results[rank, "twice"] = None
        except kh.KacqError as error:
            results[rank, "twice"] = f"{type(error).__name__}: {error}"
        if not grads:  # measuring on after a reduce must refuse until reset(), then capture slices again
            try:
                _measure_steps(model, shard=0)
                results[rank, "again"] = None
            except kh.KacqError as error:
                results[rank, "again"] = f"{type(error).__name__}: {error}"
            inst.reset()
            _measure_steps(model, shard=0)
            results[rank, "after_reset"] = ([s.d_ff for s in inst.stats], [int(s.tokens) for s in inst.stats])
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=["torch", "transformers"])
def tensor_parallel(request, tmp_path_factory):
    """(how, results of two tensor-parallel ranks, the saved model's path) for one way of sharding."""
    tmp_path = tmp_path_factory.mktemp(f"tp_{request.param}")
    saved = str(tmp_path / "tiny_llama")
    tiny_model("llama").save_pretrained(saved)
    return request.param, _spawn(_tp_worker, tmp_path, request.param, saved)


def test_tensor_parallel_gathers_neuron_slices(tensor_parallel):
    """Row-parallel down_proj (parallelize_module, or transformers' own tp_plan="auto") on two ranks."""
    how, results = tensor_parallel
    d_ff = tiny_model("llama").config.intermediate_size
    half = d_ff // WORLD
    for grads, local_output in _tp_variants(how):
        expected = (_train_one_process if grads else _measure_one_process)([0])
        for rank in range(WORLD):
            got = results[rank, grads, local_output]
            assert got["shards"] == [(rank * half, half, d_ff)] * 2  # each rank held one d_ff slice of C
            assert got["local"] == [half, half]
            assert got["max_total"] == pytest.approx(2 * math.log(d_ff))
            _assert_same(got, expected)
    tokens = int(expected["stats"]["0.tokens"])
    for rank in range(WORLD):
        assert "gather the slices with inst.all_reduce()" in results[rank, "slice_entropy"]
        assert "already combined across ranks" in results[rank, "twice"]
        assert "combined across ranks" in results[rank, "again"]
        # a step skipped or out of order: the narrowest class, not a bare KacqError
        assert all(results[rank, key].startswith("StateError: ") for key in ("slice_entropy", "twice", "again"))
        assert results[rank, "after_reset"] == ([half, half], [tokens, tokens])


def test_reduce_needs_a_process_group():
    inst = kh.instrument(tiny_model("llama"))
    with pytest.raises(kh.KacqError, match="init_process_group"):
        inst.all_reduce()
