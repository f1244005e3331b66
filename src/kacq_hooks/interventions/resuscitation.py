"""Resuscitation (Kim et al., ICLR 2025, Algorithm 1): give the least-used FFN memories more weight.

From c̄ (mean |C| per neuron, measured on calibration data), for every edited layer l:

    t   = quantile(c̄_l, ratio)                 (linear interpolation, as numpy and torch do)
    idx = { i : c̄_l[i] <= t }
    u_i = factor * mean(c̄_l) / c̄_l[i]          capped at ``max_multiplier``

and C_i is multiplied by u_i, either as a **weight edit** (the paper: the up-projection rows of a gated
MLP, since C = act(gate x) * (up x) is linear in each up row) or as a **forward pre-hook** on the output
projection, which works for every architecture the locator supports. Both give the same forward pass
on gated MLPs, but not the same training: in hook mode the up row keeps its size and its gradient is
u_i times the weight-mode gradient (weight decay also sees the unscaled row). The paper edits the
weights once, before continued training, with a fresh optimizer.

Because C_i -> u_i C_i exactly for a layer whose input is unchanged, the post-edit entropy of the first
edited layer is known without a forward pass (:meth:`ResuscitationPlan.predicted_entropy`); later
layers see changed inputs, so there the prediction is a first-order estimate: measure them.

Mixture-of-experts layers are planned over all their memory slots at once (E x m routed slots, then
the shared experts' neurons): one quantile, one layer mean. A weight edit scales row i of expert e
inside the 3-D up (or fused gate_up) parameter, and a shared expert's rows in its own up projection;
hook mode multiplies the routed slots' C inside the experts forward, where the down projection takes
it (no extra matmul; unedited slots are multiplied by exactly 1), and a shared expert's C in a
pre-hook on its down projection. The router is unchanged, so the prediction for the first edited
layer stays exact.

Near-dead neurons (c̄_i -> 0) would get unbounded multipliers: ``max_multiplier`` (default 1000) caps
them, and the plan reports how many were capped. A neuron with c̄_i = 0 gets the cap (never inf).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .._hooks import HookSet
from ..entropy import KnowledgeEntropy, knowledge_entropy
from ..errors import ArgumentTypeError, ConfigError, LocateError, NoTokensError, ResuscitationError, ShapeError
from ..experts import ExpertsTap, expert_up_rows
from ..locate import Site, find_sites
from ..stats import CoefficientStats

log = logging.getLogger(__name__)

DEFAULT_MAX_MULTIPLIER = 1e3
_MODES = ("weights", "hook")


@dataclass(frozen=True)
class LayerEdit:
    """The plan for one layer: which neurons are scaled, by how much, and how many hit the cap."""

    layer: int                  # the layer number (Site.layer)
    threshold: float            # quantile(c̄_l, ratio)
    layer_mean: float           # mean(c̄_l) before the edit
    indices: torch.Tensor       # int64 [k]: the selected neurons, ascending
    multipliers: torch.Tensor   # float64 [k]: u_i, after the cap
    capped: int                 # how many u_i were lowered to max_multiplier (c̄_i = 0 included)

    @property
    def selected(self) -> int:
        return int(self.indices.numel())


class ResuscitationPlan:
    """Per-layer neuron selections and multipliers, plus the c̄ they were computed from.

    Build it with :func:`resuscitation_plan`; apply it with :func:`resuscitate`.

    >>> cbar = [torch.tensor([1.0, 2.0, 3.0, 6.0])]
    >>> plan = resuscitation_plan(cbar, ratio=0.5, factor=2.0)
    >>> plan.edits[0].indices.tolist(), [round(u, 3) for u in plan.edits[0].multipliers.tolist()]
    ([0, 1], [6.0, 3.0])
    """

    def __init__(self, cbars: list[torch.Tensor], edits: list[LayerEdit], *, ratio: float, factor: float,
                 max_multiplier: float, layer_ids: list[int], paths: list[str] | None, weighting: str = "token",
                 tokens: int | None = None):
        self.cbars = cbars
        self.edits = edits
        self.ratio = ratio
        self.factor = factor
        self.max_multiplier = max_multiplier
        self.layer_ids = layer_ids
        self.paths = paths
        self.weighting = weighting
        self.tokens = tokens

    @property
    def d_ffs(self) -> list[int]:
        return [c.numel() for c in self.cbars]

    @property
    def edited_layers(self) -> list[int]:
        return [e.layer for e in self.edits]

    @property
    def selected(self) -> int:
        return sum(e.selected for e in self.edits)

    @property
    def capped(self) -> int:
        return sum(e.capped for e in self.edits)

    def scales(self) -> list[torch.Tensor | None]:
        """Dense float64 [d_ff] multipliers per layer (ones where not selected), None for unedited layers."""
        by_layer = {e.layer: e for e in self.edits}
        out: list[torch.Tensor | None] = []
        for layer, cbar in zip(self.layer_ids, self.cbars):
            edit = by_layer.get(layer)
            if edit is None:
                out.append(None)
                continue
            scale = torch.ones(cbar.numel(), dtype=torch.float64)
            scale[edit.indices] = edit.multipliers
            out.append(scale)
        return out

    def predicted_entropy(self) -> KnowledgeEntropy:
        """Knowledge entropy after the edit on the calibration data, without a forward pass.

        Exact for the first edited layer (its input is unchanged) and for unedited layers before it; an
        estimate for later layers, whose inputs the edit changes.
        """
        return predicted_entropy_after_scaling(self.cbars, self.scales(), weighting=self.weighting,
                                               tokens=self.tokens)

    def to_dict(self) -> dict:
        """A JSON-ready summary (no tensors but the selected indices and multipliers)."""
        return {
            "ratio": self.ratio, "factor": self.factor, "max_multiplier": self.max_multiplier,
            "weighting": self.weighting, "tokens": self.tokens, "paths": self.paths, "d_ffs": self.d_ffs,
            "layers": [{"layer": e.layer, "threshold": e.threshold, "layer_mean": e.layer_mean,
                        "selected": e.selected, "capped": e.capped, "indices": e.indices.tolist(),
                        "multipliers": e.multipliers.tolist()} for e in self.edits],
        }

    def __repr__(self) -> str:
        return (f"ResuscitationPlan(ratio={self.ratio}, factor={self.factor}, layers={self.edited_layers}, "
                f"selected={self.selected}, capped={self.capped} at {self.max_multiplier:g})")


def predicted_entropy_after_scaling(cbars: Sequence[torch.Tensor], scales: Sequence[torch.Tensor | None], *,
                                    weighting: str = "token", tokens: int | None = None) -> KnowledgeEntropy:
    """Knowledge entropy of c̄' = scale * c̄ per layer (``None``: layer unchanged).

    Scaling C_i by u_i scales its mean |C| by |u_i|, so this is the post-edit entropy of any layer whose
    input the edit leaves unchanged.

    >>> ke = predicted_entropy_after_scaling([torch.tensor([1.0, 3.0])], [torch.tensor([3.0, 1.0])])
    >>> round(ke.per_layer[0], 6) == round(math.log(2), 6)
    True
    """
    if len(cbars) != len(scales):
        raise ShapeError(f"{len(cbars)} layers of c̄ but {len(scales)} layers of scales")
    scaled = []
    for layer, (cbar, scale) in enumerate(zip(cbars, scales)):
        cbar = cbar.detach().to("cpu", torch.float64)
        if scale is not None:
            scale = scale.detach().to("cpu", torch.float64)
            if scale.shape != cbar.shape:
                raise ShapeError(f"layer {layer}: scales of shape {tuple(scale.shape)} for c̄ of shape "
                                 f"{tuple(cbar.shape)}")
            cbar = cbar * scale.abs()
        scaled.append(cbar)
    ke = knowledge_entropy(scaled)
    return KnowledgeEntropy(per_layer=ke.per_layer, max_per_layer=ke.max_per_layer, weighting=weighting,
                            tokens=tokens)


def resuscitation_plan(source, ratio: float = 0.5, factor: float = 2.0, *,
                       max_multiplier: float = DEFAULT_MAX_MULTIPLIER, layers: Sequence[int] | None = None,
                       weighting: str | None = None) -> ResuscitationPlan:
    """Select the bottom ``ratio`` of each layer's neurons by c̄ and the multipliers that lift them.

    Args:
        source: an :class:`~kacq_hooks.Instrumentation` that has seen the calibration data (its site
            paths are kept, so applying the plan to a differently shaped model fails loudly), a
            ``CoefficientStats``, or a list of per-layer c̄ tensors.
        ratio: the quantile p in (0, 1); neurons with c̄_i <= quantile(c̄_l, p) are selected (ties included).
        factor: q > 0; a selected neuron's mean |C| becomes q x the layer mean (paper default 2).
        max_multiplier: cap on u_i (finite, > 0). Capped neurons reach only cap x c̄_i; the plan counts them.
        layers: layer numbers to edit (negative counts from the end); default all.
        weighting: "token" or "document" c̄, when ``source`` is an Instrumentation; default its own.

    >>> plan = resuscitation_plan([torch.tensor([0.0, 1.0, 1.0, 2.0])], max_multiplier=100)
    >>> plan.edits[0].multipliers.tolist(), plan.capped
    ([100.0, 2.0, 2.0], 1)
    """
    check_plan_arguments(ratio, factor, max_multiplier)
    cbars, layer_ids, paths, used_weighting, tokens = _read_source(source, weighting)
    chosen = _choose_layers(layers, layer_ids)
    edits = []
    for layer, cbar in zip(layer_ids, cbars):
        if layer in chosen:
            edits.append(_plan_layer(layer, cbar, float(ratio), float(factor), float(max_multiplier)))
    plan = ResuscitationPlan(cbars, edits, ratio=float(ratio), factor=float(factor),
                             max_multiplier=float(max_multiplier), layer_ids=layer_ids, paths=paths,
                             weighting=used_weighting, tokens=tokens)
    if plan.capped:
        log.warning("%d of %d selected neurons needed a multiplier above max_multiplier=%g and were capped "
                    "(near-dead neurons); per layer: %s", plan.capped, plan.selected, plan.max_multiplier,
                    {e.layer: e.capped for e in edits if e.capped})
    log.info("%r", plan)
    return plan


def check_plan_arguments(ratio: float, factor: float, max_multiplier: float = DEFAULT_MAX_MULTIPLIER) -> None:
    """Raise ConfigError (a ValueError), saying what is allowed, unless 0 < ratio < 1, factor > 0 and 0 < max_multiplier < inf."""
    if not (isinstance(ratio, (int, float)) and 0 < ratio < 1):
        raise ConfigError(f"ratio must be a fraction strictly between 0 and 1 (the paper uses 0.5), not {ratio!r}")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise ConfigError(f"factor must be a finite number > 0 (the paper uses 2; below 1 weakens the neurons), "
                          f"not {factor!r}")
    if not (isinstance(max_multiplier, (int, float)) and math.isfinite(max_multiplier) and max_multiplier > 0):
        raise ConfigError(f"max_multiplier must be a finite number > 0 (default {DEFAULT_MAX_MULTIPLIER:g}); "
                          f"got {max_multiplier!r}. For an effectively uncapped plan pass a large value such as 1e30")


def _read_source(source, weighting: str | None):
    paths = None
    layer_ids = None
    tokens = None
    if hasattr(source, "stats") and isinstance(source.stats, CoefficientStats) and hasattr(source, "sites"):
        used = weighting or source.weighting
        cbars = source.mean_abs_coefficients(used)
        paths = [s.path for s in source.sites]
        layer_ids = [s.layer for s in source.sites]
        tokens = max(int(s.tokens) for s in source.stats)
    elif isinstance(source, CoefficientStats):
        used = weighting or "token"
        if not any(int(s.tokens) for s in source):
            raise NoTokensError("the statistics hold no tokens: run the calibration data through the instrumented "
                            "model before making a resuscitation plan")
        cbars = [s.mean_abs(used) for s in source]
        tokens = max(int(s.tokens) for s in source)
    elif isinstance(source, Sequence) and len(source) and all(isinstance(c, torch.Tensor) for c in source):
        used = weighting or "token"
        cbars = list(source)
    else:
        raise ArgumentTypeError(f"resuscitation_plan takes an Instrumentation, CoefficientStats or a non-empty list of "
                                f"per-layer c̄ tensors, not {type(source).__name__}")
    cbars = [c.detach().to("cpu", torch.float32).flatten().clone() for c in cbars]
    for i, c in enumerate(cbars):
        if c.numel() < 2:
            raise ShapeError(f"layer {i}: c̄ has {c.numel()} entries; a layer needs at least 2 neurons to select from")
        if not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
            raise ShapeError(f"layer {i}: c̄ must be finite and non-negative (a mean of |C|); got min "
                            f"{c.min().item():g}, max {c.max().item():g}")
    return cbars, layer_ids or list(range(len(cbars))), paths, used, tokens


def _choose_layers(layers: Sequence[int] | None, layer_ids: list[int]) -> set[int]:
    if layers is None:
        return set(layer_ids)
    chosen = set()
    for layer in layers:
        if not isinstance(layer, int):
            raise ArgumentTypeError(f"layers must be integers, not {type(layer).__name__}")
        resolved = layer_ids[layer] if -len(layer_ids) <= layer < 0 else layer
        if resolved not in layer_ids:
            raise ConfigError(f"layer {layer} is not among the measured layers {layer_ids}")
        chosen.add(resolved)
    if not chosen:
        raise ConfigError("layers= is empty: name at least one layer to edit, or pass None for all")
    return chosen


def _plan_layer(layer: int, cbar: torch.Tensor, ratio: float, factor: float, cap: float) -> LayerEdit:
    c = cbar.to(torch.float64)
    mean = float(c.mean())
    if mean <= 0:
        raise ResuscitationError(f"layer {layer}: every mean |C| is zero on the calibration data (no tokens, or a dead "
                        "layer), so no multiplier is defined; leave it out with layers=[...]")
    threshold = float(torch.quantile(c, ratio))
    indices = torch.nonzero(c <= threshold).flatten()
    selected = c[indices]
    raw = torch.where(selected > 0, factor * mean / selected.clamp_min(torch.finfo(torch.float64).tiny),
                      torch.full_like(selected, math.inf))
    capped = raw > cap
    multipliers = torch.where(capped, torch.full_like(raw, cap), raw)
    return LayerEdit(layer=layer, threshold=threshold, layer_mean=mean, indices=indices, multipliers=multipliers,
                     capped=int(capped.sum()))


# -- applying a plan -------------------------------------------------------------------------------------------

class Resuscitation:
    """An applied plan. :meth:`revert` restores the model exactly; also a context manager.

    Weight mode keeps the original up-projection rows (on the CPU) and writes them back bit-exactly;
    hook mode removes its hooks.
    """

    def __init__(self, model: nn.Module, plan: ResuscitationPlan, mode: str, sites: list[Site]):
        self.model = model
        self.plan = plan
        self.mode = mode
        self.sites = sites
        self._saved: list[_SavedRows] = []
        self._hooks = HookSet()
        self.active = False

    def revert(self) -> None:
        """Undo the edit: weight rows back to their pre-edit values, or hooks removed. A second call does nothing.

        If the edited rows changed since the edit (training), their changes are discarded, with a warning.
        """
        if not self.active:
            return
        with torch.no_grad():
            for saved in reversed(self._saved):
                if saved.changed():
                    log.warning("the edited rows of a %s parameter changed since the edit (training?); revert "
                                "restores their pre-edit values and discards those changes", tuple(saved.param.shape))
                saved.restore()
        self._hooks.remove()
        self._saved.clear()
        self._mark(-1)
        self.active = False

    def _mark(self, change: int) -> None:
        """Count this edit on its output-projection modules, and for a weight edit in the model's config."""
        edited = {edit.layer for edit in self.plan.edits}
        for site in self.sites:
            if site.layer in edited:
                count = getattr(site.module, _MARK, 0) + change
                setattr(site.module, _MARK, count)
        config = getattr(self.model, "config", None)
        if self.mode == "weights" and config is not None:
            record = {"layers": sorted(edited), "ratio": self.plan.ratio, "factor": self.plan.factor}
            history = list(getattr(config, _CONFIG_MARK, None) or [])
            if change > 0:
                history.append(record)
            elif record in history:
                history.remove(record)
            if history:
                setattr(config, _CONFIG_MARK, history)
            elif hasattr(config, _CONFIG_MARK):
                delattr(config, _CONFIG_MARK)

    def __enter__(self) -> "Resuscitation":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()

    def __repr__(self) -> str:
        state = "active" if self.active else "reverted"
        return f"Resuscitation(mode={self.mode!r}, layers={self.plan.edited_layers}, {state})"


