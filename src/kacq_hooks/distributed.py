"""Statistics of sharded models: one answer whatever the number of processes.

Two kinds of shard need two different reductions:

- **Token shards** (data parallel: DDP, FSDP/FSDP2, sequence or pipeline-stage replicas): every rank
  sees all d_ff neurons of a layer on its own tokens, so every statistic adds across ranks (maxima take
  the max). FSDP2 unshards the weights for the forward, so C is whole on every rank.
- **Neuron shards** (tensor parallelism with a row-parallel FFN output projection, as transformers'
  ``tp_plan`` and ``torch.distributed.tensor.parallel.RowwiseParallel`` lay it out): each rank of the
  tensor-parallel group holds a contiguous d_ff slice of C for the *same* tokens. Per-neuron sums are
  gathered along d_ff, never added, and token counts are taken once, never world-size times.

An :class:`~kacq_hooks.Instrumentation` captures a neuron shard as it is: its statistics are sized to
the local slice (:func:`neuron_shard`, read from the projection's DTensor weight) and its hook runs
first on the projection, where C is still the local tensor. :func:`reduce` (what
``Instrumentation.all_reduce`` calls) combines the ranks so that every rank ends with the statistics of
one process over all the data. It takes the statistics and the shard descriptions, never the
instrumentation, so this module imports nothing of :mod:`kacq_hooks.instrumentation`.

>>> import kacq_hooks as kh
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))
>>> inst = kh.instrument(model)   # no DTensor weights: every rank holds whole layers
>>> neuron_shards(inst)
[None, None]
"""
from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .errors import ArgumentTypeError, ConfigError, ShapeError
from .stats import COUNTERS, CoefficientStats, LayerStats

log = logging.getLogger(__name__)

# Per-layer counters (token and document counts): equal on every rank of a tensor-parallel group. How each
# per-neuron field combines across token shards (sum or max) is the statistics table's, in CoefficientStats.
_COUNTS = COUNTERS


@dataclass(frozen=True)
class NeuronShard:
    """The slice ``[offset, offset + width)`` of a site's d_ff neurons that this rank's C holds."""

    offset: int
    width: int
    d_ff: int
    group: object          # the tensor-parallel process group that holds the other slices
    mesh_dims: tuple[int, ...]   # the dims of the weight's device mesh that shard d_ff
    mesh: object


def is_dtensor(tensor) -> bool:
    return isinstance(tensor, DTensor)


def _in_features_dim(module: nn.Module) -> int | None:
    """The dim of ``module.weight`` that indexes its inputs (C's neurons), or None if unknown."""
    if isinstance(module, nn.Linear):
        return 1
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 projection stores weight as [in, out]
        return 0
    return None


def neuron_shard(site, module: nn.Module | None = None) -> NeuronShard | None:
    """The d_ff slice of ``site`` held by this rank, read from its DTensor weight; None if C is whole.

    A weight sharded on its output dim (FSDP's dim 0 of a Linear) leaves C whole; one sharded on its
    input dim (a row-parallel projection) splits C's neurons.
    """
    module = site.module if module is None else module
    weight = getattr(module, "weight", None)
    if weight is None or not is_dtensor(weight):
        return None
    in_dim = _in_features_dim(module)
    if in_dim is None:
        raise ShapeError(f"{site.path}: its weight is a DTensor but kacq_hooks does not know which dim of a "
                        f"{type(module).__name__} weight indexes C's neurons; use an nn.Linear output projection")
    dims = tuple(i for i, p in enumerate(weight.placements) if isinstance(p, Shard) and p.dim == in_dim)
    if not dims:
        return None
    if len(dims) > 1:
        raise ShapeError(f"{site.path}: d_ff is sharded over {len(dims)} mesh dims {dims}; kacq_hooks gathers "
                        "neuron slices along one tensor-parallel mesh dim only")
    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    d_ff = int(weight.shape[in_dim])
    if d_ff != site.d_ff:
        raise ShapeError(f"{site.path}: the weight's global input width is {d_ff} but the site has d_ff={site.d_ff}")
    mesh = weight.device_mesh
    return NeuronShard(offset=int(offset[in_dim]), width=int(shape[in_dim]), d_ff=d_ff,
                       group=mesh.get_group(dims[0]), mesh_dims=dims, mesh=mesh)


