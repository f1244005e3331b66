"""Where each FFN memory slot lives in the weights: the rows and columns that belong to slot i alone.

Slot i of a layer is neuron i of its FFN: the row i of the up (and gate) projection that computes C_i,
their biases' entry i, and the column i of the output projection that C_i multiplies. A fused
``gate_up_proj`` holds gate row i at i and up row i at m + i (or at 2i and 2i + 1 where interleaved, as
GPT-OSS's experts); a mixture-of-experts layer's slot e*m + j is neuron j of expert e (one slice of the
3-D parameters, or expert e's own MLP), then the shared experts' neurons. The output projection's bias
and everything outside the FFN belong to no slot.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LocateError
from ..locate import Site
from .resuscitation import parent_of


@dataclass(frozen=True, eq=False)
class SlotSlice:
    """Slots ``start .. start + count - 1`` of a site live in ``parameter[expert]`` (or the whole parameter
    when ``expert`` is None) along ``axis``, at index ``offset + stride * (slot - start)``."""

    parameter: nn.Parameter
    start: int
    count: int
    axis: int
    offset: int = 0
    stride: int = 1
    expert: int | None = None
    role: str = ""  # "up", "gate", "gate_up", "down" (weight or bias)

    def mark(self, mask: torch.Tensor, slots: torch.Tensor) -> None:
        """Set ``mask`` (bool, the parameter's shape) to True at the entries of the given site slots."""
        inside = slots[(slots >= self.start) & (slots < self.start + self.count)]
        if not inside.numel():
            return
        index = (self.offset + self.stride * (inside - self.start)).to(mask.device)
        view = mask[self.expert] if self.expert is not None else mask
        view.index_fill_(self.axis, index, True)


def _linear_like(module) -> tuple[int, int, int] | None:
    """(in_features, out_features, weight axis of the outputs) of an nn.Linear or a GPT-2 Conv1D."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if isinstance(module, nn.Linear):
        return weight.shape[1], weight.shape[0], 0
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 layer: weight [in, out]
        return weight.shape[0], weight.shape[1], 1
    return None


def _float_parameter(p, where: str) -> nn.Parameter:
    if not isinstance(p, nn.Parameter) or not p.dtype.is_floating_point:
        raise LocateError(f"{where} is not a floating-point parameter ({type(p).__name__}"
                          f"{'' if not isinstance(p, torch.Tensor) else ', ' + str(p.dtype)}); quantized weights "
                          "cannot be trained slot by slot")
    return p


def _mlp_slices(parent: nn.Module, down: nn.Module, d_ff: int, start: int, where: str) -> list[SlotSlice]:
    """The slices of one dense MLP (``down`` is its output projection inside ``parent``)."""
    shape = _linear_like(down)
    if shape is None or shape[0] != d_ff:
        raise LocateError(f"{where}: the output projection {type(down).__name__} is not a Linear/Conv1D taking "
                          f"{d_ff} inputs, so its slot columns cannot be located")
    out: list[SlotSlice] = [SlotSlice(_float_parameter(down.weight, f"{where}.weight"), start, d_ff,
                                      axis=1 - shape[2], role="down")]
    ups = 0
    for name, child in parent.named_children():
        if child is down:
            continue
        shape = _linear_like(child)
        if shape is None or shape[1] not in (d_ff, 2 * d_ff):
            continue
        halves = [(0, name)] if shape[1] == d_ff else [(0, name + ":gate"), (d_ff, name + ":up")]
        for offset, role in halves:
            out.append(SlotSlice(_float_parameter(child.weight, f"{name}.weight"), start, d_ff, axis=shape[2],
                                 offset=offset, role=role))
            if isinstance(getattr(child, "bias", None), torch.Tensor):
                out.append(SlotSlice(_float_parameter(child.bias, f"{name}.bias"), start, d_ff, axis=0,
                                     offset=offset, role=role + ":bias"))
        ups += 1
    if not ups:
        raise LocateError(f"{where}: no up projection (a Linear/Conv1D with {d_ff} or {2 * d_ff} outputs) beside "
                          f"the output projection in {type(parent).__name__}; its slots' rows cannot be located")
    return out


def _fused_slices(layer, start: int) -> list[SlotSlice]:
    module = layer.module
    m, e_count = layer.d_ff, layer.experts
    decorated = hasattr(module, "has_gate") and hasattr(module, "is_transposed")
    transposed = bool(getattr(module, "is_transposed", False))
    out = []
    up = getattr(module, "gate_up_proj", None)
    gated = up is not None
    if up is None:
        up = getattr(module, "up_proj", None)
    if not isinstance(up, torch.Tensor) or up.dim() != 3:
        raise LocateError(f"{layer.path}: no 3-D gate_up_proj/up_proj parameter to locate its slots in")
    rows = up.shape[1] if not transposed else up.shape[2]
    if not decorated and not transposed and up.shape[1] == layer.d_model and up.shape[2] in (m, 2 * m):
        transposed, rows = True, up.shape[2]
    axis = 1 if transposed else 0
    if rows == 2 * m and gated:
        interleaved = decorated and not getattr(module, "is_concatenated", True)
        halves = [(0, 2, "gate"), (1, 2, "up")] if interleaved else [(0, 1, "gate"), (m, 1, "up")]
    elif rows == m:
        halves = [(0, 1, "up")]
    else:
        raise LocateError(f"{layer.path}: up parameter of shape {tuple(up.shape)} for {m} slots per expert")
    up = _float_parameter(up, f"{layer.path}.gate_up_proj")
    bias = getattr(module, "gate_up_proj_bias", None) if gated else getattr(module, "up_proj_bias", None)
    down = _float_parameter(getattr(module, "down_proj", None), f"{layer.path}.down_proj")
    if down.dim() != 3:
        raise LocateError(f"{layer.path}.down_proj has shape {tuple(down.shape)}, not [E, ., .]")
    if getattr(module, "is_transposed", None) is not None:
        down_axis = 0 if module.is_transposed else 1
    else:
        down_axis = 1 if down.shape[2] == m and down.shape[1] == layer.d_model else 0
    if down.shape[1 + down_axis] != m:
        raise LocateError(f"{layer.path}.down_proj of shape {tuple(down.shape)} has no axis of {m} slots")
    for e in range(e_count):
        first = start + e * m
        for offset, stride, role in halves:
            out.append(SlotSlice(up, first, m, axis=axis, offset=offset, stride=stride, expert=e, role=role))
            if isinstance(bias, torch.Tensor):
                out.append(SlotSlice(_float_parameter(bias, f"{layer.path} bias"), first, m, axis=0, offset=offset,
                                     stride=stride, expert=e, role=role + ":bias"))
        out.append(SlotSlice(down, first, m, axis=down_axis, expert=e, role="down"))
    return out


def slot_parameters(model: nn.Module, site: Site) -> list[SlotSlice]:
    """Every parameter slice that belongs to a single slot of ``site`` (see the module doc).

    Dense MLPs (gated, fused gate_up, or GPT-2-style fc/proj), MoE layers with fused 3-D experts or one
    MLP per expert, and their shared experts. Raises :class:`~kacq_hooks.errors.LocateError` where a slot's
    weights cannot be told apart (quantized weights, an unknown layout).
    """
    if site.kind != "experts":
        return _mlp_slices(parent_of(model, site.module), site.module, site.d_ff, 0, site.path)
    layer = site.experts_layer
    out: list[SlotSlice] = []
    if layer.layout == "module_list":
        for e in range(layer.experts):
            out += _mlp_slices(layer.module[e], layer.downs[e], layer.d_ff, e * layer.d_ff, f"{layer.path}.{e}")
    else:
        out += _fused_slices(layer, 0)
    start = layer.experts * layer.d_ff
    for shared in layer.shared:
        out += _mlp_slices(shared.module, shared.down, shared.d_ff, start, shared.path)
        start += shared.d_ff
    return out