def resuscitate(model: nn.Module, plan: ResuscitationPlan, mode: str = "weights", *,
                mlp_out: str | None = None, stack: bool = False) -> Resuscitation:
    """Apply ``plan`` to ``model`` and return a handle whose ``revert()`` undoes it exactly.

    Args:
        mode: "weights" scales the up-projection rows of gated MLPs (``up_proj``, or the second half of
            a fused ``gate_up_proj``), so the edit is saved by ``save_pretrained`` and trained on as in
            the paper. "hook" multiplies C by u in a forward pre-hook on the output projection
            (registered first, so instrumentations see the scaled C); it works for every architecture
            the locator supports, is not saved with the model, and trains differently (see module doc).
        mlp_out: the output-projection path template, if the plan was made with one.
        stack: apply on top of a resuscitation already on these layers (the multipliers compound).
            Without it a second plan on the same layers, in either mode, raises
            :class:`~kacq_hooks.errors.ResuscitationError`: a plan made from the edited model's
            statistics would otherwise lift neurons that were already lifted, silently.

    The edit is marked on the output-projection modules, and a weight edit also in
    ``model.config.kacq_resuscitation`` (so a model saved with ``save_pretrained`` and loaded again still
    refuses a second plan). ``copy.deepcopy`` of a resuscitated model copies the edited weights or the
    hooks, and the marks with them, so the copy is resuscitated too and refuses a second plan; it has no
    handle: revert the original before copying if the copy should be unedited. One exception: the hook
    that scales a mixture-of-experts layer's routed slots cannot travel, so a copy of a model edited that
    way refuses to run (:class:`~kacq_hooks.errors.StateError`) rather than run unedited; copy before
    editing, or use ``mode="weights"``.

    >>> handle = resuscitate(model, plan)          # doctest: +SKIP
    >>> handle.revert()                            # doctest: +SKIP
    """
    if mode not in _MODES:
        raise ConfigError(f"mode must be one of {_MODES}, not {mode!r}")
    if not isinstance(plan, ResuscitationPlan):
        raise ArgumentTypeError(f"plan must be a ResuscitationPlan (from kh.resuscitation_plan), not {type(plan).__name__}")
    sites = _matching_sites(model, plan, mlp_out)
    _refuse_stacking(model, plan, sites, stack)
    handle = Resuscitation(model, plan, mode, sites)
    by_layer = dict(zip(plan.layer_ids, sites))
    if mode == "weights":
        # every target is checked before any weight changes
        targets = [(edit, _row_targets(model, by_layer[edit.layer], edit)) for edit in plan.edits]
        with torch.no_grad():
            for edit, rows in targets:
                for param, index, axis, u in rows:
                    handle._saved.append(_SavedRows.scale(param, index, axis, u))
    else:
        for edit in plan.edits:
            site = by_layer[edit.layer]
            scale = torch.ones(site.d_ff, dtype=torch.float64)
            scale[edit.indices] = edit.multipliers
            if site.kind == "experts":
                _scale_experts(site, scale, handle._hooks)
            else:  # the scale holds no outside state: a copy of the model keeps the edit (see above)
                handle._hooks.pre(site.module, _ScaleInput(scale), prepend=True, travels=True)
    handle.active = True
    handle._mark(+1)
    log.info("resuscitated %d neurons in layers %s by %s (%d capped)", plan.selected, plan.edited_layers, mode,
             plan.capped)
    return handle


