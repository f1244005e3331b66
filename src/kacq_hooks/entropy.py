"""Knowledge entropy (Kim et al., ICLR 2025): the entropy of each layer's averaged coefficient distribution.

For layer l with m neurons: p_l = c̄_l / sum(c̄_l), H_l = -sum p_l ln p_l, and H = sum_l H_l, whose
maximum is L ln m. It is the entropy *of the averaged* distribution, not an average of per-token
entropies. Computed in float64 from fp32 running sums: the signal is ~1e-3 relative.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import NoTokensError, ShapeError
from .stats import CoefficientStats

log = logging.getLogger(__name__)


class Measurement:
    """What :func:`knowledge_entropy` reads from an object that measured statistics (an
    :class:`~kacq_hooks.Instrumentation`, a :class:`~kacq_hooks.saving.SavedStats`): its ``stats``, its
    layers' ``labels`` (None: none known), :meth:`no_tokens_reason`, the weighting it was measured with
    (:meth:`entropy_weighting`) and whether its layers are whole (:meth:`check_whole_layers`), so the function
    gives what the object's own ``knowledge_entropy()`` gives."""

    stats: CoefficientStats

    @property
    def labels(self) -> list[str] | None:
        return None

    def no_tokens_reason(self) -> str | None:
        """Why no token was recorded although the model ran (None: that is not the case, or not known)."""
        return None

    def entropy_weighting(self, weighting: str | None) -> str:
        """The weighting an entropy of these statistics uses: ``weighting`` if given, else the measured one
        (a ConfigError where the statistics cannot be read that way)."""
        return weighting or "token"

    def check_whole_layers(self) -> None:
        """Refuse statistics that hold only part of a layer's neurons (a tensor-parallel rank's slice)."""


@dataclass(frozen=True)
class KnowledgeEntropy:
    """Per-layer and total knowledge entropy, in nats.

    >>> ke = knowledge_entropy([torch.ones(8), torch.tensor([1.0, 0, 0, 0])])
    >>> round(ke.total, 4), round(ke.max_total, 4), ke.per_layer[1]
    (2.0794, 3.4657, 0.0)
    """

    per_layer: list[float]
    max_per_layer: list[float]
    weighting: str = "token"
    tokens: int | None = None
    nonfinite_per_layer: list[int] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    @property
    def by_label(self) -> dict[str, float]:
        """Per-layer entropy keyed by the model's layer labels (e.g. ``decoder.layer_3``)."""
        labels = self.labels or [f"layer_{i}" for i in range(len(self.per_layer))]
        return dict(zip(labels, self.per_layer))

    @property
    def total(self) -> float:
        return float(sum(self.per_layer))

    @property
    def max_total(self) -> float:
        """L ln m for equal widths: the entropy of uniform use of every neuron."""
        return float(sum(self.max_per_layer))

    @property
    def normalized_per_layer(self) -> list[float]:
        return [h / hmax for h, hmax in zip(self.per_layer, self.max_per_layer)]

    def to_dict(self) -> dict:
        return {"total": self.total, "max_total": self.max_total, "per_layer": list(self.per_layer),
                "max_per_layer": list(self.max_per_layer), "weighting": self.weighting, "tokens": self.tokens,
                "nonfinite_per_layer": list(self.nonfinite_per_layer), "labels": list(self.labels)}


def entropy(mean_abs: torch.Tensor) -> float:
    """-sum p ln p of the distribution proportional to ``mean_abs`` (non-negative), with 0 ln 0 = 0."""
    c = mean_abs.detach().to(torch.float64).flatten()
    if c.numel() == 0:
        raise ShapeError("cannot take the entropy of an empty coefficient vector")
    if bool((c < 0).any()) or not bool(torch.isfinite(c).all()):
        raise ShapeError("mean |C| must be finite and non-negative; non-finite coefficients are excluded by the "
                        "statistics, so this vector did not come from them")
    total = c.sum()
    if total <= 0:
        raise NoTokensError("every mean |C| is zero: no tokens were recorded for this layer, or the layer is dead")
    p = c / total
    return float(-(p * torch.log(p.clamp_min(torch.finfo(torch.float64).tiny))).sum()) + 0.0  # never -0.0


