"""Coefficient reductions, dispatched by device.

``accumulate_forward(c, rows, doc_weight, out)`` and ``accumulate_backward(c, g, rows, out)`` add one
forward's (or backward's) statistics of a [N, d_ff] coefficient tensor into a
:class:`kacq_hooks.stats.LayerStats`. :mod:`.reference` is the specification. Dispatch:

- CUDA tensors with Triton installed: the fused kernels of :mod:`.triton`, custom ops that
  ``torch.compile`` keeps (and Inductor schedules), so compiled models use them too;
- CPU tensors: :mod:`.cpu`: one pass over C in the C kernel of :mod:`.native` (built at first use with the
  system compiler), or the reference in a few eager torch passes where it cannot be built or
  ``KACQ_KERNELS=eager`` asks for them (routed experts, :mod:`.experts_cpu`: one pass of the same C kernel
  over all routed rows, else one Inductor loop per expert, whose eager fallback ``KACQ_KERNELS=eager``
  forces too);
- anything else, or while ``torch.compile`` traces: :mod:`.reference`.

``KACQ_KERNELS=torch`` forces the reference everywhere, ``KACQ_KERNELS=native`` makes a failed build of the
one-pass CPU kernel an error instead of a fallback, ``KACQ_KERNELS=triton`` the Triton kernels
(on CPU only under ``TRITON_INTERPRET=1``, which is how the tests check them without a GPU).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ..errors import ConfigError, MissingExtraError
from . import cpu, native, reference

_VALID = ("auto", "torch", "triton", "eager", "native")


def backend_for(device: torch.device) -> str:
    """The backend used for tensors on ``device``: "triton", "cpu" or "torch"."""
    choice = os.environ.get("KACQ_KERNELS", "auto").lower()
    if choice not in _VALID:
        raise ConfigError(f"KACQ_KERNELS={choice!r} is not one of {_VALID}; unset it or pick one of those")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        return "triton"
    if device.type == "cuda" and _triton_available():
        return "triton"
    if device.type == "cpu" and not torch.compiler.is_compiling():
        return "cpu"
    return "torch"


_HAS_TRITON = importlib.util.find_spec("triton") is not None  # looked up once, without importing triton


def _triton_available() -> bool:
    return _HAS_TRITON


def _module(backend: str):
    if backend == "triton":
        if not _triton_available():
            raise MissingExtraError("triton", "triton", "KACQ_KERNELS=triton")
        from . import triton as triton_kernels  # the triton extra (imports triton)

        return triton_kernels
    return cpu if backend == "cpu" else reference


def describe(device: torch.device) -> str:
    """The kernels used for tensors on ``device``, in words (benchmarks print it beside their figures)."""
    backend = backend_for(device)
    if backend != "cpu":
        return backend
    if native.library() is not None:
        return "cpu: one-pass C kernel"
    return f"cpu: eager torch passes ({native.unavailable_reason() or 'KACQ_KERNELS=eager'})"


def accumulate_forward(c: torch.Tensor, rows: torch.Tensor | None, doc_weight: torch.Tensor | None, out) -> None:
    _module(backend_for(c.device)).accumulate_forward(c, rows, doc_weight, out)


def accumulate_backward(c: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None, out) -> None:
    _module(backend_for(c.device)).accumulate_backward(c, g, rows, out)
