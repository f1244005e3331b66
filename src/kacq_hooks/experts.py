"""Mixture-of-experts taps: read the coefficients every expert already computes, as the forward runs.

The layers are found by :mod:`kacq_hooks.locate.moe` (:func:`find_experts`, re-exported here).

In a mixture-of-experts layer the memory slots are (expert e, neuron i) for every routed expert, then
the shared experts' neurons. Expert e's coefficient vector on a token is ``C_e = act(G_e x) * (U_e x)``
(or ``act(U_e x)`` without a gate): the tensor the experts forward multiplies by expert e's down
projection. The layer's output adds ``w_e(x) * V_e^T C_e(x)`` over the routed experts, so the effective
coefficient of slot (e, i) is ``w_e * C_{e,i}``, zero for experts the router did not pick.

transformers 5 stores all experts of a layer in one module with 3-D parameters (``gate_up_proj`` or
``up_proj`` ``[E, ., .]``, ``down_proj``) and dispatches its forward by
``config._experts_implementation``: the class's own loop ("eager"), "batched_mm" or "grouped_mm".
:class:`ExpertsTap` hands the callback the very tensor each implementation feeds to the down
projection, with the routing of its rows, without computing anything the forward does not:

- eager: the down projection call (``F.linear``, ``@`` or ``bmm`` with a view of ``down_proj``), whose
  rows are the tokens of the loop's own ``torch.where``; both are seen through tagged tensors (the
  routing index and, for one forward, an alias of ``down_proj`` in the module's ``__dict__``), so that
  only the few ops touching them call into Python;
- batched_mm: the output of the class's ``_apply_gate`` (``act_fn`` without a gate), rows in the
  order of ``top_k_index.reshape(-1)``;
- grouped_mm: the same output, rows in the order of the implementation's own ``torch.sort``.

A torch-function mode (a Python call per op) is held only as long as it is needed: until C for
grouped_mm (it only has to see the sort), never for batched_mm, and for the whole eager forward only
where tags do not apply (input-scaled layers, forwards traced by torch.compile); so the rest of the
forwards and the callbacks' own work run unintercepted.

Any other implementation (a fused kernel) keeps C inside the kernel and is refused.

Per-expert module lists (older or custom models: an ``nn.ModuleList`` of expert MLPs and a router)
are tapped at the input of each expert's output projection; the rows each expert received and the
routing weight its output is multiplied by are read from the MoE block's own forward.

Experts that take their rows sorted by expert (JetMoE: one 3-D up and one 3-D down module, a count per
expert beside the rows) are tapped at the input of the down module; the token and gate of each row are
read from the router's output just before it.

>>> import torch
>>> from transformers import MixtralConfig, MixtralForCausalLM
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
...                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
>>> model = MixtralForCausalLM(config).eval()
>>> [layer] = find_experts(model)
>>> layer.experts, layer.d_ff, layer.path
(4, 8, 'model.layers.0.mlp.experts')
>>> seen = []
>>> with ExpertsTap(layer, lambda e, t, w, c: seen.append(c.shape[0])):
...     _ = model(torch.tensor([[1, 2, 3]]))
>>> sum(seen)  # 3 tokens x top-2
6
"""
from __future__ import annotations

import logging
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ._hooks import HookSet, OwnerHook, running_between_graphs
from .errors import ExpertsError, ShapeError
from .locate.moe import TAPPABLE, ExpertsLayer, SharedExpert, is_decorated_experts, experts_implementation
from .locate.moe import find_experts  # noqa: F401  (found in locate, a public name of this module too)

try:  # transformers 5 dispatches fused experts through this module; 4.x has no fused experts
    from transformers.integrations.moe import _default_apply_gate
except ImportError:
    _default_apply_gate = None

log = logging.getLogger(__name__)

_ROUTING_NAMES = (("top_k_index", "top_k_weights"), ("router_indices", "routing_weights"))

OnCoefficients = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
OnExpertRows = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


# ----------------------------------------------------------------------------------------------- tapping


class _Call:
    """What one forward of the experts module needs to label its rows."""

    __slots__ = ("impl", "tokens", "index", "weights", "where", "sorted", "rows", "expected", "down", "thread")

    def __init__(self, impl, tokens, index, weights, expected):
        self.impl, self.tokens, self.index, self.weights = impl, tokens, index, weights
        self.where = self.sorted = self.down = None
        self.thread = threading.get_ident()
        self.rows, self.expected = 0, expected


_MATMULS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
_SORTS = {torch.sort, torch.Tensor.sort}
_WHERES = {torch.where}


class _Mode(TorchFunctionMode):
    """Sees the experts forward's own index computations and, in eager, its down projections."""

    def __init__(self, hub: _Hub, call: _Call):
        super().__init__()
        self.hub, self.call = hub, call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.hub._emitting:  # the callbacks' own operations are not the experts forward's
            return func(*args, **kwargs)
        if func in _MATMULS and self.call.impl == "eager":
            weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
            expert = self.hub._down_expert(weight)
            if expert is not None:
                args = (self.hub._eager_rows(self.call, args[0], expert), *args[1:])
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if func in _WHERES and len(args) + len(kwargs) == 1:
            self.call.where = out
        elif func in _SORTS and self.call.sorted is None:
            self.call.sorted = out
        return out


_INDEX, _DOWN = "index", "down"  # the tag of the routing index (and its mask), of the whole down projection