def knowledge_entropy(source, weighting: str | None = None,
                      labels: Sequence[str] | None = None) -> KnowledgeEntropy:
    """Knowledge entropy of a :class:`Measurement` (an Instrumentation, saved statistics), a CoefficientStats,
    or a list of per-layer c̄ vectors.

    ``weighting`` None: a Measurement's own (the one it was measured with), else "token"."""
    if isinstance(source, Measurement):
        source.check_whole_layers()  # a rank's slice of a layer has no entropy of the layer's
        weighting = source.entropy_weighting(weighting)
        labels = labels if labels is not None else source.labels
        reason = source.no_tokens_reason()  # e.g. an Instrumentation counting by labels that selected nothing
        if reason:
            raise NoTokensError(reason)
        source = source.stats
    weighting = weighting or "token"
    tokens, nonfinite = None, []
    if isinstance(source, CoefficientStats):
        tokens = [int(s.tokens) for s in source]
        if not any(tokens):
            raise NoTokensError("no tokens have been recorded: run forward passes on the instrumented model "
                            "(outside inst.pause()) before asking for knowledge entropy")
        nonfinite = source.nonfinite_per_layer()
        bad = {i: n for i, n in enumerate(nonfinite) if n}
        if bad:
            log.warning("non-finite coefficients were seen and left out of the entropy (layer: count): %s", bad)
        cbars = [s.mean_abs(weighting) for s in source]
        for i, (s, c) in enumerate(zip(source, cbars)):
            if nonfinite[i] and not bool((c > 0).any()):
                name = labels[i] if labels else f"layer {i}"
                raise NoTokensError(f"{name}: every recorded coefficient was non-finite ({nonfinite[i]} NaN/Inf values "
                                "counted), so it has no knowledge entropy; check the model's weights and inputs "
                                "(a diverged run, or fp16 overflow)")
        tokens = max(tokens)
    elif isinstance(source, Sequence) and all(isinstance(c, torch.Tensor) for c in source):
        cbars = list(source)
    else:
        raise ShapeError(f"knowledge_entropy takes an Instrumentation, SavedStats, CoefficientStats or a list of tensors, "
                        f"not {type(source).__name__}")
    return KnowledgeEntropy(
        per_layer=[entropy(c) for c in cbars],
        max_per_layer=[math.log(c.numel()) for c in cbars],
        weighting=weighting,
        tokens=tokens,
        nonfinite_per_layer=nonfinite,
        labels=list(labels) if labels is not None else [],
    )


@dataclass(frozen=True)
class ExpertsEntropy:
    """Knowledge entropy of one mixture-of-experts layer, split by the chain rule.

    ``total`` is the entropy over all E x m routed slots and the shared slots (the layer's value in
    :class:`KnowledgeEntropy`); it equals ``which_expert + within_experts``: the entropy H(P) of the
    share of coefficient mass each expert carries (the shared experts' slots count as one more group),
    plus the share-weighted entropy inside each group. ``per_expert[e]`` is the entropy of expert e's
    mean |C| over the tokens routed to it (unweighted by the routing weight) and ``load[e]`` their
    number; an expert that saw no token has ``per_expert[e] = None`` and load 0.
    """

    label: str
    total: float
    which_expert: float
    within_experts: float
    share: list[float]
    per_expert: list[float | None]
    load: list[int]
    max_total: float

    def to_dict(self) -> dict:
        return dict(vars(self))


def experts_entropy(inst) -> list[ExpertsEntropy]:
    """The split of every mixture-of-experts layer of ``inst`` (an Instrumentation); dense layers are skipped.

    >>> import kacq_hooks as kh
    >>> from transformers import MixtralConfig, MixtralForCausalLM
    >>> model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=8,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_local_experts=4))
    >>> with kh.instrument(model) as inst:
    ...     _ = model(torch.randint(64, (2, 6)))
    >>> [split] = experts_entropy(inst)
    >>> abs(split.which_expert + split.within_experts - split.total) < 1e-9, sum(split.load)
    (True, 24)
    """
    results = []
    for site, stats in zip(inst.sites, inst.stats):
        if site.kind != "experts":
            continue
        if int(stats.tokens) == 0:
            raise NoTokensError(f"{site.label}: no tokens have been recorded; run forward passes first")
        cbar = stats.mean_abs("token").double()
        e, m = site.experts, site.expert_d_ff
        groups = [cbar[i * m:(i + 1) * m] for i in range(e)]
        if site.d_ff > e * m:
            groups.append(cbar[e * m:])
        mass = torch.stack([g.sum() for g in groups])
        share = mass / mass.sum()
        within = sum(float(p) * entropy(g) for p, g in zip(share, groups) if float(p) > 0)
        load = [int(stats.routed_tokens[i * m]) for i in range(e)]
        stats.check_finite(["routed_sum_abs"])  # unweighted, it can overflow while the weighted sums do not
        routed = [stats.routed_sum_abs[i * m:(i + 1) * m] for i in range(e)]
        per_expert = [entropy(r / n) if n and float(r.sum()) > 0 else None for r, n in zip(routed, load)]
        results.append(ExpertsEntropy(
            label=site.label, total=entropy(cbar), which_expert=entropy(share), within_experts=within,
            share=[float(p) for p in share], per_expert=per_expert, load=load, max_total=math.log(site.d_ff)))
    return results