_MARK = "_kacq_resuscitations"
_CONFIG_MARK = "kacq_resuscitation"


def _refuse_stacking(model: nn.Module, plan: ResuscitationPlan, sites: list[Site], stack: bool) -> None:
    if stack:
        return
    edited = {edit.layer for edit in plan.edits}
    marked = [site.layer for site in sites if site.layer in edited and getattr(site.module, _MARK, 0) > 0]
    saved = getattr(getattr(model, "config", None), _CONFIG_MARK, None) or []
    saved_layers = sorted({layer for record in saved for layer in record.get("layers", ())} & edited)
    if marked or saved_layers:
        where = (f"layers {marked} carry an active resuscitation" if marked
                 else f"the model's config records a saved weight edit of layers {saved_layers}")
        raise ResuscitationError(
            f"this model is already resuscitated: {where}. Applying a plan again compounds the multipliers; "
            "revert() the first edit (or start from the unedited model), or pass resuscitate(..., stack=True) "
            "to apply it on top on purpose")


class _ScaleInput:
    """Forward pre-hook: C -> C * scale along the last dimension (the neurons)."""

    def __init__(self, scale: torch.Tensor):
        self.scale = scale
        self._cast: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def __call__(self, module, args):
        c = args[0]
        key = (c.dtype, c.device)
        if key not in self._cast:
            self._cast[key] = self.scale.to(device=c.device, dtype=c.dtype)
        return (c * self._cast[key], *args[1:])