class _Tagged(torch.Tensor):
    """A tensor of one eager experts forward that its hub follows: the routing index and what the loop derives
    from it (``one_hot``, ``permute``, ``mask[e]``: its ``torch.where`` is recorded), or the down projection
    and its expert slices (a matmul with ``down_proj[e]`` hands C to the taps first).

    Only ops that touch a tagged tensor call back into Python; they run on plain tensors (results are plain
    unless followed), so the forward's numbers and autograd graph are the untagged ones (an alias is the
    identity, forward and backward). ``_kacq`` is ``(hub, call, kind)``: kind is ``_INDEX``, ``_DOWN`` or the
    expert of a down slice; a tag whose call is over is inert.
    """

    _kacq: tuple

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS and len(args) + len(kwargs) >= 2:
            weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
            if type(weight) is cls and type(weight._kacq[2]) is int:
                hub, call, expert = weight._kacq
                if hub._call is call and not hub._emitting:
                    # the matmul consumes the tensor handed out, so a tensor hook on it sees dL/dC
                    args = (hub._eager_rows(call, args[0], expert), *args[1:])
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        first = args[0] if args else None
        if type(first) is cls:
            hub, call, kind = first._kacq
            if hub._call is call and not hub._emitting:
                return hub._follow(call, kind, func, len(args) + len(kwargs), out)
        return out

    def __getitem__(self, index):
        # the loop's indexing of tagged tensors (the mask row, down_proj[e]) taken here, before torch's function
        # dispatch: a Python call where __torch_function__ costs a round of argument parsing (twice an expert)
        with torch._C.DisableTorchFunctionSubclass():
            out = _GETITEM(self, index)
        hub, call, kind = self._kacq
        if hub._call is call and not hub._emitting:
            # a user's torch-function mode sees the indexing (above), not the hub's reads of what it returned
            with torch._C.DisableTorchFunction():
                return hub._follow(call, kind, _GETITEM, 2, out)
        return out


_GETITEM = torch.Tensor.__getitem__


def _tag(tensor: torch.Tensor, hub, call, kind) -> _Tagged:
    tagged = tensor.as_subclass(_Tagged)  # an alias: same storage, same autograd history
    tagged._kacq = (hub, call, kind)
    return tagged


class _StateWithout:
    """``__getstate__`` of an experts module during a tagged forward: its state without the forward's entries,
    so a copy (deepcopy, pickle, torch.save) taken meanwhile is the plain module."""

    def __init__(self, module: nn.Module, installed: dict):
        self._module_ref, self._installed = weakref.ref(module), installed

    def __call__(self):
        module = self._module_ref()
        state = nn.Module.__getstate__(module)
        for name, value in self._installed.items():
            if state.get(name) is value:
                del state[name]
        return state


class ExpertsTap:
    """Streams the coefficients of every expert of one layer to ``on_coefficients``, as they are computed.

    During each forward of ``layer.module`` the callback is called (once per forward for batched_mm and
    grouped_mm, once per expert that received tokens for eager) as
    ``on_coefficients(expert_ids, token_index, weight, c)``:

    - ``c`` ``[n, m]``: exactly the tensor the implementation multiplies by its experts' down
      projections, in the model's dtype, live in the autograd graph (a tensor hook on it sees dL/dC);
    - ``expert_ids`` ``[n]`` (long): the expert of each row;
    - ``token_index`` ``[n]`` (long): the row of the hidden states the experts module received
      (``[B*T, d]``, batch-major), so padding is masked by ``mask.reshape(-1)[token_index]``;
    - ``weight`` ``[n]``: the routing weight that multiplies the row's output (effective coefficient
      ``weight[:, None] * c``); for input-scaled layers (Llama 4), where the experts run on every
      (expert, token) pair with the input already multiplied by the router's score, it is 1 for the
      pairs the router picked and 0 for the others (their c is exactly 0), and ``token_index`` indexes
      the ``[T]`` rows the MoE block received. Count an expert's load over ``weight != 0``.

    Rows follow the implementation's order (eager: by top-k position then token; grouped_mm: sorted by
    expert); experts that received no token get no row. A forward that used another implementation,
    or whose rows do not add up to every routed pair, raises :class:`ExpertsError`; so does a forward of the
    module started while another is open (re-entrantly from a hook or callback, or from another thread).
    The tap does not touch shared experts (they are dense MLPs: tap their ``down`` input).

    ``on_expert_rows``, when given, is called instead of ``on_coefficients`` for each expert of an eager
    forward, as ``on_expert_rows(expert, token_index, top_k_pos, routing_weights, c)``: the same rows, described
    by the forward's own routing. Row ``r`` of ``c`` is token ``token_index[r]`` at top-k position
    ``top_k_pos[r]``, its routing weight ``routing_weights[token_index[r], top_k_pos[r]]`` (``routing_weights``
    is the ``[tokens, k]`` tensor the module received) and its expert ``expert`` (an int). A consumer that reads
    these itself spares the forward three per-row tensors per expert (eager hands one call per expert, so a
    fixed cost there is paid E times a layer). Only for observing taps.

    With ``replaces=True`` the callback returns the tensor the down projection multiplies instead of
    ``c`` (same shape and dtype, e.g. ``c`` with some slots scaled): the forward continues with it,
    and every tap without ``replaces`` on the same module sees the replaced tensor, whatever the order
    in which the taps were attached. Several taps on one module share one set of hooks.

    The handle is idempotent and a context manager, like torch's ``RemovableHandle``.
    """

    def __init__(self, layer: ExpertsLayer, on_coefficients: OnCoefficients, *, replaces: bool = False,
                 on_expert_rows: OnExpertRows | None = None):
        if layer.kind != "experts":
            raise ShapeError(f"{layer!r} is a dense layer: tap the input of its output projection instead")
        module = layer.module
        decorated = is_decorated_experts(module)
        if decorated and module.has_gate and not callable(getattr(type(module), "_apply_gate", None)):
            raise ExpertsError(f"{type(module).__name__} has no _apply_gate: its batched implementations cannot be "
                               "tapped; use model.set_experts_implementation('eager')")
        if decorated and not module.has_gate and not isinstance(getattr(module, "act_fn", None), nn.Module):
            raise ExpertsError(f"{type(module).__name__}.act_fn is not a module, so C cannot be seen in its batched "
                               "implementations; use model.set_experts_implementation('eager')")
        self.layer = layer
        self.on_coefficients = on_coefficients
        self.replaces = replaces
        self._module_ref = weakref.ref(module)
        self._attached = False
        self.on_expert_rows = on_expert_rows

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def on_expert_rows(self) -> OnExpertRows | None:
        return self._on_expert_rows

    @on_expert_rows.setter
    def on_expert_rows(self, on_expert_rows: OnExpertRows | None) -> None:
        if self.replaces and on_expert_rows is not None:
            raise ExpertsError("a replacing tap returns the C the forward continues with, from on_coefficients: "
                               "on_expert_rows is for observing taps only; pass one or the other")
        self._on_expert_rows = on_expert_rows
        # the hub keeps its taps' on_expert_rows (read once per expert): set on an attached tap, it must know
        hub = self._hub()
        if hub is not None:
            hub._taps_changed()

    def attach(self) -> ExpertsTap:
        if not self._attached:
            module = self._module_ref()
            hub = _HUBS.get(module)
            if hub is None:
                kind = _ListHub if self.layer.downs else _SortedHub if self.layer.sorted_rows else _Hub
                hub = _HUBS[module] = kind(self.layer)
            hub.add(self)
            self._attached = True
        return self

    def _hub(self):
        """The hub of this attached tap's module (shared by every tap on it), or None."""
        module = self._module_ref() if self._attached else None
        return None if module is None else _HUBS.get(module)

    def remove(self) -> None:
        if not self._attached:
            return
        self._attached = False
        module = self._module_ref()
        hub = _HUBS.get(module) if module is not None else None
        if hub is not None and hub.discard(self):
            del _HUBS[module]

    def __enter__(self) -> ExpertsTap:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()