def neuron_shards(inst) -> list[NeuronShard | None]:
    """Per site, the d_ff slice this rank captures (None where it captures all neurons)."""
    return list(inst.shards)


def to_local(tensor, mesh, placements) -> torch.Tensor:
    """The local part of a DTensor laid out as (mesh, placements); a plain tensor is returned as it is."""
    return tensor.redistribute(mesh, placements).to_local() if is_dtensor(tensor) else tensor


def local_slice(path: str, shard: NeuronShard, c) -> torch.Tensor:
    """The local tensor of a DTensor C sharded along d_ff like the projection's weight (else refuse)."""
    last = c.dim() - 1
    fits = c.device_mesh == shard.mesh and all(
        isinstance(p, Shard) and p.dim % c.dim() == last if d in shard.mesh_dims else p.is_replicate()
        for d, p in enumerate(c.placements))
    if not fits:
        raise ShapeError(f"{path}: C reached the output projection as a DTensor with placements "
                        f"{c.placements} on {c.device_mesh}; kacq_hooks needs it sharded along d_ff (its last "
                        f"dim) on the mesh of the projection's weight ({shard.mesh}), and replicated otherwise")
    return c.to_local()


def reduce(stats, shards=None, group=None, *, paths: list[str] | None = None, settings: dict | None = None):
    """Combine the statistics of every rank in place, so that each rank holds the one-process answer.

    Args:
        stats: this rank's :class:`~kacq_hooks.stats.CoefficientStats`, one layer per site.
        shards: per site, the :class:`NeuronShard` this rank holds (None where it holds all neurons);
            None for a model without neuron shards.
        group: the data-parallel process group, whose ranks saw disjoint tokens. By default every
            rank for a model without neuron shards; for a tensor-parallel model, the ranks that hold
            the same slice: none when the tensor-parallel group is the whole world, the weight mesh's
            other dims when it is a 2-D mesh.
        paths: the sites' module paths, for messages.
        settings: how this rank measured (an Instrumentation's sites, weighting, padding and count); when
            given, ranks that measured otherwise are refused before anything is combined.

    Token shards add (maxima take the max); neuron shards are gathered along d_ff and their token
    counts taken once, after checking that every rank of the tensor-parallel group counted the same.
    Afterwards the statistics are those of all ranks' data. Reduce once per window: the statistics now
    hold the total, and a rank must reset them before measuring the next one. Returns ``stats``.

    ``reduce(inst, group)`` with an Instrumentation is still accepted (and returns ``inst``).
    """
    if not isinstance(stats, CoefficientStats) and isinstance(getattr(stats, "stats", None), CoefficientStats):
        inst = stats  # the former call form, reduce(inst, group)
        if shards is not None and group is not None:
            raise ArgumentTypeError("reduce(inst, group) takes the group second; pass reduce(inst.stats, inst.shards, group)")
        reduce(inst.stats, list(inst.shards), shards if group is None else group,
               paths=[site.path for site in inst.sites], settings=inst._settings())
        return inst
    if not isinstance(stats, CoefficientStats):
        raise ArgumentTypeError(f"reduce() takes CoefficientStats (an instrumentation's .stats), not {type(stats).__name__}")
    shards = [None] * len(stats) if shards is None else list(shards)
    paths = [f"site {i}" for i in range(len(stats))] if paths is None else list(paths)
    if len(shards) != len(stats) or len(paths) != len(stats):
        raise ShapeError(f"reduce() got {len(stats)} layers of statistics, {len(shards)} shard descriptions and "
                         f"{len(paths)} paths: pass one of each per site")
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("reduce() needs an initialised torch.distributed process group "
                        "(torch.distributed.init_process_group); one process has nothing to reduce")
    if settings is not None:
        _check_same_settings(settings, group, stats[0].sum_abs.device if len(stats) else torch.device("cpu"))
    data_group = group if group is not None else _data_group(shards)
    if data_group is not _NO_GROUP:
        stats.all_reduce(data_group)  # token shards add, whatever the layers hold
    if any(shard is not None for shard in shards):
        stats.assign([_gather_neurons(layer, shard, path) if shard is not None else layer
                      for layer, shard, path in zip(stats, shards, paths)])
    return stats


