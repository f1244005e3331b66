"""distributed.reduce across ranks whose statistics do not have the same layout.

Two gloo ranks on loopback, each with its own CoefficientStats. A rank with other layer widths (another
model, another site selection) must be refused on every rank with a ShapeError, never added element by
element into the other rank's layers: widths [8, 4] and [4, 8] have the same flat size, so a plain
all-reduce of the flat buffers "works" and mixes neurons of different layers; widths of different total
size crash gloo instead. Each worker reports what it saw; the spawn is bounded by a process-group timeout.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kacq_hooks import distributed
from kacq_hooks.stats import CoefficientStats

WORLD = 2


def _worker(rank: int, init_file: str, widths: list[list[int]], results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    try:
        mine = widths[rank]
        stats = CoefficientStats(mine, ["cpu"] * len(mine))
        for i, layer in enumerate(stats):  # distinct values per rank and layer: a mix-up would show
            layer.sum_abs.copy_(torch.arange(layer.d_ff, dtype=torch.float32) + 100 * rank + 10 * i)
            layer.tokens.fill_(rank + 1)
        try:
            distributed.reduce(stats, None)
            results[rank] = ("reduced", [layer.sum_abs.tolist() for layer in stats], [int(s.tokens) for s in stats])
        except Exception as error:  # noqa: BLE001 - the test inspects the kind
            results[rank] = ("refused", type(error).__name__, str(error))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, widths) -> dict:
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "pg"), widths, results), nprocs=WORLD, join=True)
    return dict(results)


def test_ranks_of_one_layout_add_their_statistics(tmp_path):
    results = _spawn(tmp_path, [[8, 4], [8, 4]])
    for rank in range(WORLD):
        kind, sums, tokens = results[rank]
        assert kind == "reduced" and tokens == [3, 3]
        assert sums[0] == [2 * v + 100 for v in range(8)]
        assert sums[1] == [2 * v + 120 for v in range(4)]


@pytest.mark.parametrize("widths", [[[8, 4], [4, 8]],      # same flat size: would silently mix layers
                                    [[8, 4], [8, 8]],      # different sizes: gloo aborts the process
                                    [[8, 8], [8, 8, 8]]],  # another number of layers
                         ids=["swapped", "wider", "more-layers"])
def test_ranks_with_other_layer_widths_are_refused_on_every_rank(tmp_path, widths):
    results = _spawn(tmp_path, widths)
    for rank in range(WORLD):
        kind, name, message = results[rank]
        assert (kind, name) == ("refused", "ShapeError"), results[rank]
        assert str(widths[rank]) in message and "rank" in message


def _settings_worker(rank: int, init_file: str, options: list[dict], results) -> None:
    import kacq_hooks as kh
    from tiny_models import random_batch, tiny_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    try:
        model = tiny_model("llama")
        ids, mask = random_batch(seed=rank)
        inst = kh.instrument(model, **options[rank])
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        try:
            inst.all_reduce()
            results[rank] = ("reduced", int(inst.stats[0].tokens), "")
        except Exception as error:  # noqa: BLE001 - the test inspects the kind
            results[rank] = ("refused", type(error).__name__, str(error))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("options", [[{}, {}],
                                     [{"weighting": "document"}, {}],
                                     [{}, {"mask_padding": False}]],
                         ids=["same", "weighting", "mask_padding"])
def test_instrumentations_measured_otherwise_are_refused_like_merge_refuses_them(tmp_path, options):
    # merge() refuses these settings locally; across ranks one rank's document sums would cover half the data
    results = mp.Manager().dict()
    mp.spawn(_settings_worker, args=(str(tmp_path / "pg"), options, results), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        if options[0] == options[1]:
            assert results[rank][0] == "reduced", results[rank]
        else:
            kind, name, message = results[rank]
            assert (kind, name) == ("refused", "ShapeError"), results[rank]
            assert "rank" in message
