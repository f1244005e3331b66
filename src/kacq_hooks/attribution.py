"""Where a fact lives: per-probe scores of every FFN memory slot (layer, neuron) for the target's log probability.

A slot is one neuron of one layer's memory coefficients C (the input of the MLP output projection, at
every site :func:`kacq_hooks.find_sites` finds). For a probe ``(input, target)`` scored as the fact
tracker scores it, ``logp`` is the target span's log probability ("mean" per target token by default,
or "sum"/"first"), and a slot's score says how much of it that slot carries:

- ``"grad_x_act"``: sum over the chosen positions of ``(C - b) * d logp / dC`` (b = 0 by default): one
  forward and one backward per probe batch;
- ``"integrated_gradients"``: every slot's coefficient, at the chosen positions, moves from the baseline
  ``b`` to its own value along ``C(α) = b + α (C - b)``; later layers see what earlier ones changed. A
  slot's score is the quadrature over ``steps`` values of α of ``(C - b) * d logp / dC``, the steps run
  as one batch, so the scores of a probe sum to ``logp(clean) - logp(every slot at its baseline)``
  (exactly in the limit; the midpoint rule's error falls as 1/steps²);
- ``"ablation"``: ``logp(clean) - logp(this one slot at its baseline)``, one row per slot, batched.
  :func:`ablate` gives the exact change for a *set* of slots (per probe or shared).

The positions are, by default, those whose next-token prediction is a target token (the last input
token and every target token but the last); ``positions="all"`` takes every unpadded position.
Padding, the target span and unclean targets are handled by the fact tracker's own encoding and
batching. The model is run in eval mode with its parameters frozen (their ``requires_grad`` flags and
``.grad`` left exactly as they were), the RNG state restored, every module's training flag restored,
and every kacq_hooks instrumentation of the model paused.

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from kacq_hooks.corpus import train_bpe_tokenizer
>>> tokenizer = train_bpe_tokenizer(["The fox jumps over the lazy dog."] * 20, vocab_size=300)
>>> model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
...                                      num_hidden_layers=2, num_attention_heads=4))
>>> result = attribute(model, tokenizer, [("The fox jumps over the", "lazy dog")])
>>> result.tensor().shape, result.labels
(torch.Size([1, 2, 64]), ['decoder.layer_0', 'decoder.layer_1'])
>>> best = result.top_k(5)[0]
>>> len(best), best[0].label in result.labels, best[0].score >= best[-1].score
(5, True, True)
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

from ._hooks import FunctionHook, HookSet
from .errors import AttributionError, ShapeError
from .facts.records import PROBE_KINDS, FactRecord, FactSet
from .facts.scoring import ModelCaller, ProbeBatch, model_device, scoring_mode, target_log_probs
from .facts.tracker import FactTracker
from .locate import Site, find_sites
from .measuring import as_model_inputs, evaluation_mode

logger = logging.getLogger(__name__)

METHODS = ("grad_x_act", "integrated_gradients", "ablation")
RULES = ("midpoint", "riemann", "trapezoid")


class Slot(NamedTuple):
    """One memory slot: ``layer`` indexes the sites (the model's layer number for a decoder-only model)."""

    layer: int
    neuron: int


class SlotScore(NamedTuple):
    """A slot with its score and the label of its site (e.g. ``"decoder.layer_3"``)."""

    layer: int
    neuron: int
    score: float
    label: str


@dataclass
class Attribution:
    """Per probe, the score of every slot; fp32 tensors on the CPU.

    ``scores[l]`` is ``[n_probes, d_ff_l]`` for site ``l``; ``logp`` the clean target log probability per
    probe; ``baseline_logp`` (integrated gradients) its value with every slot at the baseline, so that
    ``totals() ≈ logp - baseline_logp``. Probes whose target is not a clean suffix score NaN under the
    ``unclean_targets="nan"`` policy.
    """

    method: str
    scores: list[torch.Tensor]
    sites: list[Site]
    probes: list
    logp: torch.Tensor
    baseline_logp: torch.Tensor | None = None
    reduction: str = "mean"
    steps: int | None = None

    @property
    def labels(self) -> list[str]:
        return [site.label for site in self.sites]

    @property
    def n_probes(self) -> int:
        return int(self.logp.numel())

    def tensor(self) -> torch.Tensor:
        """All scores as ``[n_probes, n_layers, d_ff]`` (every layer must have the same width; else use ``scores``)."""
        widths = {s.shape[1] for s in self.scores}
        if len(widths) != 1:
            raise ShapeError(f"the layers have different widths {sorted(widths)}: read the per-layer list "
                             "Attribution.scores instead of one tensor")
        return torch.stack(self.scores, dim=1)

    def layer_totals(self) -> torch.Tensor:
        """``[n_probes, n_layers]``: each layer's summed score."""
        return torch.stack([s.sum(1) for s in self.scores], dim=1)

    def totals(self) -> torch.Tensor:
        """``[n_probes]``: the summed score of every slot (integrated gradients: ≈ logp - baseline_logp)."""
        return self.layer_totals().sum(1)

    def flat(self) -> torch.Tensor:
        """``[n_probes, total slots]``: the layers' scores side by side (slot offsets in site order)."""
        return torch.cat(self.scores, dim=1)

    def top_slots(self, k: int, by: Literal["score", "abs"] = "score") -> torch.Tensor:
        """Long ``[n_probes, k, 2]`` of (layer, neuron) of each probe's ``k`` highest-scoring slots, best first.

        ``by="abs"`` ranks by |score| (slots that carry the fact either way). Rows of NaN probes are -1.
        """
        flat = self.flat()
        if not 1 <= k <= flat.shape[1]:
            raise AttributionError(f"k must be between 1 and the {flat.shape[1]} slots, got {k}")
        if by not in ("score", "abs"):
            raise AttributionError(f"by must be 'score' or 'abs', not {by!r}")
        key = flat.abs() if by == "abs" else flat
        nan_rows = torch.isnan(key).any(1)
        index = key.nan_to_num(-math.inf).topk(k, dim=1).indices
        offsets = torch.tensor([0, *[s.shape[1] for s in self.scores]]).cumsum(0)
        layer = torch.searchsorted(offsets[1:], index, right=True)
        out = torch.stack([layer, index - offsets[layer]], dim=-1)
        out[nan_rows] = -1
        return out

    def top_k(self, k: int = 10, by: Literal["score", "abs"] = "score") -> list[list[SlotScore]]:
        """Per probe, its ``k`` best slots with their scores and labels (empty for a NaN probe)."""
        slots = self.top_slots(k, by)
        result = []
        for row, probe_slots in enumerate(slots.tolist()):
            result.append([SlotScore(layer, neuron, float(self.scores[layer][row, neuron]), self.sites[layer].label)
                           for layer, neuron in probe_slots if layer >= 0])
        return result


@dataclass
class Ablation:
    """``clean`` and ``ablated`` target log probabilities per probe, and ``delta = ablated - clean``."""

    clean: torch.Tensor
    ablated: torch.Tensor
    probes: list
    reduction: str = "mean"

    @property
    def delta(self) -> torch.Tensor:
        return self.ablated - self.clean


# -- public functions -------------------------------------------------------------------------------------------

def attribute(
    model: nn.Module,
    tokenizer,
    probes,
    method: str = "grad_x_act",
    *,
    steps: int = 64,
    rule: str = "midpoint",
    baseline: str | Sequence[torch.Tensor] = "zero",
    positions: Literal["predicting", "all"] = "predicting",
    reduction: str = "mean",
    kinds: Sequence[str] = PROBE_KINDS,
    batch_size: int = 32,
    rows_per_pass: int = 256,
    padding_side: Literal["left", "right"] = "left",
    unclean_targets: str = "extend",
    mlp_out: str | None = None,
) -> Attribution:
    """Score every FFN slot of ``model`` for each probe's target log probability (see the module docstring).

    Args:
        probes: a :class:`~kacq_hooks.facts.FactTracker` (its encoding and batching are used), a
            :class:`~kacq_hooks.facts.FactSet` or list of fact records (probes of ``kinds``, in the
            tracker's order), or a list of ``(input, target)`` pairs.
        method: "grad_x_act", "integrated_gradients" or "ablation".
        steps: integrated-gradients steps (values of α), run batched.
        rule: the quadrature over α: "midpoint" (α = (i + ½)/steps), "riemann" (α = i/steps, i = 1..steps,
            as Dai et al.) or "trapezoid" (steps + 1 points).
        baseline: "zero", or one ``[d_ff]`` tensor per site, e.g. :func:`mean_baseline` of calibration data.
        positions: "predicting" (the positions whose prediction is a target token) or "all" unpadded ones.
        reduction: the log probability attributed: "mean" per target token, "sum", or "first" token.
        rows_per_pass: at most this many rows (probes x α values, or probes x ablated slots) per forward.
    """
    if method not in METHODS:
        raise AttributionError(f"unknown method {method!r}; expected one of {METHODS}")
    if method != "ablation" and torch.is_inference_mode_enabled():  # enable_grad cannot undo inference mode
        raise AttributionError(f"{method} needs autograd, which torch.inference_mode() turns off: call attribute() "
                               "outside inference mode (torch.no_grad() around it is fine), or use method='ablation'")
    tracker = as_tracker(model, tokenizer, probes, kinds, batch_size, padding_side, unclean_targets)
    run = _Runner(model, tracker, baseline, positions, reduction, mlp_out)
    n = len(tracker.encoded)
    scores = [torch.full((n, site.d_ff), math.nan) for site in run.sites]
    logp = torch.full((n,), math.nan)
    baseline_logp = torch.full((n,), math.nan) if method == "integrated_gradients" else None
    if method != "ablation" and rows_per_pass < 1:
        raise AttributionError(f"rows_per_pass must be >= 1, got {rows_per_pass}")
    alphas, weights = _quadrature(steps, rule) if method == "integrated_gradients" else ([1.0], [1.0])
    with run.active():
        for batch in tracker.batches():
            logp[batch.positions] = run.logp(batch)
            if method == "ablation":
                per_site = run.single_slot_ablation(batch, rows_per_pass)
            else:
                per_site = run.path_scores(batch, alphas, weights, rows_per_pass)
                if baseline_logp is not None:
                    baseline_logp[batch.positions] = run.logp(batch, ablate_all=True)
            for layer, values in enumerate(per_site):
                scores[layer][batch.positions] = values
    _nan_unclean(tracker, scores, logp, baseline_logp)
    return Attribution(method, scores, run.sites, list(tracker.probes), logp, baseline_logp, reduction,
                       steps if method == "integrated_gradients" else None)


def ablate(
    model: nn.Module,
    tokenizer,
    probes,
    slots,
    *,
    baseline: str | Sequence[torch.Tensor] = "zero",
    positions: Literal["predicting", "all"] = "predicting",
    reduction: str = "mean",
    kinds: Sequence[str] = PROBE_KINDS,
    batch_size: int = 32,
    padding_side: Literal["left", "right"] = "left",
    unclean_targets: str = "extend",
    mlp_out: str | None = None,
) -> Ablation:
    """The exact target log probability of each probe with ``slots`` set to the baseline, against the clean one.

    ``slots`` is one collection of (layer, neuron) pairs for every probe, a list of such collections
    with one per probe (e.g. ``result.top_slots(k)``: a ``[n_probes, k, 2]`` tensor; -1 rows are
    skipped), or "all" for every slot of every site.
    """
    tracker = as_tracker(model, tokenizer, probes, kinds, batch_size, padding_side, unclean_targets)
    run = _Runner(model, tracker, baseline, positions, reduction, mlp_out)
    n = len(tracker.encoded)
    masks = None if isinstance(slots, str) and slots == "all" else run.slot_masks(slots, n)
    clean, ablated = torch.full((n,), math.nan), torch.full((n,), math.nan)
    with run.active():
        for batch in tracker.batches():
            clean[batch.positions] = run.logp(batch)
            if masks is None:
                ablated[batch.positions] = run.logp(batch, ablate_all=True)
            else:
                ablated[batch.positions] = run.logp(batch, ablate=[m[batch.positions] for m in masks])
    _nan_unclean(tracker, [], clean, ablated)
    return Ablation(clean, ablated, list(tracker.probes), reduction)


def mean_baseline(model: nn.Module, batches: Iterable, *, mlp_out: str | None = None) -> list[torch.Tensor]:
    """Each slot's mean coefficient (signed, over unpadded tokens) on calibration ``batches``: fp32 ``[d_ff]`` per site.

    ``batches`` are token ids ``[N, T]`` or mappings with ``input_ids`` (and ``attention_mask``), as
    :func:`kacq_hooks.measure` takes them; the model runs in evaluation mode, instrumentations paused.
    """
    sites = attributable_sites(model, mlp_out)
    device = model_device(model)
    sums = [torch.zeros(site.d_ff, dtype=torch.float64) for site in sites]
    tokens = 0
    current: dict = {}

    def hook(index, module, args):
        c = args[0].detach()
        mask = current["mask"]
        rows = c.reshape(-1, c.shape[-1])
        if mask is not None:
            if mask.numel() != rows.shape[0]:
                raise ShapeError(f"coefficients of shape {tuple(c.shape)} do not fit the attention mask "
                                 f"{tuple(current['shape'])}")
            rows = rows[mask.reshape(-1).bool().to(rows.device)]
        sums[index] += rows.double().sum(0).cpu()

    with evaluation_mode(model), _hooks(sites, hook):
        for batch in batches:
            inputs = {k: v.to(device) for k, v in as_model_inputs(batch).items()}
            mask = inputs.get("attention_mask")
            current.update(mask=mask, shape=inputs["input_ids"].shape)
            model(**inputs)
            tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
    if not tokens:
        raise AttributionError("mean_baseline got no tokens: pass at least one non-empty calibration batch")
    return [(s / tokens).float() for s in sums]


# -- the machinery ------------------------------------------------------------------------------------------------

def attributable_sites(model: nn.Module, mlp_out: str | None = None) -> list[Site]:
    """The model's sites (:func:`kacq_hooks.find_sites`), refused when one is a mixture-of-experts layer.

    The hooks here scale and ablate a site's module input as C ``[..., d_ff]``; an experts site's
    module input is the hidden state, and its memory slots are the experts' coefficients, which
    attribution does not reach yet.
    """
    sites = find_sites(model, mlp_out)
    experts = [site.label for site in sites if site.kind == "experts"]
    if experts:
        raise AttributionError(f"attribution of mixture-of-experts slots is not supported yet; the sites {experts} "
                               "are experts layers. Attribute a dense model, or pass mlp_out= naming dense MLP "
                               "output projections only")
    return sites


def _is_pairs(probes) -> bool:
    return isinstance(probes, (list, tuple)) and bool(probes) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in probes)


