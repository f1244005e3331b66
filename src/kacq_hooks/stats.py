"""Streaming per-neuron statistics of the FFN memory coefficients C, in fp32 whatever the model dtype.

Every statistic is declared once, in :data:`STATISTICS`: a :class:`Statistic` names its buffer (dtype,
per neuron or per layer), how two partial results combine (``"sum"`` or ``"max"``), which reduction fills
it, and its reference arithmetic (:meth:`Statistic.term`, the per-row contribution over the
:class:`Coefficients` or :class:`Gradients` of one block). Everything else is driven by that table:
the reference kernels (:mod:`kacq_hooks.kernels.reference`), the argument lists of the one-pass CPU and
Triton kernels, the routed-experts partials, merging, saving and the all-reduce across ranks. Adding a
statistic is one class here, one row in the table, and its lines in ``kernels/native.c`` and
``kernels/triton.py`` (which refuse to run when they do not write what the table declares).

The containers speak one protocol (``state_dict``, ``load_state_dict``, ``to``, ``reset``, ``merge``,
``all_reduce``), so saving, merging shards of a dataset and reducing across ranks are never special cases.
Buffers hold running sums, never activations: memory is O(layers x d_ff).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from .errors import ConfigError, ShapeError, StatisticsOverflowError


# -- what one block of coefficients offers a statistic ----------------------------------------------------------

@dataclass
class Coefficients:
    """One forward block as the statistics read it (see :func:`coefficients` and :func:`routed_coefficients`).

    ``a`` [n, m] is the fp32 |C| counted per slot (scaled by a routing or gate weight where there is one),
    0 on padded rows and where C is NaN/Inf; ``bad`` [n, m] marks the NaN/Inf entries of valid rows;
    ``rows`` [n] the valid rows (None: all); ``doc_weight`` [n] 1/len(document) or None; for routed
    experts, ``raw`` is |C| unweighted by the routing weight and ``routed`` [n] the rows routed to a slot.
    """

    n: int
    rows: torch.Tensor | None
    a: torch.Tensor | None = None
    bad: torch.Tensor | None = None
    doc_weight: torch.Tensor | None = None
    raw: torch.Tensor | None = None
    routed: torch.Tensor | None = None


@dataclass
class Gradients:
    """One backward block: fp32 ``c`` and ``g`` = dL/dC [n, m], ``keep`` where both are finite on a valid row."""

    n: int
    rows: torch.Tensor | None
    c: torch.Tensor | None = None
    g: torch.Tensor | None = None
    keep: torch.Tensor | None = None


def coefficients(c: torch.Tensor, rows: torch.Tensor | None, doc_weight: torch.Tensor | None,
                 scale: torch.Tensor | None = None) -> Coefficients:
    """The dense (and shared-expert) view of a [n, m] block; ``scale`` [n] multiplies |C| per row."""
    a = c.abs().float()
    finite = torch.isfinite(a)
    keep = finite if rows is None else finite & rows[:, None]
    a = torch.where(keep, a, 0.0)
    if scale is not None:
        a = a * scale.detach().abs().float().reshape(-1, 1)
    bad = ~finite if rows is None else ~finite & rows[:, None]
    return Coefficients(c.shape[0], rows, a, bad, doc_weight)


def routed_coefficients(c: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
                        doc_weight: torch.Tensor | None) -> Coefficients:
    """Routed rows of experts: row r holds C of its expert, ``weight`` [n] its routing weight, ``keep`` [n] valid."""
    a = c.abs().float()
    finite = torch.isfinite(a)
    raw = torch.where(finite & keep[:, None], a, 0.0)
    eff = raw * weight.detach().abs().float()[:, None]
    routed = keep & (weight != 0)  # input-scaled layouts pass every pair, with weight 0 where not routed
    return Coefficients(c.shape[0], keep, eff, ~finite & keep[:, None], doc_weight, raw, routed)


def gradients(c: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None) -> Gradients:
    cf, gf = c.float(), g.float()
    keep = torch.isfinite(cf) & torch.isfinite(gf)
    if rows is not None:
        keep = keep & rows[:, None]
    return Gradients(c.shape[0], rows, cf, gf, keep)


def rows_only(n: int, rows: torch.Tensor | None) -> Coefficients:
    """A block seen only through its rows: what per-layer counters read (kernels that reduce C themselves)."""
    return Coefficients(n, rows)


# -- the statistics ----------------------------------------------------------------------------------------------

class Statistic:
    """One running statistic: its buffer, how partial results combine, and its reference arithmetic.

    ``phase`` says which reduction fills it: ``"forward"`` (every forward block, dense or routed),
    ``"routed"`` (routed experts only), ``"backward"`` (dL/dC blocks) or ``"caller"`` (counted by the
    instrumentation itself). ``zero_when_finite``: the statistic only counts NaN/Inf, so a fused kernel
    that hands blocks holding them to the reference never computes it.
    """

    name: str = ""
    dtype: torch.dtype = torch.float32
    per_neuron: bool = True
    combine: str = "sum"  # or "max" (of non-negative values: a zero buffer is the identity)
    phase: str = "forward"
    zero_when_finite: bool = False
    signed: bool = False  # terms of either sign: finite terms past fp32's range can sum to NaN (inf + -inf)

    def term(self, block) -> torch.Tensor | None:
        """Per-row contributions [n, m] over ``block`` (None: nothing to add for this block)."""
        raise NotImplementedError

    def column(self, block) -> torch.Tensor | None:
        """The block's partial result per slot: the term summed (or maxed) over rows."""
        term = self.term(block)
        if term is None:
            return None
        return term.amax(0) if self.combine == "max" else term.sum(0)

    def fold(self, buf: torch.Tensor, partial) -> None:
        """Combine a partial result (a column, or another process's buffer) into ``buf`` in place."""
        if self.combine == "max":
            torch.maximum(buf, partial, out=buf)
        else:
            buf.add_(partial)

    def update(self, buf: torch.Tensor, block) -> None:
        """``buf`` (this statistic of one layer, or a slice of its slots) += the block's partial result."""
        if self.combine == "max" and block.n == 0:
            return  # no row: nothing to max over
        partial = self.column(block)
        if partial is not None:
            self.fold(buf, partial)

    def scatter(self, slots: torch.Tensor, ids: torch.Tensor, block) -> None:
        """Routed rows into ``slots`` [experts, m]: row r into the slots of expert ``ids[r]``."""
        term = self.term(block)
        if term is None:
            return
        if self.combine == "max":
            slots.scatter_reduce_(0, ids[:, None].expand(-1, term.shape[1]), term, "amax", include_self=True)
        else:
            slots.index_add_(0, ids, term.to(slots.dtype))

    def merge(self, mine: torch.Tensor, theirs: torch.Tensor) -> None:
        self.fold(mine, theirs.to(mine.device))

    @property
    def reduce_op(self) -> str:
        """The name of the torch.distributed.ReduceOp that combines ranks."""
        return "MAX" if self.combine == "max" else "SUM"


