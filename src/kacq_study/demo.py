"""The study behind ``kacq demo``: pretrain a small Llama from scratch, then inject facts from several arms.

One run, one seed, one results dict:

1. **Pretraining** on an offline corpus (English Wikipedia summaries by default), measuring knowledge
   entropy per layer on a fixed held-out calibration set every ``entropy_every`` steps (Kim et al. 2025).
2. **Continued training with fact injection** (Chang et al. 2024) from each *arm*: a starting checkpoint,
   an optional weight edit (e.g. resuscitation), a transform of the injected passages (e.g. formatting
   augmentation) and a training step factory (AdamW, or SAM). Every probe is scored before every update.
3. **Metrics** per arm: effectivity, retainability with power-law fits (Chang), acquisition and
   forgetting (Kim), and the entropy at the arm's start.
4. **Where the facts land** (the arms of ``findings.LANDING_ARMS``: late, late+resuscitation): each
   probe's top-:data:`ATTRIBUTION_K` memory slots by ``grad_x_act`` attribution at the arm's start,
   right after the first injection and at the end, and
   the share of them that were low-activity at the starting checkpoint (c̄ on the calibration set at or
   below the resuscitation quantile: the slots resuscitation amplifies), against the share of all slots.

The study is a consumer of the library's public API (``kacq_hooks``): entropy via ``kh.measure``,
injection via ``facts.InjectionSchedule`` / ``facts.inject``, probe scores via ``facts.FactTracker``
with a ``TrajectoryStore``, Chang et al.'s metrics via ``facts.summarize_acquisition``, SAM via
``training.SAM``, corpus and tokenizer via ``kacq_hooks.corpus``, slot attribution via
``kacq_hooks.attribution.attribute`` with ``training.attribution``'s store and ``low_activity_share``.

This module holds one seed's pipeline in parts (:func:`_prepare`, :func:`_pretrain`, :func:`_run_arm`);
:func:`kacq_study.study.run_study` runs them for several seeds as parallel tasks and combines them. Nothing
here prints; progress goes to an optional callback, which the CLI turns into progress bars. Same config and
seed give the same numbers. :data:`RUN_TIME` is the one statement of how long a run takes.

>>> from kacq_study.study import run_study                        # doctest: +SKIP
>>> results = run_study(DemoConfig.quick(), seeds=(0,), workers=1)  # doctest: +SKIP
>>> results["per_seed"][0]["pretraining"]["entropy"]["total"][-1]   # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import kacq_hooks as kh
from kacq_hooks import facts as kf
from kacq_hooks.attribution import attribute
from kacq_hooks.corpus import cached_tokenizer, load_corpus, pack_documents, wikipedia_summaries
from kacq_hooks.errors import KacqError
from kacq_hooks.interventions.resuscitation import check_plan_arguments
from kacq_hooks.sweep import check_device
from kacq_hooks.training import SAM, augment_record
from kacq_hooks.training.attribution import AttributionStore, low_activity_share, stability

from .findings import LANDING_ARMS

log = logging.getLogger(__name__)

# How long the study takes: the one place that says it (the CLI's --help and the README quote it; a test
# checks the README). Measured on the project's 2-core development machine (the default with `python -m kacq_study`
# after the arm settings changed; the others with `bash scripts/demo.sh`)
# (2026-12-02), pip's cache warm.
RUN_TIME = {
    "default": "about 6 minutes on 2 CPU cores (6 min 5 s measured for `bash scripts/demo.sh` from a fresh "
               "clone, pip's cache warm, the tokenizer trained afresh)",
    "quick": "about 1 minute (60 s measured on the idle 2-core machine, the tokenizer trained afresh; 2 min 29 s "
             "while two other jobs shared the cores)",
    "zhu": "about 11 minutes on 2 CPU cores (10 min 52 s measured with two workers, 1,244 s of tasks; the first "
           "minutes beside two other jobs)",
}

# Where the facts land: fixed before any run, not tuned to a verdict. k = 50 of the 512 (quick) or 2,048
# (default) slots; "score" ranks the slots that raise the target's log probability (not those that lower it).
ATTRIBUTION_METHOD = "grad_x_act"
ATTRIBUTION_K = 50
ATTRIBUTION_BY = "score"
# Record steps in an arm's attribution store: the checkpoint as loaded (c̄ only, before any edit) is step -1;
# step 0 is the arm's start (after the edit, before the first update), as in the probe trajectory.
CHECKPOINT_STEP = -1

Progress = Callable[[str, dict], None]
TrainStep = Callable[[torch.Tensor, torch.Tensor], float]


class DemoConfigError(KacqError, ValueError):
    """The demo's settings cannot work together (e.g. more injected rows than batch rows)."""


