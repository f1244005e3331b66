"""Streaming per-neuron statistics of the FFN memory coefficients C, in fp32 whatever the model dtype.

Every statistic speaks one protocol (``state_dict``, ``load_state_dict``, ``to``, ``reset``, ``merge``,
``all_reduce``), so saving, merging shards of a dataset and reducing across ranks are never special cases.
Buffers hold running sums, never activations: memory is O(layers x d_ff).
"""
from __future__ import annotations

from typing import Iterator

import torch

from .errors import ShapeError

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
}
FIELDS = tuple(_FIELDS)


class LayerStats:
    """Running statistics of one layer's coefficients, one entry per FFN neuron.

    >>> s = LayerStats(4)
    >>> s.sum_abs.shape, s.tokens.item()
    (torch.Size([4]), 0)
    """

    def __init__(self, d_ff: int, device: torch.device | str | None = None):
        self.d_ff = int(d_ff)
        for name, (dtype, per_neuron, _) in _FIELDS.items():
            shape = (self.d_ff,) if per_neuron else ()
            setattr(self, name, torch.zeros(shape, dtype=dtype, device=device))

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
        raise ValueError(f"weighting must be 'token' or 'document', not {weighting!r}")


class CoefficientStats:
    """The statistics of every instrumented layer: a list of :class:`LayerStats`, one per site.

    Layers keep their own d_ff and device, so models with uneven FFN widths or layers spread over
    devices need nothing special.
    """

    def __init__(self, d_ffs: list[int], devices: list | None = None):
        devices = devices or [None] * len(d_ffs)
        self.layers = [LayerStats(d, dev) for d, dev in zip(d_ffs, devices)]

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
        for s in self.layers:
            s.reset()

    def to(self, device) -> "CoefficientStats":
        for s in self.layers:
            s.to(device)
        return self

    def merge(self, other: "CoefficientStats") -> "CoefficientStats":
        """Add ``other``'s statistics into these: two halves of a dataset merged equal one pass over it."""
        if other.d_ffs != self.d_ffs:
            raise ShapeError(f"cannot merge statistics of layers {other.d_ffs} into layers {self.d_ffs}")
        for mine, theirs in zip(self.layers, other.layers):
            mine.merge(theirs)
        return self

    def all_reduce(self, group=None) -> "CoefficientStats":
        """Combine the statistics of every rank of ``group`` in place (sums add, maxima take the max)."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("all_reduce needs an initialised torch.distributed process group "
                               "(torch.distributed.init_process_group); for one process there is nothing to reduce")
        for s in self.layers:
            for name, (_, _, how) in _FIELDS.items():
                op = dist.ReduceOp.MAX if how == "max" else dist.ReduceOp.SUM
                dist.all_reduce(getattr(s, name), op=op, group=group)
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

