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
import warnings
import weakref
from typing import Iterator

import torch
from torch import nn

from . import kernels
from .experts import ExpertsTap, SharedTap
from .kernels import reference
from .entropy import KnowledgeEntropy, knowledge_entropy
from ._hooks import OwnerHook
from .errors import ConfigError, KacqError, ShapeError
from .frontends import Binding, StackBinding, StackInputs, bind
from .locate import Site
from .stats import CoefficientStats

log = logging.getLogger(__name__)

_WEIGHTINGS = ("token", "document")
_attached: "weakref.WeakSet[Instrumentation]" = weakref.WeakSet()


def instrument(model: nn.Module, *, mlp_out: str | None = None, grads: bool = False, mask_padding: bool = True,
               weighting: str = "token", stacks=None, padding_compat: bool = False) -> "Instrumentation":
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
        stacks: which stacks to instrument: None for the language model's (its decoder, and the encoder of
            an encoder or encoder-decoder), or names such as ``("vision",)`` or ``("decoder", "vision")``.
        padding_compat: deprecated second spelling of
            ``mask_padding=False``.

    >>> import kacq_hooks as kh
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))
    >>> with kh.instrument(model) as inst:
    ...     _ = model(torch.randint(64, (2, 8)))
    >>> len(inst.knowledge_entropy().per_layer), inst.sites[0].path
    (2, 'transformer.h.0.mlp.c_proj')
    """
    if padding_compat:
        warnings.warn("instrument(padding_compat=True) is deprecated: it is a second spelling of "
                      "mask_padding=False", DeprecationWarning, stacklevel=2)
    if weighting not in _WEIGHTINGS:
        raise ConfigError(f"weighting must be one of {_WEIGHTINGS}, not {weighting!r}")
    inst = Instrumentation(bind(model, mlp_out, stacks), model=model, grads=grads,
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


class _Call:
    """One forward of the model: the inputs each stack was called with, and which sites have fired.

    Statistics of the call are staged in the instrumentation's pending buffers and committed when
    the call ends normally with every site of every stack that ran fired exactly once.
    """

    __slots__ = ("opener", "stacks", "fired", "rows", "committed", "discarded", "root", "incomplete", "routing",
                 "grad_counted")

    def __init__(self, opener: nn.Module, root: StackInputs):
        self.opener = opener
        self.root = root
        self.stacks: dict[int, StackInputs] = {}
        self.fired: dict[int, int] = {}
        self.rows: dict = {}
        self.committed = False
        self.discarded = False
        self.incomplete = False
        self.routing: dict = {}       # experts sites: (valid rows, document weights) of the layer's tokens
        self.grad_counted: set = set()


class Instrumentation:
    """Owns the hooks on one model and the :class:`CoefficientStats` they feed.

    Each model call is a transaction: statistics of a call are staged and added to :attr:`stats` only
    when the call ends normally with every site of every stack that ran seen exactly once, so a call
    that raises (an out-of-memory retry, a keyboard interrupt) adds nothing and every layer always holds
    the same token count. ``discarded_calls`` counts the calls left out that way.

    Order of hooks: kacq reads each stack's mask in a forward pre-hook on that stack's module (for a
    causal LM the base model inside it), so input-rewriting pre-hooks on the outer model run first
    whatever their registration order. On the stack's module itself, register such hooks before
    ``instrument()`` or with ``prepend=True``.
    """

    def __init__(self, binding: Binding, *, model=None, grads: bool = False, mask_padding: bool = True,
                 weighting: str = "token"):
        self.binding = binding
        self.model = model if model is not None else binding.root
        self.grads = grads
        self.mask_padding = mask_padding
        self.weighting = weighting
        root_device = _device_of(binding.root)
        devices = [_device_of(s.module, root_device) for s in binding.sites]
        self.stats = CoefficientStats([s.d_ff for s in binding.sites], devices)
        self._pending = CoefficientStats([s.d_ff for s in binding.sites], devices)
        self._handles: list = []
        self._pause_depth = 0
        self._call: _Call | None = None
        self._last_call: _Call | None = None
        self._inside: dict[int, set[int]] = {}
        self.discarded_calls = 0
        self._stack_of_module = {id(stack.module): k for k, stack in enumerate(binding.stacks)}
        self._sites_of_stack = [[i for i, k in enumerate(binding.site_stack) if k == stack]
                                for stack in range(len(binding.stacks))]

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def sites(self) -> list[Site]:
        return self.binding.sites

    @property
    def labels(self) -> list[str]:
        """Per site, the label results use: the stack and the model's own layer number."""
        return [site.label for site in self.sites]

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "Instrumentation":
        """Register the hooks (``instrument`` does this already; use it to re-attach after ``remove``)."""
        if self._handles:
            return self
        root, closer = self.binding.root, self.binding.closer or self.binding.root
        add = self._handles.append
        add(root.register_forward_pre_hook(OwnerHook(self, "_on_enter"), with_kwargs=True))
        for k, stack in enumerate(self.binding.stacks):
            if stack.module is not root:
                add(stack.module.register_forward_pre_hook(OwnerHook(self, "_on_enter"), with_kwargs=True))
                add(stack.module.register_forward_hook(OwnerHook(self, "_on_exit"), with_kwargs=True, always_call=True))
        add(closer.register_forward_hook(OwnerHook(self, "_on_exit"), with_kwargs=True, always_call=True))
        for index, site in enumerate(self.sites):
            add(site.module.register_forward_pre_hook(OwnerHook(self, "_on_coefficients", index)))
            if site.kind == "experts":
                layer = site.experts_layer
                add(ExpertsTap(layer, OwnerHook(self, "_on_routed", index)).attach())
                start = layer.experts * layer.d_ff
                for shared in layer.shared:
                    add(SharedTap(shared, OwnerHook(self, "_on_shared", index, start)).attach())
                    start += shared.d_ff
        hooked = [root] + [stack.module for stack in self.binding.stacks]
        self._inside = {id(m): {id(h) for h in hooked if h is not m and _contains(m, h)} for m in hooked}
        _attached.add(self)
        return self

    def remove(self) -> None:
        """Remove every hook; the statistics stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._call = None
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
    def is_paused(self) -> bool:
        return self._pause_depth > 0

    @property
    def paused(self) -> bool:
        warnings.warn("Instrumentation.paused is deprecated (it reads like the function kacq_hooks.paused); "
                      "use Instrumentation.is_paused", DeprecationWarning, stacklevel=2)
        return self.is_paused

    # -- calls -----------------------------------------------------------------------------------
    def _on_enter(self, module, args, kwargs):
        if self._pause_depth:
            return
        call = self._call
        if call is not None and (module is call.opener or id(call.opener) in self._inside.get(id(module), ())):
            self._discard(call)  # the module that opened it is being called afresh: that call never ended
            call = None
        if call is None:
            root_inputs = self.binding.read_root(args, kwargs) if module is self.binding.root else StackInputs()
            call = self._call = _Call(module, root_inputs)
        stack = self._stack_of_module.get(id(module))
        if stack is not None:
            inputs = self.binding.stacks[stack].read(args, kwargs)
            self._check_inputs(stack, inputs)
            if stack in call.stacks:  # the stack runs again inside one call (a model that calls its body twice)
                if any(call.fired.get(i, 0) != 1 for i in self._sites_of_stack[stack]):
                    call.incomplete = True
                for i in self._sites_of_stack[stack]:
                    call.fired.pop(i, None)
                call.rows = {}
            call.stacks[stack] = inputs

    def _check_inputs(self, stack: int, inputs: StackInputs) -> None:
        if inputs.continuation and self.weighting == "document":
            raise KacqError("document weighting needs each document whole in one forward, but this call continues "
                            "sequences from a KV cache (cached generation). Measure with use_cache=False, or use "
                            "instrument(model, weighting='token')")
        mask = inputs.mask
        if mask is None or not self.mask_padding:
            return
        if inputs.shape is not None and (mask.shape[0] != inputs.shape[0] or mask.shape[1] < inputs.shape[1]):
            raise ShapeError(f"attention_mask of shape {tuple(mask.shape)} does not fit inputs of shape "
                             f"{inputs.shape} (expected [{inputs.shape[0]}, >= {inputs.shape[1]}]) in the "
                             f"{self.binding.stacks[stack].name} stack")

    def _on_exit(self, module, args, kwargs, output):
        call = self._call
        if call is None or module is not (call.opener if call.opener is not self.binding.root
                                          else (self.binding.closer or self.binding.root)):
            return
        self._call = None
        if output is None:  # torch passes None to always-called hooks when the forward raised
            self._discard(call)
            return
        missing = [self.sites[i].label for k in call.stacks for i in self._sites_of_stack[k]
                   if call.fired.get(i, 0) != 1]
        if missing or call.incomplete or not call.fired:
            self._discard(call, f"sites {missing[:4]} did not run once each in it" if missing or call.incomplete
                          else "no site ran in it")
            return
        self.stats.merge(self._pending)
        self._pending.reset()
        call.committed = True
        self._last_call = call

    def _discard(self, call: _Call, why: str | None = None) -> None:
        call.discarded = True
        self._pending.reset()
        if call.fired:
            self.discarded_calls += 1
            if why:
                log.warning("kacq_hooks: a forward of %s was left out of the statistics because %s (a partial "
                            "forward, e.g. an early exit or a stop_at_layer run): every layer must see every "
                            "token of a counted call", type(self.model).__name__, why)

    # -- hooks -----------------------------------------------------------------------------------
    def _on_coefficients(self, index: int, module, args):
        if self._pause_depth:
            return
        c = args[0]
        site = self.sites[index]
        if torch._C._current_graph_task_id() != -1:  # activation checkpointing re-runs forwards in backward
            call = self._last_call
            if call is not None and self.grads and c.requires_grad and torch.is_grad_enabled():
                rows, _, _ = self._rows_for(call, index, c)
                c.register_hook(functools.partial(self._on_gradient, index, call, c.detach().reshape(-1, c.shape[-1]),
                                                  rows))
            return
        call = self._call
        stack = self.binding.site_stack[index]
        if call is None or stack not in call.stacks:
            raise KacqError(f"{site.path} ran outside a call of the {self.binding.stacks[stack].name} stack it "
                            f"belongs to (a layer called on its own?), so kacq_hooks does not know which positions "
                            f"are padding. Call the model (or its {type(self.binding.stacks[stack].module).__name__}), "
                            "or run this inside inst.pause()")
        count = call.fired.get(index, 0) + 1
        call.fired[index] = count
        if count > 1:
            raise KacqError(f"{site.path} ran {count} times in one forward (a layer shared across depth, as in "
                            "ALBERT, or a module called twice): kacq_hooks does not pool the statistics of "
                            "different depths into one layer. Instrument a model whose layers are distinct, or "
                            "pass mlp_out= naming modules that run once per forward")
        stats = self._pending[index]
        if stats.device != c.device:  # a parameterless site (a TransformerLens HookPoint) on a sharded model
            self._pending.move_layer(index, c.device)
            self.stats.move_layer(index, c.device)
            stats = self._pending[index]
        c2d = c.detach().reshape(-1, c.shape[-1])
        rows, doc_weight, documents = self._rows_for(call, index, c)
        if documents is not None:
            stats.documents.add_(documents.to(stats.documents.device))
        if site.kind == "experts":  # C arrives from the taps; here the layer counts its tokens, once
            stats.tokens.add_(c2d.shape[0] if rows is None else rows.sum())
            call.routing[index] = (rows, doc_weight)
            return
        kernels.accumulate_forward(c2d, rows, doc_weight, stats)
        if self.grads and c.requires_grad and torch.is_grad_enabled():
            c.register_hook(functools.partial(self._on_gradient, index, call, c2d, rows))

    def _routed_call(self, index: int):
        """The open call in which site ``index`` has fired, or None while paused or recomputing."""
        if self._pause_depth or torch._C._current_graph_task_id() != -1:
            return None
        call = self._call
        if call is None or index not in call.routing:
            raise KacqError(f"the experts of {self.sites[index].path} ran outside a forward of their layer "
                            f"({type(self.sites[index].module).__name__}); call the model, or run inside inst.pause()")
        return call

    def _on_routed(self, index: int, expert_ids, token_index, weight, c):
        call = self._routed_call(index)
        if call is None:
            return
        rows, doc_weight = call.routing[index]
        keep = torch.ones(token_index.shape[0], dtype=torch.bool, device=c.device) if rows is None else rows[token_index]
        docs = None if doc_weight is None else doc_weight[token_index]
        experts = self.sites[index].experts
        reference.accumulate_experts(c.detach(), expert_ids, weight, keep, docs, self._pending[index], experts)
        if self.grads and c.requires_grad and torch.is_grad_enabled():
            c.register_hook(functools.partial(self._on_routed_gradient, index, call, c.detach(), expert_ids, keep))

    def _on_routed_gradient(self, index: int, call: _Call, c, expert_ids, keep, grad):
        if self._pause_depth or call.discarded:
            return
        stats = self.stats[index]
        reference.accumulate_experts_backward(c, grad, expert_ids, keep, stats, self.sites[index].experts)
        if index not in call.grad_counted:  # a layer's gradient tokens are counted once per call
            call.grad_counted.add(index)
            rows, _ = call.routing[index]
            stats.grad_tokens.add_(keep.shape[0] if rows is None else rows.sum())

    def _on_shared(self, index: int, start: int, c, gate):
        call = self._routed_call(index)
        if call is None:
            return
        rows, doc_weight = call.routing[index]
        c2d = c.detach().reshape(-1, c.shape[-1])
        reference.accumulate_slice(c2d, rows, gate, doc_weight, self._pending[index], start)
        if self.grads and c.requires_grad and torch.is_grad_enabled():
            c.register_hook(functools.partial(self._on_shared_gradient, index, call, start, c2d, rows))

    def _on_shared_gradient(self, index: int, call: _Call, start: int, c2d, rows, grad):
        if not self._pause_depth and not call.discarded:
            reference.accumulate_slice_backward(c2d, grad.reshape(-1, grad.shape[-1]), rows, self.stats[index], start)

    def _on_gradient(self, index: int, call: _Call, c2d: torch.Tensor, rows, grad: torch.Tensor):
        if not self._pause_depth and not call.discarded:
            kernels.accumulate_backward(c2d, grad.reshape(-1, grad.shape[-1]), rows, self.stats[index])

    def _rows_for(self, call: _Call, index: int, c: torch.Tensor):
        """(valid rows [N] bool or None, document weights [N] fp32 or None, documents or None) for C."""
        stack = self.binding.site_stack[index]
        key = (stack, tuple(c.shape[:-1]), c.device)
        if key not in call.rows:
            call.rows[key] = self._rows_uncached(call, stack, c)
        return call.rows[key]

    def _stack_mask(self, call: _Call, stack: int) -> torch.Tensor | None:
        inputs = call.stacks[stack]
        if not self.mask_padding:
            return None
        if inputs.mask_unusable:  # a 4-D or per-layer mask: the call's own 2-D padding mask, if it fits
            outer = call.root.mask
            if isinstance(outer, torch.Tensor) and outer.dim() == 2 and (inputs.shape is None
                                                                          or outer.shape[0] == inputs.shape[0]):
                return outer
            raise ShapeError(f"the {self.binding.stacks[stack].name} stack was given an attention mask that is not a "
                             "2-D padding mask, and the call has no 2-D mask to use instead; pass attention_mask "
                             "[batch, seq] to the model, or instrument(model, mask_padding=False)")
        return inputs.mask

    def _rows_uncached(self, call: _Call, stack: int, c: torch.Tensor):
        binding = self.binding.stacks[stack]
        inputs = call.stacks[stack]
        mask = self._stack_mask(call, stack)
        need_layout = mask is not None or self.weighting == "document"
        rows = window = None
        if need_layout:
            batch, steps = self._layout_of(binding, inputs, mask, c)
            if mask is not None:
                window = mask[:, mask.shape[1] - steps:].to(device=c.device)  # cached generation: the last positions
                if c.dim() == 3 and binding.layout == "seq_first":
                    rows = window.t().reshape(-1).bool()
                else:
                    rows = window.reshape(-1).bool()
        if self.weighting != "document":
            return rows, None, None
        window = torch.ones(batch, steps, device=c.device) if window is None else window.float()
        lengths = window.sum(1, keepdim=True)  # a document is a batch row; its weight is 1 / its token count
        weight = window / lengths.clamp_min(1)
        if c.dim() == 3 and binding.layout == "seq_first":
            weight = weight.t()
        return rows, weight.reshape(-1), (lengths > 0).sum()

    def _layout_of(self, binding: StackBinding, inputs: StackInputs, mask, c: torch.Tensor) -> tuple[int, int]:
        """(batch, positions) of C, checked against the stack's inputs so that no layout passes transposed."""
        shape = inputs.shape
        if shape is None and mask is not None:
            shape = (int(mask.shape[0]), int(mask.shape[1]))
        where = f"{binding.name} stack"
        if shape is None:
            raise ShapeError(f"kacq_hooks cannot tell the batch layout of coefficients {tuple(c.shape)} in the {where}: "
                             "the call passed neither token ids nor a mask it could read")
        batch, seq = shape
        if c.dim() == 3:
            lead = (int(c.shape[1]), int(c.shape[0])) if binding.layout == "seq_first" else (int(c.shape[0]),
                                                                                               int(c.shape[1]))
            if lead != (batch, seq):
                raise ShapeError(f"coefficients of shape {tuple(c.shape)} ({binding.layout}) do not cover the "
                                 f"{batch} x {seq} tokens of this call of the {where}: the model adds or drops "
                                 "positions inside (prompt or n-gram streams), so kacq_hooks cannot match them to the "
                                 "padding mask. Use instrument(model, mask_padding=False) on unpadded batches")
            return batch, seq
        if c.dim() == 2 and c.shape[0] == batch * seq:  # OPT flattens to (batch * seq, d_ff)
            return batch, seq
        raise ShapeError(f"coefficients of shape {tuple(c.shape)} cannot be split into the {batch} x {seq} tokens of "
                         f"this call of the {where}; pass instrument(..., mask_padding=False) to count every position")

    # -- results ---------------------------------------------------------------------------------
    def knowledge_entropy(self, weighting: str | None = None) -> KnowledgeEntropy:
        """Per-layer and total knowledge entropy of everything recorded so far, labelled by layer."""
        return knowledge_entropy(self.stats, self._weighting(weighting), labels=self.labels)

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
        return {"sites": [s.path for s in self.sites], "weighting": self.weighting, "stats": self.stats.state_dict(),
                "discarded_calls": self.discarded_calls}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sites") != [s.path for s in self.sites]:
            raise ShapeError(f"saved statistics are for sites {state.get('sites')}, this instrumentation has "
                             f"{[s.path for s in self.sites]}")
        self.stats.load_state_dict(state["stats"])
        self.discarded_calls = int(state.get("discarded_calls", 0))

    def merge(self, other: "Instrumentation") -> "Instrumentation":
        self.stats.merge(other.stats)
        return self

    def all_reduce(self, group=None) -> "Instrumentation":
        self.stats.all_reduce(group)
        return self

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"Instrumentation({len(self.sites)} sites via {self.binding.name}, {state}, grads={self.grads})"


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _device_of(module: nn.Module, default: torch.device | None = None) -> torch.device:
    for tensor in module.parameters():
        return tensor.device if tensor.device.type != "meta" else torch.device("cpu")
    return default or torch.device("cpu")
