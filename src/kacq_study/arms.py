"""The arms of continued training: a starting checkpoint, an optional weight edit, a transform of the injected
passages and a training-step factory (:class:`Arm`), and the study's arms by name (:data:`ARMS`).

Adding an arm is one entry in :data:`ARMS`, built from the parts here (or new ones with the same signatures).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

import kacq_hooks as kh
from kacq_hooks import facts as kf
from kacq_hooks.training import SAM, augment_record

from .config import DemoConfig, TrainStep

if TYPE_CHECKING:  # the pipeline imports the arms; the arms only name its Calibration in annotations
    from .pipeline import Calibration


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


def augmented_passage(injection: kf.Injection, facts: kf.FactSet, config: DemoConfig) -> str:
    """Formatting augmentation (Zhu et al.): the paper's schedule, each re-injected copy in a new layout."""
    if injection.round == 0:
        return injection.text
    record = dataclasses.replace(facts[injection.record], train_context=injection.text)
    variants = augment_record(record, config.augment_variants, seed=config.seed + injection.round)
    return variants[injection.round % len(variants)]


def adamw_step(model: nn.Module, config: DemoConfig) -> TrainStep:
    """Plain AdamW at the continued-training rate, fresh optimizer state (as after resuscitation)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.continue_lr, weight_decay=config.arm_weight_decay,
                                  betas=(config.continue_beta1, 0.999))
    schedule = warmup(optimizer, config.continue_warmup)

    def step(ids: torch.Tensor, mask: torch.Tensor) -> float:
        loss = lm_loss(model, ids, mask)
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
                    weight_decay=config.arm_weight_decay, betas=(config.continue_beta1, 0.999))
    schedule = warmup(optimizer, config.continue_warmup)

    def step(ids: torch.Tensor, mask: torch.Tensor) -> float:
        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = lm_loss(model, ids, mask)
            loss.backward()
            return loss
        loss = optimizer.step(closure)
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def warmup(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
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
    "late+augment": Arm("late+augment", "late", transform=augmented_passage),
    "late+sam": Arm("late+sam", "late", optimizer=sam_step),
    "late+augment+sam": Arm("late+augment+sam", "late", transform=augmented_passage, optimizer=sam_step),
}
ZHU_ARMS = ("late", "late+augment", "late+sam", "late+augment+sam")


def lm_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The causal language-modelling loss of ``ids`` (positions where ``mask`` is 0 are not scored)."""
    labels = ids.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss

