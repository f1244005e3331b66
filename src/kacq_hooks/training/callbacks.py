"""Hugging Face ``TrainerCallback``s: fact tracking, knowledge entropy and fact injection during training.

Metrics reach the Trainer's logs (and so TensorBoard, W&B and ``trainer.state.log_history``) through
``on_log``. Callbacks passed as ``Trainer(callbacks=[...])`` run after the reporting integrations, which
would then never see the added keys: call ``callback.attach(trainer)`` instead, which puts the callback
first.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping

import torch
from transformers import TrainerCallback

from kacq_hooks.facts.injection import InjectionCollator, InjectionSchedule, inject
from kacq_hooks.facts.scoring import model_device, scoring_mode
from kacq_hooks.facts.tracker import FactTracker

logger = logging.getLogger(__name__)


class _LoggingCallback(TrainerCallback):
    """Holds metrics until the Trainer's next ``on_log`` and adds them to its logs and ``log_history``."""

    def __init__(self):
        self._pending: dict[str, float] = {}
        self._attached = False
        self._warned_order = False

    def attach(self, trainer) -> "_LoggingCallback":
        """Add this callback to ``trainer`` ahead of the reporting integrations, so they log its metrics too."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self._attached = True
        return self

    def _queue(self, metrics: Mapping[str, float], control) -> None:
        self._pending.update(metrics)
        control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None:
            return
        if not self._attached and args.report_to and not self._warned_order:
            logger.warning(
                "%s was not added with .attach(trainer): the reporting integrations %s run before it and miss "
                "its metrics (they still reach trainer.state.log_history)", type(self).__name__, args.report_to,
            )
            self._warned_order = True
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)  # Trainer.log appended a copy before calling on_log
        self._pending = {}


class FactTrackingCallback(_LoggingCallback):
    """Score the tracker's probes every ``every`` steps, record them, and log per-kind summaries.

    At the start of training the model θ_{global_step} is recorded too (injection metrics need the
    value before the first injection); after resuming from a checkpoint, recorded steps later than
    the checkpoint are dropped first. Logged keys are ``{prefix}/{kind}`` and
    ``{prefix}/{scenario}/{kind}``: mean target log probs. ``every`` steps also force a log line.

    >>> trainer = Trainer(model=model, args=args, train_dataset=data)  # doctest: +SKIP
    >>> tracker = FactTracker(model, tokenizer, facts, store="run/facts.jsonl")  # doctest: +SKIP
    >>> FactTrackingCallback(tracker).attach(trainer)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(self, tracker: FactTracker, every: int = 1, *, prefix: str = "facts", reduction: str = "mean"):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.tracker = tracker
        self.every = every
        self.prefix = prefix
        self.reduction = reduction

    def _score(self, step: int):
        if self.tracker.store is not None:
            return self.tracker.record(step)
        return self.tracker.score_probes()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and model is not self.tracker.model:
            logger.warning("FactTrackingCallback: the Trainer trains another model object than the tracker scores")
        store = self.tracker.store
        if store is None:  # nothing to record the starting point into
            return
        store.discard_after(state.global_step)
        if store.last_step != state.global_step:
            self.tracker.record(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every:
            return
        scores = self._score(state.global_step)
        summary = self.tracker.summary(scores, self.reduction)
        self._queue({f"{self.prefix}/{key}": value for key, value in summary.items()}, control)


class KnowledgeEntropyCallback(_LoggingCallback):
    """Log knowledge entropy (total and per layer) every ``every`` steps.

    Without ``calibration`` it is measured on the training batches of the last ``every`` steps: the
    model is instrumented for the whole run, counting only between ``on_step_begin`` and
    ``on_step_end`` (so evaluation and probe scoring stay out), and the statistics restart after each
    report. With ``calibration`` (token ids [N, T], a batch dict, or an iterable of either) a fresh
    instrumentation measures the model on that fixed set at each report and at the start, with no
    grad, in eval mode, RNG untouched. ``history`` keeps ``(step, KnowledgeEntropy)`` pairs.
    """

    def __init__(
        self,
        every: int = 100,
        calibration=None,
        *,
        batch_size: int = 8,
        weighting: str = "token",
        mask_padding: bool = True,
        mlp_out: str | None = None,
        prefix: str = "knowledge_entropy",
        per_layer: bool = True,
    ):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.calibration = _calibration_batches(calibration, batch_size) if calibration is not None else None
        self.instrument_kwargs = dict(weighting=weighting, mask_padding=mask_padding, mlp_out=mlp_out)
        self.prefix = prefix
        self.per_layer = per_layer
        self.history: list[tuple[int, object]] = []
        self._instrumentation = None
        self._paused = contextlib.ExitStack()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from kacq_hooks.instrumentation import instrument

        if self.calibration is not None:
            self.history.append((state.global_step, self._measure_calibration(model)))
            return
        self._instrumentation = instrument(model, **self.instrument_kwargs)
        self._pause()

    def on_step_begin(self, args, state, control, **kwargs):
        self._paused.close()  # count this step's training forwards

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._instrumentation is not None:
            self._pause()
        if state.global_step % self.every:
            return
        if self.calibration is not None:
            entropy = self._measure_calibration(model)
        else:
            entropy = self._instrumentation.knowledge_entropy()
            self._instrumentation.reset()
        self.history.append((state.global_step, entropy))
        metrics = {f"{self.prefix}/total": entropy.total}
        if self.per_layer:
            width = len(str(len(entropy.per_layer) - 1))
            metrics.update({f"{self.prefix}/layer_{i:0{width}d}": h for i, h in enumerate(entropy.per_layer)})
        self._queue(metrics, control)

    def on_train_end(self, args, state, control, **kwargs):
        self._paused.close()
        if self._instrumentation is not None:
            self._instrumentation.remove()
            self._instrumentation = None

    def _pause(self) -> None:
        self._paused.close()
        self._paused.enter_context(self._instrumentation.pause())

    def _measure_calibration(self, model):
        from kacq_hooks.instrumentation import instrument

        device = model_device(model)
        with scoring_mode(model), instrument(model, **self.instrument_kwargs) as inst:
            for batch in self.calibration:
                model(**{key: value.to(device) for key, value in batch.items()})
        return inst.knowledge_entropy()


def _calibration_batches(calibration, batch_size: int) -> list[dict[str, torch.Tensor]]:
    items: Iterable = [calibration] if isinstance(calibration, (torch.Tensor, Mapping)) else calibration
    batches = []
    for item in items:
        batch = {"input_ids": item} if isinstance(item, torch.Tensor) else dict(item)
        if "input_ids" not in batch or batch["input_ids"].dim() != 2:
            raise ValueError(
                "calibration data must be token ids [N, T], a dict with 'input_ids' [N, T] (and 'attention_mask'), "
                "or an iterable of those"
            )
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        for first in range(0, batch["input_ids"].shape[0], batch_size):
            batches.append({k: v[first:first + batch_size] for k, v in batch.items()})
    if not batches:
        raise ValueError("the calibration set is empty")
    return batches


class InjectionCallback(TrainerCallback):
    """Inject the schedule's passages into the Trainer's batches, at the model's input.

    A forward pre-hook on the model rewrites ``input_ids``, ``attention_mask`` and ``labels`` of the
    first training forward of each step that has injections (see :func:`kacq_hooks.facts.inject`).
    The step is the Trainer's own ``global_step``, so this stays right with dataloader workers,
    prefetching, several epochs and resumed runs. ``injected`` maps steps to the records injected.
    (The Trainer counts label tokens for loss scaling before the hook runs; with fixed-length rows
    injection leaves that count unchanged.)
    """

    def __init__(self, schedule: InjectionSchedule, tokenizer):
        self.schedule = schedule
        self.tokenizer = tokenizer
        self.injected: dict[int, list[int]] = {}
        self._handle = None
        self._due: tuple[int, list] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._handle is None:
            self._handle = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        due = self.schedule.at(state.global_step)
        self._due = (state.global_step, due) if due else None

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _on_forward(self, module, args, kwargs):
        if self._due is None or not module.training or not torch.is_grad_enabled():
            return None
        step, due = self._due
        self._due = None
        batch = dict(kwargs)
        if args:  # input_ids given positionally
            batch["input_ids"], args = args[0], args[1:]
        fields = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if batch.get(k) is not None}
        injected = inject(fields, [i.text for i in due], self.tokenizer)
        batch.update({k: v.to(fields[k].device) for k, v in injected.items()})
        self.injected[step] = [i.record for i in due]
        return args, batch


class InjectionCollatorSync(TrainerCallback):
    """Keeps an :class:`InjectionCollator`'s step count aligned with the Trainer (made by ``collator.callback()``)."""

    def __init__(self, collator: InjectionCollator):
        self.collator = collator
        self._warned = False

    def on_train_begin(self, args, state, control, **kwargs):
        if args.gradient_accumulation_steps != self.collator.gradient_accumulation_steps:
            raise ValueError(
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


__all__ = [
    "FactTrackingCallback",
    "InjectionCallback",
    "InjectionCollatorSync",
    "KnowledgeEntropyCallback",
]
