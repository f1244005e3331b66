"""Interventions on the FFN memories: resuscitation (Kim et al., Algorithm 1), as a weight edit or a hook, and
sparse memory finetuning (Lin et al. 2025), which trains only the slots new data uses far more than a reference.

>>> import kacq_hooks as kh                                          # doctest: +SKIP
>>> plan = kh.resuscitation_plan(inst, ratio=0.5, factor=2.0)        # doctest: +SKIP
>>> plan.predicted_entropy().per_layer                               # doctest: +SKIP
>>> handle = kh.resuscitate(model, plan, mode="weights")             # doctest: +SKIP
>>> handle.revert()                                                  # doctest: +SKIP
"""
from __future__ import annotations

from .resuscitation import (
    DEFAULT_MAX_MULTIPLIER,
    LayerEdit,
    Resuscitation,
    ResuscitationPlan,
    predicted_entropy_after_scaling,
    resuscitate,
    resuscitation_plan,
)
from .slots import SlotSlice, slot_parameters
from .sparse_memory import SparseMemory, sparse_memory

__all__ = [
    "resuscitation_plan", "resuscitate", "ResuscitationPlan", "Resuscitation", "LayerEdit",
    "predicted_entropy_after_scaling", "DEFAULT_MAX_MULTIPLIER",
    "sparse_memory", "SparseMemory", "slot_parameters", "SlotSlice",
]
