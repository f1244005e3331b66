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

The parts live in modules of their own; this module gathers their public names in one place:

- :mod:`kacq_study.config`: :class:`DemoConfig` (every setting), :data:`RUN_TIME` (the one statement of how long
  a run takes) and the attribution constants;
- :mod:`kacq_study.arms`: :class:`Arm` and the study's :data:`ARMS`;
- :mod:`kacq_study.pipeline`: one seed's pipeline, :func:`prepare`, :func:`pretrain`, :func:`run_arm`;
- :mod:`kacq_study.metrics`: an arm's metrics and where its facts land (:class:`Landing`);
- :mod:`kacq_study.output`: :func:`json_ready` and the files written whole or not at all.

:func:`kacq_study.study.run_study` runs the pipeline for several seeds as parallel tasks and combines them.
Nothing here prints; progress goes to an optional callback, which the CLI turns into progress bars. Same
config and seed give the same numbers.

>>> from kacq_study.study import run_study                        # doctest: +SKIP
>>> results = run_study(DemoConfig.quick(), seeds=(0,), workers=1)  # doctest: +SKIP
>>> results["per_seed"][0]["pretraining"]["entropy"]["total"][-1]   # doctest: +SKIP
"""
from __future__ import annotations

from .arms import ARMS, ZHU_ARMS, Arm, adamw_step, augmented_passage, lm_loss, resuscitation_edit, sam_step
from .config import (ATTRIBUTION_BY, ATTRIBUTION_K, ATTRIBUTION_METHOD, CHECKPOINT_STEP, RUN_TIME, DemoConfig,
                     DemoConfigError, Progress, TrainStep)
from .metrics import Landing, fact_metrics, injected_values, kim_metrics
from .output import json_ready, write_results, write_text_atomic
from .pipeline import (Calibration, PreparedData, build_model, corpus_texts, deterministic, inject_spanning, prepare,
                       pretrain, run_arm)

__all__ = [
    "ARMS", "ATTRIBUTION_BY", "ATTRIBUTION_K", "ATTRIBUTION_METHOD", "Arm", "CHECKPOINT_STEP", "Calibration",
    "DemoConfig", "DemoConfigError", "Landing", "PreparedData", "Progress", "RUN_TIME", "TrainStep", "ZHU_ARMS",
    "adamw_step", "augmented_passage", "build_model", "corpus_texts", "deterministic", "fact_metrics",
    "inject_spanning", "injected_values", "json_ready", "kim_metrics", "lm_loss", "prepare", "pretrain",
    "resuscitation_edit", "run_arm", "sam_step", "write_results", "write_text_atomic",
]