def _matching_sites(model: nn.Module, plan: ResuscitationPlan, mlp_out: str | None) -> list[Site]:
    sites = find_sites(model, mlp_out)
    found = [(s.path, s.d_ff) for s in sites]
    if len(sites) != len(plan.cbars) or [s.d_ff for s in sites] != plan.d_ffs:
        raise ShapeError(f"the plan was made for {len(plan.cbars)} layers of widths {plan.d_ffs}, but this model "
                         f"has {len(sites)} coefficient sites of widths {[s.d_ff for s in sites]}: make the plan "
                         "from statistics measured on this model")
    if plan.paths is not None:
        for path, site in zip(plan.paths, sites):
            if not (path == site.path or site.path.endswith("." + path) or path.endswith("." + site.path)):
                raise ShapeError(f"the plan was made for sites {plan.paths}, but this model's are "
                                 f"{[p for p, _ in found]}; make the plan on this model (or pass the same mlp_out=)")
    if [s.layer for s in sites] != plan.layer_ids:
        raise ShapeError(f"the plan covers layers {plan.layer_ids}, this model's sites are layers "
                         f"{[s.layer for s in sites]}")
    return sites


def check_weight_edit(model: nn.Module, mlp_out: str | None = None) -> None:
    """Refuse, with a :class:`~kacq_hooks.errors.LocateError`, a model whose MLPs cannot take a weight edit."""
    for site in find_sites(model, mlp_out):
        _row_targets(model, site, None)


