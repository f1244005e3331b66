"""The CPU reductions in one pass over C (dense blocks, dL/dC, routed experts' rows): ``native.c``, built at
first use with the system C compiler.

The build is cached under ``$KACQ_CACHE`` (default ``~/.cache/kacq_hooks``) in a folder named by a hash
of the source, the compiler and the machine, written atomically (workers of one study may build at the
same time). Where no compiler is found or the build fails, :func:`library` returns None and
:mod:`.cpu` uses its eager torch passes, which give the same statistics a few passes slower; the reason
is logged once. ``KACQ_KERNELS=eager`` skips the build, ``KACQ_KERNELS=native`` makes its failure an
error.

The kernel takes raw pointers, so the caller (:mod:`.cpu`, :mod:`.experts_cpu`) hands it only what it is written for: fp32
or bf16 blocks whose rows are contiguous, on the CPU; anything else goes to the eager passes. Its output
buffers are passed in the order of the statistics table (:func:`kacq_hooks.stats.kernel_outputs`), and
the library is loaded only if ``native.c`` declares that it writes exactly those fields.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from .. import stats
from ..errors import KacqError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the codes native.c reads
# Tried in order. -fno-trapping-math lets the compiler vectorize the selects (results are unchanged: it only
# drops floating-point exception flags); -march=native is why the cache key names the CPU; without OpenMP
# (e.g. Apple clang) the kernel runs on one thread.
_BASE = ["-O3", "-fno-trapping-math", "-fPIC", "-shared"]
_FLAG_SETS = ([*_BASE, "-march=native", "-fopenmp"], [*_BASE, "-fopenmp"], [*_BASE, "-march=native"], _BASE)

# the per-neuron buffers each kernel writes, in the order it takes them (NaN/Inf counts are the reference's)
FORWARD_OUTPUTS = stats.kernel_outputs("forward")
BACKWARD_OUTPUTS = stats.kernel_outputs("backward")
ROUTED_OUTPUTS = stats.kernel_outputs("routed")
_FORWARD_COUNTERS = tuple(s for s in stats.FORWARD if not s.per_neuron)  # added here, from the row mask
_BACKWARD_COUNTERS = tuple(s for s in stats.BACKWARD if not s.per_neuron)

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded library or None, once tried; "why": why it is None


class NativeBuildError(KacqError):
    """``KACQ_KERNELS=native`` was asked for, but the one-pass CPU kernel could not be built or loaded."""


def _cache_root() -> Path:
    return Path(os.environ.get("KACQ_CACHE") or Path.home() / ".cache" / "kacq_hooks")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_identity() -> str:
    """What -march=native depends on: a build for one CPU must not be loaded on another (shared home folders)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join(part.encode() if isinstance(part, str) else part for part in (
        source, version, platform.machine(), sys.platform, _cpu_identity(), repr(_FLAG_SETS)))).hexdigest()[:16]
    target = _cache_root() / "native" / key / "libkacq_reduce.so"
    digest = target.with_suffix(".sha256")
    # a cached build is loaded only if its bytes are those its builder recorded: a truncated or corrupt .so
    # (an interrupted copy of a shared cache) would crash the process in dlopen
    if target.exists() and digest.exists() and digest.read_text().strip() == _sha256(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in _FLAG_SETS:
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
            partial = Path(tmp.name)
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            recorded = _sha256(partial)
            os.replace(partial, target)  # atomic: a concurrent build of the same key writes the same bytes
            with tempfile.NamedTemporaryFile("w", dir=target.parent, suffix=".sha256", delete=False) as tmp:
                tmp.write(recorded)
            os.replace(tmp.name, digest)
            return target
        partial.unlink(missing_ok=True)
        errors.append(f"{' '.join(flags)}: {done.stderr.strip()[-300:]}")
    raise RuntimeError("; ".join(errors))


class _TableMismatch(RuntimeError):
    """native.c and the statistics table disagree: a statistic was added to one and not the other."""


def _load() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (looked for $CC, cc, gcc, clang)")
    lib = ctypes.CDLL(str(_build(compiler)))
    for kernel, wanted in (("kacq_forward", FORWARD_OUTPUTS), ("kacq_backward", BACKWARD_OUTPUTS),
                           ("kacq_routed", ROUTED_OUTPUTS)):
        declared = tuple(ctypes.c_char_p.in_dll(lib, f"{kernel}_outputs").value.decode().split(","))
        if declared != wanted:
            raise _TableMismatch(f"native.c's {kernel} writes {declared} but the statistics table asks for {wanted}: "
                                 "add the missing statistics' lines to native.c")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    # (c, dtype, n, d, row stride, valid rows, document weights, *outputs, threads)
    lib.kacq_forward.argtypes = [p, i32, i64, i64, i64, p, p, *[p] * len(FORWARD_OUTPUTS), i32]
    lib.kacq_forward.restype = i32
    # (c, g, dtype, n, d, c row stride, g row stride, valid rows, *outputs, threads)
    lib.kacq_backward.argtypes = [p, p, i32, i64, i64, i64, i64, p, *[p] * len(BACKWARD_OUTPUTS), i32]
    lib.kacq_backward.restype = i32
    # (c, dtype, n, m, row stride, expert ids, experts, weights, valid rows, document weights,
    #  eager's gather: token and top-k position of each row, their expert, tokens, k; *outputs, threads)
    lib.kacq_routed.argtypes = [p, i32, i64, i64, i64, p, i64, p, p, p, p, p, i64, i64, i64,
                                *[p] * len(ROUTED_OUTPUTS), i32]
    lib.kacq_routed.restype = i32
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first call; None where it cannot be built (see the module doc)."""
    mode = os.environ.get("KACQ_KERNELS", "auto").lower()
    if mode == "eager":
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                try:
                    _state["lib"] = _load()
                except Exception as err:  # no toolchain, a read-only cache, a platform the source does not build on
                    _state["lib"], _state["why"] = None, f"{type(err).__name__}: {err}"
                    # a missing toolchain is the machine's limit; a table native.c does not match is a developer's
                    # slip that would otherwise only show as slower statistics
                    report = log.warning if isinstance(err, _TableMismatch) else log.info
                    report("kacq_hooks: the one-pass CPU kernel is unavailable (%s); using eager torch passes, "
                           "which give the same statistics a few passes slower", _state["why"])
    if _state["lib"] is None and mode == "native":
        raise NativeBuildError(f"KACQ_KERNELS=native, but the one-pass CPU kernel could not be built: "
                               f"{_state['why']}. Install a C compiler (or set CC), or unset KACQ_KERNELS")
    return _state["lib"]


def unavailable_reason() -> str | None:
    """Why the last :func:`library` call found no kernel (None when it found one or was not made)."""
    return _state.get("why")


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernel reads these [n, d] blocks as they are: same CPU dtype it knows, unit column stride."""
    first = tensors[0]
    # raw memory is read: tensors whose values are not their storage's (a neg or conj bit, torch's zero
    # tensor without storage) and empty blocks go to the eager passes
    return all(t.device.type == "cpu" and t.dtype == first.dtype and t.dim() == 2 and
               (t.stride(1) == 1 or t.shape[1] == 1) and t.shape == first.shape and
               not t.is_neg() and not t.is_conj() and not t._is_zerotensor() for t in tensors) \
        and first.dtype in DTYPES and first.numel() > 0


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(status: int) -> bool:
    """True when the kernel committed the block; False when a column sum was non-finite (nothing written)."""
    if status == 2:
        raise MemoryError("kacq_hooks: the one-pass CPU kernel could not allocate its per-column scratch")
    return status == 0


def forward(lib: ctypes.CDLL, c: torch.Tensor, rows: torch.Tensor | None, doc_weight: torch.Tensor | None,
            out) -> bool:
    """One pass of :func:`kacq_hooks.kernels.reference.accumulate_forward` over ``c`` (see :func:`supports`).

    Returns False, having added nothing, when the block holds a NaN or Inf (or a column sum overflows):
    the caller then counts it exactly with the reference. Token counts are added only on success.
    """
    n, d = c.shape
    valid = None if rows is None else rows.contiguous()
    weight = None if doc_weight is None else doc_weight.float().contiguous()
    done = _check(lib.kacq_forward(_ptr(c), DTYPES[c.dtype], n, d, c.stride(0), _ptr(valid), _ptr(weight),
                                   *[_ptr(getattr(out, name)) for name in FORWARD_OUTPUTS], torch.get_num_threads()))
    if done:
        _count_rows(_FORWARD_COUNTERS, out, n, valid)
    return done


def backward(lib: ctypes.CDLL, c: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None, out,
             start: int | None = None) -> bool:
    """One pass of :func:`kacq_hooks.kernels.reference.accumulate_backward`; False as in :func:`forward`.

    With ``start``, the block is one routed expert's: its sums go into slots ``start .. start + d`` of ``out``
    and its rows are not counted (a layer's gradient tokens are counted once, by the caller)."""
    n, d = c.shape
    valid = None if rows is None else rows.contiguous()
    buffers = [getattr(out, name) for name in BACKWARD_OUTPUTS]
    if start is not None:
        buffers = [buf[start:start + d] for buf in buffers]
    done = _check(lib.kacq_backward(_ptr(c), _ptr(g), DTYPES[c.dtype], n, d, c.stride(0), g.stride(0), _ptr(valid),
                                    *[_ptr(buf) for buf in buffers], torch.get_num_threads()))
    if done and start is None:
        _count_rows(_BACKWARD_COUNTERS, out, n, valid)
    return done


def routed(lib: ctypes.CDLL, c: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
           doc_weight: torch.Tensor | None, out, experts: int) -> bool | None:
    """One pass of :func:`kacq_hooks.kernels.reference.accumulate_experts` over ``c`` (see :func:`supports`).

    Row ``r`` of ``c`` belongs to expert ``ids[r]`` (contiguous int64); ``weight`` (contiguous fp32) is its
    routing weight, ``keep`` (contiguous bool) whether it is a valid row, ``doc_weight`` (contiguous fp32)
    its document weight or None. Returns False, having added nothing, as :func:`forward`; None, having
    added nothing, when an id lies outside ``0..experts - 1``.
    """
    n, m = c.shape
    status = lib.kacq_routed(_ptr(c), DTYPES[c.dtype], n, m, c.stride(0), _ptr(ids), experts, _ptr(weight),
                             _ptr(keep), _ptr(doc_weight), None, None, 0, 0, 0,
                             *[_ptr(getattr(out, name)) for name in ROUTED_OUTPUTS], torch.get_num_threads())
    return None if status == 3 else _check(status)


def routed_rows(lib: ctypes.CDLL, c: torch.Tensor, expert: int, token_index: torch.Tensor, top_k_pos: torch.Tensor,
                weights: torch.Tensor, keep: torch.Tensor | None, doc_weight: torch.Tensor | None, out,
                experts: int) -> bool | None:
    """:func:`routed` for one expert's rows as an eager forward hands them: row ``r`` of ``c`` is token
    ``token_index[r]`` at top-k position ``top_k_pos[r]`` (both contiguous int64), whose routing weight is
    ``weights[token_index[r], top_k_pos[r]]`` (``weights`` [tokens, k], contiguous fp32); ``keep`` (contiguous
    bool) and ``doc_weight`` (contiguous fp32) are per token, or None. The kernel gathers the per-row values
    itself. Returns as :func:`routed`; None also when a token or position is out of range.
    """
    return bind_routed_rows(lib, weights, keep, doc_weight, out, experts)(c, expert, token_index, top_k_pos)


def bind_routed_rows(lib: ctypes.CDLL, weights: torch.Tensor, keep: torch.Tensor | None,
                     doc_weight: torch.Tensor | None, out, experts: int):
    """:func:`routed_rows` with one layer forward's routing and outputs bound: a function
    ``(c, expert, token_index, top_k_pos)`` returning as :func:`routed_rows`, which takes only the pointers of
    one expert's rows (eager hands E calls a layer, so what is bound here is converted once, not E times).
    The bound tensors must outlive it; its caller checks what :func:`routed_rows` asks of each call (``c``
    [n, m] of a dtype the kernel reads, unit column stride; both indices contiguous int64 of length n)."""
    tokens, k = weights.shape
    kernel = lib.kacq_routed
    bound = (_ptr(weights), _ptr(keep), _ptr(doc_weight))
    tail = (*[_ptr(getattr(out, name)) for name in ROUTED_OUTPUTS], torch.get_num_threads())

    def routed_rows_of(c: torch.Tensor, expert: int, token_index: torch.Tensor, top_k_pos: torch.Tensor):
        n, m = c.shape
        status = kernel(c.data_ptr(), DTYPES[c.dtype], n, m, c.stride(0), None, experts, *bound,
                        token_index.data_ptr(), top_k_pos.data_ptr(), expert, tokens, k, *tail)
        return None if status == 3 else _check(status)

    return routed_rows_of


def _count_rows(counters, out, n: int, valid: torch.Tensor | None) -> None:
    """The per-layer counters (token counts), which read only the row mask."""
    block = stats.rows_only(n, valid)
    for stat in counters:
        stat.update(getattr(out, stat.name), block)