def as_tracker(model, tokenizer, probes, kinds, batch_size, padding_side, unclean_targets) -> FactTracker:
    """A FactTracker holding the probes' encoding and padded batches (its scoring is not used)."""
    if isinstance(probes, FactTracker):
        if probes.model is not model:
            raise AttributionError("the FactTracker given as probes scores another model object")
        return probes
    if _is_pairs(probes):  # one single-probe record per pair, so the tracker's encoding checks apply
        records = [FactRecord("", [i], [t], [], [], [], []) for i, t in probes]
        return FactTracker(model, tokenizer, FactSet(records), ("mem",), batch_size=batch_size,
                           padding_side=padding_side, unclean_targets=unclean_targets)
    if isinstance(probes, FactSet) or (isinstance(probes, (list, tuple)) and probes
                                       and all(isinstance(p, FactRecord) for p in probes)):
        return FactTracker(model, tokenizer, probes, kinds, batch_size=batch_size, padding_side=padding_side,
                           unclean_targets=unclean_targets)
    raise AttributionError("probes must be a FactTracker, a FactSet or list of FactRecords, or a non-empty list of "
                           "(input, target) string pairs")


def _nan_unclean(tracker: FactTracker, scores, *per_probe) -> None:
    if tracker.unclean_targets != "nan" or not tracker.tokenization.unclean:
        return
    bad = tracker.tokenization.unclean
    for tensor in [*scores, *per_probe]:
        if tensor is not None:
            tensor[bad] = math.nan