class _RowCount(Statistic):
    """A per-layer counter of valid rows."""

    dtype = torch.int64
    per_neuron = False

    def column(self, block):
        return block.n if block.rows is None else block.rows.sum()


class SumAbs(Statistic):
    """sum |C| over valid tokens (finite values only)."""
    name = "sum_abs"

    def term(self, block):
        return block.a


class SumSq(Statistic):
    """sum C^2 (squared in fp32)."""
    name = "sum_sq"

    def term(self, block):
        return block.a * block.a


class Active(Statistic):
    """count of |C| > 0."""
    name, dtype = "active", torch.int64

    def term(self, block):
        return block.a > 0


class MaxAbs(Statistic):
    """max |C|."""
    name, combine = "max_abs", "max"

    def term(self, block):
        return block.a


class Nonfinite(Statistic):
    """count of NaN / Inf on valid rows, kept out of every other statistic."""
    name, dtype, zero_when_finite = "nonfinite", torch.int64, True

    def term(self, block):
        return block.bad


class Tokens(_RowCount):
    """valid (unpadded) tokens seen; a mixture-of-experts layer counts its own, once per forward."""
    name = "tokens"


class DocSumAbs(Statistic):
    """sum over documents of the per-document mean |C| (each row weighted by 1/len(its document))."""
    name = "doc_sum_abs"

    def term(self, block):
        return None if block.doc_weight is None else block.a * block.doc_weight[:, None]

    def column(self, block):
        return None if block.doc_weight is None else block.doc_weight @ block.a