# ------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of the study. ``DemoConfig()`` is the default run and :meth:`quick` a smoke-sized
    one (their run times: :data:`RUN_TIME`)."""

    seed: int = 0
    # model: a Llama-style decoder trained from scratch
    d_model: int = 96
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 384
    seq_len: int = 320                   # a row holds nearly every generated passage + EOS whole (a few run to 323)
    vocab_size: int = 2048
    # corpus and tokenizer
    corpus: str | None = None            # None: offline Wikipedia summaries; else a .txt / .jsonl path
    max_docs: int | None = 6000
    cache_dir: str | None = None         # tokenizer cache; None: $KACQ_CACHE or ~/.cache/kacq_hooks
    calibration_sequences: int = 24
    # pretraining
    pretrain_steps: int = 360
    batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    early_step: int = 170               # the "early" checkpoint (well past the first transient, where the controls
                                         # still rise least); the "late" one is the last step
    entropy_every: int = 20
    arm_entropy_every: int = 20          # calibration entropy during continued training (also the progress bar's)
    # facts and injection
    facts: str | None = None             # None: procedural facts; else a Fictional Knowledge JSON path
    facts_per_scenario: int = 1
    control_facts: int = 2               # records never injected ("unused"): what continued training alone does to a fact
    injection: str = "row"               # "row": each passage + EOS starts one row, cut to seq_len (Chang et al.);
                                         # "span": a longer passage continues over the next rows, kept whole
    injection_every: int = 4
    injection_rounds: int = 20
    lead_steps: int = 8                  # steps before the first injection: warmup, settling, t_pre baseline
    tail_steps: int = 14                 # steps after the last injection, for forgetting
    continue_batch_size: int | None = 4  # rows per continued-training step (None: batch_size); fewer rows, more weight per
                                         # fact (2 of 4 rows at a round) and cheaper steps, which pay for the extra rounds
    continue_lr: float = 4e-3            # high for a model this small: one update must visibly move a fact
    continue_beta1: float = 0.5          # AdamW momentum: 0.9 smears each injection's update over ~10 steps
    continue_warmup: int = 6             # linear warmup of the fresh optimizer (steps); 0: none
    window: int = 3                      # t_w: local acquisition maximum searched in (t_i, t_i + t_w]
    iqr_factor: float = 1.5
    # resuscitation (Kim et al. Algorithm 1, weight mode)
    resuscitation_ratio: float = 0.5
    resuscitation_factor: float = 2.0
    resuscitation_cap: float = 10.0
    # Zhu et al. arms
    augment_variants: int = 4
    sam_rho: float = 0.05
    arms: tuple[str, ...] = ("early", "late", "late+resuscitation")
    threads: int = 1                     # fixed thread count: CPU reductions are then run-to-run identical
    device: str = "cpu"                  # where the model, batches and calibration live ("cpu", "cuda", "cuda:1")

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """A smoke-sized study for tests and a first look (``RUN_TIME["quick"]``)."""
        small = dict(d_model=64, n_layers=2, n_heads=4, d_ff=256, seq_len=128, vocab_size=768, max_docs=800,
                     calibration_sequences=8, pretrain_steps=60, batch_size=24, lr=3e-3, warmup_steps=6,
                     early_step=15, entropy_every=10, facts_per_scenario=1, control_facts=1, injection="span",
                     continue_batch_size=None, continue_warmup=4, injection_every=8, injection_rounds=3,
                     lead_steps=5, tail_steps=16, window=4, augment_variants=2)
        return cls(**{**small, **overrides})

    def scaled(self, k: float) -> "DemoConfig":
        """A larger (k > 1) or smaller study: d_model and d_ff times ``k`` (d_model kept a multiple of
        2 * n_heads: RoPE needs an even head dimension), and the pretraining steps, the corpus documents and the
        step settings tied to them (early checkpoint, warmup, entropy interval) times ``k``, so the checkpoints
        stay at the same share of training. Meant for a GPU (``--scale``); ``k = 1`` is this config.

        >>> c = DemoConfig.quick().scaled(1.2)
        >>> c.d_model, c.d_model // c.n_heads % 2
        (80, 0)
        """
        if not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
            raise DemoConfigError(f"scale must be a finite number > 0, got {k}")
        if k == 1:
            return self

        def times(value: int, minimum: int = 1) -> int:
            return max(minimum, round(value * k))

        step = 2 * self.n_heads  # d_model / n_heads must stay even for the rotary embedding
        d_model = max(step, round(self.d_model * k / step) * step)
        steps = times(self.pretrain_steps, 2)
        return dataclasses.replace(
            self, d_model=d_model, d_ff=times(self.d_ff), pretrain_steps=steps,
            early_step=min(steps - 1, times(self.early_step)), warmup_steps=times(self.warmup_steps, 0),
            entropy_every=times(self.entropy_every),
            max_docs=None if self.max_docs is None else times(self.max_docs))

    @property
    def continue_steps(self) -> int:
        return self.lead_steps + self.injection_every * (self.injection_rounds - 1) + 1 + self.tail_steps

    def injection_steps(self) -> list[int]:
        return [self.lead_steps + r * self.injection_every for r in range(self.injection_rounds)]

    def schedule(self, facts: kf.FactSet) -> kf.InjectionSchedule:
        """Chang et al.'s schedule from :meth:`injection_steps`: every round's passages in one step;
        paraphrase records cycle through their versions when they have fewer than ``injection_rounds``."""
        return kf.InjectionSchedule(facts, interval=self.injection_every, rounds=self.injection_rounds,
                                    start=self.lead_steps, cycle_paraphrases=True)

    def validate(self) -> None:
        if self.n_heads < 1 or self.d_model % self.n_heads:
            raise DemoConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise DemoConfigError(f"d_model={self.d_model} / n_heads={self.n_heads} = {self.d_model // self.n_heads} "
                                  "is odd: the rotary position embedding needs an even head dimension")
        if not 0 < self.early_step < self.pretrain_steps:
            raise DemoConfigError(f"early_step={self.early_step} must lie in (0, pretrain_steps={self.pretrain_steps})")
        if self.injection_rounds < 1 or self.injection_every < 1:
            raise DemoConfigError("injection_rounds and injection_every must be >= 1")
        if self.lead_steps < 0 or self.tail_steps < 0:
            raise DemoConfigError(f"lead_steps={self.lead_steps} and tail_steps={self.tail_steps} must be >= 0")
        if self.window < 1:
            raise DemoConfigError(f"window={self.window}: the local acquisition maximum needs a window of >= 1 step")
        if self.window > self.tail_steps + 1:  # probes are recorded up to tail_steps + 1 steps after the last injection
            raise DemoConfigError(f"window={self.window} runs past the recording: the probes are recorded "
                                  f"tail_steps + 1 = {self.tail_steps + 1} steps after the last injection; raise "
                                  "tail_steps or lower window")
        if self.window >= self.injection_every and self.injection_rounds > 1:
            log.info("window %d >= injection interval %d: acquisition maxima may see the next injection",
                     self.window, self.injection_every)
        if self.injection not in ("row", "span"):
            raise DemoConfigError(f"injection={self.injection!r}: use 'row' (one row per passage, as Chang et al.) "
                                  "or 'span' (long passages continue over rows)")
        rows = self.continue_batch_size or self.batch_size
        if self.injection == "row" and 3 * self.facts_per_scenario > rows:
            raise DemoConfigError(f"{3 * self.facts_per_scenario} passages are injected at the first round but a "
                                  f"continued-training batch has {rows} rows: raise continue_batch_size or lower "
                                  "facts_per_scenario")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise DemoConfigError(f"unknown arm(s) {unknown}; choose from {sorted(ARMS)}")
        if any(ARMS[a].edit is resuscitation_edit for a in self.arms):
            try:  # what the edit would refuse in the arm's task, after pretraining
                check_plan_arguments(self.resuscitation_ratio, self.resuscitation_factor, self.resuscitation_cap)
            except KacqError as error:
                raise DemoConfigError(f"resuscitation settings: {error}") from None
        repeated = sorted({a for a in self.arms if self.arms.count(a) > 1})
        if repeated:  # the same arm twice would run twice per seed and be stored once
            raise DemoConfigError(f"arm(s) {repeated} given more than once in arms={list(self.arms)}")
        check_device(self.device)

    def to_dict(self) -> dict:
        """The settings as results.json records them. ``cache_dir`` is left out: it is where this machine keeps
        its tokenizer, not a setting of the study, and would make equal studies differ by a path."""
        settings = dataclasses.asdict(self)
        del settings["cache_dir"]
        return {**settings, "continue_steps": self.continue_steps}


# ------------------------------------------------------------------------------------------------
# Arms: (starting checkpoint, optional edit, data transform, training-step factory)


@dataclass(frozen=True)
class Arm:
    """One branch of continued training.

    Attributes:
        name: the arm's label in results and figures.
        checkpoint: "early" or "late" pretraining checkpoint to start from.
        edit: ``edit(model, calibration, config) -> dict`` changes the weights once before training and
            returns what it did (for the report); None for no edit.
        transform: ``transform(injection, facts, config) -> str`` the text injected for one scheduled
            :class:`kacq_hooks.facts.Injection`; None injects the schedule's passage as it is.
        optimizer: ``optimizer(model, config) -> step`` where ``step(ids, mask) -> loss`` does one update.
    """

    name: str
    checkpoint: str
    edit: Callable[[nn.Module, "Calibration", DemoConfig], dict] | None = None
    transform: Callable[[kf.Injection, kf.FactSet, DemoConfig], str] | None = None
    optimizer: Callable[[nn.Module, DemoConfig], TrainStep] | None = None


def _augmented_passage(injection: kf.Injection, facts: kf.FactSet, config: DemoConfig) -> str:
    """Formatting augmentation (Zhu et al.): the paper's schedule, each re-injected copy in a new layout."""
    if injection.round == 0:
        return injection.text
    record = dataclasses.replace(facts[injection.record], train_context=injection.text)
    variants = augment_record(record, config.augment_variants, seed=config.seed + injection.round)
    return variants[injection.round % len(variants)]


def adamw_step(model: nn.Module, config: DemoConfig) -> TrainStep:
    """Plain AdamW at the continued-training rate, fresh optimizer state (as after resuscitation)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.continue_lr, weight_decay=config.weight_decay,
                                  betas=(config.continue_beta1, 0.999))
    schedule = _warmup(optimizer, config.continue_warmup)

    def step(ids: torch.Tensor, mask: torch.Tensor) -> float:
        loss = _lm_loss(model, ids, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def sam_step(model: nn.Module, config: DemoConfig) -> TrainStep:
    """Sharpness-aware minimization around AdamW (Foret et al. 2021): two forward/backward passes a step."""
    optimizer = SAM(model.parameters(), torch.optim.AdamW, rho=config.sam_rho, model=model, lr=config.continue_lr,
                    weight_decay=config.weight_decay, betas=(config.continue_beta1, 0.999))
    schedule = _warmup(optimizer, config.continue_warmup)

    def step(ids: torch.Tensor, mask: torch.Tensor) -> float:
        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = _lm_loss(model, ids, mask)
            loss.backward()
            return loss
        loss = optimizer.step(closure)
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _warmup(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``steps`` updates, then constant: a fresh AdamW at full rate jolts the model
    (its first update moves every weight by about the learning rate), which would mask the injections."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / steps) if steps > 0 else 1.0)


def resuscitation_edit(model: nn.Module, calibration: "Calibration", config: DemoConfig) -> dict:
    """Kim et al. Algorithm 1 as a one-off weight edit of every layer (multipliers capped), measured on calibration."""
    plan = kh.resuscitation_plan(calibration.instrumentation(model), ratio=config.resuscitation_ratio,
                              factor=config.resuscitation_factor, max_multiplier=config.resuscitation_cap)
    predicted = plan.predicted_entropy()
    kh.resuscitate(model, plan, mode="weights")
    layers = [{"layer": e.layer, "selected": int(e.selected), "capped": int(e.capped),
               "max_multiplier": float(e.multipliers.max()) if e.selected else 1.0,
               "mean_multiplier": float(e.multipliers.double().mean()) if e.selected else 1.0} for e in plan.edits]
    return {"kind": "resuscitation", "mode": "weights", "ratio": plan.ratio, "factor": plan.factor,
            "cap": plan.max_multiplier, "selected": plan.selected, "capped": plan.capped, "layers": layers,
            "entropy_predicted": predicted.to_dict()}


ARMS: dict[str, Arm] = {
    "early": Arm("early", "early"),
    "late": Arm("late", "late"),
    "late+resuscitation": Arm("late+resuscitation", "late", edit=resuscitation_edit),
    "late+augment": Arm("late+augment", "late", transform=_augmented_passage),
    "late+sam": Arm("late+sam", "late", optimizer=sam_step),
    "late+augment+sam": Arm("late+augment+sam", "late", transform=_augmented_passage, optimizer=sam_step),
}
ZHU_ARMS = ("late", "late+augment", "late+sam", "late+augment+sam")


# ------------------------------------------------------------------------------------------------
# Corpus, tokenizer, model


def corpus_texts(path: str | None = None, max_docs: int | None = None) -> list[str]:
    """Documents of the pretraining corpus: a .txt or .jsonl file (see :func:`kacq_hooks.corpus.load_corpus`)
    or, with no path, the offline English Wikipedia summaries; the first ``max_docs`` of them."""
    texts = wikipedia_summaries() if path is None else load_corpus(path)
    return texts[:max_docs] if max_docs is not None else texts


def build_model(config: DemoConfig, vocab_size: int, pad_token_id: int, eos_token_id: int) -> nn.Module:
    model_config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads, max_position_embeddings=max(512, config.seq_len),
        pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(model_config).to(config.device)  # initialized on the CPU: the same weights anywhere


def _lm_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    labels = ids.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


# ------------------------------------------------------------------------------------------------
# Calibration: entropy and held-out accuracy on a fixed set


@dataclass
class Calibration:
    """A fixed held-out batch: knowledge entropy and next-token accuracy are always measured on it."""

    ids: torch.Tensor
    batch_size: int = 8

    def _batches(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.ids), self.batch_size):
            yield self.ids[start:start + self.batch_size].to(self.device)

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def instrumentation(self, model: nn.Module) -> kh.Instrumentation:
        return kh.measure(model, ({"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in self._batches()))

    def entropy(self, model: nn.Module) -> dict:
        return self.instrumentation(model).knowledge_entropy().to_dict()

    def mean_abs_coefficients(self, model: nn.Module) -> list[torch.Tensor]:
        return self.instrumentation(model).mean_abs_coefficients()

    def accuracy(self, model: nn.Module) -> float:
        """Top-1 next-token accuracy: the stand-in for Kim et al.'s downstream accuracy P."""
        was_training = model.training
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for ids in self._batches():
                logits = model(input_ids=ids).logits[:, :-1]
                correct += int((logits.argmax(-1) == ids[:, 1:]).sum())
                total += ids[:, 1:].numel()
        model.train(was_training)
        return correct / max(total, 1)


# ------------------------------------------------------------------------------------------------
# Resuscitation (weight mode)


# ------------------------------------------------------------------------------------------------
# Injection


def inject_spanning(batch: torch.Tensor, passages: Sequence[list[int]], seq_len: int) -> tuple[torch.Tensor, list[int]]:
    """Put each passage (token ids, EOS included) at the start of batch rows, as Chang et al. do, whole.

    Used with ``injection="span"``. Unlike :func:`kacq_hooks.facts.inject` (``"row"``, the
    paper's way), which cuts a passage to one row, a passage longer than a row continues on the next rows
    (for rows shorter than the passages, e.g. the quick run's); the last of its rows keeps the original
    tokens after it, so the batch shape never changes. Returns the new batch and each passage's first row.

    >>> inject_spanning(torch.zeros(3, 4, dtype=torch.long), [[7, 7, 7, 7, 7, 9]], 4)[0].tolist()
    [[7, 7, 7, 7], [7, 9, 0, 0], [0, 0, 0, 0]]
    """
    batch = batch.clone()
    row, starts = 0, []
    for tokens in passages:
        starts.append(row)
        for offset in range(0, len(tokens), seq_len):
            if row >= len(batch):
                needed = sum(math.ceil(len(t) / seq_len) for t in passages)
                raise DemoConfigError(f"injected passages need {needed} rows of {seq_len} tokens but a batch has "
                                      f"{len(batch)}: raise batch_size or lower facts_per_scenario")
            chunk = torch.tensor(tokens[offset:offset + seq_len], dtype=torch.long)
            batch[row, :len(chunk)] = chunk
            row += 1
    return batch, starts