def _quadrature(steps: int, rule: str) -> tuple[list[float], list[float]]:
    if not isinstance(steps, int) or steps < 1:
        raise AttributionError(f"steps must be a positive integer, got {steps!r}")
    if rule == "midpoint":
        return [(i + 0.5) / steps for i in range(steps)], [1.0 / steps] * steps
    if rule == "riemann":
        return [i / steps for i in range(1, steps + 1)], [1.0 / steps] * steps
    if rule == "trapezoid":
        weights = [1.0 / steps] * (steps + 1)
        weights[0] = weights[-1] = 0.5 / steps
        return [i / steps for i in range(steps + 1)], weights
    raise AttributionError(f"unknown rule {rule!r}; expected one of {RULES}")


@contextlib.contextmanager
def _hooks(sites: list[Site], hook) -> Iterator[None]:
    """``hook(index, module, args)`` as a forward pre-hook on every site, inert in a copy of the model."""
    with HookSet() as hooks:
        for index, site in enumerate(sites):
            hooks.pre(site.module, FunctionHook(hook, index))
        yield


def _repeat(batch: ProbeBatch, times: int) -> ProbeBatch:
    """The batch's rows ``times`` over (row r of the result is row r % B of the batch)."""
    if times == 1:
        return batch
    return ProbeBatch(batch.positions.repeat(times), batch.input_ids.repeat(times, 1),
                      batch.attention_mask.repeat(times, 1), batch.target_start.repeat(times),
                      batch.target_end.repeat(times))


