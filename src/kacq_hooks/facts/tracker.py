"""FactTracker: score every probe of a fact set under the current model, and record the trajectory over steps."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from kacq_hooks.errors import ConfigError, UnknownKeyError
from kacq_hooks.facts.records import PROBE_KINDS, FactSet
from kacq_hooks.facts.scoring import (
    REDUCTIONS,
    EncodedProbe,
    ModelCaller,
    ProbeBatch,
    ProbeTokenizationError,
    TokenizationReport,
    UncleanPolicy,
    encode_probe,
    model_device,
    plan_batches,
    scoring_mode,
    target_log_probs,
)
from kacq_hooks.facts.trajectory import ProbeRef, TrajectoryStore

logger = logging.getLogger(__name__)


@dataclass
class ProbeScores:
    """Scores of every probe in the tracker's flat order: fp32 tensors [n_probes] on the CPU."""

    mean: torch.Tensor
    first: torch.Tensor
    sum: torch.Tensor

    def __getitem__(self, reduction: str) -> torch.Tensor:
        if reduction not in REDUCTIONS:
            raise UnknownKeyError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
        return getattr(self, reduction)


class FactTracker:
    """Scores the probes of a :class:`FactSet` under a model: mean, first-token and summed target log prob.

    Probes are tokenized once, at construction. Scoring runs batched by length with no grad, the model
    in eval mode (every module's flag restored after), the RNG state untouched, and every
    ``kacq_hooks`` instrumentation on the model paused, so probes never enter coefficient statistics.
    Peak memory grows with ``batch_size``, not with the number of probes.

    ``unclean_targets`` says what to do when a target is not a clean token suffix of its probe under
    this tokenizer: "error", "extend" (score the straddling token as part of the target; the default)
    or "nan". Either way ``tokenization`` reports which probes were affected.

    ``add_special_tokens`` (default False) says whether probes are tokenized with the tokenizer's special
    tokens (a BOS in front, for Llama-style tokenizers). The default scores them as the training rows hold
    text, with no BOS, as the released analysis code does; a model trained with a BOS at every document
    start may be scored with ``True``.

    ``trim_logits`` asks the model only for the last positions' logits, those that predict target
    tokens (``logits_to_keep``), where its forward accepts that; the LM head then costs almost nothing.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from kacq_hooks.corpus import train_bpe_tokenizer
    >>> from kacq_hooks.facts import FactRecord, FactSet
    >>> tokenizer = train_bpe_tokenizer(["The fox jumps over the lazy dog."] * 20, vocab_size=300)
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
    ...                                      num_hidden_layers=1, num_attention_heads=4))
    >>> probes = {f"{k}_{p}": ["The fox jumps over the"] if p == "input" else ["lazy dog"]
    ...           for k in ("mem", "gen", "hard_gen") for p in ("input", "target")}
    >>> tracker = FactTracker(model, tokenizer, FactSet([FactRecord("The fox jumps.", **probes)]))
    >>> {kind: tuple(s.shape) for kind, s in tracker.score().items()}
    {'mem': (1, 1), 'gen': (1, 1), 'hard_gen': (1, 1)}
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        facts: FactSet,
        kinds: Sequence[str] = PROBE_KINDS,
        *,
        batch_size: int = 32,
        padding_side: Literal["left", "right"] = "left",
        unclean_targets: UncleanPolicy = "extend",
        store: TrajectoryStore | str | os.PathLike | None = None,
        trim_logits: bool = True,
        add_special_tokens: bool = False,
    ):
        if not isinstance(facts, FactSet):
            facts = FactSet(list(facts))
        unknown = [k for k in kinds if k not in PROBE_KINDS]
        if unknown or not kinds:
            raise ConfigError(f"kinds {list(kinds)} must be a non-empty subset of {PROBE_KINDS}")
        if unclean_targets not in ("error", "extend", "nan"):
            raise ConfigError(f"unclean_targets must be 'error', 'extend' or 'nan', got {unclean_targets!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.facts = facts
        self.kinds = tuple(kinds)
        self.batch_size = batch_size
        self.padding_side = padding_side
        self.unclean_targets = unclean_targets
        self.add_special_tokens = bool(add_special_tokens)
        self.probes: list[ProbeRef] = [
            ProbeRef(record, kind, index)
            for kind in self.kinds
            for record, fact in enumerate(facts)
            for index in range(len(fact.probes(kind)))
        ]
        self.encoded: list[EncodedProbe] = self._encode_all()
        self.tokenization = self._report()
        self._caller = ModelCaller(model, trim_logits)
        self._batches: list[ProbeBatch] | None = None
        pad = getattr(tokenizer, "pad_token_id", None)
        self._pad_token_id = pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)
        if store is None or isinstance(store, TrajectoryStore):
            self.store = store
        else:
            self.store = TrajectoryStore(store, self.probes, facts.scenarios)
        if self.store is not None and self.store.probes != self.probes:
            raise ConfigError("the trajectory store records other probes than this tracker scores")

    # scoring

    def score(self, reduction: str = "mean") -> dict[str, torch.Tensor]:
        """``{kind: fp32 tensor [n_records, n_probes]}`` of the target log prob ("mean", "first" or "sum").

        Records with fewer probes of a kind than the most are padded with NaN.
        """
        return self.by_kind(self.score_probes()[reduction])

    def score_probes(self) -> ProbeScores:
        """Score every probe once; the three reductions in the tracker's flat probe order."""
        device = model_device(self.model)
        n = len(self.encoded)
        out = {name: torch.full((n,), float("nan"), dtype=torch.float32) for name in REDUCTIONS}
        with scoring_mode(self.model):
            for batch in self.batches():
                logits, offset = self._caller.logits(batch, device)
                scores = target_log_probs(logits, offset, batch)
                del logits
                for name in REDUCTIONS:
                    out[name][batch.positions] = scores[name].cpu()
        if self.unclean_targets == "nan":
            for name in REDUCTIONS:
                out[name][self.tokenization.unclean] = float("nan")
        return ProbeScores(**out)

    def record(self, step: int) -> ProbeScores:
        """Score every probe and append the scores to the trajectory store as ``step``."""
        if self.store is None:
            raise ConfigError("this tracker has no trajectory store; create it with store=PATH (or a TrajectoryStore)")
        scores = self.score_probes()
        self.store.append(step, scores)
        return scores

    def batches(self) -> Iterator[ProbeBatch]:
        """The padded probe batches scoring runs on (also what a benchmark's plain forward should see).

        Planned once and kept on the CPU: token ids only, small next to any forward pass.
        """
        if self._batches is None:
            self._batches = list(plan_batches(self.encoded, self.batch_size, self.padding_side, self._pad_token_id))
        return iter(self._batches)

    # views

    def by_kind(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reshape values in flat probe order into ``{kind: [n_records, n_probes]}`` (NaN where a record has fewer)."""
        width = {kind: max((len(f.probes(kind)) for f in self.facts), default=0) for kind in self.kinds}
        out = {kind: torch.full((len(self.facts), width[kind]), float("nan"), dtype=flat.dtype) for kind in self.kinds}
        for column, probe in enumerate(self.probes):
            out[probe.kind][probe.record, probe.index] = flat[column]
        return out

    def summary(self, scores: ProbeScores | None = None, reduction: str = "mean") -> dict[str, float]:
        """Mean score per kind and per (scenario, kind), keyed like ``"mem"`` and ``"paraphrase/mem"`` (NaN-aware)."""
        flat = (scores or self.score_probes())[reduction]
        result: dict[str, float] = {}
        for kind in self.kinds:
            columns = [c for c, p in enumerate(self.probes) if p.kind == kind]
            result[kind] = _nanmean(flat[columns])
            for scenario in dict.fromkeys(self.facts.scenarios):
                if scenario == "unused":
                    continue
                picked = [c for c in columns if self.facts.scenarios[self.probes[c].record] == scenario]
                if picked:
                    result[f"{scenario}/{kind}"] = _nanmean(flat[picked])
        return result

    # construction helpers

    def _encode_all(self) -> list[EncodedProbe]:
        encoded = []
        for probe in self.probes:
            input_text, target_text = self.facts[probe.record].probes(probe.kind)[probe.index]
            try:
                item = encode_probe(self.tokenizer, input_text, target_text, self.add_special_tokens)
            except ProbeTokenizationError as error:
                raise ProbeTokenizationError(
                    f"record {probe.record}, {probe.kind} probe {probe.index}: {error}"
                ) from error
            if not item.clean and self.unclean_targets == "error":
                raise ProbeTokenizationError(
                    f"record {probe.record}, {probe.kind} probe {probe.index}: under this tokenizer the target "
                    f"{target_text!r} is not a clean token suffix of the probe (a token spans the end of the input "
                    "and the start of the target); pass unclean_targets='extend' to score that token too, or 'nan'"
                )
            encoded.append(item)
        max_positions = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        longest = max((len(e.ids) for e in encoded), default=0)
        if max_positions is not None and longest > max_positions:
            raise ProbeTokenizationError(
                f"the longest probe has {longest} tokens but the model takes at most {max_positions} positions"
            )
        return encoded

    def _report(self) -> TokenizationReport:
        counts = [e.n_target for e in self.encoded] or [0]
        report = TokenizationReport(
            n_probes=len(self.encoded),
            target_tokens_min=min(counts),
            target_tokens_mean=sum(counts) / len(counts),
            target_tokens_max=max(counts),
            unclean=[i for i, e in enumerate(self.encoded) if not e.clean],
        )
        if report.unclean:
            logger.warning(
                "%d of %d probe targets are not a clean token suffix under this tokenizer (policy %r); "
                "see tracker.tokenization.unclean",
                len(report.unclean), report.n_probes, self.unclean_targets,
            )
        return report


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else float("nan")