class _TapHub:
    """What the hubs of every experts layout share: the taps of one module, the hooks they share (one
    :class:`~kacq_hooks._hooks.HookSet`, placed with the first tap and removed with the last) and the reason
    a copy of the model must not run the module unedited."""

    def __init__(self, layer: ExpertsLayer):
        self.layer = layer
        self._taps: list[ExpertsTap] = []
        self._hooks = HookSet()
        # forwards of the experts opened (for a module list: of its block, and one more each time an expert runs
        # again in it). A tap that keeps state per forward reads it: Capture's bound routing, and its refusal of
        # experts run twice in one forward of their layer
        self.forwards = 0

    def add(self, tap: ExpertsTap) -> None:
        if not self._hooks:
            self._attach()
        self._taps.append(tap)
        self._taps_changed()

    def discard(self, tap: ExpertsTap) -> bool:
        """Forget ``tap``; True when it was the last one and the hooks are gone."""
        self._taps = [t for t in self._taps if t is not tap]
        self._taps_changed()
        if self._taps:
            return False
        self._detach()
        self._hooks.remove()
        return True

    def _attach(self) -> None:
        raise NotImplementedError

    def _detach(self) -> None:
        """Drop what a forward left behind, before the hooks go."""

    def _taps_changed(self) -> None:
        """The taps were added to or removed: eager's hub reads them once per expert, so it keeps what it needs."""

    def copy_refusal(self) -> str | None:
        """Why a deep copy of the model must not run this module unedited (None: the copy may, uninstrumented)."""
        if not any(tap.replaces for tap in self._taps):
            return None
        return (f"'{self.layer.path}' belongs to a copy (copy.deepcopy, pickle or torch.save) of a model whose "
                "mixture-of-experts coefficients were replaced by a hook there (resuscitate(..., mode='hook') or a "
                "replacing ExpertsTap). That edit cannot travel with a copy, and running the copy unedited would "
                "measure another model than the one copied. Copy the model before editing it, or edit it with "
                "resuscitate(..., mode='weights'), whose edit is in the weights and is copied")


class _Hub(_TapHub):
    """The hooks of one experts module, shared by every :class:`ExpertsTap` attached to it.

    One hub per module keeps one set of hooks, one torch-function mode (or one set of tags) and one ``_apply_gate``
    override however many taps there are, so that taps compose: replacing taps run first, in attach
    order, then the observers on the final tensor.
    """

    def __init__(self, layer: ExpertsLayer):
        super().__init__(layer)
        self._module_ref = weakref.ref(layer.module)
        self._call: _Call | None = None
        self._installed: dict = {}  # what one forward put in the module's __dict__ (name -> object)
        self._mode: _Mode | None = None
        self._scores: torch.Tensor | None = None  # input-scaled layouts: the router's last [T, E] scores
        self._emitting = False
        self._lock = threading.Lock()
        self._refused: dict[int, int] = {}  # thread -> forwards _pre refused, whose always-called _post must pass
        self._row_takers: tuple = ()  # every tap's on_expert_rows, when every tap takes it (eager), else empty

    # -- lifecycle

    def _taps_changed(self) -> None:
        takers = tuple(tap.on_expert_rows for tap in self._taps)
        self._row_takers = takers if all(f is not None for f in takers) else ()

    def _detach(self) -> None:
        self._close()
        self._scores = None

    def _attach(self) -> None:
        module, hooks = self._module_ref(), self._hooks
        hooks.pre(module, OwnerHook(self, "_pre"), with_kwargs=True)
        hooks.post(module, OwnerHook(self, "_post"), with_kwargs=True, always_call=True)
        if is_decorated_experts(module) and not module.has_gate:
            hooks.post(module.act_fn, OwnerHook(self, "_act_out"))
        if self.layer.input_scaled:
            hooks.post(self.layer.router, OwnerHook(self, "_router_out"))

    # -- hooks

    def _pre(self, module, args, kwargs):
        with self._lock:  # the check that no call is open and the opening of this one, at once for every thread
            call = self._open(module, args, kwargs)
        impl = call.impl
        if impl != "eager" and module.has_gate:
            self._install(module, "_apply_gate", self._apply_gate)
        if impl == "eager" and self._can_tag(module, call.index):
            return self._tag_forward(module, args, kwargs, call)
        # a torch-function mode costs a Python call on every op, so it is held only while it is needed:
        # eager (where tensors cannot be tagged) reads its own torch.where and down projections through it for
        # the whole forward, grouped_mm only its torch.sort (the mode is left where C appears); batched_mm's rows
        # are in the routing's order
        if impl != "batched_mm":
            self._mode = _Mode(self, call)
            self._mode.__enter__()
        return None

    def _open(self, module, args, kwargs) -> _Call:
        """Check the arguments and open this forward's call (under ``_lock``)."""
        # one call is followed at a time: starting another would close the open one, whose remaining experts
        # would then go unseen without an error (a call left open by a KeyboardInterrupt is not running)
        open_call, me = self._call, threading.get_ident()
        if open_call is not None:
            if open_call.thread == me and _forwards_of(module) > 1:
                why = ("was called again inside its own forward (a hook or a tap ran the model re-entrantly). Run "
                       "the inner forward after the outer one returns, or remove the taps for it")
            elif open_call.thread != me and any(t.ident == open_call.thread for t in threading.enumerate()):
                why = ("was called from two threads at once. Run the instrumented model's forwards one at a time "
                       "(or give each thread its own copy of the model)")
            else:
                why = None
            if why is not None:
                self._refused[me] = self._refused.get(me, 0) + 1
                raise ExpertsError(f"'{self.layer.path}' {why}: kacq_hooks follows one forward of an experts "
                                   "module at a time")
        impl = experts_implementation(module)
        if impl not in TAPPABLE:
            raise ExpertsError(
                f"'{self.layer.path}' runs the experts implementation {impl!r}, which computes C inside a fused "
                f"kernel where no hook can see it. Switch to one kacq_hooks can tap: "
                f"model.set_experts_implementation('grouped_mm') (or 'batched_mm', 'eager'), or load with "
                f"from_pretrained(..., experts_implementation='grouped_mm')")
        if getattr(module, "_is_expert_parallel", False):
            raise ExpertsError(f"'{self.layer.path}' is expert-parallel: its local rows hold sentinel experts; "
                               "measure without expert parallelism")
        hidden = args[0] if args else next(iter(kwargs.values()))
        if self.layer.input_scaled:
            if self._scores is None or self._scores.numel() != hidden.shape[0]:
                raise ExpertsError(f"'{self.layer.path}' ran without its router's scores for these "
                                   f"{hidden.shape[0]} rows just before it: the routed pairs are unknown")
            index, weights = None, self._scores
            self._scores = None
            expected = hidden.shape[0]
        else:
            index, weights = self._routing(args, kwargs)
            expected = index.numel()
        self._close()
        self._call = call = _Call(impl, hidden.shape[0], index, weights, expected)
        self.forwards += 1
        return call

    # -- eager, through tagged tensors

    def _can_tag(self, module, index) -> bool:
        """Whether this eager forward is followed through tagged tensors rather than a torch-function mode.

        Not for input-scaled layers (their down projection is one bmm over every expert), not between
        torch.compile's graphs (Dynamo traces the module's attributes), and only where the down projection
        is a plain 3-D parameter (the instance attribute that shadows it for one forward must be a tensor) and the
        index a plain tensor: a subclass of either (a DTensor) would lose its own type to the tag."""
        down = module._parameters.get("down_proj")
        # accelerate's hooks (offloading) swap the parameters in inside the wrapped forward, after the pre-hook,
        # behind the shadow: the mode reads them at the matmul instead
        return (not self.layer.input_scaled and not running_between_graphs() and type(index) is torch.Tensor
                and type(down) in (nn.Parameter, torch.Tensor) and down.dim() == 3 and down.device.type != "meta"
                and "_hf_hook" not in module.__dict__)

    def _tag_forward(self, module, args, kwargs, call: _Call):
        """Tag the routing index and shadow ``down_proj`` with a tagged alias, for this forward only.

        The index's one-hot mask and its per-expert rows stay tagged, so the loop's ``torch.where`` is seen;
        ``down_proj[e]`` is tagged with ``e``, so its matmul is seen. Every other op of the forward runs
        untouched: no mode, no Python call per op. ``_close`` takes the shadow away (always: the post-hook
        runs on exceptions too, and a copy taken meanwhile pickles the module's state without it).
        """
        call.down = module._parameters["down_proj"]
        self._install(module, "down_proj", _tag(call.down, self, call, _DOWN))
        index = call.index
        tagged = _tag(index, self, call, _INDEX)
        args = tuple(tagged if a is index else a for a in args)
        kwargs = {k: tagged if v is index else v for k, v in kwargs.items()}
        return args, kwargs

    def _install(self, module, name: str, value) -> None:
        """Put ``value`` in ``module.__dict__[name]`` until ``_close``; a copy's state leaves it out."""
        if not self._installed:
            self._installed["__getstate__"] = module.__dict__["__getstate__"] = _StateWithout(module, self._installed)
        self._installed[name] = module.__dict__[name] = value

    def _follow(self, call: _Call, kind, func, nargs: int, out):
        """An op of the forward touched a tagged tensor (its first argument): keep following it, or record it."""
        if kind is _INDEX:
            if func in _WHERES and nargs == 1:
                call.where = out
            elif func in _FOLLOWED and isinstance(out, torch.Tensor):
                return _tag(out, self, call, _INDEX)
        elif func in _FOLLOWED and isinstance(out, torch.Tensor):
            if self._module_ref()._parameters.get("down_proj") is not call.down:
                # the shadow would multiply by the weights of before the swap
                raise ExpertsError(f"'{self.layer.path}'.down_proj was replaced in _parameters during its forward "
                                   "(after kacq_hooks' pre-hook), so the forward would run on the old weights; "
                                   "replace parameters before the forward, or with setattr")
            expert = self._down_expert(out)
            if expert is not None and expert >= 0:
                return _tag(out, self, call, expert)
        return out

    def _post(self, module, args, kwargs, output):
        me = threading.get_ident()
        if self._refused.get(me):  # the always-called post-hook of a forward _pre refused: the open one goes on
            self._refused[me] -= 1
            return
        call = self._call
        self._close()
        if output is not None and call is not None and call.rows != call.expected:
            raise ExpertsError(
                f"the {call.impl} forward of '{self.layer.path}' ({type(module).__name__}) exposed C for {call.rows} "
                f"of its {call.expected} routed (token, expert) pairs: its code does not compute C where kacq_hooks "
                "looks for it. Try model.set_experts_implementation('grouped_mm') or 'eager'")

    def _close(self) -> None:
        module = self._module_ref()
        installed, self._installed = self._installed, {}
        if module is not None:
            for name, value in installed.items():
                if module.__dict__.get(name) is value:
                    del module.__dict__[name]
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        self._call = None

    def _routing(self, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if len(args) >= 3:
            return args[1], args[2]
        for index_name, weight_name in _ROUTING_NAMES:
            if index_name in kwargs or weight_name in kwargs:
                rest = list(args[1:])
                index = kwargs.get(index_name, rest.pop(0) if rest else None)
                weights = kwargs.get(weight_name, rest.pop(0) if rest else None)
                return index, weights
        raise ExpertsError(f"cannot find the routing (top-k indices and weights) among the arguments of "
                           f"'{self.layer.path}'.forward")

    # -- where C is

    def _down_expert(self, weight) -> int | None:
        """The expert whose down projection ``weight`` is (a view of ``down_proj``), -1 for all of them."""
        module = self._module_ref()
        down = module._parameters.get("down_proj")  # the parameter, not the tagged alias a forward puts before it
        if down is None:
            down = module.down_proj
        if weight is down:
            return -1
        if isinstance(weight, torch.Tensor) and weight._base is down and weight.dim() == 2:
            expert, rest = divmod(weight.storage_offset() - down.storage_offset(), down.stride(0))
            if rest == 0 and tuple(weight.shape) == tuple(down.shape[1:]):
                return expert
        return None

    def _eager_rows(self, call: _Call, c: torch.Tensor, expert: int) -> torch.Tensor:
        if expert == -1:  # input-scaled: every expert over every token, [E, T, m]
            e, t, m = c.shape
            flat = c.reshape(e * t, m)
            device = c.device
            expert_ids = torch.arange(e, device=device).repeat_interleave(t)
            token_index = torch.arange(t, device=device).repeat(e)
            weight = (call.weights.t().reshape(-1) != 0).to(c.dtype)  # the router's top-k, as 1 and 0
            # the matmul consumes the tensor handed out, so its hooks see dL/dC
            return self._emit(call, expert_ids, token_index, weight, flat).view(e, t, m)
        if call.where is None or call.where[1].shape[0] != c.shape[0]:
            raise ExpertsError(f"the eager forward of '{self.layer.path}' multiplied {c.shape[0]} rows by expert "
                               f"{expert}'s down projection without a torch.where that routes them; use "
                               "model.set_experts_implementation('grouped_mm')")
        top_k_pos, token_index = call.where
        call.where = None  # one where routes one down projection: a matmul without its own is refused
        return self._emit(call, None, token_index, None, c, eager=(expert, top_k_pos))

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        self._leave_mode()
        module = self._module_ref()
        return self._batched_rows(self._call, type(module)._apply_gate(module, gate_up))

    def _leave_mode(self) -> None:
        """Exit the mode once the batched forward reaches C: the sort it needed has been seen.

        Only when the mode is the innermost one (another mode entered inside the forward keeps it until
        the forward ends, as before); the rest of the forward and the taps' own work then run unintercepted.
        """
        mode = self._mode
        depth = torch._C._len_torch_function_stack()
        if mode is not None and depth and torch._C._get_function_stack_at(depth - 1) is mode:
            self._mode = None
            mode.__exit__(None, None, None)

    def _router_out(self, router, args, output):
        self._scores = output[0] if isinstance(output, tuple) else output

    def _act_out(self, act, args, output):
        call = self._call
        if call is not None and call.impl != "eager":
            self._leave_mode()
            return self._batched_rows(call, output)
        return None

    def _batched_rows(self, call: _Call, c: torch.Tensor) -> torch.Tensor:
        k = call.index.shape[-1]
        if call.impl == "batched_mm":
            expert_ids = call.index.reshape(-1)
            token_index = torch.arange(call.tokens, device=c.device).repeat_interleave(k)
            weight = call.weights.reshape(-1)
        else:
            if call.sorted is None:
                raise ExpertsError(f"the grouped_mm forward of '{self.layer.path}' reached C without a torch.sort of "
                                   "its routing, so the order of its rows is unknown; use "
                                   "model.set_experts_implementation('batched_mm') or 'eager'")
            expert_ids, perm = call.sorted
            token_index = perm // k
            weight = call.weights.reshape(-1)[perm]
        return self._emit(call, expert_ids, token_index, weight, c)

    def _emit(self, call, expert_ids, token_index, weight, c, *, eager=None) -> torch.Tensor:
        """Hand ``c`` to every tap (replacing ones first); the tensor the forward continues with.

        ``eager`` is ``(expert, top_k_pos)`` for one expert's rows of an eager forward: when every tap takes
        ``on_expert_rows`` (none replaces, then) they get the rows so; else ``expert_ids`` and ``weight`` are
        built here and every tap gets ``on_coefficients``, the same rows.
        """
        if c.shape[0] != token_index.shape[0]:
            raise ExpertsError(f"'{self.layer.path}': {c.shape[0]} rows of C for {token_index.shape[0]} routed pairs")
        call.rows += c.shape[0]
        self._emitting = True
        try:
            if eager is not None:
                expert, top_k_pos = eager
                if self._row_takers:
                    for on_expert_rows in self._row_takers:
                        on_expert_rows(expert, token_index, top_k_pos, call.weights, c)
                    return c
                expert_ids = torch.full_like(token_index, expert)
                weight = call.weights[token_index, top_k_pos]
            c = _hand_to_taps([t for t in self._taps if t.replaces], self.layer.path, expert_ids, token_index, weight, c)
            return _hand_to_taps([t for t in self._taps if not t.replaces], self.layer.path, expert_ids, token_index,
                                 weight, c)
        finally:
            self._emitting = False


_CALL_IMPL = nn.Module._call_impl.__code__


def _forwards_of(module: nn.Module) -> int:
    """How many calls of ``module`` are running in this thread (frames of ``nn.Module._call_impl``)."""
    n, frame = 0, sys._getframe(1)
    while frame is not None:
        if frame.f_code is _CALL_IMPL and frame.f_locals.get("self") is module:
            n += 1
        frame = frame.f_back
    return n


_VIEWS = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten,
          torch.Tensor.contiguous, torch.Tensor.squeeze, torch.Tensor.unsqueeze}