_NO_GROUP = object()


def _check_same_settings(settings: dict, group, device) -> None:
    """Refuse, on every rank alike, ranks that measured otherwise: their sums are not one measurement (a rank
    without document sums would leave its documents out of the document entropy)."""
    digest = zlib.crc32(json.dumps(settings, sort_keys=True, default=str).encode())
    both = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)  # max and -min of the digests in one collective
    if int(both[0]) != -int(both[1]):
        raise ShapeError(f"the ranks measured with different settings (this rank {dist.get_rank()}: {settings}); "
                         "instrument the model the same way on every rank before combining them")


def _data_group(shards: list[NeuronShard | None]):
    """The default data-parallel group: everyone without neuron shards, else the mesh's other ranks."""
    present = [s for s in shards if s is not None]
    if not present:
        return None
    mesh, dims = present[0].mesh, present[0].mesh_dims
    if any(s.mesh != mesh or s.mesh_dims != dims for s in present):
        raise ConfigError("tensor-parallel sites live on different device meshes; pass inst.all_reduce(group=...) "
                        "with the data-parallel group")
    other = [d for d in range(mesh.ndim) if d not in dims]
    if not other:
        if mesh.size() == dist.get_world_size():
            return _NO_GROUP
        raise ConfigError(f"the tensor-parallel mesh holds {mesh.size()} of {dist.get_world_size()} ranks; pass "
                        "inst.all_reduce(group=...) with the data-parallel group (ranks holding the same d_ff slice)")
    if len(other) > 1:
        raise ConfigError(f"the weight mesh has {len(other)} non-tensor-parallel dims {other}; pass "
                        "inst.all_reduce(group=...) with the data-parallel group")
    return mesh.get_group(other[0])


def _gather_neurons(local: LayerStats, shard: NeuronShard, path: str) -> LayerStats:
    """The whole-layer statistics from every tensor-parallel rank's d_ff slice."""
    group = shard.group
    size = dist.get_world_size(group)
    device = local.device
    where = torch.tensor([shard.offset, local.d_ff], dtype=torch.int64, device=device)
    wheres = [torch.empty_like(where) for _ in range(size)]
    dist.all_gather(wheres, where, group=group)
    spans = sorted((int(w[0]), int(w[1])) for w in wheres)
    covered = 0
    for offset, width in spans:
        if offset != covered:
            raise ShapeError(f"{path}: the tensor-parallel slices {spans} do not tile d_ff={shard.d_ff}")
        covered = offset + width
    if covered != shard.d_ff:
        raise ShapeError(f"{path}: the tensor-parallel slices {spans} do not tile d_ff={shard.d_ff}")
    widest = max(width for _, width in spans)
    whole = LayerStats(shard.d_ff, device)
    for name, buf in local.buffers():
        if name in _COUNTS:
            low, high = buf.clone(), buf.clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
            if int(low) != int(high):
                raise ShapeError(f"{path}: the tensor-parallel ranks counted different {name} ({int(low)} to "
                                f"{int(high)}); every rank of a tensor-parallel group must run the same batches")
            getattr(whole, name).copy_(buf)
            continue
        padded = torch.zeros(widest, dtype=buf.dtype, device=device)
        padded[:local.d_ff] = buf
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded, group=group)
        target = getattr(whole, name)
        for (offset, width), part in zip((tuple(int(x) for x in w) for w in wheres), parts):
            target[offset:offset + width] = part[:width]
    return whole
