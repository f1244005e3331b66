"""``instrument(model)``: hooks that stream FFN memory-coefficient statistics while the model runs.

One forward pre-hook on the model remembers the call's attention mask; one forward pre-hook per
layer sees C (the input of the MLP output projection) and adds its statistics into fp32 buffers in a
single reduction. With ``grads=True`` that hook also puts a tensor hook on C, so the backward pass
streams dL/dC statistics into the same layer. Hooks return nothing (the model's outputs are not
changed by a single bit), never call ``.item()`` on a GPU, and are gone after ``remove()`` or the
end of a ``with`` block, also on error.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from typing import Iterator

import torch
from torch import nn

from . import kernels
from .entropy import KnowledgeEntropy, knowledge_entropy
from .errors import KacqError, ShapeError
from .frontends import Binding, bind
from .locate import Site
from .stats import CoefficientStats

log = logging.getLogger(__name__)

_WEIGHTINGS = ("token", "document")
_attached: "weakref.WeakSet[Instrumentation]" = weakref.WeakSet()


def instrument(model: nn.Module, *, mlp_out: str | None = None, grads: bool = False, mask_padding: bool = True,
               weighting: str = "token", padding_compat: bool = False) -> "Instrumentation":
    """Attach coefficient capture to ``model`` and return the :class:`Instrumentation` that owns it.

    Args:
        model: a Hugging Face causal LM (or any torch model the locator understands, wrapped by DDP,
            FSDP, ``torch.compile`` or activation checkpointing or not), a TransformerLens
            ``HookedTransformer``/``TransformerBridge``, or an nnsight model.
        mlp_out: path template of the MLP output projection, e.g. ``"model.layers.{i}.mlp.down_proj"``,
            overriding the automatic search.
        grads: also stream dL/dC in backward passes (per neuron: sum |g| and sum C*g).
        mask_padding: leave padded positions out (default). ``False`` counts them, as the released
            knowledge-entropy code does, which never passes the mask.
        weighting: the default for :meth:`Instrumentation.knowledge_entropy`: "token" (every token
            counts once; the released code) or "document" (mean over each batch row first; the paper's
            equation). Document sums are only kept when "document" is chosen here.
        padding_compat: the released code's padding behaviour by its SCIENCE.md name; the same as
            ``mask_padding=False``.

    >>> import kacq_hooks as kh
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))
    >>> with kh.instrument(model) as inst:
    ...     _ = model(torch.randint(64, (2, 8)))
    >>> len(inst.knowledge_entropy().per_layer), inst.sites[0].path
    (2, 'transformer.h.0.mlp.c_proj')
    """
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"weighting must be one of {_WEIGHTINGS}, not {weighting!r}")
    inst = Instrumentation(bind(model, mlp_out), model=model, grads=grads,
                           mask_padding=mask_padding and not padding_compat,
                           weighting=weighting)
    inst.attach()
    return inst


def instrumentations_of(model: nn.Module) -> list["Instrumentation"]:
    """The instrumentations attached to ``model`` or to any module inside it."""
    inside = {id(m) for m in model.modules()} if isinstance(model, nn.Module) else set()
    return [inst for inst in list(_attached)
            if inst.model is model or any(id(site.module) in inside for site in inst.sites)]


@contextlib.contextmanager
def paused(model: nn.Module) -> Iterator[None]:
    """Pause every instrumentation of ``model`` (e.g. while scoring probes)."""
    with contextlib.ExitStack() as stack:
        for inst in instrumentations_of(model):
            stack.enter_context(inst.pause())
        yield


class Instrumentation:
    """Owns the hooks on one model and the :class:`CoefficientStats` they feed."""

    def __init__(self, binding: Binding, *, model=None, grads: bool = False, mask_padding: bool = True,
                 weighting: str = "token"):
        self.binding = binding
        self.model = model if model is not None else binding.root
        self.grads = grads
        self.mask_padding = mask_padding
        self.weighting = weighting
        root_device = _device_of(binding.root)
        self.stats = CoefficientStats([s.d_ff for s in binding.sites],
                                      [_device_of(s.module, root_device) for s in binding.sites])
        self._handles: list = []
        self._pause_depth = 0
        self._call: tuple[torch.Tensor | None, tuple[int, int] | None] = (None, None)
        self._rows_cache: dict = {}

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def sites(self) -> list[Site]:
        return self.binding.sites

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "Instrumentation":
        """Register the hooks (``instrument`` does this already; use it to re-attach after ``remove``)."""
        if self._handles:
            return self
        self._handles.append(self.binding.root.register_forward_pre_hook(self._on_call, with_kwargs=True))
        for index, site in enumerate(self.sites):
            self._handles.append(site.module.register_forward_pre_hook(functools.partial(self._on_coefficients, index)))
        _attached.add(self)
        return self

    def remove(self) -> None:
        """Remove every hook; the statistics stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._call, self._rows_cache = (None, None), {}
        _attached.discard(self)

    def __enter__(self) -> "Instrumentation":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextlib.contextmanager
    def pause(self) -> Iterator["Instrumentation"]:
        """Inside this context forward (and backward) passes are not counted."""
        self._pause_depth += 1
        try:
            yield self
        finally:
            self._pause_depth -= 1

    @property
    def paused(self) -> bool:
        return self._pause_depth > 0

    # -- hooks -----------------------------------------------------------------------------------
    def _on_call(self, module, args, kwargs):
        mask, shape = self.binding.call_inputs(args, kwargs)
        if mask is not None and self.mask_padding:
            if mask.dim() != 2:
                raise ShapeError(f"attention_mask has shape {tuple(mask.shape)}; kacq_hooks needs the 2-D padding "
                                 "mask [batch, seq]. Pass a 2-D mask, or instrument(model, mask_padding=False) to "
                                 "count every position")
            if shape is not None and (mask.shape[0] != shape[0] or mask.shape[1] < shape[1]):
                raise ShapeError(f"attention_mask of shape {tuple(mask.shape)} does not fit inputs of shape "
                                 f"{shape} (expected [{shape[0]}, >= {shape[1]}])")
        self._call = (mask if self.mask_padding else None, shape)
        self._rows_cache = {}

    def _on_coefficients(self, index: int, module, args):
        if self._pause_depth:
            return
        c = args[0]
        recomputing = torch._C._current_graph_task_id() != -1  # activation checkpointing re-runs forwards in backward
        c2d = c.detach().reshape(-1, c.shape[-1])
        stats = self.stats[index]
        if stats.device != c.device:  # a parameterless site (a TransformerLens HookPoint) on a sharded model
            stats.to(c.device)
        rows, doc_weight, documents = self._rows_for(c)
        if not recomputing:
            kernels.accumulate_forward(c2d, rows, doc_weight, stats)
            if documents is not None:
                stats.documents.add_(documents.to(stats.documents.device))
        if self.grads and c.requires_grad and torch.is_grad_enabled():
            c.register_hook(functools.partial(self._on_gradient, index, c2d, rows))

    def _on_gradient(self, index: int, c2d: torch.Tensor, rows, grad: torch.Tensor):
        if not self._pause_depth:
            kernels.accumulate_backward(c2d, grad.reshape(-1, grad.shape[-1]), rows, self.stats[index])

    def _rows_for(self, c: torch.Tensor):
        """(valid rows [N] bool or None, document weights [N] fp32 or None, documents or None) for C."""
        key = tuple(c.shape[:-1])
        if key not in self._rows_cache:
            self._rows_cache[key] = self._rows_uncached(c)
        return self._rows_cache[key]

    def _rows_uncached(self, c: torch.Tensor):
        mask, shape = self._call
        if c.dim() == 3:
            batch, steps = c.shape[0], c.shape[1]
        elif c.dim() == 2 and (mask is not None or shape is not None):  # OPT flattens to (batch * seq, d_ff)
            batch = mask.shape[0] if mask is not None else shape[0]
            if c.shape[0] % batch:
                raise ShapeError(f"coefficients of shape {tuple(c.shape)} cannot be split into {batch} batch rows")
            steps = c.shape[0] // batch
        else:
            batch, steps = 1, c.reshape(-1, c.shape[-1]).shape[0]
        rows = window = None
        if mask is not None:
            if mask.shape[0] != batch or mask.shape[1] < steps:
                raise ShapeError(f"attention_mask of shape {tuple(mask.shape)} does not fit coefficients covering "
                                 f"{batch} rows x {steps} positions; pass instrument(..., mask_padding=False) to "
                                 "count every position")
            window = mask[:, mask.shape[1] - steps:].to(device=c.device)  # cached generation: the last positions
            rows = window.reshape(-1).bool()
        if self.weighting != "document":
            return rows, None, None
        window = torch.ones(batch, steps, device=c.device) if window is None else window.float()
        lengths = window.sum(1, keepdim=True)  # a document is a batch row; its weight is 1 / its token count
        return rows, (window / lengths.clamp_min(1)).reshape(-1), (lengths > 0).sum()

    # -- results ---------------------------------------------------------------------------------
    def knowledge_entropy(self, weighting: str | None = None) -> KnowledgeEntropy:
        """Per-layer and total knowledge entropy of everything recorded so far (SCIENCE.md §2)."""
        return knowledge_entropy(self.stats, self._weighting(weighting))

    def mean_abs_coefficients(self, weighting: str | None = None) -> list[torch.Tensor]:
        """c̄ per layer: fp32 [d_ff] tensors of the mean |C| over recorded tokens (or documents)."""
        self._require_tokens()
        return [s.mean_abs(self._weighting(weighting)) for s in self.stats]

    def activity_frequency(self) -> list[torch.Tensor]:
        """Per layer, the fraction of recorded tokens on which each neuron's |C| > 0."""
        self._require_tokens()
        return [s.active.double().div(s.tokens.clamp(min=1)).float() for s in self.stats]

    def _weighting(self, weighting: str | None) -> str:
        weighting = weighting or self.weighting
        if weighting == "document" and self.weighting != "document":
            raise KacqError("document-weighted sums were not kept: create the instrumentation with "
                            "instrument(model, weighting='document')")
        return weighting

    def _require_tokens(self) -> None:
        if not any(int(s.tokens) for s in self.stats):
            raise KacqError("no tokens have been recorded: run forward passes on the instrumented model "
                            "(outside inst.pause()) first")

    def reset(self) -> None:
        self.stats.reset()

    def state_dict(self) -> dict:
        return {"sites": [s.path for s in self.sites], "weighting": self.weighting, "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sites") != [s.path for s in self.sites]:
            raise ShapeError(f"saved statistics are for sites {state.get('sites')}, this instrumentation has "
                             f"{[s.path for s in self.sites]}")
        self.stats.load_state_dict(state["stats"])

    def merge(self, other: "Instrumentation") -> "Instrumentation":
        self.stats.merge(other.stats)
        return self

    def all_reduce(self, group=None) -> "Instrumentation":
        self.stats.all_reduce(group)
        return self

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"Instrumentation({len(self.sites)} sites via {self.binding.name}, {state}, grads={self.grads})"


def _device_of(module: nn.Module, default: torch.device | None = None) -> torch.device:
    for tensor in module.parameters():
        return tensor.device if tensor.device.type != "meta" else torch.device("cpu")
    return default or torch.device("cpu")
