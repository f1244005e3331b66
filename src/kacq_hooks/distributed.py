"""Statistics of sharded models: one answer whatever the number of processes.

Two kinds of shard need two different reductions:

- **Token shards** (data parallel: DDP, FSDP/FSDP2, sequence or pipeline-stage replicas): every rank
  sees all d_ff neurons of a layer on its own tokens, so every statistic adds across ranks (maxima take
  the max). FSDP2 unshards the weights for the forward, so C is whole on every rank.
- **Neuron shards** (tensor parallelism with a row-parallel FFN output projection, as transformers'
  ``tp_plan`` and ``torch.distributed.tensor.parallel.RowwiseParallel`` lay it out): each rank of the
  tensor-parallel group holds a contiguous d_ff slice of C for the *same* tokens. Per-neuron sums are
  gathered along d_ff, never added, and token counts are taken once, never world-size times.

:func:`prepare` makes an :class:`~kacq_hooks.Instrumentation` capture a neuron shard correctly (its
statistics sized to the local slice, the hook placed where C is still the local tensor); :func:`reduce`
combines the ranks so that every rank ends with the statistics of one process over all the data.

>>> import kacq_hooks as kh
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))
>>> inst = prepare(kh.instrument(model))   # no DTensor weights: nothing to change
>>> neuron_shards(inst)
[None, None]
"""
from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .errors import KacqError, ShapeError
from .stats import FIELDS, CoefficientStats, LayerStats

if TYPE_CHECKING:
    from .instrumentation import Instrumentation

log = logging.getLogger(__name__)

# Scalar fields (token and document counts): equal on every rank of a tensor-parallel group.
_COUNTS = tuple(name for name in FIELDS if getattr(LayerStats(1), name).dim() == 0)
_MAXIMA = ("max_abs",)


@dataclass(frozen=True)
class NeuronShard:
    """The slice ``[offset, offset + width)`` of a site's d_ff neurons that this rank's C holds."""

    offset: int
    width: int
    d_ff: int
    group: object          # the tensor-parallel process group that holds the other slices
    mesh_dims: tuple[int, ...]   # the dims of the weight's device mesh that shard d_ff
    mesh: object


# Instrumentation -> {site index: NeuronShard}, for instrumentations that prepare() adjusted.
_PREPARED: "weakref.WeakKeyDictionary[Instrumentation, dict[int, NeuronShard]]" = weakref.WeakKeyDictionary()


def instrument(model: nn.Module, **options) -> Instrumentation:
    """:func:`kacq_hooks.instrument` followed by :func:`prepare`: use it on tensor-parallel models."""
    from .instrumentation import instrument as plain  # local: instrumentation may import neuron_shard from here

    return prepare(plain(model, **options))


def _is_dtensor(tensor) -> bool:
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
    if weight is None or not _is_dtensor(weight):
        return None
    in_dim = _in_features_dim(module)
    if in_dim is None:
        raise KacqError(f"{site.path}: its weight is a DTensor but kacq_hooks does not know which dim of a "
                        f"{type(module).__name__} weight indexes C's neurons; use an nn.Linear output projection")
    dims = tuple(i for i, p in enumerate(weight.placements) if isinstance(p, Shard) and p.dim == in_dim)
    if not dims:
        return None
    if len(dims) > 1:
        raise KacqError(f"{site.path}: d_ff is sharded over {len(dims)} mesh dims {dims}; kacq_hooks gathers "
                        "neuron slices along one tensor-parallel mesh dim only")
    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    d_ff = int(weight.shape[in_dim])
    if d_ff != site.d_ff:
        raise ShapeError(f"{site.path}: the weight's global input width is {d_ff} but the site has d_ff={site.d_ff}")
    mesh = weight.device_mesh
    return NeuronShard(offset=int(offset[in_dim]), width=int(shape[in_dim]), d_ff=d_ff,
                       group=mesh.get_group(dims[0]), mesh_dims=dims, mesh=mesh)


def neuron_shards(inst: Instrumentation) -> list[NeuronShard | None]:
    """Per site, the d_ff slice this rank captures (None where it captures all neurons)."""
    prepared = _PREPARED.get(inst)
    if prepared is not None:
        return [prepared.get(i) for i in range(len(inst.sites))]
    return [neuron_shard(site) for site in inst.sites]


