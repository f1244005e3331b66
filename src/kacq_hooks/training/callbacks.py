"""Hugging Face ``TrainerCallback``s: fact tracking, knowledge entropy and fact injection during training.

Metrics reach the Trainer's logs (and so TensorBoard, W&B and ``trainer.state.log_history``) through
``on_log``. Callbacks passed as ``Trainer(callbacks=[...])`` run after the reporting integrations, which
would then never see the added keys: call ``callback.attach(trainer)`` instead, which puts the callback
first.

Every callback here joins the Trainer's checkpoints: ``on_save`` writes its state (statistics of the
instrumentation it owns, its history, what it injected) as ``kacq_<name>.pt`` into the checkpoint folder,
and a run resumed from that checkpoint reads it back, so an interrupted and resumed run logs, injects and
ends exactly like an uninterrupted one. A user's own instrumentation joins with one line,
``InstrumentationCheckpointCallback(inst)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from transformers import TrainerCallback

from kacq_hooks._hooks import HookSet, OwnerHook
from kacq_hooks.entropy import KnowledgeEntropy
from kacq_hooks.errors import CheckpointError, ConfigError, NoTokensError
from kacq_hooks.facts.injection import InjectionCollatorSync, InjectionSchedule, inject
from kacq_hooks.facts.tracker import FactTracker
from kacq_hooks.training.logging import entropy_scalars, fact_scalars
from kacq_hooks.instrumentation import Instrumentation, instrument
from kacq_hooks.measuring import as_model_inputs, measure

logger = logging.getLogger(__name__)

STATE_VERSION = 1


# -- checkpoint state ------------------------------------------------------------------------------------------

def checkpoint_folder(args, state) -> Path:
    """The folder the Trainer has just written for ``state.global_step`` (``output_dir/checkpoint-N``)."""
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


def resumed_checkpoint(args, state) -> Path | None:
    """The checkpoint a run resumed from, found at ``on_train_begin``; ``None`` for a fresh run.

    A resumed Trainer starts with ``state.global_step`` > 0. Its folder is
    ``args.resume_from_checkpoint`` when that names a checkpoint of this step, else
    ``output_dir/checkpoint-{global_step}`` (where ``train(resume_from_checkpoint=True)`` looks).
    """
    if state.global_step == 0:
        return None
    candidates = []
    if isinstance(getattr(args, "resume_from_checkpoint", None), str):
        candidates.append(Path(args.resume_from_checkpoint))
    candidates.append(checkpoint_folder(args, state))
    for folder in candidates:
        trainer_state = folder / "trainer_state.json"
        if not trainer_state.is_file():
            continue
        try:
            step = json.loads(trainer_state.read_text(encoding="utf-8")).get("global_step")
        except (OSError, json.JSONDecodeError):
            continue
        if step == state.global_step:
            return folder
    raise CheckpointError(
        f"the Trainer resumed at step {state.global_step}, but no checkpoint of that step was found at "
        f"{', '.join(str(c) for c in candidates)}; resume from a checkpoint inside output_dir, or name it in "
        "TrainingArguments(resume_from_checkpoint=PATH) too"
    )


def _state_path(folder: Path, name: str, args) -> Path:
    rank = f".rank{args.process_index}" if getattr(args, "world_size", 1) > 1 else ""
    return folder / f"kacq_{name}{rank}.pt"


def save_state(folder: Path, name: str, args, payload: dict) -> Path:
    """Write ``payload`` as ``folder/kacq_<name>.pt``, atomically (a temporary file, then ``os.replace``)."""
    path = _state_path(folder, name, args)
    staging = path.with_name(path.name + ".tmp")
    torch.save({"version": STATE_VERSION, "name": name, **payload}, staging)
    os.replace(staging, path)
    return path


def load_state(folder: Path, name: str, args) -> dict:
    """Read what :func:`save_state` wrote; a :class:`CheckpointError` when it is missing or unreadable."""
    path = _state_path(folder, name, args)
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no {path.name}: that checkpoint was written without this callback, or the run stopped "
            f"before the callback saved. Resume from a checkpoint written with it, or start a fresh run "
            "(a resumed run without it would report statistics of part of a window)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged file
        raise CheckpointError(f"{path} could not be read ({type(error).__name__}: {error}); resume from another "
                              "checkpoint") from error
    if payload.get("version") != STATE_VERSION or payload.get("name") != name:
        raise CheckpointError(f"{path} holds state version {payload.get('version')} of {payload.get('name')!r}; "
                              f"this kacq_hooks reads version {STATE_VERSION} of {name!r}")
    return payload


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "state"


def _entropy_to_state(entropy: KnowledgeEntropy) -> dict:
    return {f.name: getattr(entropy, f.name) for f in dataclasses.fields(entropy)}


def _entropy_from_state(fields: dict) -> KnowledgeEntropy:
    known = {f.name for f in dataclasses.fields(KnowledgeEntropy)}
    return KnowledgeEntropy(**{k: v for k, v in fields.items() if k in known})


class InstrumentationCheckpointCallback(TrainerCallback):
    """Save ``inst``'s statistics into every Trainer checkpoint, and restore them when the run resumes.

    One line makes a user's own instrumentation survive an interrupted run exactly (gradient statistics
    included):

    >>> inst = kh.instrument(model, grads=True)  # doctest: +SKIP
    >>> trainer = Trainer(model, args, callbacks=[InstrumentationCheckpointCallback(inst)])  # doctest: +SKIP
    >>> trainer.train(resume_from_checkpoint=True)  # doctest: +SKIP

    The statistics go to ``checkpoint-N/kacq_<name>.pt`` (one file per process when distributed). A
    resumed run whose checkpoint lacks that file raises :class:`~kacq_hooks.errors.CheckpointError`.
    """

    def __init__(self, inst: Instrumentation, name: str = "instrumentation"):
        self.inst = inst
        self.name = _slug(name)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.inst.grads and not self.inst._gradients.declared:  # the Trainer's fp16 scaler, as LossScaleCallback
            self.inst.loss_scale(loss_scaler_of(optimizer, args))
        folder = resumed_checkpoint(args, state)
        if folder is not None:
            self.inst.load_state_dict(load_state(folder, self.name, args)["instrumentation"])

    def on_save(self, args, state, control, **kwargs):
        save_state(checkpoint_folder(args, state), self.name, args, {"instrumentation": self.inst.state_dict()})


class LossScaleCallback(TrainerCallback):
    """Give ``inst`` the loss scaler the Trainer (through accelerate) trains with, so its gradient statistics
    are of the unscaled loss and leave out the steps the scaler skips (see
    :meth:`~kacq_hooks.Instrumentation.loss_scale`).

    >>> inst = kh.instrument(model, grads=True)  # doctest: +SKIP
    >>> args = TrainingArguments("out", fp16=True)  # doctest: +SKIP
    >>> trainer = Trainer(model, args, callbacks=[LossScaleCallback(inst)])  # doctest: +SKIP

    Without a scaler (fp32, bf16) it declares the loss unscaled. The scaler is read at the start of
    training from the Trainer's (accelerate-wrapped) optimizer, whose ``scaler`` is the accelerator's.
    """

    def __init__(self, inst: Instrumentation):
        self.inst = inst

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.inst.loss_scale(loss_scaler_of(optimizer, args))


def loss_scaler_of(optimizer, args=None):
    """The ``torch.amp.GradScaler`` an (accelerate-wrapped) optimizer steps through, or None.

    DeepSpeed scales an fp16 loss inside its engine with a scaler of its own that kacq_hooks cannot read:
    that run is refused rather than measured as unscaled.
    """
    if args is not None and getattr(args, "deepspeed", None) and getattr(args, "fp16", False):
        raise ConfigError("DeepSpeed scales an fp16 loss inside its engine, where kacq_hooks cannot read the scale, so "
                          "grads=True statistics would be of the scaled loss: train in bf16 (no loss scaling) or "
                          "without DeepSpeed's fp16, or instrument with grads=False")
    scaler = getattr(optimizer, "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) else None


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
    The scores live in the tracker's store; the checkpoint file ``kacq_{prefix}.pt`` holds the
    metrics not yet logged.

    >>> trainer = Trainer(model=model, args=args, train_dataset=data)  # doctest: +SKIP
    >>> tracker = FactTracker(model, tokenizer, facts, store="run/facts.jsonl")  # doctest: +SKIP
    >>> FactTrackingCallback(tracker).attach(trainer)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(self, tracker: FactTracker, every: int = 1, *, prefix: str = "facts", reduction: str = "mean"):
        super().__init__()
        if every < 1:
            raise ConfigError(f"every must be >= 1, got {every}")
        self.tracker = tracker
        self.every = every
        self.prefix = prefix
        self.reduction = reduction
        self.name = _slug(prefix)

    def _score(self, state):
        if self.tracker.store is not None and state.is_world_process_zero:  # one writer per store
            return self.tracker.record(state.global_step)
        return self.tracker.score_probes()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and model is not self.tracker.model:
            logger.warning("FactTrackingCallback: the Trainer trains another model object than the tracker scores")
        folder = resumed_checkpoint(args, state)
        if folder is not None and _state_path(folder, self.name, args).is_file():
            self._pending = dict(load_state(folder, self.name, args)["pending"])
        store = self.tracker.store
        if store is None or not state.is_world_process_zero:  # nothing to record into, or another process writes
            return
        store.discard_after(state.global_step)
        if store.last_step != state.global_step:
            self.tracker.record(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every:
            return
        scores = self._score(state)
        summary = self.tracker.summary(scores, self.reduction)
        self._queue(fact_scalars(summary, self.prefix), control)

    def on_save(self, args, state, control, **kwargs):
        save_state(checkpoint_folder(args, state), self.name, args, {"pending": dict(self._pending)})


class KnowledgeEntropyCallback(_LoggingCallback):
    """Log knowledge entropy (total and per layer) every ``every`` steps.

    Without ``calibration`` it is measured on the training batches of the last ``every`` steps: the
    model is instrumented for the whole run, counting only between ``on_step_begin`` and
    ``on_step_end`` (so evaluation and probe scoring stay out), and the statistics restart after each
    report. With ``calibration`` (token ids [N, T], a batch dict, or an iterable of either) the model is
    measured on that fixed set with :func:`kacq_hooks.measure` at each report and at the start (no
    grad, eval mode, RNG untouched). ``history`` keeps ``(step, KnowledgeEntropy)`` pairs.

    ``count`` ("labels" or "shifted_labels", see :func:`kacq_hooks.instrument`) counts only the positions
    the batches' ``labels`` select (e.g. answer tokens); training batches carry labels, and calibration
    batches must too (dicts with ``labels``). A report window whose training batches held no counted token
    (answers cut by truncation, say) logs nothing and warns; training goes on.

    Logged keys are ``{prefix}/total`` and, per layer, ``{prefix}/{site.label}`` (the model's own layer
    numbers, e.g. ``knowledge_entropy/decoder.layer_3``). Checkpoints hold ``kacq_{prefix}.pt``: the
    statistics of the window in progress and the history, so a resumed run reports what an
    uninterrupted one would.
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
        count: str | None = None,
    ):
        super().__init__()
        if every < 1:
            raise ConfigError(f"every must be >= 1, got {every}")
        self.every = every
        self.calibration = _calibration_batches(calibration, batch_size) if calibration is not None else None
        self.instrument_kwargs = dict(weighting=weighting, mask_padding=mask_padding, mlp_out=mlp_out)
        if count is not None:  # only when set, so checkpoints of runs without it still resume
            self.instrument_kwargs["count"] = count
        self.prefix = prefix
        self.name = _slug(prefix)
        self.per_layer = per_layer
        self.history: list[tuple[int, KnowledgeEntropy]] = []
        self._instrumentation: Instrumentation | None = None
        self._paused = contextlib.ExitStack()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        folder = resumed_checkpoint(args, state)
        saved = load_state(folder, self.name, args) if folder is not None else None
        if saved is not None:
            settings = {"every": self.every, "calibration": self.calibration is not None, **self.instrument_kwargs}
            if saved.get("settings") != settings:
                raise CheckpointError(
                    f"{folder} holds the state of a KnowledgeEntropyCallback with settings {saved.get('settings')}, "
                    f"this one has {settings}: its window and history would not fit; resume with the same settings"
                )
            self.history = [(step, _entropy_from_state(fields)) for step, fields in saved["history"]]
            self._pending = dict(saved["pending"])
        if self.calibration is not None:
            if saved is None:
                self.history.append((state.global_step, self._measure_calibration(model)))
            return
        self._instrumentation = instrument(model, **self.instrument_kwargs)
        if saved is not None:
            self._instrumentation.load_state_dict(saved["instrumentation"])
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
            try:
                entropy = self._instrumentation.knowledge_entropy()
            except NoTokensError as nothing:
                # a window whose batches held no counted token (e.g. SFT rows whose answers truncation cut) has no
                # entropy; the Trainer trains through it, so the report is left out rather than the run stopped
                logger.warning("step %d: no knowledge entropy logged for the last %d step(s): %s",
                               state.global_step, self.every, nothing)
                self._instrumentation.reset()
                return
            self._instrumentation.reset()
        self.history.append((state.global_step, entropy))
        self._queue(entropy_scalars(entropy, self.prefix, self.per_layer), control)

    def on_save(self, args, state, control, **kwargs):
        payload = {"history": [(step, _entropy_to_state(e)) for step, e in self.history],
                   "pending": dict(self._pending),
                   "settings": {"every": self.every, "calibration": self.calibration is not None,
                                **self.instrument_kwargs}}
        if self._instrumentation is not None:
            payload["instrumentation"] = self._instrumentation.state_dict()
        save_state(checkpoint_folder(args, state), self.name, args, payload)

    def on_train_end(self, args, state, control, **kwargs):
        self._paused.close()
        if self._instrumentation is not None:
            self._instrumentation.remove()
            self._instrumentation = None

    def _pause(self) -> None:
        self._paused.close()
        self._paused.enter_context(self._instrumentation.pause())

    def _measure_calibration(self, model) -> KnowledgeEntropy:
        return measure(model, self.calibration, **self.instrument_kwargs).knowledge_entropy()