# ------------------------------------------------------------------------------------------------
# The study


@contextlib.contextmanager
def deterministic(threads: int, device: str = "cpu") -> Iterator[None]:
    """Deterministic algorithms and a fixed thread count for the duration, restored after.

    Byte-identical results are a CPU promise. On CUDA this sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless
    already set; it takes effect only before the process's first cuBLAS call, so a task sets it before any CUDA
    work) and asks torch for deterministic algorithms, but with ``warn_only``: an op without a deterministic
    CUDA kernel warns instead of stopping the study, and kacq_hooks' Triton statistics kernels add float
    partial sums with atomics, in no fixed order. A CUDA run is then close to, not byte-for-byte, a rerun.
    """
    if torch.device(device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous_threads = torch.get_num_threads()
    previous_mode = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_mode)


@dataclass
class _Data:
    tokenizer: Any
    train: torch.Tensor
    calibration: Calibration
    facts: kf.FactSet
    summary: dict = field(default_factory=dict)


def _prepare(config: DemoConfig, report: Progress) -> _Data:
    report("prepare", {"stage": "corpus"})
    texts = corpus_texts(config.corpus, config.max_docs)
    tokenizer = cached_tokenizer(texts, config.vocab_size, config.cache_dir)
    report("prepare", {"stage": "tokenize"})
    packed = pack_documents(texts, tokenizer, config.seq_len)
    n_cal = config.calibration_sequences
    if len(packed) <= n_cal + config.batch_size:
        raise DemoConfigError(f"the corpus packs into {len(packed)} sequences of {config.seq_len}; it needs more "
                              f"than calibration_sequences + batch_size = {n_cal + config.batch_size}")
    calibration, train = packed[:n_cal], packed[n_cal:]
    per = config.facts_per_scenario
    if config.facts is None:
        generated = kf.generate_facts(3 * per + config.control_facts, seed=config.seed,
                                      n_paraphrases=max(1, config.injection_rounds - 1), avoid=texts)
        scenarios = [s for s in ("paraphrase", "duplication", "once") for _ in range(per)]
        facts = kf.FactSet(list(generated), scenarios + ["unused"] * config.control_facts)
        facts_source = "generated"
    else:
        loaded = kf.load_fictional_knowledge(config.facts)
        picked = []
        for scenario in ("paraphrase", "duplication", "once"):
            indices = loaded.indices(scenario)[:per]
            if len(indices) < per:
                raise DemoConfigError(f"{config.facts} has {len(indices)} '{scenario}' records, fewer than "
                                      f"facts_per_scenario={per}")
            picked += [(loaded[i], scenario) for i in indices]
        unused = loaded.indices("unused")[:config.control_facts]
        if len(unused) < config.control_facts:
            raise DemoConfigError(f"{config.facts} has {len(unused)} 'unused' records, fewer than "
                                  f"control_facts={config.control_facts}")
        picked += [(loaded[i], "unused") for i in unused]
        facts = kf.FactSet([r for r, _ in picked], [s for _, s in picked])
        facts_source = str(config.facts)
    _check_rows(config, tokenizer, facts)
    summary = {
        "corpus": config.corpus or "wikipedia_summaries", "documents": len(texts),
        "tokens": int(packed.numel()), "train_sequences": len(train),
        "calibration_sequences": n_cal, "vocab_size": len(tokenizer),
        "facts": facts_source, "records": len(facts), "scenarios": list(facts.scenarios),
        "injection_steps": config.injection_steps(),
    }
    return _Data(tokenizer, train, Calibration(calibration.to(config.device)), facts, summary)


def _check_rows(config: DemoConfig, tokenizer, facts: kf.FactSet) -> None:
    """With ``injection="span"``, every step's passages must fit in a continued-training batch (a passage takes
    ceil(tokens / seq_len) rows): checked here, before pretraining, not when the first arm reaches the step.
    (The rows of "row" injection are checked by :meth:`DemoConfig.validate`.) Transformed passages (formatting
    augmentation) are checked when injected."""
    if config.injection != "span":
        return
    rows = config.continue_batch_size or config.batch_size
    schedule = config.schedule(facts)
    for step in schedule.steps:
        lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in schedule.passages_at(step)]
        needed = sum(math.ceil(n / config.seq_len) for n in lengths)
        if needed > rows:
            raise DemoConfigError(f"the passages injected at continued-training step {step} need {needed} rows of "
                                  f"{config.seq_len} tokens but a batch has {rows}: raise continue_batch_size (or "
                                  "batch_size) or seq_len, or lower facts_per_scenario")


