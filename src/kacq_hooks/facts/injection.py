"""Injecting fact passages into training batches on a schedule (Chang et al. 2024, "How do large language
models acquire factual knowledge during pretraining?").

Each injected passage (+ EOS) is prepended to one batch row and the row is cut back to the batch's
sequence length, so the batch shape never changes; labels and attention mask follow the new tokens.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import get_worker_info
from transformers import DataCollatorForLanguageModeling, TrainerCallback

from kacq_hooks.errors import InjectionError, ShapeError
from kacq_hooks.facts.records import FactSet

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels the Hugging Face losses skip


@dataclass(frozen=True)
class Injection:
    """One passage entering training: at ``step`` (0-based update index), for ``record``, in injection ``round``."""

    step: int
    record: int
    scenario: str
    round: int
    text: str


class InjectionSchedule:
    """Which passages enter training at which step.

    Round ``r`` (``0 <= r < rounds``) starts at step ``start + r * interval``. Per scenario:
    "paraphrase" records inject their original passage at round 0 and their ``r``-th paraphrase at
    round ``r``; "duplication" records the same passage every round; "once" records only at round 0;
    "unused" records never. Steps count optimizer updates from 0: a passage injected at step ``t``
    is in the batch of the update that turns the model θ_t into θ_{t+1}.

    ``max_per_step`` spreads a round's passages over consecutive steps when a batch has fewer rows than
    a round has passages (the paper's batches hold all 120 at once); each record's steps stay exact in
    :meth:`steps_of`. Kim et al.'s variant is ``interval=160``.

    >>> from kacq_hooks.facts import FactRecord, FactSet
    >>> probes = {f"{k}_{p}": ["x"] for k in ("mem", "gen", "hard_gen") for p in ("input", "target")}
    >>> facts = FactSet([FactRecord("A.", paraphrases=["A!"], **probes), FactRecord("B.", **probes)],
    ...                 ["paraphrase", "once"])
    >>> schedule = InjectionSchedule(facts, interval=10, rounds=2)
    >>> [(i.step, i.record, i.text) for i in schedule]
    [(0, 0, 'A.'), (0, 1, 'B.'), (10, 0, 'A!')]
    >>> schedule.steps_of(0), schedule.passages_at(10)
    ([0, 10], ['A!'])
    """

    def __init__(
        self,
        facts: FactSet,
        interval: int = 100,
        rounds: int = 10,
        *,
        start: int = 0,
        max_per_step: int | None = None,
        cycle_paraphrases: bool = False,
    ):
        if interval < 1 or rounds < 1 or start < 0:
            raise InjectionError(f"need interval >= 1, rounds >= 1 and start >= 0; got {interval}, {rounds}, {start}")
        if max_per_step is not None and max_per_step < 1:
            raise InjectionError(f"max_per_step must be >= 1 or None, got {max_per_step}")
        self.facts = facts
        self.interval = interval
        self.rounds = rounds
        self.start = start
        self.max_per_step = max_per_step
        self._by_step: dict[int, list[Injection]] = {}
        for round_index in range(rounds):
            passages = [
                (record, text)
                for record in range(len(facts))
                if (text := self._text(record, round_index, cycle_paraphrases)) is not None
            ]
            per_step = max_per_step or max(len(passages), 1)
            n_steps = -(-len(passages) // per_step)
            if n_steps > interval:
                raise InjectionError(
                    f"round {round_index} has {len(passages)} passages: at {per_step} per step they need {n_steps} "
                    f"steps, more than the interval of {interval}; raise max_per_step or the interval"
                )
            base = start + round_index * interval
            for position, (record, text) in enumerate(passages):
                step = base + position // per_step
                self._by_step.setdefault(step, []).append(
                    Injection(step, record, facts.scenarios[record], round_index, text)
                )

    def _text(self, record: int, round_index: int, cycle: bool) -> str | None:
        fact, scenario = self.facts[record], self.facts.scenarios[record]
        if scenario == "duplication":
            return fact.train_context
        if scenario == "once":
            return fact.train_context if round_index == 0 else None
        if scenario == "paraphrase":
            versions = [fact.train_context, *fact.paraphrases]
            if round_index >= len(versions) and not cycle:
                raise InjectionError(
                    f"record {record} is a paraphrase record with {len(fact.paraphrases)} paraphrases, too few for "
                    f"{self.rounds} rounds (round 0 is the original passage, round i its i-th paraphrase); load the "
                    "paraphrased data file, lower rounds, or pass cycle_paraphrases=True to reuse them"
                )
            return versions[round_index % len(versions)]
        return None  # unused

    # queries

    def at(self, step: int) -> list[Injection]:
        """The injections whose passages enter the batch of update ``step``."""
        return list(self._by_step.get(int(step), ()))

    def passages_at(self, step: int) -> list[str]:
        return [injection.text for injection in self.at(step)]

    def steps_of(self, record: int) -> list[int]:
        """T_k: the steps whose batch contains record ``record``'s passage, in order."""
        return [step for step in sorted(self._by_step) for i in self._by_step[step] if i.record == record]

    @property
    def steps(self) -> list[int]:
        """Every step with at least one injection, in order."""
        return sorted(self._by_step)

    @property
    def last_step(self) -> int | None:
        return max(self._by_step) if self._by_step else None

    def __iter__(self) -> Iterator[Injection]:
        for step in sorted(self._by_step):
            yield from self._by_step[step]

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_step.values())

    def apply(self, batch: Mapping[str, torch.Tensor], step: int, tokenizer) -> dict[str, torch.Tensor]:
        """``inject(batch, self.passages_at(step), tokenizer)``; the batch unchanged (a shallow copy) when none are due."""
        return inject(batch, self.passages_at(step), tokenizer)