def prepare(inst: Instrumentation) -> Instrumentation:
    """Make ``inst`` capture neuron-sharded (tensor-parallel) sites correctly; a no-op for other models.

    For each site whose output projection is row-parallel, the layer's statistics are sized to the
    local d_ff slice, and the capture hook runs first on the module, where C is still the local
    tensor the column-parallel projections produced (``RowwiseParallel`` turns it into a DTensor in a
    hook of its own). Call it once, right after :func:`kacq_hooks.instrument` and before any forward.
    """
    if inst in _PREPARED:
        return inst
    shards = {i: s for i, s in enumerate(neuron_shard(site) for site in inst.sites) if s is not None}
    if shards and not inst.attached:
        raise KacqError("prepare() needs an attached instrumentation: call it right after kacq_hooks.instrument")
    for index, shard in shards.items():
        layer = inst.stats[index]
        if int(layer.tokens) or int(layer.grad_tokens):
            raise KacqError(f"{inst.sites[index].path}: statistics were recorded before prepare(); call "
                            "prepare() before the first forward (or inst.reset() first)")
        inst.stats.layers[index] = _LocalSlice(shard.width, layer.device)
        _move_capture_first(inst, index)
    _PREPARED[inst] = shards
    if shards:
        inst.stats = _NeuronShardedStats(inst.stats)
        log.info("tensor-parallel sites (index: offset/width of d_ff): %s",
                 {i: f"{s.offset}/{s.width} of {s.d_ff}" for i, s in shards.items()})
    return inst


class _LocalSlice(LayerStats):
    """One rank's d_ff slice of a layer: its entropy is not the layer's, so it refuses to give one."""

    def mean_abs(self, weighting: str = "token") -> torch.Tensor:
        raise KacqError(f"these statistics hold this rank's {self.d_ff}-neuron slice of a tensor-parallel layer; "
                        "gather the slices with kacq_hooks.distributed.reduce(inst) before reading c̄ or entropy")


class _NeuronShardedStats(CoefficientStats):
    """Statistics with tensor-parallel layers: adding them across ranks would mix different neurons."""

    def __init__(self, stats: CoefficientStats):
        self.layers = stats.layers

    def all_reduce(self, group=None) -> "CoefficientStats":
        raise KacqError("these statistics hold tensor-parallel d_ff slices, which must be gathered, not added: "
                        "use kacq_hooks.distributed.reduce(inst) instead of all_reduce")


def _move_capture_first(inst: Instrumentation, index: int) -> None:
    """Replace the site's capture hook by one registered first, which checks C before capturing it."""
    module = inst.sites[index].module
    position = next((k for k, h in enumerate(inst._handles)
                     if h.hooks_dict_ref() is module._forward_pre_hooks and
                     getattr(module._forward_pre_hooks.get(h.id), "args", (None,))[0] == index), None)
    if position is None:
        raise KacqError(f"{inst.sites[index].path}: the capture hook of this site was not found on its module")
    inst._handles[position].remove()
    ref = weakref.ref(inst)
    inst._handles[position] = module.register_forward_pre_hook(
        functools.partial(_capture_local, ref, index), prepend=True)


def _capture_local(ref, index: int, module, args):
    inst = ref()
    if inst is None or inst.paused:
        return
    shard = _PREPARED[inst][index]
    c = args[0]
    local = _local_slice(inst, index, shard, c) if _is_dtensor(c) else c
    if local.shape[-1] != shard.width:
        raise ShapeError(f"{inst.sites[index].path}: C has {local.shape[-1]} neurons on this rank but the weight's "
                         f"shard holds {shard.width} (offset {shard.offset} of {shard.d_ff})")
    layer = inst.stats[index]
    if layer.d_ff != shard.width:  # reduce() left the gathered statistics here
        if any(bool(buf.any()) for _, buf in layer.buffers()):
            raise KacqError(f"{inst.sites[index].path}: the statistics were reduced across ranks; read them, "
                            "then inst.reset() before measuring again")
        inst.stats.layers[index] = _LocalSlice(shard.width, layer.device)
    if local is c:
        inst._on_coefficients(index, module, args)
        return
    # C is a DTensor (ColwiseParallel(use_local_output=False)): capture its local slice, and take dL/dC
    # from a hook on the DTensor itself, since the local view is not on the path to the loss.
    inst._on_coefficients(index, module, (local.detach(),))
    if inst.grads and c.requires_grad and torch.is_grad_enabled():
        c2d = local.detach().reshape(-1, local.shape[-1])
        rows = inst._rows_for(local)[0]
        mesh, placements = c.device_mesh, c.placements
        c.register_hook(lambda grad: inst._on_gradient(index, c2d, rows, _to_local(grad, mesh, placements)))


def _to_local(tensor, mesh, placements) -> torch.Tensor:
    return tensor.redistribute(mesh, placements).to_local() if _is_dtensor(tensor) else tensor


