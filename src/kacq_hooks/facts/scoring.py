"""Scoring probes: the log probability of a target span given its input, batched by length and padding-aware.

A probe ``(input, target)`` is tokenized once as ``input + " " + target``. Its target span is the run of
tokens whose character offsets start at or after ``len(input)``: the separator space belongs to the target,
as word-initial tokens of byte-level and SentencePiece tokenizers carry it. A token that straddles that
boundary means the target is not a clean suffix under this tokenizer; that is reported, never hidden.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from kacq_hooks.errors import ConfigError, ProbeTokenizationError
from kacq_hooks.measuring import evaluation_mode

logger = logging.getLogger(__name__)

UncleanPolicy = Literal["error", "extend", "nan"]
REDUCTIONS = ("mean", "first", "sum")


@dataclass(frozen=True)
class EncodedProbe:
    """Token ids of ``input + " " + target`` and where the target span starts.

    ``clean`` is False when a token straddled the input/target boundary; under the "extend" policy that
    token is counted as the first target token, under "nan" the probe scores NaN.
    """

    ids: tuple[int, ...]
    target_start: int
    clean: bool = True

    @property
    def n_target(self) -> int:
        return len(self.ids) - self.target_start


@dataclass
class TokenizationReport:
    """How the probes tokenized: counts of target tokens and the probes whose target was not a clean suffix."""

    n_probes: int
    target_tokens_min: int
    target_tokens_mean: float
    target_tokens_max: int
    unclean: list[int] = field(default_factory=list)  # positions in the flat probe list

    @property
    def all_clean(self) -> bool:
        return not self.unclean


def encode_probe(tokenizer, input_text: str, target_text: str, add_special_tokens: bool = False) -> EncodedProbe:
    """Tokenize one probe and locate its target span from character offsets.

    Needs a fast tokenizer (offsets). By default no special tokens are added: the probe's text is scored
    the way the packed training rows hold text (as the released analysis code does). With
    ``add_special_tokens=True`` the tokenizer's own template applies: leading special tokens (a BOS)
    stay in the context, trailing ones (an appended EOS) are dropped.

    >>> from kacq_hooks.corpus import train_bpe_tokenizer
    >>> tok = train_bpe_tokenizer(["the cat sat on the mat"] * 20, vocab_size=300)
    >>> probe = encode_probe(tok, "the cat sat on the", "mat")
    >>> tok.decode(probe.ids[probe.target_start:]), probe.clean
    (' mat', True)
    """
    if not input_text:
        raise ProbeTokenizationError("a probe input is empty: the first target token would have no context")
    text = f"{input_text} {target_text}"
    try:
        encoding = tokenizer(
            text, return_offsets_mapping=True, return_special_tokens_mask=True, add_special_tokens=add_special_tokens
        )
    except NotImplementedError as error:
        raise ProbeTokenizationError(
            f"{type(tokenizer).__name__} gives no character offsets; the fact tracker needs a fast tokenizer "
            "(load it with use_fast=True)"
        ) from error
    ids = list(encoding["input_ids"])
    offsets = list(encoding["offset_mapping"])
    special = list(encoding["special_tokens_mask"])
    while ids and special[-1]:
        ids.pop(), offsets.pop(), special.pop()
    boundary = len(input_text)
    target_start = None
    clean = True
    for position, ((start, end), is_special) in enumerate(zip(offsets, special)):
        if is_special:
            continue
        if start >= boundary:
            target_start = position
            break
        if end > boundary:  # this token holds the end of the input and the start of the target
            target_start = position
            clean = False
            break
    if target_start is None or target_start >= len(ids):
        raise ProbeTokenizationError(f"the target {target_text!r} produced no tokens after input {input_text!r}")
    if target_start == 0:
        raise ProbeTokenizationError(
            f"the target of probe {input_text!r} -> {target_text!r} starts at the first token: it has no context"
        )
    return EncodedProbe(tuple(ids), target_start, clean)


@dataclass
class ProbeBatch:
    """A padded batch of probes: ``positions`` index the flat probe list; target spans are in padded coordinates."""

    positions: torch.Tensor  # [B] long
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    target_start: torch.Tensor  # [B] first target token position
    target_end: torch.Tensor  # [B] one past the last target token

    @property
    def n_logits_needed(self) -> int:
        """How many final positions' logits cover every target token (each is predicted one step earlier)."""
        return int(self.input_ids.shape[1] - (self.target_start.min() - 1))


