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
import sys
import functools
import logging
import warnings
import weakref
from typing import Iterator

import torch
from torch import nn

from . import kernels, saving
from .experts import ExpertsTap, SharedTap
from .kernels import experts_cpu, reference
from .distributed import is_dtensor, local_slice, neuron_shard, reduce as reduce_across_ranks, to_local
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
                 "grad_counted", "frame", "handling", "training", "marks", "staged", "recomputable")

    def __init__(self, opener: nn.Module, root: StackInputs, frame, handling):
        self.opener = opener
        self.root = root
        self.frame = frame            # the frame of the forward this call belongs to: alive while it runs
        self.handling = handling      # the exception being handled when the call began (a retry inside except)
        self.training = torch.is_grad_enabled()
        self.recomputable = False     # sites ran without grad inside a training call: reentrant checkpointing
        self.marks: list = []         # modules between the root and a stack that are running, and what was staged
        self.staged = False
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
        # tensor parallelism: a rank's row-parallel projection sees only its d_ff slice of C
        self.shards = [neuron_shard(s) if s.kind == "dense" else None for s in binding.sites]
        self._widths = [shard.width if shard else s.d_ff for s, shard in zip(binding.sites, self.shards)]
        self.stats = CoefficientStats(self._widths, devices)
        self._pending = CoefficientStats(self._widths, devices)
        self.reduced = False
        self._handles: list = []
        self._pause_depth = 0
        self._call: _Call | None = None
        self._last_call: _Call | None = None
        self._exit_handle = None
        self._training_calls = 0     # counted training forwards since the last backward began
        self._backward_task, self._backward_calls = None, 0
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
        self._exit_handle = closer.register_forward_hook(OwnerHook(self, "_on_exit"), with_kwargs=True,
                                                         always_call=True)
        add(self._exit_handle)
        for module in _between(root, [stack.module for stack in self.binding.stacks]):
            # an attempt that fails inside the root's forward, and is retried there, must leave nothing behind
            add(module.register_forward_pre_hook(OwnerHook(self, "_on_attempt")))
            add(module.register_forward_hook(OwnerHook(self, "_on_attempt_end"), always_call=True))
        for index, site in enumerate(self.sites):
            # first on a row-parallel projection: RowwiseParallel's own pre-hook turns C into a DTensor
            add(site.module.register_forward_pre_hook(OwnerHook(self, "_on_coefficients", index),
                                                      prepend=self.shards[index] is not None))
            if site.kind == "experts":
                layer = site.experts_layer
                add(ExpertsTap(layer, OwnerHook(self, "_on_routed", index)).attach())
                start = layer.experts * layer.d_ff
                for shared in layer.shared:
                    add(SharedTap(shared, OwnerHook(self, "_on_shared", index, start)).attach())
                    start += shared.d_ff
        _attached.add(self)
        return self

    def remove(self) -> None:
        """Remove every hook; the statistics stay readable (a forward still running adds nothing)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._call is not None:
            self._discard(self._call)
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
        if self.reduced:
            raise KacqError("these statistics were combined across ranks (all_reduce); read them, then call "
                            "inst.reset() before measuring again, or every rank's earlier tokens would count twice")
        call = self._call
        if call is not None and not _alive(call.frame):
            self._discard(call, "it never finished (an interrupt, or a run stopped before the last layer)")
            call = None
        if call is None:
            owner = (self.binding.frame_owner or module) if module is self.binding.root else module
            call = self._call = _Call(module, self.binding.read_root(args, kwargs) if module is self.binding.root
                                      else StackInputs(), _frame_of(owner), sys.exc_info()[1])
            if module is self.binding.root:  # commit after every other forward hook on the closer has run
                closer = self.binding.closer or self.binding.root
                closer._forward_hooks.move_to_end(self._exit_handle.id)
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

    def _on_attempt(self, module, args):
        call = self._call
        if call is not None and not self._pause_depth:
            call.marks.append((module, call.staged, sys.exc_info()[1]))

    def _on_attempt_end(self, module, args, output):
        call = self._call
        if call is None or not call.marks or call.marks[-1][0] is not module:
            return
        _, staged_before, handling = call.marks.pop()
        if not _failing(handling):
            return
        if staged_before:  # what this attempt staged cannot be told apart from what came before it
            call.incomplete = True
            return
        self._pending.reset()  # the failed attempt was all there was: forget it, keep the call for a retry
        call.fired.clear()
        call.stacks.clear()
        call.routing.clear()
        call.rows = {}

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
        call.frame = None  # a finished frame holds the forward's locals (its outputs): never keep it
        if _failing(call.handling):  # torch runs always-called hooks while the forward's exception propagates
            self._discard(call)
            return
        missing = [self.sites[i].label for k in call.stacks for i in self._sites_of_stack[k]
                   if call.fired.get(i, 0) != 1]
        if missing or call.incomplete or not call.fired:
            self._discard(call, f"sites {missing[:4]} did not run once each in it" if missing else
                          "an attempt inside it failed after an earlier one had run" if call.incomplete
                          else "no site ran in it")
            return
        self.stats.merge(self._pending)
        self._pending.reset()
        call.committed = True
        self._last_call = call
        if call.recomputable:
            self._training_calls += 1

    def _discard(self, call: _Call, why: str | None = None) -> None:
        call.discarded = True
        call.frame = None
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
        task = torch._C._current_graph_task_id()
        if task != -1:  # activation checkpointing re-runs forwards in backward
            call = self._recomputed_call(task)
            if call is not None and self.grads and c.requires_grad and torch.is_grad_enabled():
                rows, _, _ = self._rows_for(call, index, c)
                c.register_hook(functools.partial(self._on_gradient, index, call, c.detach().reshape(-1, c.shape[-1]),
                                                  rows))
            return
        call = self._call
        stack = self.binding.site_stack[index]
        if call is not None and not _alive(call.frame):
            self._discard(call, "it never finished (an interrupt, or a run stopped before the last layer)")
            call = self._call = None
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
        shard, whole = self.shards[index], None
        if shard is not None and is_dtensor(c):  # ColwiseParallel(use_local_output=False) hands a DTensor
            whole, c = c, local_slice(site.path, shard, c)
        stats = self._pending[index]
        if site.kind == "dense" and c.shape[-1] != stats.d_ff:
            raise ShapeError(f"{site.path}: C has {c.shape[-1]} neurons but the site has {stats.d_ff}"
                             + (f" (this rank's slice {shard.offset}..{shard.offset + shard.width} of {shard.d_ff})"
                                if shard else "") + "; was the model resharded after instrument()?")
        if stats.device != c.device:  # a parameterless site (a TransformerLens HookPoint) on a sharded model
            self._pending.move_layer(index, c.device)
            self.stats.move_layer(index, c.device)
            stats = self._pending[index]
        c2d = c.detach().reshape(-1, c.shape[-1])
        rows, doc_weight, documents = self._rows_for(call, index, c)
        call.staged = True
        if call.training and not torch.is_grad_enabled():
            call.recomputable = True
        if documents is not None:
            stats.documents.add_(documents.to(stats.documents.device))
        if site.kind == "experts":  # C arrives from the taps; here the layer counts its tokens, once
            stats.tokens.add_(c2d.shape[0] if rows is None else rows.sum())
            call.routing[index] = (rows, doc_weight)
            return
        kernels.accumulate_forward(c2d, rows, doc_weight, stats)
        if whole is not None and self.grads and whole.requires_grad and torch.is_grad_enabled():
            # the local view is not on the path to the loss: take dL/dC from the DTensor itself
            whole.register_hook(functools.partial(self._on_dtensor_gradient, index, call, c2d, rows,
                                                  whole.device_mesh, whole.placements))
        elif self.grads and c.requires_grad and torch.is_grad_enabled():
            c.register_hook(functools.partial(self._on_gradient, index, call, c2d, rows))

    def _recomputed_call(self, task: int) -> _Call | None:
        """The call whose forward reentrant checkpointing re-runs in backward ``task``, or None.

        None also for non-reentrant checkpointing, whose recomputed coefficients are not on the backward
        path (the original forward's tensor hooks see dL/dC).

        One backward can only be matched to one counted training forward: with several (gradient
        accumulation summed into one backward) the recomputed coefficients could belong to any of them.
        """
        if task != self._backward_task:
            self._backward_task, self._backward_calls, self._training_calls = task, self._training_calls, 0
        if self._backward_calls == 0:
            return None  # the forward was paused (or not counted): neither are its gradients
        if self._backward_calls > 1:
            raise KacqError(f"one backward pass recomputes {self._backward_calls} counted forwards "
                            "(reentrant activation checkpointing with gradient accumulation): kacq_hooks cannot tell "
                            "whose padding mask a recomputed layer had. Use gradient_checkpointing_kwargs="
                            "{'use_reentrant': False} (the default), or call backward after each forward")
        return self._last_call

    def _on_dtensor_gradient(self, index: int, call: _Call, c2d, rows, mesh, placements, grad):
        self._on_gradient(index, call, c2d, rows, to_local(grad, mesh, placements))

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
        if self.sites[index].routed_scale != 1.0:  # applied to the routed output after the experts (Laguna)
            weight = weight * self.sites[index].routed_scale
        rows, doc_weight = call.routing[index]
        keep = torch.ones(token_index.shape[0], dtype=torch.bool, device=c.device) if rows is None else rows[token_index]
        docs = None if doc_weight is None else doc_weight[token_index]
        experts = self.sites[index].experts
        fused = experts_cpu if kernels.backend_for(c.device) == "cpu" else reference
        fused.accumulate_experts(c.detach(), expert_ids, weight, keep, docs, self._pending[index], experts)
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
        outer = call.root.mask
        if (inputs.mask is None and not inputs.mask_unusable and isinstance(outer, torch.Tensor)
                and inputs.tokens is not None and inputs.tokens is call.root.tokens):
            # the stack runs on the call's own tokens but was not handed its mask (a model that ignores the
            # mask, as RWKV and FNet do): those positions are still padding the caller marked
            return outer
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
        self._require_whole_layers()
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

    def _require_whole_layers(self) -> None:
        sliced = [site.label for site, layer, shard in zip(self.sites, self.stats, self.shards)
                  if shard is not None and layer.d_ff != site.d_ff]
        if sliced:
            raise KacqError(f"{sliced[:3]} hold this rank's slice of tensor-parallel layers, whose entropy is not the "
                            "layer's: gather the slices with inst.all_reduce() (every rank) first")

    def _require_tokens(self) -> None:
        self._require_whole_layers()
        if not any(int(s.tokens) for s in self.stats):
            raise KacqError("no tokens have been recorded: run forward passes on the instrumented model "
                            "(outside inst.pause()) first")

    def reset(self) -> None:
        """Forget everything recorded (after a gather, layers go back to this rank's slices)."""
        if [layer.d_ff for layer in self.stats] != self._widths:
            self.stats = CoefficientStats(self._widths, [layer.device for layer in self.stats])
        self.stats.reset()
        self.reduced = False

    def _slices(self) -> list:
        return [None if shard is None else [shard.offset, shard.width, shard.d_ff] for shard in self.shards]

    def state_dict(self) -> dict:
        return {**self._settings(), "stats": self.stats.state_dict(), "discarded_calls": self.discarded_calls,
                "slices": self._slices(), "reduced": self.reduced}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sites") != [s.path for s in self.sites]:
            raise ShapeError(f"saved statistics are for sites {state.get('sites')}, this instrumentation has "
                             f"{[s.path for s in self.sites]}")
        self._check_same_measurement(state, "the saved statistics were measured with")
        slices = state.get("slices", [None] * len(self.sites))
        if state.get("reduced") or any(slices):
            if slices != self._slices() and not state.get("reduced"):
                raise ShapeError(f"saved statistics hold tensor-parallel slices {slices}, this rank holds "
                                 f"{self._slices()}: load each rank's own file")
            if state.get("reduced"):  # whole layers, gathered on the rank that saved them
                self.stats = CoefficientStats([s.d_ff for s in self.sites], [layer.device for layer in self.stats])
        self.stats.load_state_dict(state["stats"])
        self.discarded_calls = int(state.get("discarded_calls", 0))
        self.reduced = bool(state.get("reduced", False))

    def _settings(self) -> dict:
        return {"sites": [s.path for s in self.sites], "weighting": self.weighting, "mask_padding": self.mask_padding}

    def _check_same_measurement(self, other: dict, what: str) -> None:
        mine = self._settings()
        for key in ("sites", "mask_padding"):
            if key in other and other[key] != mine[key]:
                raise ShapeError(f"{what} {key}={other[key]!r}, this instrumentation {key}={mine[key]!r}: their sums "
                                 "are not one measurement. Measure both the same way")
        if other.get("weighting", "token") != "document" and self.weighting == "document":
            # token-weighted statistics hold no document sums: the document entropy would miss their documents
            raise ShapeError(f"{what} weighting='token', so they hold no document sums; this instrumentation keeps "
                             "them (weighting='document'). Measure both with weighting='document'")

    def save(self, path) -> None:
        """Write these statistics to ``path``: safetensors with a JSON header (see :mod:`kacq_hooks.saving`)."""
        saving.save_stats(self, path)

    @classmethod
    def load(cls, path, model: nn.Module, **instrument_options) -> "Instrumentation":
        """An instrumentation of ``model`` (hooks attached) holding the statistics saved at ``path``."""
        return saving.load_stats(path, instrument(model, **instrument_options))

    def to_pandas(self):
        """One row per (layer label, neuron) with every statistic (needs pandas)."""
        return saving.to_dataframe(self)

    def merge(self, other: "Instrumentation") -> "Instrumentation":
        """Add another instrumentation's statistics (another shard of the data) into these."""
        self._check_same_measurement(other._settings(), "the other statistics were measured with")
        self.stats.merge(other.stats)
        return self

    def all_reduce(self, group=None) -> "Instrumentation":
        """Combine every rank's statistics in place, so each rank holds the one-process answer.

        Token shards (data parallel, FSDP) add; tensor-parallel d_ff slices are gathered, their token
        counts taken once. ``group`` is the data-parallel group (default: see
        :func:`kacq_hooks.distributed.reduce`). Once reduced, the statistics refuse further forwards
        until :meth:`reset`, so no rank's tokens are ever counted twice.
        """
        if self.reduced:
            raise KacqError("these statistics were already combined across ranks; inst.reset() before the next window")
        reduce_across_ranks(self, group)
        self.reduced = True
        return self

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"Instrumentation({len(self.sites)} sites via {self.binding.name}, {state}, grads={self.grads})"


def _between(root: nn.Module, inner: list[nn.Module]) -> list[nn.Module]:
    """Modules strictly between ``root`` and each of ``inner`` on their paths down the module tree."""
    paths = {id(m): name for name, m in root.named_modules()}
    found = {}
    for module in inner:
        path = paths.get(id(module))
        if not path:
            continue
        parts = path.split(".")
        for k in range(1, len(parts)):
            found.setdefault(".".join(parts[:k]), None)
    between = [root.get_submodule(p) for p in found]
    return [m for m in between if not isinstance(m, (nn.ModuleList, nn.ModuleDict)) and m not in inner]


def _failing(handling: BaseException | None) -> bool:
    """Whether an always-called hook runs because its forward raised, not while handling an exception the
    forward began in (a retry inside an ``except`` block)."""
    current = sys.exc_info()[1]
    return current is not None and current is not handling


def _frame_of(owner: nn.Module):
    """The innermost running frame of a method of ``owner`` (its forward, or the hook machinery calling it)."""
    frame = sys._getframe(2)
    for _ in range(_FRAME_DEPTH):
        if frame is None:
            return None
        if frame.f_locals.get("self") is owner:
            return frame
        frame = frame.f_back
    return None


def _alive(frame) -> bool:
    """Whether ``frame`` is still running, i.e. on the current thread's stack."""
    if frame is None:
        return True  # nothing to check against (a call opened where no frame of its owner was found)
    current = sys._getframe(1)
    for _ in range(_FRAME_DEPTH * 4):
        if current is None:
            return False
        if current is frame:
            return True
        current = current.f_back
    return False


_FRAME_DEPTH = 64


def _device_of(module: nn.Module, default: torch.device | None = None) -> torch.device:
    for tensor in module.parameters():
        return tensor.device if tensor.device.type != "meta" else torch.device("cpu")
    return default or torch.device("cpu")