def parent_of(model: nn.Module, child: nn.Module) -> nn.Module:
    for module in model.modules():
        if any(c is child for c in module.children()):
            return module
    raise LocateError("the output projection is not inside this model")  # find_sites found it there: unreachable


def _up_rows(model: nn.Module, site: Site) -> tuple[list[nn.Parameter], int]:
    """The parameters whose rows produce the up half of C (weight, and bias if any), and the row offset."""
    return _up_rows_of(parent_of(model, site.module), site.path, site.d_ff)


def _up_rows_of(parent: nn.Module, path: str, d_ff: int) -> tuple[list[nn.Parameter], int]:
    """As :func:`_up_rows`, for the MLP ``parent`` whose output projection (at ``path``) takes C of width ``d_ff``."""
    children = dict(parent.named_children())
    if "gate_up_proj" in children:
        linear, offset, rows_needed, name = children["gate_up_proj"], d_ff, 2 * d_ff, "gate_up_proj"
    elif "up_proj" in children and "gate_proj" in children:
        linear, offset, rows_needed, name = children["up_proj"], 0, d_ff, "up_proj"
    else:
        raise LocateError(
            f"'{path}' belongs to a non-gated MLP ({type(parent).__name__} with {sorted(children)}): there "
            "C = act(fc x), which is not linear in a row of fc, so no weight edit scales C_i by exactly u_i. "
            "Use resuscitate(model, plan, mode='hook'), which multiplies C in a hook on the output projection")
    weight = getattr(linear, "weight", None)
    if not isinstance(linear, nn.Linear) or not isinstance(weight, torch.Tensor) or weight.dim() != 2 \
            or weight.shape[0] != rows_needed:
        raise LocateError(f"{type(parent).__name__}.{name} is {type(linear).__name__} with weight "
                          f"{None if weight is None else tuple(weight.shape)}; a weight edit needs an nn.Linear with "
                          f"{rows_needed} output rows. Use mode='hook'")
    if not weight.dtype.is_floating_point:
        raise LocateError(f"{type(parent).__name__}.{name} has {weight.dtype} weights (quantized?), which cannot "
                          "be scaled row by row. Use mode='hook'")
    params = [weight] + ([linear.bias] if isinstance(linear.bias, torch.Tensor) else [])
    return params, offset