def inject(
    batch: Mapping[str, torch.Tensor],
    passages: Sequence[str],
    tokenizer,
    *,
    rows: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Prepend each passage (+ EOS) to one batch row and cut the row back to the batch's length.

    ``batch`` holds ``input_ids`` [B, T] and optionally ``attention_mask`` and ``labels``; a new dict is
    returned and the input tensors are not modified. Passage ``i`` goes to ``rows[i]`` (default: row
    ``i``). The row's own tokens follow the passage; padding (left or right, read from the mask) stays
    on its side. New labels are the passage tokens, then the row's own labels (so a row's masked
    positions stay masked), and ``-100`` on padding.

    >>> from kacq_hooks.corpus import train_bpe_tokenizer
    >>> tok = train_bpe_tokenizer(["the cat sat on the mat"] * 20, vocab_size=300)
    >>> ids = torch.tensor([tok("the mat the mat")["input_ids"]] * 2)
    >>> out = inject({"input_ids": ids, "labels": ids.clone()}, ["cat"], tok)
    >>> tok.decode(out["input_ids"][0]), tok.decode(out["input_ids"][1]) == tok.decode(ids[1])
    ('cat<|endoftext|>the mat', True)
    """
    if "input_ids" not in batch:
        raise ShapeError(f"the batch has no 'input_ids' (keys: {sorted(batch)}); inject needs token ids [batch, seq]")
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise ShapeError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    n_rows, width = input_ids.shape
    out = dict(batch)
    if not passages:
        return out
    rows = list(range(len(passages))) if rows is None else list(rows)
    if len(rows) != len(passages):
        raise InjectionError(f"{len(passages)} passages but {len(rows)} rows to put them in")
    if len(passages) > n_rows:
        raise InjectionError(
            f"{len(passages)} passages to inject into a batch of {n_rows} rows; use a larger batch or "
            f"InjectionSchedule(..., max_per_step={n_rows})"
        )
    if len(set(rows)) != len(rows) or not all(0 <= r < n_rows for r in rows):
        raise InjectionError(f"rows {rows} must be distinct indices below the batch size {n_rows}")
    known = {"input_ids", "attention_mask", "labels"}
    for key, value in batch.items():
        if key not in known and isinstance(value, torch.Tensor) and value.shape[:2] == (n_rows, width):
            raise InjectionError(
                f"the batch's {key!r} is per token too, and inject does not know how to rewrite it; "
                "drop it from the batch (models derive it) or inject before adding it"
            )
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise InjectionError("the tokenizer has no eos_token_id; injected passages end with EOS (set tokenizer.eos_token)")

    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    left_padded = mask is not None and bool((mask[:, 0] == 0).any())
    new_ids = input_ids.clone()
    new_mask = mask.clone() if mask is not None else None
    new_labels = labels.clone() if labels is not None else None
    pad_id = _pad_id(input_ids, mask, tokenizer, eos)
    cut = []
    for passage, row in zip(passages, rows):
        passage_ids = tokenizer(passage, add_special_tokens=False)["input_ids"] + [eos]
        if len(passage_ids) > width:
            cut.append(len(passage_ids))
        own = _real_positions(mask, row, width)
        content = (passage_ids + input_ids[row, own].tolist())[:width]
        content_labels = None
        if labels is not None:
            content_labels = (passage_ids + labels[row, own].tolist())[:width]
        n_pad = width - len(content)
        if n_pad and new_mask is None:  # unreachable: without a mask every row is full
            raise ShapeError("a row without attention mask came out shorter than the sequence")
        span = slice(n_pad, width) if left_padded else slice(0, len(content))
        new_ids[row] = pad_id
        new_ids[row, span] = torch.tensor(content, dtype=input_ids.dtype)
        if new_mask is not None:
            new_mask[row] = 0
            new_mask[row, span] = 1
        if new_labels is not None:
            new_labels[row] = IGNORE_INDEX
            new_labels[row, span] = torch.tensor(content_labels, dtype=labels.dtype)
    if cut:
        logger.warning("%d injected passage(s) of up to %d tokens cut to the sequence length %d", len(cut), max(cut), width)
    out["input_ids"] = new_ids
    if new_mask is not None:
        out["attention_mask"] = new_mask
    if new_labels is not None:
        out["labels"] = new_labels
    return out


def _real_positions(mask: torch.Tensor | None, row: int, width: int) -> torch.Tensor:
    if mask is None:
        return torch.arange(width)
    positions = mask[row].nonzero().squeeze(1)
    if positions.numel() and positions[-1] - positions[0] + 1 != positions.numel():
        raise InjectionError(
            f"row {row}'s attention mask is not one contiguous run of ones (packed sequences?); inject works on "
            "rows padded on one side only"
        )
    return positions


def _pad_id(input_ids: torch.Tensor, mask: torch.Tensor | None, tokenizer, eos: int) -> int:
    if mask is not None and bool((mask == 0).any()):
        return int(input_ids[mask == 0][0])
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else int(eos)


class InjectionCollator:
    """Deprecated: use :class:`kacq_hooks.training.InjectionCallback`, which reads the Trainer's own step.

    A data collator that injects the schedule's passages, counting its calls to know the step: call
    ``k`` builds the ``k``-th micro-batch, which belongs to update ``k // gradient_accumulation_steps``.
    That count is wrong whenever a built batch is not trained on, in order, in this process (dataloader
    workers, prefetching, epochs that do not hold a whole number of updates, resumed runs), which is why
    it goes away in the next release. ``base`` turns a list of features into a batch; default:
    ``DataCollatorForLanguageModeling(tokenizer, mlm=False)``.
    """

    def __init__(
        self,
        schedule: InjectionSchedule,
        tokenizer,
        base: Callable[[list], Mapping[str, torch.Tensor]] | None = None,
        *,
        gradient_accumulation_steps: int = 1,
    ):
        warnings.warn("InjectionCollator counts collator calls, which miss the Trainer's step in common setups; "
                      "use kacq_hooks.training.InjectionCallback(schedule, tokenizer) instead (InjectionCollator "
                      "goes away in the next release)", DeprecationWarning, stacklevel=2)
        if gradient_accumulation_steps < 1:
            raise InjectionError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        self.schedule = schedule
        self.tokenizer = tokenizer
        self.base = base if base is not None else DataCollatorForLanguageModeling(tokenizer, mlm=False)
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.calls = 0
        self.injected: dict[int, list[int]] = {}  # step -> records injected (for checks and analysis)

    @property
    def next_step(self) -> int:
        """The update the next batch built will belong to."""
        return self.calls // self.gradient_accumulation_steps

    def seek(self, step: int) -> None:
        """Make the next batch built belong to update ``step`` (after resuming from a checkpoint)."""
        self.calls = int(step) * self.gradient_accumulation_steps

    def __call__(self, features: list) -> dict[str, torch.Tensor]:
        if get_worker_info() is not None:
            raise InjectionError(
                "InjectionCollator runs in a DataLoader worker process, where its step count is wrong; use "
                "num_workers=0 (Trainer: dataloader_num_workers=0) or InjectionCallback"
            )
        batch = dict(self.base(features))
        step, micro = divmod(self.calls, self.gradient_accumulation_steps)
        self.calls += 1
        if micro == 0:
            due = self.schedule.at(step)
            if due:
                batch = inject(batch, [i.text for i in due], self.tokenizer)
                self.injected[step] = [i.record for i in due]
        return batch

    def callback(self) -> "InjectionCollatorSync":
        """Deprecated with the collator: a ``TrainerCallback`` that keeps its step aligned with the Trainer's."""
        return InjectionCollatorSync(self)


class InjectionCollatorSync(TrainerCallback):
    """Deprecated with :class:`InjectionCollator`: keeps its step count aligned with the Trainer."""

    def __init__(self, collator: InjectionCollator):
        self.collator = collator
        self._warned = False

    def on_train_begin(self, args, state, control, **kwargs):
        if args.gradient_accumulation_steps != self.collator.gradient_accumulation_steps:
            raise InjectionError(
                f"the collator counts {self.collator.gradient_accumulation_steps} micro-batches per step but the "
                f"Trainer accumulates {args.gradient_accumulation_steps}; give the collator the same number"
            )
        self.collator.seek(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        # The collator may be one batch ahead: the data loader fetches the next batch before yielding this one.
        ahead = self.collator.calls - state.global_step * self.collator.gradient_accumulation_steps
        if not 0 <= ahead <= 1 and not self._warned:
            logger.warning(
                "InjectionCollator built %d batches by step %d, expected %d: injections may be on the wrong steps "
                "(dataloader workers? epochs that do not hold a whole number of updates?); use InjectionCallback",
                self.collator.calls, state.global_step, state.global_step * self.collator.gradient_accumulation_steps,
            )
            self._warned = True