_GATHERS = {torch.Tensor.__getitem__, torch.index_select, torch.Tensor.index_select}
_MULS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
# what keeps a tensor of an eager forward tagged: the one-hot mask of the index, and views, permutes, indexing
_FOLLOWED = _VIEWS | {F.one_hot, torch.Tensor.__getitem__, torch.Tensor.permute, torch.permute, torch.Tensor.transpose,
                      torch.transpose, torch.Tensor.t, torch.t, torch.Tensor.select}


class _ListMode(TorchFunctionMode):
    """Follows, inside one forward of a MoE block, which rows of its input each expert receives and
    which tensor multiplies each expert's output (its routing weight)."""

    def __init__(self, hub: _ListHub):
        super().__init__()
        self.hub = hub

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        hub = self.hub
        if hub._emitting or not args or not isinstance(out, torch.Tensor):
            return out
        rows = hub._rows.get(id(args[0]))
        if rows is not None and isinstance(args[0], torch.Tensor):
            if func in _VIEWS and out.dim() >= 1 and out.numel() // max(out.shape[-1], 1) == rows[1].numel():
                hub._track(out, rows[1])
            elif func in _GATHERS and rows[1] is hub._identity:
                index = _row_index(args, kwargs, func)
                if index is not None and out.numel() // max(out.shape[-1], 1) == index.numel():
                    hub._track(out, index.reshape(-1))
        if func in _MULS and len(args) == 2:
            for mine, other in ((args[0], args[1]), (args[1], args[0])):
                if isinstance(mine, torch.Tensor) and id(mine) in hub._outputs:
                    hub._weight(mine, other)
        return out


