"""The routed-experts reduction of :func:`.reference.accumulate_experts` on the CPU, in one pass over C.

The reference scatters a dozen ``[n, m]`` temporaries into ``[E, m]`` with ``index_add_``, which
costs as much as the experts' own matmuls. Here every routed row is read once by the C kernel of
:mod:`.native` (``kacq_routed``): per (expert, column tile) it streams that expert's rows and forms
``|w| |C|`` in a register, exactly as the reference forms it, for every statistic of
:data:`kacq_hooks.stats.ROUTED` (its argument list is built from that table). Rows grouped by expert
(eager: one expert per call; grouped_mm: sorted) are read in place; batched_mm's token order is read
through the rows' grouped order, without copying C. A NaN or Inf on a valid row makes the kernel add
nothing, and the block goes to the reference, which counts it. The sums equal the reference's up to the
order of float additions.

Where the C kernel cannot run (no compiler, fp16, strided columns) each expert's block is reduced by one
Inductor-generated loop (the same compile path as :mod:`.cpu`) into named per-slot partials, folded into
that expert's slots; without Inductor, the reference.

dL/dC of routed rows (and of a shared expert's) is reduced by the dense backward kernel (``kacq_backward``),
once per expert's rows, into that expert's slots; where it cannot run, by the reference.
"""
from __future__ import annotations

import operator

import torch

from .. import stats as S
from ..errors import ExpertIdError, ShapeError
from . import cpu, native, reference