def _calibration_batches(calibration, batch_size: int) -> list[dict[str, torch.Tensor]]:
    items: Iterable = [calibration] if isinstance(calibration, (torch.Tensor, Mapping)) else calibration
    batches = []
    for item in items:
        batch = as_model_inputs(item, keep=("labels",))  # labels matter to count=; measure drops them otherwise
        if "input_ids" not in batch or batch["input_ids"].dim() != 2:
            raise ConfigError(
                "calibration data must be token ids [N, T], a dict with 'input_ids' [N, T] (and 'attention_mask'), "
                "or an iterable of those"
            )
        for first in range(0, batch["input_ids"].shape[0], batch_size):
            batches.append({k: v[first:first + batch_size] for k, v in batch.items()})
    if not batches:
        raise ConfigError("the calibration set is empty")
    return batches


class InjectionCallback(TrainerCallback):
    """Inject the schedule's passages into the Trainer's batches, at the model's input.

    A forward pre-hook on the model rewrites ``input_ids``, ``attention_mask`` and ``labels`` of the
    first training forward of each step that has injections (see :func:`kacq_hooks.facts.inject`).
    The hook is registered with ``prepend=True``, so it runs before kacq_hooks' own hooks on the model:
    an instrumentation reads the mask injection wrote. The step is the Trainer's own ``global_step``,
    so this stays right with dataloader workers, prefetching, several epochs and resumed runs.
    ``injected`` maps steps to the records injected; checkpoints hold it (``kacq_injection.pt``), so a
    resumed run knows what was injected before it. (The Trainer counts label tokens for loss scaling
    before the hook runs; with fixed-length rows injection leaves that count unchanged.)
    """

    def __init__(self, schedule: InjectionSchedule, tokenizer, *, name: str = "injection"):
        self.schedule = schedule
        self.tokenizer = tokenizer
        self.name = _slug(name)
        self.injected: dict[int, list[int]] = {}
        self._hooks = HookSet()
        self._due: tuple[int, list] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        folder = resumed_checkpoint(args, state)
        if folder is not None:
            saved = load_state(folder, self.name, args)["injected"]
            self.injected = {int(step): list(records) for step, records in saved.items()}
        if not self._hooks:  # inert in a copy of the model: a copy must not inject this schedule
            self._hooks.pre(model, OwnerHook(self, "_on_forward"), with_kwargs=True, prepend=True)

    def on_step_begin(self, args, state, control, **kwargs):
        due = self.schedule.at(state.global_step)
        self._due = (state.global_step, due) if due else None

    def on_save(self, args, state, control, **kwargs):
        save_state(checkpoint_folder(args, state), self.name, args, {"injected": dict(self.injected)})

    def on_train_end(self, args, state, control, **kwargs):
        self._hooks.remove()

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


__all__ = [
    "FactTrackingCallback",
    "InjectionCallback",
    "InjectionCollatorSync",
    "InstrumentationCheckpointCallback",
    "KnowledgeEntropyCallback",
]