class Documents(Statistic):
    """documents (batch rows with at least one token), counted by the instrumentation."""
    name, dtype, per_neuron, phase = "documents", torch.int64, False, "caller"


class GradSumAbs(Statistic):
    """sum |dL/dC|."""
    name, phase = "grad_sum_abs", "backward"

    def term(self, block):
        return torch.where(block.keep, block.g.abs(), 0.0)


class GradSumCg(Statistic):
    """sum C * dL/dC (the first-order effect of scaling neuron i)."""
    name, phase, signed = "grad_sum_cg", "backward", True

    def term(self, block):
        return torch.where(block.keep, block.c * block.g, 0.0)


class GradTokens(_RowCount):
    """tokens whose gradient was seen."""
    name, phase = "grad_tokens", "backward"


class RoutedSumAbs(Statistic):
    """mixture-of-experts slots: sum |C_e,i| over the tokens routed to the slot's expert, unweighted."""
    name, phase = "routed_sum_abs", "routed"

    def term(self, block):
        return torch.where(block.routed[:, None], block.raw, 0.0)


class RoutedTokens(Statistic):
    """mixture-of-experts slots: tokens routed to the slot's expert (its load)."""
    name, dtype, phase = "routed_tokens", torch.int64, "routed"

    def term(self, block):
        return block.routed[:, None].expand(-1, block.raw.shape[1])


# The table. Its order is the order of every buffer list a kernel takes.
STATISTICS: tuple[Statistic, ...] = (
    SumAbs(), SumSq(), Active(), MaxAbs(), Nonfinite(), Tokens(), DocSumAbs(), Documents(),
    GradSumAbs(), GradSumCg(), GradTokens(), RoutedSumAbs(), RoutedTokens(),
)
BY_NAME: dict[str, Statistic] = {s.name: s for s in STATISTICS}
FIELDS = tuple(BY_NAME)
FORWARD = tuple(s for s in STATISTICS if s.phase == "forward")    # a dense forward block fills these
BACKWARD = tuple(s for s in STATISTICS if s.phase == "backward")  # a dense dL/dC block fills these
# a block of slots (routed or shared experts): per-slot statistics only, token counts are the caller's
SLOT_FORWARD = tuple(s for s in FORWARD if s.per_neuron)
ROUTED = SLOT_FORWARD + tuple(s for s in STATISTICS if s.phase == "routed")
SLOT_BACKWARD = tuple(s for s in BACKWARD if s.per_neuron)
COUNTERS = tuple(s.name for s in STATISTICS if not s.per_neuron)
MAXIMA = tuple(s.name for s in STATISTICS if s.combine == "max")


def kernel_outputs(phase: str) -> tuple[str, ...]:
    """The per-neuron fields a fused kernel that hands NaN/Inf blocks to the reference writes, in table order.

    ``phase`` is a statistic's phase, or ``"routed"`` for a kernel over routed experts' rows, which fills
    :data:`ROUTED` (the slot statistics of a forward and the routed ones). Its argument list
    (``kernels/native.py``) is built from this; the kernel declares the same names.
    """
    chosen = ROUTED if phase == "routed" else tuple(s for s in STATISTICS if s.phase == phase)
    return tuple(s.name for s in chosen if s.per_neuron and not s.zero_when_finite)


def _groups() -> list[tuple[torch.dtype, str, list[str]]]:
    """The fields by (dtype, combine): one flat buffer each per device."""
    groups: dict[tuple, list[str]] = {}
    for s in STATISTICS:
        groups.setdefault((s.dtype, s.combine), []).append(s.name)
    return [(dtype, combine, names) for (dtype, combine), names in groups.items()]


