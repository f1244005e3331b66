"""The capture: hooks that read C (and dL/dC) at each site and feed the statistics kernels.

A forward pre-hook on each site's module sees C, the input of the FFN output projection; the
experts and shared-expert taps of a mixture-of-experts layer see each expert's C where it is
computed. The rows of C that count, and their document weights, come from the stack's reader
(:class:`~kacq_hooks.frontends.stacks.StackReader`), once per call and shape. Forward statistics are
staged in the call's pending buffers (:mod:`kacq_hooks.calls` commits them); with ``grads=True`` a
tensor hook on C adds dL/dC statistics of a counted call during backward into where
:mod:`kacq_hooks.gradients` says: the instrumentation's statistics, or the staged step of a declared
loss scaler. Hooks return nothing and never call ``.item()``.
"""
from __future__ import annotations

import functools
import weakref

import torch

from . import kernels
from ._hooks import HookSet, OwnerHook
from .calls import Call, Calls
from .distributed import is_dtensor, local_slice, to_local
from .errors import ShapeError, StateError
from .experts import ExpertsError, ExpertsTap, SharedTap
from .kernels import experts_cpu, reference


class Capture:
    """The site hooks of one instrumentation (module notes); ``inst`` holds the settings and statistics."""

    def __init__(self, inst, calls: Calls):
        self.inst = inst
        self.calls = calls
        self.sites = inst.sites
        # experts sites: (routing weights, call, ExpertRows, hub forward) of the eager forward now running
        # (on_expert_rows); the hub's forward count tells a second forward handed the same weights object apart.
        # Weights and call are held weakly: a forward's router output and inputs (and their graph) are not kept
        self._bound_rows: dict[int, tuple] = {}
        self._hubs: dict[int, object] = {}
        # experts sites: the hub's forward counted in the layer's current forward (None: none yet); paused
        # experts forwards (a probe run inside inst.pause()) are not counted, so they are not a second one
        self._layer_counted: dict[int, int | None] = {}
        # experts sites: the shared experts (by first slot) seen in the layer's current forward, for the same refusal
        self._shared_counted: dict[int, set[int]] = {}

    def attach(self, hooks: HookSet) -> None:
        for index, site in enumerate(self.sites):
            # first on a row-parallel projection: RowwiseParallel's own pre-hook turns C into a DTensor
            hooks.pre(site.module, OwnerHook(self, "on_coefficients", index),
                      prepend=self.inst.shards[index] is not None)
            if site.kind == "experts":
                layer = site.experts_layer
                tap = hooks.tap(ExpertsTap(layer, OwnerHook(self, "on_routed", index),
                                           on_expert_rows=OwnerHook(self, "on_expert_rows", index)))
                self._hubs[index] = tap._hub()
                start = layer.experts * layer.d_ff
                for shared in layer.shared:
                    hooks.tap(SharedTap(shared, OwnerHook(self, "on_shared", index, start)))
                    start += shared.d_ff

    # -- dense sites (and the token count of experts sites)
    def on_coefficients(self, index: int, module, args):
        inst = self.inst
        if inst._pause_depth:
            return
        c = args[0]
        site = self.sites[index]
        task = torch._C._current_graph_task_id()
        if task != -1:  # activation checkpointing re-runs forwards in backward
            if site.kind == "experts":  # the module's input is not C: its taps take dL/dC of the recomputed C
                return
            call = self.calls.recomputed(task)
            if call is not None and inst.grads and c.requires_grad and torch.is_grad_enabled():
                rows, _, _ = self._rows_for(call, index, c)
                c.register_hook(functools.partial(self._on_gradient, index, call, c.detach().reshape(-1, c.shape[-1]),
                                                  rows))
            return
        call = self.calls.fire(index)
        shard, whole = inst.shards[index], None
        if shard is not None and is_dtensor(c):  # ColwiseParallel(use_local_output=False) hands a DTensor
            whole, c = c, local_slice(site.path, shard, c)
        pending = self.calls.pending
        stats = pending[index]
        if site.kind == "dense" and c.shape[-1] != stats.d_ff:
            raise ShapeError(f"{site.path}: C has {c.shape[-1]} neurons but the site has {stats.d_ff}"
                             + (f" (this rank's slice {shard.offset}..{shard.offset + shard.width} of {shard.d_ff})"
                                if shard else "") + "; was the model resharded after instrument()?")
        if stats.device != c.device:  # a parameterless site (a TransformerLens HookPoint) on a sharded model
            pending.move_layer(index, c.device)
            inst.stats.move_layer(index, c.device)
            if inst._gradients.staged is not None:
                inst._gradients.staged.move_layer(index, c.device)
            stats = pending[index]
        c2d = c.detach().reshape(-1, c.shape[-1])
        rows, doc_weight, documents = self._rows_for(call, index, c)
        call.staged = True
        if call.training and not torch.is_grad_enabled():
            call.recomputable = True
        if documents is not None:
            stats.documents.add_(documents.to(stats.documents.device))
        if site.kind == "experts":  # C arrives from the taps; here the layer counts its tokens, once
            tokens = c2d.shape[0] if rows is None else rows.sum()
            stats.tokens.add_(tokens)
            call.routing[index] = (rows, doc_weight)
            call.layer_tokens[index] = tokens  # the gradient tokens too: not the routed rows of a handoff
            self._layer_counted[index] = None
            self._shared_counted[index] = set()
            return
        kernels.accumulate_forward(c2d, rows, doc_weight, stats)
        if whole is not None and inst.grads and whole.requires_grad and torch.is_grad_enabled():
            # the local view is not on the path to the loss: take dL/dC from the DTensor itself
            whole.register_hook(functools.partial(self._on_dtensor_gradient, index, call, c2d, rows,
                                                  whole.device_mesh, whole.placements))
        elif inst.grads and c.requires_grad and torch.is_grad_enabled():
            c.register_hook(functools.partial(self._on_gradient, index, call, c2d, rows))
        if inst.grads and call.training and torch.is_grad_enabled():
            self._note_training_forward(index, c if whole is None else whole)

    def _note_training_forward(self, index: int, c: torch.Tensor) -> None:
        """What a training forward says about the gradients to come: none at this site, or a likely scaled loss."""
        gradients = self.inst._gradients
        if not c.requires_grad:
            gradients.note_gradless(index, self.sites[index].path)
        elif not gradients.declared and (c.dtype == torch.float16 or _fp16_autocast(c.device.type)):
            gradients.note_fp16()

    def _rows_for(self, call: Call, index: int, c: torch.Tensor):
        """(valid rows [N] bool or None, document weights [N] fp32 or None, documents or None) for C."""
        stack = self.inst.binding.site_stack[index]
        key = (stack, tuple(c.shape[:-1]), c.device)
        if key not in call.rows:
            call.rows[key] = self.inst.binding.stacks[stack].rows(
                call.stacks[stack], call.root, c, mask_padding=self.inst.mask_padding, weighting=self.inst.weighting,
                count=self.inst.count)
        return call.rows[key]

    def _on_gradient(self, index: int, call: Call, c2d: torch.Tensor, rows, grad: torch.Tensor):
        if not self.inst._pause_depth and not call.discarded:
            kernels.accumulate_backward(c2d, grad.reshape(-1, grad.shape[-1]), rows,
                                        self.inst._gradients.target(index))

    def _on_dtensor_gradient(self, index: int, call: Call, c2d, rows, mesh, placements, grad):
        self._on_gradient(index, call, c2d, rows, to_local(grad, mesh, placements))

    # -- experts sites: routed and shared experts
    def _routed_call(self, index: int, routed: bool = True) -> Call | None:
        """The open call in which site ``index`` has fired, or None while paused or recomputing. ``routed``: for
        the routed experts, whose first counted forward in the layer's forward is noted and a second refused (the
        shared experts, which may run before them, only read the call)."""
        if self.inst._pause_depth or torch._C._current_graph_task_id() != -1:
            return None
        call = self.calls.current
        if call is None or index not in call.routing:
            raise StateError(f"the experts of {self.sites[index].path} ran outside a forward of their layer "
                             f"({type(self.sites[index].module).__name__}); call the model, or run inside inst.pause()")
        if not routed:
            return call
        forward = self._hubs[index].forwards
        counted = self._layer_counted.get(index)
        if counted is None:
            self._layer_counted[index] = forward
        elif forward != counted:
            raise ExpertsError(f"the experts of {self.sites[index].path} ran twice in one forward of their layer "
                               f"({type(self.sites[index].module).__name__}): its tokens are counted once a forward, "
                               "so rows handed twice would count twice against them. Call the experts once per "
                               "forward of the layer, or measure them with an ExpertsTap of your own")
        return call

    def _recomputed_call(self, index: int, c: torch.Tensor) -> Call | None:
        """In a backward that re-runs the forward (reentrant checkpointing): the counted call whose dL/dC the
        recomputed C of experts site ``index`` carries, if gradients are measured; else None."""
        task = torch._C._current_graph_task_id()
        if task == -1 or self.inst._pause_depth or not self.inst.grads:
            return None
        if not (c.requires_grad and torch.is_grad_enabled()):
            return None
        call = self.calls.recomputed(task)
        return call if call is not None and index in call.routing else None

    def on_routed(self, index: int, expert_ids, token_index, weight, c):
        recomputed = self._recomputed_call(index, c)
        if recomputed is not None:  # the original forward ran without grad and counted C; only dL/dC is new
            rows, _ = recomputed.routing[index]
            c.register_hook(functools.partial(self._on_routed_gradient, index, recomputed, c.detach(), expert_ids,
                                              _routed_keep(rows, token_index, c.device)))
            return
        call = self._routed_call(index)
        if call is None:
            return
        if self.sites[index].routed_scale != 1.0:  # applied to the routed output after the experts (Laguna)
            weight = weight * self.sites[index].routed_scale
        rows, doc_weight = call.routing[index]
        keep = _routed_keep(rows, token_index, c.device)
        docs = None if doc_weight is None else doc_weight[token_index]
        experts = self.sites[index].experts
        _experts_kernels(c.device).accumulate_experts(c.detach(), expert_ids, weight, keep, docs,
                                                      self.calls.pending[index], experts)
        if self.inst.grads and c.requires_grad and torch.is_grad_enabled():
            c.register_hook(functools.partial(self._on_routed_gradient, index, call, c.detach(), expert_ids, keep))

    def on_expert_rows(self, index: int, expert: int, token_index, top_k_pos, weights, c):
        """One expert's rows of an eager forward: :meth:`on_routed`'s statistics, the routing read per token by
        the CPU kernel. Eager hands one call per expert, so what is saved here is saved E times a layer: the
        first expert of a layer's forward checks the call and binds its routing to the kernel
        (:class:`~kacq_hooks.kernels.experts_cpu.ExpertRows`); the others, in the same call with the same
        routing, check only what can differ between them."""
        sink = self._bound_sink(index, weights, self.calls.current)
        if (sink is not None and not self.inst._pause_depth and torch._C._current_graph_task_id() == -1
                and not (c.requires_grad and self.inst.grads and torch.is_grad_enabled())
                and sink(c.detach(), expert, token_index, top_k_pos)):
            return
        site = self.sites[index]
        if (site.routed_scale != 1.0 or kernels.backend_for(c.device) != "cpu"
                or (self.inst.grads and c.requires_grad and torch.is_grad_enabled())):
            self.on_routed(index, torch.full_like(token_index, expert), token_index, weights[token_index, top_k_pos], c)
            return
        call = self._routed_call(index)
        if call is None:
            return
        rows, doc_weight = call.routing[index]
        out = self.calls.pending[index]
        if sink is None:  # the first expert of this forward: bind its routing (None where the kernel cannot)
            sink = experts_cpu.ExpertRows.prepare(c, weights, rows, doc_weight, out, site.experts)
            self._bound_rows[index] = None if sink is None else (weakref.ref(weights), weakref.ref(call), sink,
                                                                 self._hubs[index].forwards)
            if sink is not None and sink(c.detach(), expert, token_index, top_k_pos):
                return
        experts_cpu.accumulate_expert_rows(c.detach(), expert, token_index, top_k_pos, weights, rows, doc_weight,
                                           out, site.experts)

    def _bound_sink(self, index: int, weights, call: Call | None):
        """The routing bound for this forward of site ``index`` (same call, same weights object, same experts
        forward, the pending buffers it was bound to), or None."""
        bound = self._bound_rows.get(index)
        if (bound is None or call is None or bound[1]() is not call or bound[0]() is not weights
                or bound[3] != self._hubs[index].forwards or self.calls.pending.layers[index] is not bound[2].out):
            return None
        return bound[2]

    def _on_routed_gradient(self, index: int, call: Call, c, expert_ids, keep, grad):
        if self.inst._pause_depth or call.discarded:
            return
        stats = self.inst._gradients.target(index)
        _experts_kernels(c.device).accumulate_experts_backward(c, grad, expert_ids, keep, stats,
                                                               self.sites[index].experts)
        if index not in call.grad_counted:  # a layer's gradient tokens are counted once per call
            call.grad_counted.add(index)
            stats.grad_tokens.add_(call.layer_tokens[index])

    def on_shared(self, index: int, start: int, c, gate):
        recomputed = self._recomputed_call(index, c)
        if recomputed is not None:
            rows, _ = recomputed.routing[index]
            c.register_hook(functools.partial(self._on_shared_gradient, index, recomputed, start,
                                              c.detach().reshape(-1, c.shape[-1]), rows))
            return
        call = self._routed_call(index, routed=False)
        if call is None:
            return
        seen = self._shared_counted[index]
        if start in seen:
            raise ExpertsError(f"a shared expert of {self.sites[index].path} ran twice in one forward of its layer "
                               f"({type(self.sites[index].module).__name__}): its tokens are counted once a forward, "
                               "so its rows would count twice against them. Call it once per forward of the layer")
        seen.add(start)
        rows, doc_weight = call.routing[index]
        c2d = c.detach().reshape(-1, c.shape[-1])
        reference.accumulate_slice(c2d, rows, gate, doc_weight, self.calls.pending[index], start)
        if self.inst.grads and c.requires_grad and torch.is_grad_enabled():
            c.register_hook(functools.partial(self._on_shared_gradient, index, call, start, c2d, rows))

    def _on_shared_gradient(self, index: int, call: Call, start: int, c2d, rows, grad):
        if not self.inst._pause_depth and not call.discarded:
            _experts_kernels(c2d.device).accumulate_slice_backward(c2d, grad.reshape(-1, grad.shape[-1]), rows,
                                                                    self.inst._gradients.target(index), start)


def _experts_kernels(device: torch.device):
    """Where experts' blocks are reduced: the CPU kernels (one pass of the C kernel), elsewhere the reference."""
    return experts_cpu if kernels.backend_for(device) == "cpu" else reference


def _routed_keep(rows: torch.Tensor | None, token_index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Which routed rows are real tokens: the layer's row mask read at each row's token (all, without a mask)."""
    if rows is None:
        return torch.ones(token_index.shape[0], dtype=torch.bool, device=device)
    return rows[token_index]


def _fp16_autocast(device_type: str) -> bool:
    """Whether float16 autocast is on for ``device_type`` (the forwards a GradScaler usually goes with)."""
    return (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) == torch.float16)