def _row_index(args, kwargs, func) -> torch.Tensor | None:
    """The long index of rows a gather selects (``x[idx]``, ``x[None, idx]``, ``index_select(x, 0, idx)``)."""
    if func is not torch.Tensor.__getitem__:
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        index = args[2] if len(args) > 2 else kwargs.get("index")
        return index if dim == 0 and isinstance(index, torch.Tensor) else None
    key = args[1] if len(args) > 1 else None
    parts = [k for k in (key if isinstance(key, tuple) else (key,)) if k is not None]
    if len(parts) == 1 and isinstance(parts[0], torch.Tensor) and parts[0].dtype in (torch.long, torch.int):
        return parts[0]
    return None


class _ListHub(_TapHub):
    """The hooks of one per-expert module list (see :class:`ExpertsTap`).

    C of expert e is the input of its output projection (a pre-hook there). The block's own forward
    says the rest, read through a torch-function mode while it runs: the rows of the block's input
    that expert e received (the index its code gathers them with) and the routing weight (the tensor
    its output is multiplied by). An expert whose rows or weight cannot be read this way is refused
    at the end of the block's forward, never guessed.
    """

    def __init__(self, layer: ExpertsLayer):
        super().__init__(layer)
        self._mode: _ListMode | None = None
        self._emitting = False
        self._reset()

    def _reset(self) -> None:
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # id(tensor) -> (tensor, token index)
        self._identity: torch.Tensor | None = None
        self._expert_rows: dict[int, torch.Tensor] = {}
        self._c: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, tuple[int, torch.Tensor]] = {}          # id(expert output) -> (expert, output)
        self._handed: set[int] = set()                                  # experts handed since forwards last grew

    def _attach(self) -> None:
        block, hooks = self.layer.block, self._hooks
        hooks.pre(block, OwnerHook(self, "_enter"))
        hooks.post(block, OwnerHook(self, "_exit"), always_call=True)
        for e, (expert, down) in enumerate(zip(self.layer.module, self.layer.downs)):
            hooks.pre(expert, OwnerHook(self, "_expert_in", e))
            hooks.pre(down, OwnerHook(self, "_down_in", e))
            hooks.post(expert, OwnerHook(self, "_expert_out", e))

    def _detach(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        self._reset()

    def _track(self, tensor: torch.Tensor, index: torch.Tensor) -> None:
        self._rows[id(tensor)] = (tensor, index)

    def _enter(self, block, args):
        self._close()
        hidden = args[0]
        self._identity = torch.arange(hidden.numel() // hidden.shape[-1], device=hidden.device)
        self._track(hidden, self._identity)
        self.forwards += 1
        self._mode = _ListMode(self)
        self._mode.__enter__()

    def _expert_in(self, e, expert, args):
        found = self._rows.get(id(args[0])) if args else None
        if found is None:
            raise ExpertsError(
                f"expert {e} of '{self.layer.path}' received rows that kacq_hooks could not trace back to the rows of "
                f"its block '{type(self.layer.block).__name__}' (it follows indexing and reshapes of the block's input). "
                "Measure this layer another way: instrument(model, mlp_out='path.{i}.to.a.projection')")
        self._expert_rows[e] = found[1]

    def _down_in(self, e, down, args):
        c = args[0]
        if e not in self._expert_rows:
            return None
        rows = self._expert_rows[e]
        if c.numel() // c.shape[-1] != rows.numel():
            raise ExpertsError(f"expert {e} of '{self.layer.path}': C has {c.numel() // c.shape[-1]} rows for the "
                               f"{rows.numel()} rows the expert received")
        if e in self._c:  # its first C still waits for a weight: which weight goes with which C cannot be told
            raise ExpertsError(f"expert {e} of '{self.layer.path}' ran again in one forward of its block "
                               f"'{type(self.layer.block).__name__}' before its first output was multiplied by its "
                               "routing weight: kacq_hooks pairs an expert's C with the next weight its output is "
                               "multiplied by, and cannot tell which C each weight goes with. Weigh each run's output "
                               "before running the expert again, or measure the layer another way: "
                               "instrument(model, mlp_out='path.{i}.to.a.projection')")
        if e in self._handed:
            # run again after its first run was weighed (chunks of its rows, or another path): its rows are handed
            # again, as a second forward of fused experts is; for the taps that count forwards it is another one
            # (instrument() counts the layer's tokens once a forward of the layer, and refuses it)
            self.forwards += 1
            self._handed = set()
        self._handed.add(e)
        c2d = c.reshape(-1, c.shape[-1])
        # replacing taps act now, on the tensor the down projection takes; observers wait for the weight
        ids = torch.full_like(rows, e)
        replaced = self._run(ids, rows, None, c2d, replacing=True)
        self._c[e] = replaced
        # the projection takes the very tensor handed out, so a tensor hook on it sees dL/dC
        return (replaced.view(c.shape), *args[1:])

    def _expert_out(self, e, expert, args, output):
        if e in self._c and isinstance(output, torch.Tensor):
            self._outputs[id(output)] = (e, output)

    def _weight(self, output: torch.Tensor, other) -> None:
        e, _ = self._outputs.pop(id(output))
        rows = self._expert_rows[e]
        n = rows.numel()
        if not (isinstance(other, torch.Tensor) and other.dim() >= 1 and other.numel() == n):
            raise ExpertsError(f"the output of expert {e} of '{self.layer.path}' is multiplied by "
                               f"{other!r:.60} rather than one routing weight per row; kacq_hooks cannot read its "
                               "effective coefficients")
        c = self._c.pop(e)
        self._run(torch.full_like(rows, e), rows, other.reshape(-1), c, replacing=False)

    def _exit(self, block, args, output):
        pending = sorted(self._c)
        self._close()
        if pending and output is not None:
            raise ExpertsError(
                f"the output of expert(s) {pending} of '{self.layer.path}' was not multiplied by a routing weight "
                f"inside '{type(block).__name__}'.forward, so kacq_hooks cannot tell their effective coefficients. "
                "Measure this layer another way: instrument(model, mlp_out='path.{i}.to.a.projection')")

    def _run(self, expert_ids, token_index, weight, c, *, replacing: bool) -> torch.Tensor:
        self._emitting = True
        try:
            return _hand_to_taps([t for t in self._taps if t.replaces == replacing], self.layer.path, expert_ids,
                                 token_index, weight, c)
        finally:
            self._emitting = False


class _SortedHub(_TapHub):
    """The hooks of experts that take their rows sorted by expert (JetMoE, see :class:`ExpertsTap`).

    C is the input of the down projection (``module``): all routed rows, sorted by expert, with the count
    per expert beside it. The router's output, just before, says the token of each row and the gate that
    multiplies the row's output after the down projection.
    """

    def __init__(self, layer: ExpertsLayer):
        super().__init__(layer)
        self._routing = None

    def _attach(self) -> None:
        hooks = self._hooks
        hooks.post(self.layer.router, OwnerHook(self, "_router_out"))
        hooks.pre(self.layer.module, OwnerHook(self, "_down_in"))
        if self.layer.block is not None:  # a forward that failed halfway leaves no routing behind
            hooks.pre(self.layer.block, OwnerHook(self, "_reset"))

    def _detach(self) -> None:
        self._routing = None

    def _reset(self, *_):
        self._routing = None

    def _router_out(self, router, args, output):
        self._routing = output

    def _down_in(self, module, args):
        routing, self._routing = self._routing, None
        path = self.layer.path
        if routing is None or not isinstance(routing, tuple) or len(routing) < 4:
            raise ExpertsError(f"'{path}' ran without its router's (order, token, gate, counts) just before it: "
                               "the expert and token of its rows are unknown")
        c, counts = args[0], args[1]
        _, token_index, gates, sizes = routing[:4]
        sizes = torch.as_tensor(sizes, device=c.device).reshape(-1)
        if not (isinstance(token_index, torch.Tensor) and isinstance(gates, torch.Tensor)
                and token_index.dim() == 1 and gates.shape == token_index.shape == c.shape[:1]
                and sizes.numel() == self.layer.experts and int(sizes.sum()) == c.shape[0]
                and torch.equal(sizes, torch.as_tensor(counts, device=c.device).reshape(-1))):
            raise ExpertsError(f"'{path}': its router's output does not line up with the {c.shape[0]} rows of C "
                               "(a token index and a gate per row, a count per expert): kacq_hooks cannot label them")
        expert_ids = torch.repeat_interleave(torch.arange(self.layer.experts, device=c.device), sizes)
        self.forwards += 1
        c = _hand_to_taps([t for t in self._taps if t.replaces], path, expert_ids, token_index, gates, c)
        c = _hand_to_taps([t for t in self._taps if not t.replaces], path, expert_ids, token_index, gates, c)
        return (c, *args[1:])  # the projection takes the very tensor handed out, so its hooks see dL/dC


def _hand_to_taps(taps, path: str, expert_ids, token_index, weight, c) -> torch.Tensor:
    """Call each tap on the routed rows; a replacing tap's result is the C the next tap and the forward see."""
    for tap in taps:
        out = tap.on_coefficients(expert_ids, token_index, weight, c)
        if tap.replaces:
            if not (isinstance(out, torch.Tensor) and out.shape == c.shape and out.dtype == c.dtype):
                raise ExpertsError(f"a replacing tap on '{path}' must return a tensor of C's shape "
                                   f"{tuple(c.shape)} and dtype {c.dtype}, not {out!r:.80}")
            c = out
    return c


_HUBS: weakref.WeakKeyDictionary[nn.Module, _Hub] = weakref.WeakKeyDictionary()


class SharedTap:
    """Streams a shared expert's coefficients and gate: ``on_coefficients(c, gate)`` once per forward.

    ``c`` (``[..., m_s]``) is exactly the input of the shared expert's down projection, live in the
    autograd graph; ``gate`` is ``sigmoid(shared_expert_gate(x))`` with ``c``'s leading shape (the
    factor on the shared expert's output, computed from the gate's own output: no matmul), or None for
    an ungated shared expert. Rows are the hidden-state rows the shared expert received.
    """

    def __init__(self, shared: SharedExpert, on_coefficients: Callable[[torch.Tensor, torch.Tensor | None], None]):
        self.shared = shared
        self.on_coefficients = on_coefficients
        self._hooks = HookSet()
        self._reset()

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def attach(self) -> SharedTap:
        if self._hooks:
            return self
        self._hooks.pre(self.shared.down, OwnerHook(self, "_down_in"))
        if self.shared.gate is not None:
            self._hooks.post(self.shared.gate, OwnerHook(self, "_gate_out"))
            if self.shared.block is not None:  # a forward that failed halfway leaves no half pair behind
                self._hooks.pre(self.shared.block, OwnerHook(self, "_block_in"))
                self._hooks.post(self.shared.block, OwnerHook(self, "_block_out"), always_call=True)
        return self

    def remove(self) -> None:
        self._hooks.remove()
        self._reset()

    def __enter__(self) -> SharedTap:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _reset(self) -> None:
        self._clear()
        self._in_block = 0  # forwards of the block running: the refusal below is for a second C inside one

    def _clear(self) -> None:
        self._c = self._gate = None
        self._paired = False

    def _block_in(self, *_):
        self._clear()
        self._in_block += 1

    def _block_out(self, *_):  # always called, also when a pre-hook of the block raised before _block_in
        self._clear()
        self._in_block = max(self._in_block - 1, 0)

    def _down_in(self, module, args):
        if self.shared.gate is None:
            self.on_coefficients(args[0], None)
            return
        # which of two Cs would the block's one gate multiply? (without the block, forwards cannot be told apart;
        # outside a forward of the block, a probe of the shared expert on its own, there is no gate to mix up)
        if self._in_block and (self._c is not None or self._paired):
            self._clear()
            raise ExpertsError(f"'{self.shared.path}' ran twice in one forward of its block "
                               f"'{type(self.shared.block).__name__}', which computes its gate once: kacq_hooks pairs "
                               "a shared expert's C with its gate once per forward of the block and cannot tell which "
                               "C the gate multiplies. Run the shared expert once per forward of the block (a probe "
                               "too, even inside inst.pause())")
        self._c = args[0]
        self._pair()

    def _gate_out(self, module, args, output):
        self._gate = torch.sigmoid(output).squeeze(-1)
        self._pair()

    def _pair(self) -> None:
        if self._c is None or self._gate is None:
            return
        c, gate = self._c, self._gate
        self._c = self._gate = None
        self._paired = True
        if gate.shape != c.shape[:-1]:
            raise ExpertsError(f"the gate of '{self.shared.path}' has shape {tuple(gate.shape)}, its coefficients "
                               f"{tuple(c.shape)}: they do not pair row by row")
        self.on_coefficients(c, gate)


# ----------------------------------------------------------------------------------------------- editing


@dataclass(frozen=True)
class UpRows:
    """Where rows ``i`` of one expert's up projection live: ``parameter[index]``, rows along ``axis``."""

    parameter: nn.Parameter
    index: tuple
    axis: int


def expert_up_rows(layer: ExpertsLayer, expert: int, rows: torch.Tensor) -> list[UpRows]:
    """The slices of the 3-D up (or fused gate_up) parameter, and bias, that scale ``C[expert, rows]``.

    Multiplying every returned slice by ``u`` (per row) multiplies ``C_{expert, i}`` by exactly ``u_i``:
    for gated experts ``C = act(gate) * up`` is linear in the up half; the router is not touched.
    Refused (:class:`ExpertsError`) where no slice does that: experts without a gate (``act(up x)``)
    and custom gates that clamp or shift the up half (GPT-OSS).
    """
    module = layer.module
    if layer.kind != "experts":
        raise ShapeError(f"{layer!r} is dense: scale rows of its up projection directly")
    if not 0 <= expert < layer.experts:
        raise ShapeError(f"expert {expert} is outside 0..{layer.experts - 1} for {layer.path}")
    if layer.layout == "sorted":  # [E, 2m, d]: gate rows, then up rows; C = act(gate) * up is linear in up
        m = layer.d_ff
        rows = torch.as_tensor(rows, dtype=torch.long, device=layer.up.weight.device)
        if rows.numel() and (rows.min() < 0 or rows.max() >= m):
            raise ShapeError(f"rows must lie in 0..{m - 1} for {layer.path}")
        return [UpRows(layer.up.weight, (expert, rows + m), axis=0)]
    if layer.layout == "module_list":  # one gated MLP per expert: the rows of its own up projection
        mlp = module[expert]
        up = next((getattr(mlp, n) for n in ("up_proj", "w3") if isinstance(getattr(mlp, n, None), nn.Linear)), None)
        if up is None or not any(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "w1")):
            raise ExpertsError(f"{layer.path}.{expert} has no gated up projection (up_proj/w3 beside gate_proj/w1): "
                               "scaling rows would not multiply C exactly; use hook mode")
        rows = torch.as_tensor(rows, dtype=torch.long, device=up.weight.device)
        out = [UpRows(up.weight, (rows,), axis=0)]
        if up.bias is not None:
            out.append(UpRows(up.bias, (rows,), axis=0))
        return out
    rows = torch.as_tensor(rows, dtype=torch.long, device=module.down_proj.device)
    m = layer.d_ff
    if rows.numel() and (rows.min() < 0 or rows.max() >= m):
        raise ShapeError(f"rows must lie in 0..{m - 1} for {layer.path}")
    decorated = is_decorated_experts(module)
    if decorated and not module.has_gate:
        raise ExpertsError(f"{layer.path} has no gate: C = act(up x), so no row scaling multiplies C by exactly u")
    if decorated and (type(module)._apply_gate is not _default_apply_gate or not module.is_concatenated):
        raise ExpertsError(f"{layer.path} ({type(module).__name__}) computes C with its own gate function "
                           "(clamped or shifted up half): scaling up rows does not scale C exactly; use hook mode")
    weight = module.gate_up_proj
    transposed = getattr(module, "is_transposed", False) or (not decorated and weight.shape[1] == layer.d_model)
    up = rows + m  # concatenated [gate; up] (Llama 4's chunk too): the up half is the second
    out = [UpRows(weight, (expert, slice(None), up) if transposed else (expert, up), axis=1 if transposed else 0)]
    if decorated and module.has_bias:
        out.append(UpRows(module.gate_up_proj_bias, (expert, up), axis=0))
    return out


def scale_up_rows(layer: ExpertsLayer, expert: int, rows: torch.Tensor, u: torch.Tensor) -> Callable[[], None]:
    """Multiply ``C[expert, rows]`` by ``u`` through the weights; returns a function that restores them exactly."""
    slices = expert_up_rows(layer, expert, rows)
    saved = []
    with torch.no_grad():
        for s in slices:
            old = s.parameter[s.index].clone()
            shape = [1] * old.dim()
            shape[s.axis] = -1
            s.parameter[s.index] = old * torch.as_tensor(u, dtype=old.dtype, device=old.device).view(shape)
            saved.append((s, old))

    def restore() -> None:
        with torch.no_grad():
            for s, old in saved:
                s.parameter[s.index] = old

    return restore
