"""Slot usage of new data against a reference corpus: which FFN memory slots the new data uses far more.

Lin et al. (2025, "Continual learning via sparse memory finetuning") rank the slots of a memory layer by a
TF-IDF of their usage: how much a batch of new data uses slot i (the term frequency), discounted by how
much pretraining data uses it (the inverse document frequency). The FFN analogue scores every slot i of
every layer from the knowledge-entropy distribution p (each layer's mean |C| normalized to sum 1):

    score(i) = p_new(i) * ln(1 / p_ref(i))                    (method="tfidf", the default)

A slot the reference never uses (p_ref = 0) but the new data does scores +inf (it ranks first); a slot
the new data does not use scores 0. Lin et al.'s own notion of usage is a count: their memory layer
looks up the top-k keys per token, so a slot is "accessed" by a token when it is among them. With
``method="count"`` a slot is accessed by a token when its |C| is among the token's k largest in its
layer and not 0 (a ReLU slot at 0 is unused, however few slots a token uses), and p is each layer's
access count normalized to sum 1 (same formula). That needs counts that mean |C| statistics do not hold: measure both corpora with :func:`measure_usage` and the same k.

In their memory layer only the k looked-up slots of a token get a gradient at all, so counting accesses
is the layer's own notion of use. An FFN slot is used by every token with a weight |C_i|, which is what
the mean |C| measures; the top-k count reads an FFN as if it were sparse. Where Lin et al.'s IDF counts
the background batches that touch a slot (a document frequency), the count option here uses the
reference's share of accesses instead, so that both options take the same aggregated statistics.

Mixture-of-experts layers are scored over all their slots at once (E x m routed, then shared experts'
neurons), from the effective coefficient (routing weight x C), as the instrumentation measures them.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from ._hooks import HookSet, OwnerHook
from .errors import ArgumentTypeError, ConfigError, NoTokensError, ShapeError
from .experts import ExpertsTap, SharedTap
from .frontends.nnsight import underlying_module
from .frontends.stacks import StackReader
from .instrumentation import Instrumentation
from .locate import LAYOUT_BY_MODEL_TYPE, Site, find_config, find_sites
from .saving import SavedStats, load_stats
from .stats import CoefficientStats

METHODS = ("tfidf", "count")


def slot_means(source, weighting: str = "token") -> list[torch.Tensor]:
    """Per-layer mean |C| per slot (float64 on the CPU) from any statistics source.

    ``source``: an Instrumentation, saved statistics (``kh.saving.load_stats`` result, or the path of a
    statistics file), a ``CoefficientStats``, a :class:`SlotUsage`, or a list of per-layer tensors.
    """
    if isinstance(source, (str, os.PathLike)):
        source = load_stats(source)
    if isinstance(source, SlotUsage):
        return source.means()
    stats = getattr(source, "stats", source)
    if callable(getattr(source, "mean_abs_coefficients", None)) and isinstance(stats, CoefficientStats):
        tokens = [int(s.tokens) for s in stats]
        if not any(tokens):
            raise NoTokensError("the statistics hold no tokens: run data through the instrumented model first")
        return [c.detach().to("cpu", torch.float64).flatten() for c in source.mean_abs_coefficients(weighting)]
    if isinstance(stats, CoefficientStats):
        if not any(int(s.tokens) for s in stats):
            raise NoTokensError("the statistics hold no tokens: run data through the instrumented model first")
        return [s.mean_abs(weighting).detach().to("cpu", torch.float64).flatten() for s in stats]
    if isinstance(source, Sequence) and len(source) and all(isinstance(c, torch.Tensor) for c in source):
        return [c.detach().to("cpu", torch.float64).flatten() for c in source]
    raise ArgumentTypeError(f"usage statistics must be an Instrumentation, saved statistics (or their path), "
                            f"CoefficientStats, a SlotUsage or a list of per-layer tensors, not {type(source).__name__}")


def slot_distribution(values: list[torch.Tensor], what: str,
                      layer_ids: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Each layer's slot usage normalized to sum 1; non-finite, negative or all-zero usage is refused."""
    out = []
    for i, v in enumerate(values):
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            raise ConfigError(f"{what}, layer {i}: usage must be finite and non-negative")
        total = float(v.sum())
        if total <= 0:
            raise NoTokensError(f"{what}, layer {i}: no slot was used (no tokens, or a dead layer), so its usage "
                            "distribution is undefined; measure more data")
        out.append(v / total)
    return out