def _pretrain(config: DemoConfig, data: _Data, report: Progress,
              snapshot_at: Sequence[int] = ()) -> tuple[dict, dict]:
    """Pretrain from scratch; checkpoints "early", "late" and ``step<N>`` for each step of ``snapshot_at``."""
    tokenizer = data.tokenizer
    model = build_model(config, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(config.warmup_steps, config.pretrain_steps))
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(config.seed))
    entropy = {"steps": [], "total": [], "per_layer": [], "max_total": None}
    losses, checkpoints = [], {}

    def measure(step: int) -> dict:
        ke = data.calibration.entropy(model)
        entropy["steps"].append(step)
        entropy["total"].append(ke["total"])
        entropy["per_layer"].append(ke["per_layer"])
        entropy["max_total"] = ke["max_total"]
        return ke

    latest = measure(0)
    for step in range(1, config.pretrain_steps + 1):
        rows = order[torch.arange((step - 1) * config.batch_size, step * config.batch_size) % len(order)]
        ids = data.train[rows].to(config.device)
        loss = _lm_loss(model, ids, torch.ones_like(ids))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % config.entropy_every == 0 or step in (config.early_step, config.pretrain_steps):
            if not entropy["steps"] or entropy["steps"][-1] != step:
                latest = measure(step)
        if step == config.early_step:
            checkpoints["early"] = _snapshot(model, step)
        if step in snapshot_at:
            checkpoints[f"step{step}"] = _snapshot(model, step)
        report("pretrain", {"step": step, "total": config.pretrain_steps, "loss": losses[-1],
                            "entropy": latest["total"]})
    checkpoints["late"] = _snapshot(model, config.pretrain_steps)
    checkpoints["tokenizer"] = tokenizer
    checkpoints["model"] = model
    pretraining = {"steps": list(range(1, config.pretrain_steps + 1)), "loss": losses, "entropy": entropy,
                   "checkpoints": {"early": config.early_step, "late": config.pretrain_steps},
                   "accuracy": {"early": None, "late": data.calibration.accuracy(model)}}
    return pretraining, checkpoints


def _snapshot(model: nn.Module, step: int) -> dict:
    return {"step": step, "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}


def _cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def _run_arm(arm: Arm, config: DemoConfig, data: _Data, checkpoints: dict, report: Progress) -> dict:
    model = checkpoints["model"]
    model.load_state_dict(checkpoints[arm.checkpoint]["state"])
    torch.manual_seed(config.seed + 1)  # every arm sees the same background batches
    start = data.calibration.instrumentation(model)
    entropy_start = start.knowledge_entropy().to_dict()
    edit = arm.edit(model, data.calibration, config) if arm.edit else None
    if edit is not None:
        edit["entropy_before"] = entropy_start
        entropy_start = data.calibration.entropy(model)
    accuracy_before = data.calibration.accuracy(model)
    step_fn = (arm.optimizer or adamw_step)(model, config)
    tracker = kf.FactTracker(model, data.tokenizer, data.facts, batch_size=64)
    store = kf.TrajectoryStore(None, tracker.probes, data.facts.scenarios)  # in memory
    schedule = config.schedule(data.facts)
    # where the facts land, in the arms the finding compares (three attribution passes each)
    landing = (_Landing(model, data.tokenizer, tracker, start.mean_abs_coefficients())
               if arm.name in LANDING_ARMS else None)
    attribute_at = {0, schedule.steps[0] + 1}  # the arm's start, and right after the first injection's update
    eos = data.tokenizer.eos_token_id
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(config.seed + 17))
    losses = []
    entropy = {"steps": [0], "total": [entropy_start["total"]]}
    rows_per_step = config.continue_batch_size or config.batch_size
    model.train()
    for step in range(config.continue_steps):
        store.append(step, tracker.score_probes())  # every probe, before every update
        if landing is not None and step in attribute_at:
            landing.record(step)
        rows = order[torch.arange(step * rows_per_step, (step + 1) * rows_per_step) % len(order)]
        ids = data.train[rows].to(config.device)
        due = schedule.at(step)
        if due:
            texts = [arm.transform(i, data.facts, config) if arm.transform else i.text for i in due]
            if config.injection == "row":
                ids = kf.inject({"input_ids": ids}, texts, data.tokenizer)["input_ids"]
            else:
                passages = [data.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] for text in texts]
                ids, _ = inject_spanning(ids, passages, config.seq_len)
        losses.append(step_fn(ids, torch.ones_like(ids)))
        if (step + 1) % config.arm_entropy_every == 0 and step + 1 < config.continue_steps:
            entropy["steps"].append(step + 1)
            entropy["total"].append(data.calibration.entropy(model)["total"])
        report(f"arm:{arm.name}", {"step": step + 1, "total": config.continue_steps, "loss": losses[-1],
                                   "entropy": entropy["total"][-1]})
    store.append(config.continue_steps, tracker.score_probes())
    if landing is not None:
        landing.record(config.continue_steps)
    accuracy_after = data.calibration.accuracy(model)
    entropy_end = data.calibration.entropy(model)
    entropy["steps"].append(config.continue_steps)
    entropy["total"].append(entropy_end["total"])
    results = {
        "checkpoint": arm.checkpoint, "checkpoint_step": checkpoints[arm.checkpoint]["step"],
        "edit": edit, "entropy_start": entropy_start, "entropy_end": entropy_end, "entropy": entropy,
        "loss": losses,
        **_fact_metrics(store, schedule, config),
        "kim": _kim_metrics(_injected_values(store, schedule), accuracy_before, accuracy_after),
    }
    if landing is not None:
        results["attribution"] = landing.summary(schedule, data.facts, config.resuscitation_ratio)
        results["_attribution_s"] = landing.seconds  # arm_task moves it to the timings
    return results


class _Landing:
    """Where an arm's injected facts land: every probe's top-k slots at a few steps, in an attribution store
    whose first record (:data:`CHECKPOINT_STEP`) holds c̄ of the starting checkpoint as loaded, before any edit.

    c̄ is taken before the edit because the question is whether facts land in the slots resuscitation
    amplifies, and those are the low-activity slots of the checkpoint it edited (after the edit they are
    no longer low). The late arms share the checkpoint, so they are measured against the same slots.
    """

    def __init__(self, model: nn.Module, tokenizer, tracker: kf.FactTracker, cbar: list[torch.Tensor]):
        self.model, self.tokenizer, self.tracker = model, tokenizer, tracker
        sites = kh.find_sites(model)
        self.store = AttributionStore(None, tracker.probes, labels=[s.label for s in sites],
                                      d_ff=[s.d_ff for s in sites], k=ATTRIBUTION_K, method=ATTRIBUTION_METHOD)
        # c̄ without slots: the checkpoint is not attributed, only its activity is needed
        self.store.append(CHECKPOINT_STEP, [[] for _ in tracker.probes], [[] for _ in tracker.probes], cbar)
        self.seconds = 0.0

    def record(self, step: int) -> None:
        started = time.perf_counter()
        result = attribute(self.model, self.tokenizer, self.tracker, ATTRIBUTION_METHOD)
        best = result.top_k(ATTRIBUTION_K, ATTRIBUTION_BY)
        self.store.append(step, [[(s.layer, s.neuron) for s in row] for row in best],
                          [[s.score for s in row] for row in best])
        self.seconds += time.perf_counter() - started

    def summary(self, schedule: kf.InjectionSchedule, facts: kf.FactSet, quantile: float) -> dict:
        """The low-activity share of the probes' top-k slots per recorded step (mean, min, max over probes, and
        per probe kind and scenario), against chance, with the top-k sets' stability between records."""
        first = [schedule.steps_of(r) for r in range(len(facts))]
        # every record after the checkpoint is measured against its c̄ (the step-0 record too: the share the
        # edit alone gives, since resuscitation raises exactly these slots' activations); the records after
        # the first injection are then what low_activity_share reports with the schedule's injection steps
        measured = low_activity_share(self.store, {r: CHECKPOINT_STEP for r, when in enumerate(first) if when},
                                      quantile)
        steps, share = self.store.steps[1:], measured.share[1:]                  # [records, probes]
        injected = torch.tensor([bool(first[p.record]) for p in self.store.probes])

        def stats(columns: torch.Tensor) -> dict:
            rows = share[:, columns]
            return {"mean": _nanmean(rows), "min": _nanreduce(rows, torch.amin), "max": _nanreduce(rows, torch.amax)}

        kinds = {kind: torch.tensor([p.kind == kind for p in self.store.probes]) for kind in kf.PROBE_KINDS}
        scenarios = {scenario: torch.tensor([facts.scenarios[p.record] == scenario for p in self.store.probes])
                     for scenario in kf.SCENARIOS}
        by_kind = {kind: stats(columns) for kind, columns in kinds.items() if columns.any()}
        by_scenario = {scenario: stats(columns) for scenario, columns in scenarios.items() if columns.any()}
        total = sum(self.store.d_ff)
        chance = float(measured.chance[injected].double().mean())
        return {
            "method": ATTRIBUTION_METHOD, "k": ATTRIBUTION_K, "by": ATTRIBUTION_BY, "quantile": quantile,
            "slots": total, "low_activity_slots": round(chance * total), "chance": chance,
            "steps": steps, "first_injection": min(when[0] for when in first if when),
            "share": stats(injected), "share_by_kind": by_kind, "share_by_scenario": by_scenario,
            # Jaccard of each probe's top-k set with its previous record's (the c̄-only record has none)
            "stability": _nanmean(stability(self.store)[1:]),
        }


def _nanmean(rows: torch.Tensor) -> list[float]:
    """Per row of ``[rows, probes]`` the mean over its finite entries (NaN where there is none)."""
    return rows.double().nanmean(1).tolist()


def _nanreduce(rows: torch.Tensor, reduce) -> list[float]:
    finite = torch.isfinite(rows)
    fill = math.inf if reduce is torch.amin else -math.inf
    out = reduce(torch.where(finite, rows.double(), fill), dim=1)
    return torch.where(finite.any(1), out, math.nan).tolist()