def plan_batches(
    probes: Sequence[EncodedProbe],
    batch_size: int,
    padding_side: Literal["left", "right"] = "left",
    pad_token_id: int = 0,
) -> Iterator[ProbeBatch]:
    """Group probes by length (longest first, so memory peaks at once) into padded batches of ``batch_size``."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    order = sorted(range(len(probes)), key=lambda i: (-len(probes[i].ids), i))
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        width = max(len(probes[i].ids) for i in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        start = torch.empty(len(chunk), dtype=torch.long)
        end = torch.empty(len(chunk), dtype=torch.long)
        for row, index in enumerate(chunk):
            probe = probes[index]
            shift = width - len(probe.ids) if padding_side == "left" else 0
            ids[row, shift:shift + len(probe.ids)] = torch.tensor(probe.ids, dtype=torch.long)
            mask[row, shift:shift + len(probe.ids)] = 1
            start[row] = shift + probe.target_start
            end[row] = shift + len(probe.ids)
        yield ProbeBatch(torch.tensor(chunk, dtype=torch.long), ids, mask, start, end)


class ModelCaller:
    """Calls a causal LM on a padded batch with the extras it accepts: position ids from the mask, fewer logits.

    Explicit position ids make left padding give the same numbers as right padding for absolute
    position embeddings (GPT-2); ``logits_to_keep`` skips the LM head where no target is predicted.
    """

    def __init__(self, model: torch.nn.Module, trim_logits: bool = True):
        self.model = model
        parameters = inspect.signature(model.forward).parameters
        self.takes_position_ids = "position_ids" in parameters
        self.takes_logits_to_keep = trim_logits and "logits_to_keep" in parameters
        self.takes_use_cache = "use_cache" in parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
        )

    def kwargs(self, batch: ProbeBatch, device: torch.device) -> dict:
        mask = batch.attention_mask.to(device)
        kwargs: dict = {"input_ids": batch.input_ids.to(device), "attention_mask": mask}
        if self.takes_position_ids:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if self.takes_use_cache:
            kwargs["use_cache"] = False
        return kwargs

    def logits(self, batch: ProbeBatch, device: torch.device) -> tuple[torch.Tensor, int]:
        """Logits of the last ``K`` positions and the offset ``T - K`` of the first one kept."""
        kwargs = self.kwargs(batch, device)
        width = batch.input_ids.shape[1]
        keep = batch.n_logits_needed if self.takes_logits_to_keep else width
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        logits = self.model(**kwargs).logits
        return logits, width - logits.shape[1]


def target_log_probs(logits: torch.Tensor, offset: int, batch: ProbeBatch) -> dict[str, torch.Tensor]:
    """Per-row mean, first-token and summed log probability of the target spans (fp32, on the logits' device)."""
    device = logits.device
    lengths = (batch.target_end - batch.target_start).to(device)
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    # position of each target token: its row's start plus its rank within the row
    rank = torch.arange(int(lengths.sum()), device=device) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    token_positions = batch.target_start.to(device)[rows] + rank
    predicting = logits[rows, token_positions - 1 - offset].float()  # [N, V]
    targets = batch.input_ids.to(device)[rows, token_positions]
    token_log_probs = predicting.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(predicting, dim=-1)
    summed = torch.zeros(len(lengths), dtype=torch.float32, device=device).index_add_(0, rows, token_log_probs)
    first = token_log_probs[lengths.cumsum(0) - lengths]
    return {"mean": summed / lengths, "first": first, "sum": summed}


scoring_mode = evaluation_mode  # eval mode, no grad, RNG and training flags restored, instrumentations paused


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