class _SavedRows:
    """The pre-edit values of ``param[index]`` (rows along ``axis``), to write back bit-exactly."""

    def __init__(self, param: torch.Tensor, index: tuple, original: torch.Tensor, edited_sum: float):
        self.param, self.index, self.original, self.edited_sum = param, index, original, edited_sum

    @classmethod
    def scale(cls, param: torch.Tensor, index: tuple, axis: int, u: torch.Tensor) -> "_SavedRows":
        """Multiply ``param[index]`` by ``u`` along ``axis`` (computed in float64, then cast back)."""
        original = param[index]
        shape = [1] * original.dim()
        shape[axis] = -1
        edited = (original.double() * u.to(original.device, torch.float64).view(shape)).to(param.dtype)
        param[index] = edited
        return cls(param, index, original.cpu(), float(edited.double().sum()))

    def changed(self) -> bool:
        return float(self.param[self.index].double().sum()) != self.edited_sum

    def restore(self) -> None:
        self.param[self.index] = self.original.to(self.param.device)


def _row_targets(model: nn.Module, site: Site, edit: LayerEdit | None) -> list[tuple]:
    """(parameter, index, axis, u) for every slice that scales the edit's slots; all checks, no writes.

    ``edit`` None only checks that the site can take a weight edit.
    """
    indices = edit.indices if edit is not None else torch.zeros(0, dtype=torch.long)
    u = edit.multipliers if edit is not None else torch.zeros(0, dtype=torch.float64)
    if site.kind != "experts":
        params, offset = _up_rows(model, site)
        return [(p, (indices + offset,), 0, u) for p in params]
    layer = site.experts_layer
    m = layer.d_ff
    out = []
    for expert in range(layer.experts):
        chosen = (indices >= expert * m) & (indices < (expert + 1) * m)
        if not (chosen.any() or edit is None):
            continue
        if layer.layout == "module_list":  # one MLP per expert: its own up rows
            params, offset = _up_rows_of(layer.module[expert], f"{layer.path}.{expert}", m)
            out += [(p, (indices[chosen] - expert * m + offset,), 0, u[chosen]) for p in params]
        elif expert == 0 or edit is not None:
            for rows in expert_up_rows(layer, expert, indices[chosen] - expert * m):
                out.append((rows.parameter, rows.index, rows.axis, u[chosen]))
    start = layer.experts * m
    for shared in layer.shared:
        chosen = (indices >= start) & (indices < start + shared.d_ff)
        if chosen.any() or edit is None:
            params, offset = _up_rows_of(shared.module, shared.path, shared.d_ff)
            out += [(p, (indices[chosen] - start + offset,), 0, u[chosen]) for p in params]
        start += shared.d_ff
    return out


