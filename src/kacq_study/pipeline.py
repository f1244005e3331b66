"""One seed's pipeline, in public parts: :func:`prepare` (corpus, tokenizer, calibration set, facts),
:func:`pretrain` (from scratch, with knowledge entropy per layer and the early and late checkpoints) and
:func:`run_arm` (continued training with fact injection from a checkpoint, and the arm's metrics).

:func:`kacq_study.study.run_study` runs these parts for several seeds as parallel tasks; the experiments of
:mod:`kacq_study.experiments` run them in their own combinations. Nothing here prints: progress goes to a
callback (:data:`kacq_study.config.Progress`). Same config and seed give the same numbers (under
:func:`deterministic`).
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import kacq_hooks as kh
from kacq_hooks import facts as kf
from kacq_hooks.errors import MetricError
from kacq_hooks.corpus import cached_tokenizer, load_corpus, pack_documents, wikipedia_summaries

from .arms import Arm, adamw_step, lm_loss
from .config import DemoConfig, DemoConfigError, Progress
from .findings import DECAY_NOISE_MULTIPLE, LANDING_ARMS
from .metrics import Landing, fact_metrics, injected_values, kim_metrics

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

    def loss(self, model: nn.Module) -> float:
        """The mean next-token loss (nats/token) over the calibration rows, in eval mode and without gradients."""
        was_training = model.training
        model.eval()
        with torch.no_grad():
            losses = [float(model(input_ids=ids, labels=ids).loss) for ids in self._batches()]
        model.train(was_training)
        return sum(losses) / max(len(losses), 1)

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
# One seed's pipeline: prepare, pretrain, run an arm


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
class PreparedData:
    """What :func:`prepare` returns: the tokenizer, the packed training rows, the calibration set, the facts, and
    a summary of them for results.json."""

    tokenizer: Any
    train: torch.Tensor
    calibration: Calibration
    facts: kf.FactSet
    summary: dict = field(default_factory=dict)


def prepare(config: DemoConfig, report: Progress) -> PreparedData:
    """The corpus packed into rows (the first ``calibration_sequences`` held out for calibration), the tokenizer
    (trained in-process, cached on disk) and the facts (generated, or read from ``config.facts``)."""
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
    return PreparedData(tokenizer, train, Calibration(calibration.to(config.device)), facts, summary)


def _check_rows(config: DemoConfig, tokenizer, facts: kf.FactSet) -> None:
    """With ``injection="span"``, every step's passages must fit in a continued-training batch (a passage takes
    ceil(tokens / seq_len) rows): checked here, before pretraining, not when the first arm reaches the step.
    (The rows of "row" injection are checked by :meth:`DemoConfig.validate`.) Transformed passages (formatting
    augmentation) are checked when injected."""
    if config.injection != "span":
        return
    rows = config.continue_batch_size or config.batch_size
    schedule = config.schedule(facts)
    needed = {}
    for step in schedule.steps:
        lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in schedule.passages_at(step)]
        needed[step] = sum(math.ceil(n / config.seq_len) for n in lengths)
    if needed and max(needed.values()) > rows:
        # the worst step, so that one number fixes every step (kacq demo has no option for it: say how from Python)
        step = max(needed, key=needed.get)
        raise DemoConfigError(f"the passages injected at continued-training step {step} need {needed[step]} rows of "
                              f"{config.seq_len} tokens but a batch has {rows}: raise continue_batch_size (or "
                              "batch_size) or seq_len, or lower facts_per_scenario; kacq demo has no option for "
                              "these: run the study from Python (kacq_study.study.run_study) with e.g. "
                              f"continue_batch_size={needed[step]}")


def pretrain(config: DemoConfig, data: PreparedData, report: Progress,
              snapshot_at: Sequence[int] = ()) -> tuple[dict, dict]:
    """Pretrain from scratch; checkpoints "early", "late" and ``step<N>`` for each step of ``snapshot_at``.

    With ``config.checkpoint_rule == "peak"`` the early checkpoint is chosen after training by
    :func:`entropy_peak` from the entropy measured every ``entropy_every`` steps (a snapshot is kept at each), and
    ``pretraining["checkpoint_rule"]`` records the rule's numbers, including whether entropy decayed after the peak."""
    tokenizer = data.tokenizer
    model = build_model(config, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.95))
    factor = (_cosine(config.warmup_steps, config.pretrain_steps) if config.lr_schedule == "cosine"
              else _constant(config.warmup_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(config.seed))
    entropy = {"steps": [], "total": [], "per_layer": [], "max_total": None}
    losses, checkpoints = [], {}
    by_peak = config.checkpoint_rule == "peak"
    measured: dict[int, dict] = {}  # by_peak: a snapshot at every entropy measurement, the candidates

    def measure(step: int) -> dict:
        ke = data.calibration.entropy(model)
        entropy["steps"].append(step)
        entropy["total"].append(ke["total"])
        entropy["per_layer"].append(ke["per_layer"])
        entropy["max_total"] = ke["max_total"]
        if by_peak:
            measured[step] = _snapshot(model, step)
        return ke

    latest = measure(0)
    fixed_early = None if by_peak else config.early_step
    for step in range(1, config.pretrain_steps + 1):
        loss = pretrain_step(model, optimizer, schedule, data, order, step, config)
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % config.entropy_every == 0 or step in (fixed_early, config.pretrain_steps):
            if not entropy["steps"] or entropy["steps"][-1] != step:
                latest = measure(step)
        if step == fixed_early:
            checkpoints["early"] = _snapshot(model, step)
        if step in snapshot_at:
            checkpoints[f"step{step}"] = _snapshot(model, step)
        report("pretrain", {"step": step, "total": config.pretrain_steps, "loss": losses[-1],
                            "entropy": latest["total"]})
    checkpoints["late"] = _snapshot(model, config.pretrain_steps)
    rule = None
    if by_peak:
        rule = entropy_peak(entropy["steps"], entropy["total"])
        checkpoints["early"] = measured[rule["peak_step"]]
        measured.clear()
    checkpoints["tokenizer"] = tokenizer
    checkpoints["model"] = model
    pretraining = {"steps": list(range(1, config.pretrain_steps + 1)), "loss": losses, "entropy": entropy,
                   "checkpoints": {"early": checkpoints["early"]["step"], "late": config.pretrain_steps},
                   "accuracy": {"early": None, "late": data.calibration.accuracy(model)}}
    if rule is not None:
        pretraining["checkpoint_rule"] = rule
    return pretraining, checkpoints


def curve_noise(values: Sequence[float]) -> float | None:
    """Step-to-step noise of a curve: the standard deviation of its first differences over sqrt(2), which a slow
    trend barely moves; None for fewer than three values.

    >>> round(curve_noise([1.0, 1.1, 1.0, 1.1]), 4)
    0.0816
    """
    diffs = [b - a for a, b in zip(values, values[1:])]
    if len(diffs) < 2:
        return None
    return statistics.stdev(diffs) / math.sqrt(2)


def entropy_peak(steps: Sequence[int], totals: Sequence[float],
                 noise_multiple: float = DECAY_NOISE_MULTIPLE) -> dict:
    """The checkpoint rule of the decay regime, from a pretraining's own entropy curve (it looks at no finding).

    From scratch, entropy collapses within tens of steps, climbs, and (with enough weight decay) peaks and falls.
    The early minimum is the lowest total in the first quarter of the measurements after step 0; the peak is the
    highest total from it on, and the early checkpoint is the measurement at the peak. The late checkpoint is the
    last measurement. ``decays`` is True when the last total is below the peak by more than ``noise_multiple``
    times the noise of the curve from the peak on (:func:`curve_noise`), False when not, None when fewer than
    three measurements follow the peak: a run whose entropy did not decay says so, and its late checkpoint is
    then not "after the decay".

    >>> r = entropy_peak([0, 1, 2, 3, 4, 5, 6, 7], [9.0, 5.0, 6.0, 7.0, 6.9, 6.7, 6.5, 6.3])
    >>> r["early_minimum_step"], r["peak_step"], r["late_step"], r["decays"]
    (1, 3, 7, True)
    """
    if len(steps) != len(totals) or len(totals) < 2:
        raise DemoConfigError(f"the peak rule needs at least two entropy measurements, got {len(totals)}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise DemoConfigError(f"the peak rule needs the measurements' steps increasing, got {list(steps)}")
    bad = [s for s, t in zip(steps, totals) if not math.isfinite(t)]
    if bad:
        # a diverged model: nothing compares above NaN, so it would be taken as the peak, or crash the noise
        raise MetricError(f"the entropy measured at step(s) {bad} is not finite (the pretraining diverged): no "
                          "checkpoint can be chosen from this curve; lower lr or weight_decay")
    head = max(2, len(totals) // 4)  # step 0 is the untrained model, near the maximum: the collapse comes after it
    low = min(range(1, min(head, len(totals))), key=totals.__getitem__)
    peak = max(range(low, len(totals)), key=totals.__getitem__)
    after = list(totals[peak:])
    noise = curve_noise(after)
    fall = totals[peak] - totals[-1]
    # at least three measurements after the peak (``after`` holds the peak too)
    decays = None if noise is None or len(after) < 4 else bool(fall > noise_multiple * noise)
    return {"rule": "peak", "early_minimum_step": steps[low], "early_minimum": totals[low],
            "peak_step": steps[peak], "peak": totals[peak], "late_step": steps[-1], "last": totals[-1],
            "fall_after_peak": fall, "noise": noise, "noise_multiple": noise_multiple,
            "measurements_after_peak": len(after) - 1, "decays": decays}


def pretrain_step(model: nn.Module, optimizer: torch.optim.Optimizer, schedule, data: PreparedData,
                  order: torch.Tensor, step: int, config: DemoConfig) -> torch.Tensor:
    """One pretraining step (1-based ``step``): the next ``batch_size`` rows of ``order``, the LM loss, its backward,
    clipping to norm 1, the optimizer and the schedule; returns the loss. The caller zeroes the gradients."""
    rows = order[torch.arange((step - 1) * config.batch_size, step * config.batch_size) % len(order)]
    ids = data.train[rows].to(config.device)
    loss = lm_loss(model, ids, torch.ones_like(ids))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    return loss


def _snapshot(model: nn.Module, step: int) -> dict:
    return {"step": step, "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}


def _cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def _constant(warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return factor


def run_arm(arm: Arm, config: DemoConfig, data: PreparedData, checkpoints: dict, report: Progress) -> dict:
    """Continued training with fact injection from ``checkpoints[arm.checkpoint]`` (the checkpoints of
    :func:`pretrain`, with its ``"model"``), every probe scored before every update; the arm's results dict."""
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
    landing = (Landing(model, data.tokenizer, tracker, start.mean_abs_coefficients())
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
        **fact_metrics(store, schedule, config),
        "kim": kim_metrics(injected_values(store, schedule), accuracy_before, accuracy_after),
    }
    if landing is not None:
        results["attribution"] = landing.summary(schedule, data.facts, config.resuscitation_ratio)
        results["_attribution_s"] = landing.seconds  # arm_task moves it to the timings
    return results