def _block_partials(c: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
                    doc_weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per statistic (by name), one expert block's partial result per slot; absent where it adds nothing."""
    block = S.routed_coefficients(c, weight, keep, doc_weight)
    partials = {}
    for stat in S.ROUTED:
        partial = stat.column(block)
        if partial is not None:
            partials[stat.name] = partial
    return partials


def _check_rows(c: torch.Tensor, per_row, slots: torch.Tensor, experts: int) -> bool:
    """Refuse per-row tensors (name, tensor or None) of another length than C's rows: a kernel reads n entries of
    them, and the torch loops would broadcast or index them into plausible sums. Then whether there is a row to
    add; if so, the layer's ``experts`` x m slots must fit ``slots``."""
    n, m = c.shape
    for what, t in per_row:
        if t is not None and t.shape != (n,):
            raise ShapeError(f"{what} of shape {tuple(t.shape)} for {n} routed rows of C: one entry per row expected")
    if n and slots.numel() < experts * m:
        raise ShapeError(f"{experts} experts of {m} neurons do not fit statistics of {slots.numel()} slots")
    return n > 0


def _expert_range(ids: torch.Tensor, experts: int) -> tuple[int, int]:
    """The lowest and highest expert of ``ids`` (non-empty), refused outside the layer's 0..experts - 1."""
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= experts:
        raise ExpertIdError(f"routed rows name expert {low if low < 0 else high}, outside 0..{experts - 1} of this "
                            "layer: hand only the layer's own expert ids (expert-parallel sentinels are not rows)")
    return low, high


def accumulate_experts(c: torch.Tensor, expert_ids: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
                       doc_weight: torch.Tensor | None, out, experts: int) -> None:
    """Same contract as :func:`.reference.accumulate_experts`, for CPU tensors."""
    n, m = c.shape
    if not _check_rows(c, (("expert ids", expert_ids), ("routing weights", weight), ("row mask", keep),
                           ("document weights", doc_weight)), out.sum_abs, experts):
        return
    ids = expert_ids.to(torch.long)
    weight = weight.detach()
    lib = cpu._native_for(out, c, rows=keep)
    done = None if lib is None else _native(lib, c, ids, weight, keep, doc_weight, out, experts)
    if done is False:  # a NaN or Inf among the valid rows: counted exactly
        reference.accumulate_experts(c, ids, weight, keep, doc_weight, out, experts)
    if done is not None:
        return
    # the kernel range-checks ids itself; the per-expert loop below would fold an id of `experts` or more into
    # the slots after the routed ones (a shared expert's) and fail on a negative one without saying why
    _expert_range(ids, experts)
    if n > 1 and not bool((ids[1:] >= ids[:-1]).all()):  # batched_mm: token order; group the rows once
        order = torch.argsort(ids, stable=True)
        ids, c, weight, keep = ids[order], c.index_select(0, order), weight[order], keep[order]
        doc_weight = None if doc_weight is None else doc_weight[order]
    counts = torch.bincount(ids, minlength=experts).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        block = slice(start, start + count)
        start += count
        args = (c[block], weight[block], keep[block], None if doc_weight is None else doc_weight[block])
        partials = cpu._run_compiled("experts", _block_partials, *args)
        if partials is None:  # no compiler here: the reference's scatter, on this block
            reference.accumulate_experts(args[0], ids[block], *args[1:], out, experts)
            continue
        slots = slice(expert * m, (expert + 1) * m)
        for name, partial in partials.items():
            S.BY_NAME[name].fold(getattr(out, name)[slots], partial)


def accumulate_experts_backward(c: torch.Tensor, g: torch.Tensor, expert_ids: torch.Tensor, keep: torch.Tensor,
                                out, experts: int) -> None:
    """Same contract as :func:`.reference.accumulate_experts_backward`, for CPU tensors: each expert's rows in
    one pass of the dense dL/dC kernel (:func:`.native.backward`) into that expert's slots. Rows grouped by
    expert (eager, grouped_mm) are read in place; batched_mm's are grouped first. A block holding a NaN or Inf
    goes to the reference, which counts it; without the C kernel, every block does."""
    n, m = c.shape
    if g.shape != c.shape:
        raise ShapeError(f"dL/dC of shape {tuple(g.shape)} does not match C of shape {tuple(c.shape)}")
    # a mask of None keeps every row, as the reference's does
    if not _check_rows(c, (("expert ids", expert_ids), ("row mask", keep)), out.grad_sum_abs, experts):
        return
    ids = expert_ids.to(torch.long)
    low, high = _expert_range(ids, experts)  # index_add_ would fold others into a shared expert's slots
    lib = cpu._native_for(out, c, g, rows=keep)
    if lib is None or not out.grad_sum_abs.is_contiguous():
        reference.accumulate_experts_backward(c, g, ids, keep, out, experts)
        return
    if low != high and not bool((ids[1:] >= ids[:-1]).all()):  # batched_mm: token order
        order = torch.argsort(ids, stable=True)
        ids, c, g = ids[order], c.index_select(0, order), g.index_select(0, order)
        keep = None if keep is None else keep[order]
    runs = ((low, n),) if low == high else enumerate(torch.bincount(ids, minlength=experts).tolist())
    start = 0
    for expert, count in runs:
        if not count:
            continue
        rows = slice(start, start + count)
        start += count
        valid = None if keep is None else keep[rows]
        if not native.backward(lib, c[rows], g[rows], valid, out, start=expert * m):
            reference.accumulate_experts_backward(c[rows], g[rows], ids[rows], valid, out, experts)


def accumulate_slice_backward(c: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None, out, start: int) -> None:
    """Same contract as :func:`.reference.accumulate_slice_backward` (a shared expert's dL/dC into slots
    ``start .. start + m``), for CPU tensors: one pass of the dense dL/dC kernel."""
    if c.dim() != 2:
        raise ShapeError(f"a shared expert's C of shape {tuple(c.shape)}: pass [rows, neurons]")
    n, m = c.shape
    if g.shape != c.shape:
        raise ShapeError(f"dL/dC of shape {tuple(g.shape)} does not match C of shape {tuple(c.shape)}")
    if rows is not None and rows.shape != (n,):  # the kernel reads n entries of it: never past its end
        raise ShapeError(f"row mask of shape {tuple(rows.shape)} for {n} rows of C: one entry per row expected")
    start = operator.index(start)
    if not 0 <= start <= out.grad_sum_abs.numel() - m:
        raise ShapeError(f"slots {start}..{start + m - 1} lie outside statistics of {out.grad_sum_abs.numel()} slots")
    lib = cpu._native_for(out, c, g, rows=rows) if out.grad_sum_abs.is_contiguous() else None
    if lib is None or not native.backward(lib, c, g, rows, out, start=start):
        reference.accumulate_slice_backward(c, g, rows, out, start)


def accumulate_expert_rows(c: torch.Tensor, expert: int, token_index: torch.Tensor, top_k_pos: torch.Tensor,
                           weights: torch.Tensor, keep: torch.Tensor | None, doc_weight: torch.Tensor | None, out,
                           experts: int) -> None:
    """:func:`accumulate_experts` for one expert's rows as an eager forward hands them: row ``r`` of ``c`` is
    token ``token_index[r]`` at top-k position ``top_k_pos[r]``, its routing weight
    ``weights[token_index[r], top_k_pos[r]]``; ``keep`` and ``doc_weight`` are per token (None: every token
    valid, no document weights). The C kernel reads the routing per token; where it cannot, the per-row
    tensors are gathered here and summed as :func:`accumulate_experts` sums them.
    """
    n, m = c.shape
    # the kernel reads both as int64 arrays: an int32 one would be read as pairs of tokens (and past its end)
    token_index, top_k_pos = token_index.to(torch.long), top_k_pos.to(torch.long)
    lib = cpu._native_for(out, c, rows=None) if (
        0 <= expert < experts and out.sum_abs.numel() >= experts * m and weights.dim() == 2
        and token_index.shape == top_k_pos.shape == (n,)) else None
    if lib is not None and weights.dtype in (torch.float32, torch.bfloat16, torch.float16) \
            and (keep is None or (keep.dtype == torch.bool and keep.shape == weights.shape[:1])) \
            and (doc_weight is None or doc_weight.shape == weights.shape[:1]):
        done = native.routed_rows(lib, c, expert, token_index.contiguous(), top_k_pos.contiguous(),
                                  weights.detach().float().contiguous(), None if keep is None else keep.contiguous(),
                                  None if doc_weight is None else doc_weight.float().contiguous(), out, experts)
        if done:
            return
    else:
        done = None
    if weights.dim() != 2:
        raise ShapeError(f"routing weights of shape {tuple(weights.shape)}: eager rows index a [tokens, k] routing")
    tokens, k = weights.shape
    if n and (int(token_index.min()) < 0 or int(token_index.max()) >= tokens):
        raise ShapeError(f"eager rows name token {int(token_index.min())}..{int(token_index.max())} of a routing of "
                         f"{tokens} tokens: hand the token index of the forward's own torch.where")
    # a negative position would index from the end: another position's weight, without an error
    if n and (int(top_k_pos.min()) < 0 or int(top_k_pos.max()) >= k):
        raise ShapeError(f"eager rows name top-k position {int(top_k_pos.min())}..{int(top_k_pos.max())} of a "
                         f"routing of {k} per token: hand the positions of the forward's own torch.where")
    for what, t in (("row mask", keep), ("document weights", doc_weight)):
        if t is not None and (t.dim() != 1 or (n and int(token_index.max()) >= t.shape[0])):
            raise ShapeError(f"{what} of shape {tuple(t.shape)} for a routing of {tokens} tokens: one entry per "
                             "token expected")
    ids = torch.full_like(token_index, expert)
    weight = weights[token_index, top_k_pos]
    row_keep = torch.ones_like(token_index, dtype=torch.bool) if keep is None else keep[token_index] != 0
    row_doc = None if doc_weight is None else doc_weight[token_index]
    if done is False:  # a NaN or Inf among the valid rows: counted exactly
        reference.accumulate_experts(c, ids, weight, row_keep, row_doc, out, experts)
    else:
        accumulate_experts(c, ids, weight, row_keep, row_doc, out, experts)


class ExpertRows:
    """:func:`accumulate_expert_rows` for the experts of one eager forward of a layer, its routing checked and
    bound to the C kernel once (:meth:`prepare`): each expert's call then checks and hands over only its own
    rows. Eager hands one call per expert, so what is done here once is spared E - 1 times a layer."""

    __slots__ = ("out", "buffer", "experts", "dtype", "_held", "_kernel")

    def __init__(self, lib, weights: torch.Tensor, keep: torch.Tensor | None, doc_weight: torch.Tensor | None, out,
                 experts: int, dtype: torch.dtype):
        # the kernel reads these by address: they live as long as this object
        self._held = (weights.detach().float().contiguous(), None if keep is None else keep.contiguous(),
                      None if doc_weight is None else doc_weight.float().contiguous())
        self.out, self.buffer, self.experts, self.dtype = out, out.sum_abs, experts, dtype
        self._kernel = native.bind_routed_rows(lib, *self._held, out, experts)

    @classmethod
    def prepare(cls, c: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None,
                doc_weight: torch.Tensor | None, out, experts: int) -> "ExpertRows | None":
        """The bound routing, or None where the kernel cannot read it as it is (then call
        :func:`accumulate_expert_rows`, which converts, falls back or refuses)."""
        lib = cpu._native_for(out, c, rows=None)
        if lib is None or weights.dim() != 2 or weights.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None
        if keep is not None and not (keep.dtype == torch.bool and keep.shape == weights.shape[:1]):
            return None
        if doc_weight is not None and doc_weight.shape != weights.shape[:1]:
            return None
        return cls(lib, weights, keep, doc_weight, out, experts, c.dtype)

    def __call__(self, c: torch.Tensor, expert: int, token_index: torch.Tensor, top_k_pos: torch.Tensor) -> bool:
        """Add one expert's rows, as :func:`accumulate_expert_rows` adds them. False, having added nothing, when
        they are not as the kernel reads them (another dtype or layout, int32 indices), hold a NaN or Inf, or
        name a token or position out of range: :func:`accumulate_expert_rows` then converts, counts or refuses."""
        n = token_index.shape[0]
        if not (c.dtype is self.dtype and c.is_cpu and c.dim() == 2 and c.shape[0] == n and n > 0
                and (c.stride(1) == 1 or c.shape[1] == 1) and 0 <= expert < self.experts
                and self.experts * c.shape[1] <= self.buffer.numel() and self.out.sum_abs is self.buffer
                and token_index.dtype is torch.long and top_k_pos.dtype is torch.long
                and top_k_pos.shape == token_index.shape == (n,)
                and token_index.is_contiguous() and top_k_pos.is_contiguous()
                and not (c.is_neg() or c.is_conj() or c._is_zerotensor())):
            return False
        return self._kernel(c, expert, token_index, top_k_pos) is True


def _native(lib, c, ids, weight, keep, doc_weight, out, experts: int) -> bool | None:
    """All routed rows through the one-pass C kernel (:func:`.native.routed`): True when they are added;
    False, having added nothing, when a slot sum is non-finite (a NaN or Inf in C on a valid row); None
    when the kernel cannot take them (expert ids outside the layer: refused by the caller; mismatched lengths,
    weights other than fp32/bf16/fp16: the slower paths refuse or handle them)."""
    n = c.shape[0]
    extras = (ids, weight, keep) + (() if doc_weight is None else (doc_weight,))
    if not all(t.device.type == "cpu" and t.shape == (n,) for t in extras):
        return None
    # the kernel reads weights as fp32: a float64 weight that rounds to 0 there would no longer count as routed
    # (the reference tests weight != 0 on the weight as given); those dtypes convert exactly
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    # few and cheap host ops: eager hands one call per expert, so a fixed cost here is paid E times a layer
    doc = None if doc_weight is None else doc_weight.float().contiguous()
    return native.routed(lib, c, ids.contiguous(), weight.float().contiguous(), keep.contiguous(), doc, out, experts)
