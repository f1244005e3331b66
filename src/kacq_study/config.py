"""The study's settings: :class:`DemoConfig` (every setting of one run), its errors, and the constants fixed before
any run (how long a run takes, how slots are attributed).

``DemoConfig()`` is the default run of ``kacq demo``, :meth:`DemoConfig.quick` the smoke-sized one;
:meth:`DemoConfig.validate` refuses settings that cannot work together before any slow work.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from kacq_hooks import facts as kf
from kacq_hooks.errors import KacqError
from kacq_hooks.interventions.resuscitation import check_plan_arguments
from kacq_hooks.sweep import check_device

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
    "decay": "about an hour on the shared 2-core machine (57 min 35 s measured for `python -m kacq_study --regime decay "
             "--workers 3` on 2026-12-07 while about ten other processes shared the cores; its 1,453 CPU-seconds "
             "suggest about 12 minutes on 2 idle cores, an estimate, not measured)",
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

# the decay regime's pretraining length (DemoConfig.decay): 12 weight-decay time constants at lr 3e-3 and wd 1.0.
# The latest peak measured at this recipe (step 2,300) is then followed by 1,700 steps, and a 3,000-step run's fall
# 700 steps after its peak already exceeded 3x its noise; the entropy-weight-decay experiment's wd 1.0 runs are this
# pretraining step for step (the same seeds, rows, schedule and calibration set), so their curves cross-check it.
# Fixed before the full run (not from any finding's verdict).
DECAY_STEPS = 4000

Progress = Callable[[str, dict], None]
TrainStep = Callable[[torch.Tensor, torch.Tensor], float]


class DemoConfigError(KacqError, ValueError):
    """The demo's settings cannot work together (e.g. more injected rows than batch rows)."""


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
    # the decay regime (DemoConfig.decay): a constant learning rate after warmup, the checkpoints chosen from the
    # pretraining's own entropy curve, and continued training at its own weight decay
    lr_schedule: str = "cosine"          # "cosine": warmup, then cosine to 10% of lr; "constant": warmup, then lr
    checkpoint_rule: str = "fixed"       # "fixed": early at early_step, late at the last step; "peak": early at the
                                         # entropy peak after the early collapse, late at the last step (see
                                         # pipeline.entropy_peak), and the run says whether entropy decayed after it
    continue_weight_decay: float | None = None  # AdamW weight decay of continued training (None: weight_decay)
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

    @classmethod
    def decay(cls, **overrides) -> "DemoConfig":
        """The study where knowledge entropy decays during pretraining (``kacq demo --regime decay``,
        ``RUN_TIME["decay"]``).

        The default run trains 360 steps at weight decay 0.01, about 0.01 of AdamW's weight-decay time constant
        1 / (lr * wd), and its entropy climbs throughout. Here the recipe of the ``entropy-weight-decay``
        experiment, where entropy peaks after 3-7 time constants and then falls: d_model 64, 4 layers, 128-token
        rows of 8, a constant learning rate of 3e-3 after a 50-step warmup and weight decay 1.0 (333 steps per time
        constant), 4,000 steps (12 time constants), entropy on 64 held-out rows every 100 steps. The early checkpoint
        is the entropy peak after the early collapse and the late one the last step (``checkpoint_rule="peak"``,
        :func:`kacq_study.pipeline.entropy_peak`). Continued training runs the default study's arms; its 128-token
        rows carry the passages whole over several rows (``injection="span"``: up to 3 rows a passage, 9 at the first
        round, so 12 rows a step), and its AdamW keeps the default's weight decay 0.01 (1.0 at the continued rate
        would shrink every weight by a third over the arm, an intervention of its own).

        These settings were fixed before the first full run, from the experiment's measurements, not from any
        finding's verdict.
        """
        settings = dict(d_model=64, n_layers=4, n_heads=4, d_ff=256, seq_len=128, vocab_size=2048, max_docs=None,
                        calibration_sequences=64, pretrain_steps=DECAY_STEPS, batch_size=8, lr=3e-3, warmup_steps=50,
                        weight_decay=1.0, lr_schedule="constant", checkpoint_rule="peak", early_step=0,
                        entropy_every=100, injection="span", continue_batch_size=12, continue_weight_decay=0.01)
        return cls(**{**settings, **overrides})

    @property
    def arm_weight_decay(self) -> float:
        """The AdamW weight decay of continued training."""
        return self.weight_decay if self.continue_weight_decay is None else self.continue_weight_decay

    def scaled(self, k: float) -> "DemoConfig":
        """A larger (k > 1) or smaller study: d_model and d_ff times ``k`` (d_model kept a multiple of
        2 * n_heads: RoPE needs an even head dimension), and the pretraining steps, the corpus documents and the
        step settings tied to them (early checkpoint, warmup, entropy interval) times ``k``, so the checkpoints
        stay at the same share of training. Meant for a GPU (``--scale``); ``k = 1`` is this config. A study whose
        checkpoints are chosen on the entropy curve (the decay regime) is clocked in weight-decay time constants:
        its weight decay is divided by ``k``, so it spans as many of them as unscaled.

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
            weight_decay=self.weight_decay / k if self.checkpoint_rule == "peak" else self.weight_decay,
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
        if self.lr_schedule not in ("cosine", "constant"):
            raise DemoConfigError(f"lr_schedule={self.lr_schedule!r}: use 'cosine' or 'constant'")
        if self.checkpoint_rule not in ("fixed", "peak"):
            raise DemoConfigError(f"checkpoint_rule={self.checkpoint_rule!r}: use 'fixed' (early_step and the last "
                                  "step) or 'peak' (the entropy peak and the last step)")
        if self.continue_weight_decay is not None and not self.continue_weight_decay >= 0:
            raise DemoConfigError(f"continue_weight_decay={self.continue_weight_decay} must be >= 0 (or None)")
        if self.checkpoint_rule == "peak":
            # the rule needs the early collapse, a peak after it and three measurements after the peak
            if self.pretrain_steps // self.entropy_every < 8:
                raise DemoConfigError(f"checkpoint_rule='peak' needs at least 8 entropy measurements after step 0; "
                                      f"pretrain_steps={self.pretrain_steps} with entropy_every={self.entropy_every} "
                                      f"gives {self.pretrain_steps // self.entropy_every}: raise pretrain_steps "
                                      f"(--pretrain-steps) to at least {8 * self.entropy_every}, or lower "
                                      "entropy_every (DemoConfig; kacq demo has no option for it)")
        elif not 0 < self.early_step < self.pretrain_steps:
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
        from .arms import ARMS, resuscitation_edit  # the arms are built on this config: imported when checked
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
        # settings added with the decay regime are left out at their defaults: an earlier study's results.json
        # keeps its bytes
        for name, default in (("lr_schedule", "cosine"), ("checkpoint_rule", "fixed"), ("continue_weight_decay", None)):
            if settings[name] == default:
                del settings[name]
        return {**settings, "continue_steps": self.continue_steps}