def tfidf(p_new: torch.Tensor, p_ref: torch.Tensor) -> torch.Tensor:
    """``p_new * ln(1 / p_ref)`` per slot, with +inf where only the new data uses a slot and 0 where it does not.

    >>> scores = tfidf(torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64), torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64))
    >>> round(scores[0].item(), 6), scores[1].item(), scores[2].item()
    (0.693147, inf, 0.0)
    """
    if p_new.shape != p_ref.shape:
        raise ShapeError(f"usage of {tuple(p_new.shape)} slots against a reference of {tuple(p_ref.shape)}")
    idf = torch.where(p_ref > 0, -torch.log(p_ref.clamp_min(torch.finfo(torch.float64).tiny)),
                      torch.full_like(p_ref, math.inf))
    return torch.where(p_new > 0, p_new * idf, torch.zeros_like(p_new))


def slot_scores(new, reference, *, method: str = "tfidf", weighting: str = "token") -> list[torch.Tensor]:
    """Score every slot of every layer by how much more ``new`` uses it than ``reference`` (see module doc).

    Returns one float64 tensor per layer (length d_ff, MoE layers' E x m + shared slots included).
    ``method="count"`` needs two :class:`SlotUsage` measured with the same ``k``.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, not {method!r}")
    new, reference = _loaded(new), _loaded(reference)
    check_same_source(new, reference)
    if method == "count":
        for name, source in (("new", new), ("reference", reference)):
            if not isinstance(source, SlotUsage) or source.k is None:
                raise ArgumentTypeError(f"method='count' needs top-k access counts: measure {name} with "
                                        "kh.usage.measure_usage(model, k=...), not a mean |C| statistic")
        if new.k != reference.k:
            raise ConfigError(f"new was counted with k={new.k}, reference with k={reference.k}: count both with one k")
        new_v, ref_v = new.counts(), reference.counts()
    else:
        new_v, ref_v = slot_means(new, weighting), slot_means(reference, weighting)
    _check_widths(new_v, ref_v)
    return [tfidf(a, b) for a, b in zip(slot_distribution(new_v, "new"), slot_distribution(ref_v, "reference"))]


def torch_module(model):
    """The torch module an nnsight envoy wraps (its hooks go there, as kh.instrument places them); any other model
    as it is."""
    return underlying_module(model) if (type(model).__module__ or "").startswith("nnsight") else model


def _loaded(source):
    if isinstance(source, (str, os.PathLike)):
        return load_stats(source)
    return source


def _config_model_type(model) -> str | None:
    # through wrappers (DDP, torch.compile) to the Hugging Face model; None where no config names a type
    for _ in range(4):
        if model is None:
            return None
        config = getattr(model, "config", None)
        if isinstance(getattr(config, "model_type", None), str):
            return config.model_type
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    return None


def describe_source(source) -> dict:
    """What a statistics source records about its measurement: model type and padding rule, where known."""
    if isinstance(source, SavedStats):
        return {"model_type": source.model_type, "mask_padding": source.header.get("mask_padding")}
    if isinstance(source, SlotUsage):
        return {"model_type": _config_model_type(source.model), "mask_padding": True}
    if isinstance(source, nn.Module):
        return {"model_type": _config_model_type(source)}
    if isinstance(source, Instrumentation):
        return {"model_type": _config_model_type(getattr(source, "model", None)), "mask_padding": source.mask_padding}
    return {}


def check_same_source(new, reference, new_name: str = "new", ref_name: str = "reference") -> None:
    """Refuse statistics of another model type, or measured with another padding rule, as one comparison."""
    a, b = describe_source(new), describe_source(reference)
    for key in ("model_type", "mask_padding"):
        if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
            raise ShapeError(f"{new_name} was measured with {key}={a[key]!r}, {ref_name} with {key}={b[key]!r}: "
                             "their usage is not comparable. Measure both on the same model, the same way")


def _check_widths(new_v: list[torch.Tensor], ref_v: list[torch.Tensor]) -> None:
    if [v.numel() for v in new_v] != [v.numel() for v in ref_v]:
        raise ShapeError(f"new usage has layers of {[v.numel() for v in new_v]} slots, the reference "
                         f"{[v.numel() for v in ref_v]}: measure both on the same model")


def top_slots(scores: Sequence[torch.Tensor], top: int) -> list[torch.Tensor]:
    """The ``top`` highest-scoring slots of each layer (ties: the lower index first), ascending. Long tensors.

    >>> top_slots([torch.tensor([0.1, 0.3, 0.3, 0.0])], 2)[0].tolist()
    [1, 2]
    """
    check_top(top, [s.numel() for s in scores])
    out = []
    for s in scores:
        order = torch.sort(s.double().nan_to_num(nan=-math.inf), descending=True, stable=True).indices
        out.append(order[:top].sort().values)
    return out


def least_used_slots(reference, top: int, weighting: str = "token") -> list[torch.Tensor]:
    """The ``top`` slots of each layer with the smallest mean |C| (resuscitation's choice: the least active).

    >>> least_used_slots([torch.tensor([0.5, 0.1, 0.2, 0.1])], 2)[0].tolist()
    [1, 3]
    """
    return top_slots([-c for c in slot_means(reference, weighting)], top)


def check_top(top, widths: Sequence[int]) -> None:
    """Raise ConfigError unless ``top`` is an int between 1 and every layer's width."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"top must be a whole number of slots per layer >= 1, not {top!r}")
    if widths and top > min(widths):
        raise ConfigError(f"top={top} is more slots than the narrowest layer has ({min(widths)}); at most that")


class SlotUsage:
    """Per-slot usage measured by hooks on a model's forwards: sum of |C| and, with ``k``, top-k access counts.

    Build it with :func:`measure_usage` (a context manager). Padding is left out where the model is called
    with an ``attention_mask`` (by keyword or position) whose padding fits the tokens; MoE slots use the
    effective coefficient (routing weight x C) as the instrumentation does. ``k`` counts are dense layers only (a
    token's top-k over routed experts would need all its experts' rows at once): with ``k`` an MoE layer is refused.
    """

    def __init__(self, model: nn.Module, *, k: int | None = None, mlp_out: str | None = None,
                 sites: list[Site] | None = None, grad_only: bool = False):
        model = torch_module(model)
        self.model = model
        self.sites = sites if sites is not None else find_sites(model, mlp_out)
        stacks = sorted({site.stack for site in self.sites})
        if len(stacks) > 1 or getattr(find_config(model), "is_encoder_decoder", False):
            # one padding mask is read, the model call's: another stack's C has other rows (a decoder's own length)
            raise ConfigError(f"slot usage reads the padding of the model's own call only, but the sites lie in the "
                              f"stacks {stacks} of {type(model).__name__}, an encoder-decoder model or several "
                              "stacks whose rows it cannot tell: measure a decoder-only or encoder-only model, or use "
                              "kh.instrument(model) (which reads each stack's own mask) and pass its statistics")
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ConfigError(f"k must be a whole number of slots per token >= 1, not {k!r}")
            wide = [s.path for s in self.sites if s.kind == "experts"]
            if wide:
                raise ConfigError(f"top-k access counts are measured on dense layers only; {wide} are mixture-of-"
                                  "experts layers: use the mean |C| score (method='tfidf')")
            if k > min(s.d_ff for s in self.sites):
                raise ConfigError(f"k={k} exceeds the narrowest layer's {min(s.d_ff for s in self.sites)} slots")
        self.k = k
        self.grad_only = grad_only  # only forwards that build a graph (training): evaluation passes do not count
        self._sum = [torch.zeros(s.d_ff, dtype=torch.float64) for s in self.sites]
        self._count = [torch.zeros(s.d_ff, dtype=torch.float64) for s in self.sites]
        self.tokens = [0] * len(self.sites)
        self._mask: torch.Tensor | None = None
        self._reader = StackReader(name="model", module=model,  # the row order of C, as instrument() reads it
                                   layout=LAYOUT_BY_MODEL_TYPE.get(_config_model_type(model), "batch_first"))  # the one read of a call's inputs, as instrument()'s
        self._hooks = HookSet()
        self.forwards = 0

    # -- results

    def means(self) -> list[torch.Tensor]:
        """Mean |C| per slot over the measured tokens, per layer (float64)."""
        if not any(self.tokens):
            raise NoTokensError("no tokens were measured: run data through the model inside measure_usage()")
        return [s / max(t, 1) for s, t in zip(self._sum, self.tokens)]

    def counts(self) -> list[torch.Tensor]:
        """Top-k accesses per slot, per layer (float64), when measured with ``k``."""
        if self.k is None:
            raise ConfigError("this usage was measured without k: no access counts")
        return [c.clone() for c in self._count]

    def reset(self) -> None:
        for buf in self._sum + self._count:
            buf.zero_()
        self.tokens = [0] * len(self.sites)

    # -- hooks

    def attach(self) -> "SlotUsage":
        if self._hooks:
            return self
        self._hooks.pre(self.model, OwnerHook(self, "_on_model"), with_kwargs=True)
        for index, site in enumerate(self.sites):
            if site.kind == "experts":
                layer = site.experts_layer
                self._hooks.tap(ExpertsTap(layer, OwnerHook(self, "_on_routed", index)))
                start = layer.experts * layer.d_ff
                for shared in layer.shared:
                    self._hooks.tap(SharedTap(shared, OwnerHook(self, "_on_shared", index, start)))
                    start += shared.d_ff
            else:
                self._hooks.pre(site.module, OwnerHook(self, "_on_dense", index))
        return self

    def remove(self) -> None:
        self._hooks.remove()

    def __enter__(self) -> "SlotUsage":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _counting(self) -> bool:
        return torch.is_grad_enabled() or not self.grad_only

    def _on_model(self, module, args, kwargs):
        if not self._counting():
            return None
        inputs = self._reader.read(args, kwargs)  # the mask by keyword or position; a 4-D mask's padding if readable
        mask, shape = inputs.mask, inputs.shape
        if isinstance(mask, torch.Tensor) and shape is not None and mask.shape[-1] > shape[1]:
            mask = mask[:, -shape[1]:]  # a KV-cache continuation: C is computed for this call's positions only
        self._mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        # MoE layers see every token of the forward; routed pairs are not tokens, so count them here
        tokens = _tokens_of(self._mask, args, kwargs)
        for index, site in enumerate(self.sites):
            if site.kind == "experts":
                self.tokens[index] += tokens
        self.forwards += 1
        self.on_forward()
        return None

    def on_forward(self) -> None:
        """Called at the start of every counted forward of the model (a subclass may reset there)."""

    def _rows(self, c2d: torch.Tensor, seq_first: bool = False) -> torch.Tensor | None:
        """Which rows of a [B*T, m] coefficient tensor (of a [T, B, m] one when ``seq_first``) are real tokens
        (None: all)."""
        if self._mask is not None and self._mask.numel() == c2d.shape[0]:
            return (self._mask.t() if seq_first else self._mask).reshape(-1).to(c2d.device) != 0
        return None

    def _on_dense(self, index: int, module, args):
        if not self._counting():
            return None
        c = args[0].detach()
        c2d = c.reshape(-1, c.shape[-1])
        rows = self._rows(c2d, seq_first=c.dim() == 3 and self._reader.layout == "seq_first")
        if rows is not None:
            c2d = c2d[rows]
        a = c2d.abs().double()
        self._sum[index] += a.sum(0).cpu()
        self.tokens[index] += int(c2d.shape[0])
        if self.k is not None and c2d.shape[0]:
            top = a.topk(self.k, dim=-1)
            # a slot with C exactly 0 (ReLU) is not accessed even when a token has fewer than k used slots
            hit = top.indices[top.values > 0]
            self._count[index] += torch.bincount(hit, minlength=a.shape[-1]).double().cpu()
        return None

    def _on_routed(self, index: int, expert_ids, token_index, weight, c):
        if not self._counting():
            return None
        site = self.sites[index]
        layer = site.experts_layer
        a = (c.detach().abs().double() * (weight.detach().abs().double() * site.routed_scale)[:, None])
        if self._mask is not None:
            flat = self._mask.reshape(-1).to(c.device) != 0
            if token_index.numel() and int(token_index.max()) < flat.numel():
                a = a * flat[token_index][:, None]
        total = torch.zeros(layer.experts, layer.d_ff, dtype=torch.float64, device=a.device)
        total.index_add_(0, expert_ids.to(a.device, torch.long), a)
        self._sum[index][: layer.experts * layer.d_ff] += total.reshape(-1).cpu()
        return None

    def _on_shared(self, index: int, start: int, c, gate):
        if not self._counting():
            return None
        c2d = c.detach().reshape(-1, c.shape[-1]).double().abs()
        if gate is not None:
            c2d = c2d * gate.detach().reshape(-1, 1).double().abs()
        rows = self._rows(c2d)
        if rows is not None:
            c2d = c2d[rows]
        self._sum[index][start:start + c2d.shape[-1]] += c2d.sum(0).cpu()
        return None


def _tokens_of(mask: torch.Tensor | None, args, kwargs) -> int:
    if mask is not None:
        return int((mask != 0).sum())
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor):
        return ids.numel()
    embeds = kwargs.get("inputs_embeds")
    return embeds.shape[:-1].numel() if isinstance(embeds, torch.Tensor) else 0


def measure_usage(model: nn.Module, *, k: int | None = None, mlp_out: str | None = None) -> SlotUsage:
    """A :class:`SlotUsage` attached to ``model``; use it as a context manager around forwards.

    >>> with measure_usage(model, k=8) as usage:      # doctest: +SKIP
    ...     model(ids, attention_mask=mask)
    >>> usage.counts()                                # doctest: +SKIP
    """
    return SlotUsage(model, k=k, mlp_out=mlp_out).attach()