_GROUPS = _groups()


def _sizes(names: list[str], d_ff: int) -> list[int]:
    return [d_ff if BY_NAME[n].per_neuron else 1 for n in names]


class _Arena:
    """One flat buffer per (dtype, combine) group of fields, holding the fields of several layers on one device.

    Every field of every layer is a view into them, so zeroing, merging or committing a whole set of
    layers costs one operation per group and device, not one per field and layer.
    """

    def __init__(self, d_ffs: list[int], device):
        self.buffers = [torch.zeros(sum(sum(_sizes(names, d)) for d in d_ffs), dtype=dtype, device=device)
                        for dtype, _, names in _GROUPS]
        self.offsets = [0] * len(_GROUPS)

    def carve(self, d_ff: int) -> dict[str, torch.Tensor]:
        views = {}
        for k, (_, _, names) in enumerate(_GROUPS):
            for name, size in zip(names, _sizes(names, d_ff)):
                view = self.buffers[k][self.offsets[k]:self.offsets[k] + size]
                views[name] = view if BY_NAME[name].per_neuron else view[0]  # a 0-d view for per-layer counters
                self.offsets[k] += size
        return views

    def add_(self, other: "_Arena") -> None:
        for (_, combine, names), mine, theirs in zip(_GROUPS, self.buffers, other.buffers):
            BY_NAME[names[0]].fold(mine, theirs)

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
        self.index: int | None = None  # its place in a CoefficientStats, for messages
        with torch.inference_mode(False):  # buffers made under inference_mode could never be updated outside it
            views = _views if _views is not None else _Arena([self.d_ff], device).carve(self.d_ff)
        for name in FIELDS:
            setattr(self, name, views[name])

    @property
    def device(self) -> torch.device:
        return self.sum_abs.device

    def buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in FIELDS:
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
        for stat in STATISTICS:
            stat.merge(getattr(self, stat.name), getattr(other, stat.name))

    def check_finite(self, names=None) -> None:
        """Refuse running sums that overflowed: NaN/Inf coefficients are counted and kept out of every sum, so
        a non-finite float statistic can only be an fp32 overflow, and no number derived from it is right."""
        for name in names or [s.name for s in STATISTICS if s.dtype.is_floating_point]:
            buf = getattr(self, name)
            # one reduction: finite fp32 values sum to a finite float64, an Inf or NaN does not
            if math.isfinite(buf.sum(dtype=torch.float64).item()):
                continue
            bad = ~torch.isfinite(buf.reshape(-1))
            if bool(bad.any()):
                where = f"layer {self.index}" if self.index is not None else "this layer"
                slots = f" at neurons {bad.nonzero().flatten()[:5].tolist()}" if buf.dim() else ""
                value = buf.reshape(-1)[bad][0].item()
                # a routed row's statistics are of |w C|: a NaN or Inf routing weight (a diverged router) is not
                # counted apart as a non-finite C is
                router = ("; in a mixture-of-experts layer, a NaN or Inf routing weight w (a diverged router) makes "
                          "|w C| non-finite: check the router's outputs")
                if BY_NAME[name].signed:  # products of finite values past fp32 with opposite signs give NaN
                    raise StatisticsOverflowError(
                        f"{where}: the running fp32 sum {name} overflowed to {value}{slots} (NaN/Inf coefficients "
                        "are counted apart, so finite terms passed fp32's range, or did so with opposite signs and "
                        "made NaN): these values are too large to measure in fp32; check for a diverged run or an "
                        "unscaled loss, or reset and measure shorter windows")
                if math.isnan(value):  # finite non-negative values summed past fp32 give Inf, never NaN
                    raise StatisticsOverflowError(
                        f"{where}: the running fp32 sum {name} is NaN{slots}. NaN/Inf coefficients are counted apart "
                        f"and kept out of every sum, so this NaN did not come from C{router}; no number derived from "
                        "these statistics is right: reset and measure again once the cause is fixed")
                raise StatisticsOverflowError(
                    f"{where}: the running fp32 sum {name} overflowed to {value}{slots} "
                    f"(NaN/Inf coefficients are counted apart, so finite |C| summed past "
                    f"{torch.finfo(torch.float32).max:.3g}): these coefficients are too large to measure in fp32; "
                    f"check for a diverged run, or reset and measure shorter windows{router}")

    def mean_abs(self, weighting: str = "token") -> torch.Tensor:
        """c̄: the mean |C| per neuron, over tokens ("token") or over per-document means ("document")."""
        if weighting == "token":
            self.check_finite(["sum_abs"])
            return self.sum_abs / self.tokens.clamp(min=1)
        if weighting == "document":
            self.check_finite(["doc_sum_abs"])
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
        for index, layer in enumerate(self.layers):
            layer.index = index
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

    def assign(self, layers: list[LayerStats]) -> None:
        """Take ``layers``' widths and values (a gather along d_ff replaces slices by whole layers)."""
        self._build([s.d_ff for s in layers], [s.device for s in layers], list(layers))

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
            raise ConfigError("all_reduce needs an initialised torch.distributed process group "
                            "(torch.distributed.init_process_group); for one process there is nothing to reduce")
        self._check_same_layout(dist, group)
        for arena in self._arenas.values():
            for (_, _, names), buf in zip(_GROUPS, arena.buffers):
                dist.all_reduce(buf, op=getattr(dist.ReduceOp, BY_NAME[names[0]].reduce_op), group=group)
        return self

    def _check_same_layout(self, dist, group) -> None:
        """Refuse, on every rank alike, ranks whose layers differ: the flat buffers are reduced element by element,
        so other widths of the same total size would mix neurons of different layers, and other sizes abort gloo."""
        d_ffs = self.d_ffs
        per_device = [sum(s.d_ff for s in self.layers if s.device == dev) for dev in self._arenas]
        # a fixed-length fingerprint, so that ranks with different numbers of layers can still compare it
        fingerprint = [len(d_ffs), len(self._arenas), sum(d_ffs), sum((i + 1) * d for i, d in enumerate(d_ffs)),
                  sum((i + 1) ** 2 * d for i, d in enumerate(d_ffs)), sum((i + 1) * n for i, n in enumerate(per_device))]
        device = next(iter(self._arenas.values())).buffers[0].device if self._arenas else torch.device("cpu")
        mine = torch.tensor(fingerprint, dtype=torch.int64, device=device)
        both = torch.cat([mine, -mine])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)  # max and -min of every entry in one collective
        if not torch.equal(both[:len(fingerprint)], -both[len(fingerprint):]):
            raise ShapeError(f"the ranks hold statistics of different layers (this rank {dist.get_rank()}: widths "
                             f"{d_ffs}); every rank must measure the same sites of the same model before they are "
                             "combined")

    def check_finite(self) -> None:
        """Refuse (StatisticsOverflowError naming the layer) when any running float sum overflowed."""
        for layer in self.layers:
            layer.check_finite()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{name}": buf.detach().clone() for i, s in enumerate(self.layers) for name, buf in s.buffers()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {f"{i}.{name}" for i, s in enumerate(self.layers) for name, _ in s.buffers()}
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ShapeError(f"statistics state does not fit these layers: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}; was it saved from a different model?")
        for i, s in enumerate(self.layers):  # every shape checked before anything is copied
            for name, buf in s.buffers():
                value = state[f"{i}.{name}"]
                if value.shape != buf.shape:
                    raise ShapeError(f"layer {i} {name}: saved shape {tuple(value.shape)}, "
                                     f"expected {tuple(buf.shape)}; was it saved from a different model?")
        for i, s in enumerate(self.layers):
            for name, buf in s.buffers():
                buf.copy_(state[f"{i}.{name}"])

    def nonfinite_per_layer(self) -> list[int]:
        return [int(s.nonfinite.sum()) for s in self.layers]