class _ScaleSlots:
    """A replacing :class:`ExpertsTap` callback: each routed row's C times its expert's slot multipliers."""

    def __init__(self, scale: torch.Tensor):
        self.scale = scale  # float64 [E, m]
        self._cast: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def __call__(self, expert_ids, token_index, weight, c):
        key = (c.dtype, c.device)
        if key not in self._cast:
            self._cast[key] = self.scale.to(device=c.device, dtype=c.dtype)
        return c * self._cast[key][expert_ids]


def _scale_experts(site: Site, scale: torch.Tensor, hooks: HookSet) -> None:
    """Hooks (owned by ``hooks``) that multiply an experts site's slots by ``scale`` (float64 [d_ff]) where C is
    computed."""
    layer = site.experts_layer
    routed = layer.experts * layer.d_ff
    if bool((scale[:routed] != 1).any()):
        hooks.tap(ExpertsTap(layer, _ScaleSlots(scale[:routed].view(layer.experts, layer.d_ff)), replaces=True))
    start = routed
    for shared in layer.shared:
        part = scale[start:start + shared.d_ff]
        if bool((part != 1).any()):  # registered first, so a SharedTap sees the scaled C
            hooks.pre(shared.down, _ScaleInput(part), prepend=True, travels=True)
        start += shared.d_ff