class _Runner:
    """Runs probe batches with a forward pre-hook on every site that can rescale, ablate and keep C."""

    def __init__(self, model, tracker: FactTracker, baseline, positions, reduction, mlp_out):
        if positions not in ("predicting", "all"):
            raise AttributionError(f"positions must be 'predicting' or 'all', not {positions!r}")
        if reduction not in ("mean", "sum", "first"):
            raise AttributionError(f"reduction must be 'mean', 'sum' or 'first', not {reduction!r}")
        self.model = model
        self.sites = attributable_sites(model, mlp_out)
        self.caller = ModelCaller(model, trim_logits=True)
        self.device = model_device(model)
        self.positions = positions
        self.reduction = reduction
        self.baseline = self._baselines(baseline)
        self.plan: dict = {}

    def _baselines(self, baseline) -> list[torch.Tensor | None]:
        if isinstance(baseline, str):
            if baseline != "zero":
                raise AttributionError(f"baseline must be 'zero' or one [d_ff] tensor per site (see mean_baseline), "
                                       f"not {baseline!r}")
            return [None] * len(self.sites)
        baseline = list(baseline)
        if len(baseline) != len(self.sites) or any(
                torch.as_tensor(b).shape != (site.d_ff,) for b, site in zip(baseline, self.sites)):
            raise AttributionError(f"baseline needs one [d_ff] tensor per site, widths {[s.d_ff for s in self.sites]}; "
                                   f"got shapes {[tuple(torch.as_tensor(b).shape) for b in baseline]}")
        return [torch.as_tensor(b, dtype=torch.float32) for b in baseline]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Scoring mode (eval, RNG, pauses), parameters frozen and the site hooks on; all undone after."""
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        with scoring_mode(self.model), _hooks(self.sites, self._hook):
            try:
                for p, _ in flags:
                    p.requires_grad_(False)
                yield
            finally:
                for p, flag in flags:
                    p.requires_grad_(flag)
                self.plan = {}

    # one forward

    def _mask(self, batch: ProbeBatch) -> torch.Tensor:
        if self.positions == "all":
            return batch.attention_mask.bool()
        columns = torch.arange(batch.input_ids.shape[1])
        return (columns >= (batch.target_start - 1)[:, None]) & (columns < (batch.target_end - 1)[:, None])

    def _forward(self, batch: ProbeBatch, *, alpha=None, ablate=None, ablate_all=False, keep=False) -> torch.Tensor:
        self.plan = dict(mask=self._mask(batch).to(self.device), alpha=alpha, ablate=ablate, ablate_all=ablate_all,
                         keep=keep, kept={})
        logits, offset = self.caller.logits(batch, self.device)
        return target_log_probs(logits, offset, batch)[self.reduction]

    def _hook(self, index: int, module, args):
        plan = self.plan
        if not plan:
            return None
        c = args[0]
        mask = plan["mask"]
        rows, width = mask.shape
        if c.numel() != rows * width * c.shape[-1]:
            raise ShapeError(f"coefficients of shape {tuple(c.shape)} at {self.sites[index].path} do not cover the "
                             f"{rows} x {width} probe positions")
        view = c.reshape(rows, width, c.shape[-1])
        where = mask[:, :, None]
        b = self.baseline[index]
        b = torch.zeros((), dtype=c.dtype, device=c.device) if b is None else b.to(c.device, c.dtype)
        new = view
        if plan["alpha"] is not None:
            alpha = plan["alpha"].to(c.device, c.dtype)[:, None, None]
            new = torch.where(where, b + alpha * (view - b), view)
        if plan["ablate_all"]:
            new = torch.where(where, b.expand_as(view), new)
        elif plan["ablate"] is not None and plan["ablate"][index] is not None:
            chosen = where & plan["ablate"][index].to(c.device)[:, None, :]
            new = torch.where(chosen, b.expand_as(view), new)
        fed = c if new is view else new.reshape(c.shape)
        if plan["keep"]:
            if not fed.requires_grad:  # nothing upstream needs grad (frozen parameters): start the graph here
                fed = fed.detach().requires_grad_()
            # the gradient is taken at the very tensor the projection consumes (a reshape of it is a dead end)
            plan["kept"][index] = (fed, ((view.detach().float() - b.float()) * where))
        return None if fed is c else (fed, *args[1:])

    # what attribute() and ablate() ask for

    def logp(self, batch: ProbeBatch, **intervention) -> torch.Tensor:
        with torch.no_grad():
            return self._forward(batch, **intervention).cpu()

    def path_scores(self, batch: ProbeBatch, alphas, weights, rows_per_pass) -> list[torch.Tensor]:
        """Σ_α w_α (C(α) - b) dlogp/dC(α) over the chosen positions, per row and slot, α batched."""
        size = len(batch.positions)
        per_pass = max(1, rows_per_pass // size)
        totals = [torch.zeros(size, site.d_ff) for site in self.sites]
        for first in range(0, len(alphas), per_pass):
            chunk = alphas[first:first + per_pass]
            wide = _repeat(batch, len(chunk))
            alpha = None if chunk == [1.0] else torch.tensor(chunk).repeat_interleave(size)
            row_weight = torch.tensor(weights[first:first + per_pass]).repeat_interleave(size).to(self.device)
            with torch.enable_grad():
                logp = self._forward(wide, alpha=alpha, keep=True)
                kept = self.plan["kept"]
                if len(kept) != len(self.sites):
                    raise AttributionError(f"only {len(kept)} of {len(self.sites)} sites saw the probe forward; "
                                    "attribution needs every site to run once per forward")
                order = sorted(kept)
                grads = torch.autograd.grad((logp * row_weight).sum(), [kept[i][0] for i in order], allow_unused=True)
            for i, grad in zip(order, grads):
                if grad is None:  # this site does not reach the target: every score is 0
                    continue
                contribution = (grad.reshape(kept[i][1].shape).float() * kept[i][1]).sum(1)  # [rows, d_ff]
                totals[i] += contribution.reshape(len(chunk), size, -1).sum(0).cpu()
            self.plan = {}
        return totals

    def single_slot_ablation(self, batch: ProbeBatch, rows_per_pass) -> list[torch.Tensor]:
        """logp(clean) - logp(one slot at the baseline), for every slot, slots batched."""
        size = len(batch.positions)
        clean = self.logp(batch)
        slots = [(layer, neuron) for layer, site in enumerate(self.sites) for neuron in range(site.d_ff)]
        per_pass = max(1, rows_per_pass // size)
        out = [torch.zeros(size, site.d_ff) for site in self.sites]
        for first in range(0, len(slots), per_pass):
            chunk = slots[first:first + per_pass]
            masks = [torch.zeros(len(chunk) * size, site.d_ff, dtype=torch.bool) for site in self.sites]
            for k, (layer, neuron) in enumerate(chunk):
                masks[layer][k * size:(k + 1) * size, neuron] = True
            ablated = self.logp(_repeat(batch, len(chunk)), ablate=masks).reshape(len(chunk), size)
            for k, (layer, neuron) in enumerate(chunk):
                out[layer][:, neuron] = clean - ablated[k]
        return out

    def slot_masks(self, slots, n: int) -> list[torch.Tensor]:
        """Per site, bool ``[n_probes, d_ff]``: which slots each probe ablates."""
        if isinstance(slots, torch.Tensor):
            slots = slots.tolist()
        slots = list(slots)
        shared = not slots or all(_is_slot(s) for s in slots)
        per_probe = [slots] * n if shared else slots
        if len(per_probe) != n:
            raise AttributionError(f"slots has {len(per_probe)} entries for {n} probes: give one collection of "
                                   "(layer, neuron) pairs for all probes, or one per probe")
        masks = [torch.zeros(n, site.d_ff, dtype=torch.bool) for site in self.sites]
        for row, chosen in enumerate(per_probe):
            for slot in chosen:
                if not _is_slot(slot):
                    raise AttributionError(f"a slot is a (layer, neuron) pair, not {slot!r}")
                layer, neuron = int(slot[0]), int(slot[1])
                if layer < 0 and neuron < 0:  # the padding of top_slots() for a NaN probe
                    continue
                if not (0 <= layer < len(self.sites) and 0 <= neuron < self.sites[layer].d_ff):
                    raise AttributionError(f"slot ({layer}, {neuron}) is outside the {len(self.sites)} sites of widths "
                                           f"{[s.d_ff for s in self.sites]}")
                masks[layer][row, neuron] = True
        return masks


def _is_slot(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(x, int) for x in value)


__all__ = ["Ablation", "Attribution", "AttributionError", "METHODS", "Slot", "SlotScore", "ablate", "attributable_sites",
           "attribute", "mean_baseline"]
