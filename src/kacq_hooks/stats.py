"""Streaming per-neuron statistics of the FFN memory coefficients C, in fp32 whatever the model dtype.

Every statistic speaks one protocol (``state_dict``, ``load_state_dict``, ``to``, ``reset``, ``merge``,
``all_reduce``), so saving, merging shards of a dataset and reducing across ranks are never special cases.
Buffers hold running sums, never activations: memory is O(layers x d_ff).
"""
from __future__ import annotations

from typing import Iterator

import torch

from .errors import KacqError, ShapeError

# name -> (dtype, per_neuron, how two partial results combine)
_FIELDS: dict[str, tuple[torch.dtype, bool, str]] = {
    "sum_abs": (torch.float32, True, "sum"),        # sum |C| over valid tokens (finite values only)
    "sum_sq": (torch.float32, True, "sum"),         # sum C^2
    "active": (torch.int64, True, "sum"),           # count of |C| > 0
    "max_abs": (torch.float32, True, "max"),        # max |C|
    "nonfinite": (torch.int64, True, "sum"),        # count of NaN / Inf, kept out of every other sum
    "tokens": (torch.int64, False, "sum"),          # valid (unpadded) tokens seen
    "doc_sum_abs": (torch.float32, True, "sum"),    # sum over documents of the per-document mean |C|
    "documents": (torch.int64, False, "sum"),       # documents (batch rows with at least one token)
    "grad_sum_abs": (torch.float32, True, "sum"),   # sum |dL/dC|
    "grad_sum_cg": (torch.float32, True, "sum"),    # sum C * dL/dC (first-order effect of scaling neuron i)
    "grad_tokens": (torch.int64, False, "sum"),     # tokens whose gradient was seen
    # mixture-of-experts layers only (zero elsewhere): per slot, over the tokens routed to its expert
    "routed_sum_abs": (torch.float32, True, "sum"),  # sum |C_e,i| unweighted by the routing weight
    "routed_tokens": (torch.int64, True, "sum"),     # tokens routed to the slot's expert (its load)
}
FIELDS = tuple(_FIELDS)


_SUMMED_FLOATS = [n for n, (d, _, how) in _FIELDS.items() if d == torch.float32 and how == "sum"]
_MAXED_FLOATS = [n for n, (d, _, how) in _FIELDS.items() if how == "max"]
_SUMMED_INTS = [n for n, (d, _, how) in _FIELDS.items() if d == torch.int64]


def _sizes(names: list[str], d_ff: int) -> list[int]:
    return [d_ff if _FIELDS[n][1] else 1 for n in names]


class _Arena:
    """Three flat buffers (summed fp32, maxed fp32, summed int64) holding the fields of several layers on one device.

    Every field of every layer is a view into them, so zeroing, merging or committing a whole set of
    layers costs three operations per device, not one per field and layer.
    """

    def __init__(self, d_ffs: list[int], device):
        self.buffers = [torch.zeros(sum(sum(_sizes(names, d)) for d in d_ffs), dtype=dtype, device=device)
                        for names, dtype in ((_SUMMED_FLOATS, torch.float32), (_MAXED_FLOATS, torch.float32),
                                             (_SUMMED_INTS, torch.int64))]
        self.offsets = [0, 0, 0]

    def carve(self, d_ff: int) -> dict[str, torch.Tensor]:
        views = {}
        for k, names in enumerate((_SUMMED_FLOATS, _MAXED_FLOATS, _SUMMED_INTS)):
            for name, size in zip(names, _sizes(names, d_ff)):
                view = self.buffers[k][self.offsets[k]:self.offsets[k] + size]
                views[name] = view if _FIELDS[name][1] else view[0]  # a 0-d view for per-layer counters
                self.offsets[k] += size
        return views

    def add_(self, other: "_Arena") -> None:
        summed_f, maxed, summed_i = self.buffers
        summed_f.add_(other.buffers[0])
        torch.maximum(maxed, other.buffers[1], out=maxed)
        summed_i.add_(other.buffers[2])

    def zero_(self) -> None:
        for buf in self.buffers:
            buf.zero_()


class LayerStats:
    """Running statistics of one layer's coefficients, one entry per FFN neuron (or memory slot).

    >>> s = LayerStats(4)
    >>> s.sum_abs.shape, s.tokens.item()
    (torch.Size([4]), 0)
    """

    def __init__(self, d_ff: int, device: torch.device | str | None = None, *, _views: dict | None = None):
        self.d_ff = int(d_ff)
        with torch.inference_mode(False):  # buffers made under inference_mode could never be updated outside it
            views = _views if _views is not None else _Arena([self.d_ff], device).carve(self.d_ff)
        for name in _FIELDS:
            setattr(self, name, views[name])

    @property
    def device(self) -> torch.device:
        return self.sum_abs.device

    def buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in _FIELDS:
            yield name, getattr(self, name)

    def reset(self) -> None:
        for _, buf in self.buffers():
            buf.zero_()

    def to(self, device) -> "LayerStats":
        for name, buf in self.buffers():
            setattr(self, name, buf.to(device))
        return self

    def merge(self, other: "LayerStats") -> None:
        """Fold in statistics gathered elsewhere (another shard of the data, another process)."""
        if other.d_ff != self.d_ff:
            raise ShapeError(f"cannot merge a layer of d_ff={other.d_ff} into one of d_ff={self.d_ff}")
        for name, (_, _, how) in _FIELDS.items():
            mine, theirs = getattr(self, name), getattr(other, name).to(self.device)
            if how == "max":
                torch.maximum(mine, theirs, out=mine)
            else:
                mine.add_(theirs)

    def mean_abs(self, weighting: str = "token") -> torch.Tensor:
        """c̄: the mean |C| per neuron, over tokens ("token") or over per-document means ("document")."""
        if weighting == "token":
            return self.sum_abs / self.tokens.clamp(min=1)
        if weighting == "document":
            return self.doc_sum_abs / self.documents.clamp(min=1)
        raise ShapeError(f"weighting must be 'token' or 'document', not {weighting!r}")


class CoefficientStats:
    """The statistics of every instrumented layer: a list of :class:`LayerStats`, one per site.

    Layers keep their own d_ff and device, so models with uneven FFN widths or layers spread over
    devices need nothing special. The layers of one device share flat buffers, so resetting or
    merging two statistics of the same layout is a few operations whatever the number of layers.
    """

    def __init__(self, d_ffs: list[int], devices: list | None = None):
        devices = [torch.device(d) if d is not None else torch.device("cpu")
                   for d in (devices or [None] * len(d_ffs))]
        self.layers: list[LayerStats] = []
        self._arenas: dict[torch.device, _Arena] = {}
        self._build([int(d) for d in d_ffs], devices)

    def _build(self, d_ffs: list[int], devices: list[torch.device], values: list[LayerStats] | None = None) -> None:
        with torch.inference_mode(False):
            self._arenas = {dev: _Arena([d for d, e in zip(d_ffs, devices) if e == dev], dev) for dev in set(devices)}
            self.layers = [LayerStats(d, _views=self._arenas[dev].carve(d)) for d, dev in zip(d_ffs, devices)]
        for mine, old in zip(self.layers, values or []):
            for name, buf in mine.buffers():
                buf.copy_(getattr(old, name))

    def _layout(self) -> tuple:
        return tuple((s.d_ff, s.device) for s in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LayerStats:
        return self.layers[layer]

    def __iter__(self) -> Iterator[LayerStats]:
        return iter(self.layers)

    @property
    def d_ffs(self) -> list[int]:
        return [s.d_ff for s in self.layers]

    def reset(self) -> None:
        for arena in self._arenas.values():
            arena.zero_()

    def to(self, device) -> "CoefficientStats":
        self._build(self.d_ffs, [torch.device(device)] * len(self.layers), list(self.layers))
        return self

    def move_layer(self, index: int, device) -> None:
        """Put one layer's statistics on ``device`` (a site whose coefficients arrive elsewhere than expected)."""
        devices = [s.device for s in self.layers]
        devices[index] = torch.device(device)
        self._build(self.d_ffs, devices, list(self.layers))

    def merge(self, other: "CoefficientStats") -> "CoefficientStats":
        """Add ``other``'s statistics into these: two halves of a dataset merged equal one pass over it."""
        if other.d_ffs != self.d_ffs:
            raise ShapeError(f"cannot merge statistics of layers {other.d_ffs} into layers {self.d_ffs}")
        if other._layout() == self._layout():
            for device, arena in self._arenas.items():
                arena.add_(other._arenas[device])
        else:
            for mine, theirs in zip(self.layers, other.layers):
                mine.merge(theirs)
        return self

    def all_reduce(self, group=None) -> "CoefficientStats":
        """Combine the statistics of every rank of ``group`` in place (sums add, maxima take the max)."""
        import torch.distributed as dist  # torch.distributed is optional on some builds

        if not dist.is_available() or not dist.is_initialized():
            raise KacqError("all_reduce needs an initialised torch.distributed process group "
                            "(torch.distributed.init_process_group); for one process there is nothing to reduce")
        for arena in self._arenas.values():
            summed_f, maxed, summed_i = arena.buffers
            dist.all_reduce(summed_f, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(summed_i, op=dist.ReduceOp.SUM, group=group)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{name}": buf.detach().clone() for i, s in enumerate(self.layers) for name, buf in s.buffers()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {f"{i}.{name}" for i, s in enumerate(self.layers) for name, _ in s.buffers()}
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ShapeError(f"statistics state does not fit these layers: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}; was it saved from a different model?")
        for i, s in enumerate(self.layers):
            for name, buf in s.buffers():
                value = state[f"{i}.{name}"]
                if value.shape != buf.shape:
                    raise ShapeError(f"layer {i} {name}: saved shape {tuple(value.shape)}, "
                                     f"expected {tuple(buf.shape)}; was it saved from a different model?")
                buf.copy_(value)

    def nonfinite_per_layer(self) -> list[int]:
        return [int(s.nonfinite.sum()) for s in self.layers]