def _local_slice(inst: Instrumentation, index: int, shard: NeuronShard, c) -> torch.Tensor:
    """The local tensor of a DTensor C sharded along d_ff like the projection's weight (else refuse)."""
    last = c.dim() - 1
    fits = c.device_mesh == shard.mesh and all(
        isinstance(p, Shard) and p.dim % c.dim() == last if d in shard.mesh_dims else p.is_replicate()
        for d, p in enumerate(c.placements))
    if not fits:
        raise KacqError(f"{inst.sites[index].path}: C reached the output projection as a DTensor with placements "
                        f"{c.placements} on {c.device_mesh}; kacq_hooks needs it sharded along d_ff (its last "
                        f"dim) on the mesh of the projection's weight ({shard.mesh}), and replicated otherwise")
    return c.to_local()


def reduce(inst: Instrumentation, group=None) -> Instrumentation:
    """Combine the statistics of every rank in place, so that each rank holds the one-process answer.

    Args:
        inst: an instrumentation on this rank's model (for tensor-parallel models, one :func:`prepare`
            adjusted).
        group: the data-parallel process group, whose ranks saw disjoint tokens. By default every
            rank for a model without neuron shards; for a tensor-parallel model, the ranks that hold
            the same slice: none when the tensor-parallel group is the whole world, the weight mesh's
            other dims when it is a 2-D mesh.

    Token shards add (maxima take the max); neuron shards are gathered along d_ff and their token
    counts taken once, after checking that every rank of the tensor-parallel group counted the same.
    Afterwards ``inst.knowledge_entropy()`` is the entropy of all ranks' data. Reduce once per window:
    the statistics now hold the total, and a rank must ``inst.reset()`` before measuring the next one.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise KacqError("reduce() needs an initialised torch.distributed process group "
                        "(torch.distributed.init_process_group); one process has nothing to reduce")
    shards = neuron_shards(inst)
    prepared = _PREPARED.get(inst)
    for index, shard in enumerate(shards):
        if shard is not None and (prepared is None or inst.stats[index].d_ff == shard.d_ff != shard.width):
            if prepared is None:
                raise KacqError(f"{inst.sites[index].path} is tensor-parallel (this rank holds neurons "
                                f"{shard.offset}..{shard.offset + shard.width} of {shard.d_ff}): create the "
                                "instrumentation with kacq_hooks.distributed.instrument(model) or prepare(inst)")
            raise KacqError(f"{inst.sites[index].path}: these statistics were already reduced; reset() first")
    data_group = group if group is not None else _data_group(shards)
    if data_group is not _NO_GROUP:
        CoefficientStats.all_reduce(inst.stats, data_group)  # token shards add, whatever the layers hold
    for index, shard in enumerate(shards):
        if shard is not None:
            inst.stats.layers[index] = _gather_neurons(inst.stats[index], shard, inst.sites[index].path)
    return inst


_NO_GROUP = object()


def _data_group(shards: list[NeuronShard | None]):
    """The default data-parallel group: everyone without neuron shards, else the mesh's other ranks."""
    present = [s for s in shards if s is not None]
    if not present:
        return None
    mesh, dims = present[0].mesh, present[0].mesh_dims
    if any(s.mesh != mesh or s.mesh_dims != dims for s in present):
        raise KacqError("tensor-parallel sites live on different device meshes; pass reduce(inst, group=...) "
                        "with the data-parallel group")
    other = [d for d in range(mesh.ndim) if d not in dims]
    if not other:
        if mesh.size() == dist.get_world_size():
            return _NO_GROUP
        raise KacqError(f"the tensor-parallel mesh holds {mesh.size()} of {dist.get_world_size()} ranks; pass "
                        "reduce(inst, group=...) with the data-parallel group (ranks holding the same d_ff slice)")
    if len(other) > 1:
        raise KacqError(f"the weight mesh has {len(other)} non-tensor-parallel dims {other}; pass "
                        "reduce(inst, group=...) with the data-parallel group")
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
            raise KacqError(f"{path}: the tensor-parallel slices {spans} do not tile d_ff={shard.d_ff}")
        covered = offset + width
    if covered != shard.d_ff:
        raise KacqError(f"{path}: the tensor-parallel slices {spans} do not tile d_ff={shard.d_ff}")
    widest = max(width for _, width in spans)
    whole = LayerStats(shard.d_ff, device)
    for name, buf in local.buffers():
        if name in _COUNTS:
            low, high = buf.clone(), buf.clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
            if int(low) != int(high):
                raise KacqError(f"{path}: the tensor-parallel ranks counted different {name} ({int(low)} to "
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