def _fact_metrics(store: kf.TrajectoryStore, schedule: kf.InjectionSchedule, config: DemoConfig) -> dict:
    """Chang et al.'s metrics per (scenario, kind): ``facts.summarize_acquisition``'s effectivity and
    power-law fit, with the per-injection gains and the retainability curve it was fitted to (for the
    figures and findings), from the store's trajectory (the probes' scores before each step)."""
    summary = {(row["scenario"], row["kind"]): row for row in
               kf.summarize_acquisition(store, schedule, window=config.window, iqr_factor=config.iqr_factor)}
    # the same effectivity on the first target token alone: a name's later tokens follow from its first
    # whatever the probe's wording, which flattens differences between probe kinds in the per-token mean
    first_token = {(row["scenario"], row["kind"]): row["effectivity"] for row in
                   kf.summarize_acquisition(store, schedule, "first", window=config.window,
                                            iqr_factor=config.iqr_factor)}
    values = store.values("mean").double()                                      # [steps + 1, probes]
    groups: dict[str, dict] = {}
    trajectories: dict[str, list] = {}
    for scenario in kf.SCENARIOS:
        for kind in kf.PROBE_KINDS:
            row = summary.get((scenario, kind))
            if row is None:
                columns = store.columns(kind=kind, scenario=scenario) if scenario == "unused" else []
                if columns:  # never injected: a trajectory for the figures, no metrics
                    trajectories[f"{scenario}/{kind}"] = values[:, columns].T.nanmean(0).tolist()
                continue
            key = f"{scenario}/{kind}"
            columns = store.columns(kind=kind, scenario=scenario)
            when = schedule.steps_of(store.probes[columns[0]].record)  # a scenario's records share their steps
            group = values[:, columns].T                                           # [probes, steps + 1]
            trajectories[key] = group.nanmean(0).tolist()
            curve = torch.tensor(row["retainability"][1:], dtype=torch.float64)  # R from t = 1, as it is fitted
            fitted = math.isfinite(row["r_squared"])
            groups[key] = {
                "injection_steps": list(when),
                "effectivity": row["effectivity"],
                "effectivity_first_token": first_token[(scenario, kind)],
                "effectivity_per_round": row["effectivity_per_injection"],
                "effectivity_positive_fraction": row["effectivity_positive_fraction"],
                "retainability": {"t": list(range(1, row["horizon"] + 1)), "R": curve.tolist(),
                                  "probes": row["n_probes"], "fit": {
                    "decay": row["decay"], "intercept": row["intercept"], "r_squared": row["r_squared"],
                    "x_intercept_steps": row["x_intercept_steps"] if fitted and row["decay"] > 0 else None,
                    "points": int(torch.isfinite(curve).sum()) if fitted else 0}},
                "log_prob_start": float(group[:, 0].nanmean()), "log_prob_end": float(group[:, -1].nanmean()),
            }
    return {"trajectories": trajectories, "groups": groups, "learning": _learning(store, schedule)}


def _learning(store: kf.TrajectoryStore, schedule: kf.InjectionSchedule) -> dict:
    """Whether the arm learned its facts at all: the mean target log prob (nats per token, all probe kinds) of
    injected facts and of facts never injected ("unused"), at the arm's start, its end and the change, overall
    and per kind. Facts that rise no more than the controls were not learned from their injections."""
    values = store.values("mean").double()                                      # [steps + 1, probes]
    out: dict[str, dict] = {}
    for group, injected in (("injected", True), ("control", False)):
        columns = _probe_columns(store, schedule, injected)
        if not columns:
            continue
        picked = values[:, columns]
        kinds = {kind: [i for i, c in enumerate(columns) if store.probes[c].kind == kind] for kind in kf.PROBE_KINDS}
        out[group] = {"probes": len(columns), "start": float(picked[0].nanmean()), "end": float(picked[-1].nanmean()),
                      "peak": float(picked.nanmean(1).max()),
                      "rise": float(picked[-1].nanmean() - picked[0].nanmean()),
                      "rise_by_kind": {kind: float(picked[-1, idx].nanmean() - picked[0, idx].nanmean())
                                       for kind, idx in kinds.items() if idx}}
    return out


def _injected_values(store: kf.TrajectoryStore, schedule: kf.InjectionSchedule) -> torch.Tensor:
    """``[steps + 1, probes]`` mean target log probs of the injected facts' probes (the controls left out)."""
    return store.values("mean").double()[:, _probe_columns(store, schedule, injected=True)]


def _probe_columns(store: kf.TrajectoryStore, schedule: kf.InjectionSchedule, injected: bool) -> list[int]:
    """Columns of the probes whose records the schedule injects (``injected``) or never injects (the controls)."""
    return [c for c, p in enumerate(store.probes) if bool(schedule.steps_of(p.record)) == injected]


def _kim_metrics(trajectory: torch.Tensor, accuracy_before: float, accuracy_after: float) -> dict:
    """K = mean target log prob over probes; A = (K_after - K_before) / |K_before|; F on held-out accuracy;
    retention = share of the peak gain in K still held at the end."""
    k = torch.tensor([kf.knowledge_score(scores) for scores in trajectory], dtype=torch.float64)
    k_before, k_after, k_peak = float(k[0]), float(k[-1]), float(k.max())
    gain = k_peak - k_before
    return {
        "K_before": k_before, "K_after": k_after, "K_peak": k_peak,
        "acquisition": kf.acquisition(k_before, k_after),
        "retention": (k_after - k_before) / gain if gain > 0 else None,
        "P_before": accuracy_before, "P_after": accuracy_after,
        "forgetting": kf.forgetting(accuracy_before, accuracy_after) if accuracy_before > 0 else None,
        "K": k.tolist(),
    }


def _json_ready(value):
    """Floats rounded to 7 significant digits (stable text), NaN and inf to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_ready(value.tolist())
    if isinstance(value, float):
        return float(f"{value:.7g}") if math.isfinite(value) else None
    return value


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all: into a temporary file beside it, then ``os.replace``. An
    interrupted write leaves the previous file as it was (and no partial file)."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.partial")  # beside it (one file system), with the umask's permissions
    try:
        Path(staging).write_text(text, encoding="utf-8")
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


def write_results(results: dict, out: str | os.PathLike) -> Path:
    """Write ``results.json`` (without wall-clock timings, so equal runs give equal bytes) and ``timings.json``,
    each whole or not at all (:func:`write_text_atomic`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stable = {k: v for k, v in results.items() if k != "timings"}
    text = json.dumps(stable, indent=1, sort_keys=True, allow_nan=False) + "\n"
    timings = json.dumps(results["timings"], indent=1, sort_keys=True) + "\n" if "timings" in results else None
    path = write_text_atomic(out / "results.json", text)
    if timings is not None:
        write_text_atomic(out / "timings.json", timings)
    return path
