"""Fact tracking (Chang et al. 2024): data, injection, per-probe scoring, acquisition and forgetting metrics.

>>> from kacq_hooks import facts
>>> facts.fit_power_law([1, 10, 100], [1.0, 0.5, 0.0]).decay
0.5
"""
from __future__ import annotations

from kacq_hooks.errors import FactDataError, InjectionError, ProbeTokenizationError, TrajectoryError
from kacq_hooks.facts.data import load_fictional_knowledge
from kacq_hooks.facts.generator import assign_scenarios, generate_facts, max_paraphrases
from kacq_hooks.facts.injection import Injection, InjectionSchedule, inject
from kacq_hooks.facts.metrics import (
    PowerLawFit,
    acquisition,
    effectivity,
    fit_power_law,
    forgetting,
    knowledge_score,
    local_acquisition_maximum,
    retainability,
    summarize_acquisition,
)
from kacq_hooks.facts.records import PAPER_SPLIT, PROBE_KINDS, SCENARIOS, FactRecord, FactSet
from kacq_hooks.facts.tracker import FactTracker, ProbeScores
from kacq_hooks.facts.trajectory import ProbeRef, TrajectoryStore

__all__ = [
    "FactRecord", "FactSet", "PROBE_KINDS", "SCENARIOS", "PAPER_SPLIT",
    "load_fictional_knowledge", "generate_facts", "assign_scenarios", "max_paraphrases",
    "InjectionSchedule", "Injection", "inject",
    "FactTracker", "ProbeScores", "TrajectoryStore", "ProbeRef",
    "effectivity", "retainability", "local_acquisition_maximum", "fit_power_law", "PowerLawFit",
    "summarize_acquisition", "knowledge_score", "acquisition", "forgetting",
]
_ERRORS = (FactDataError, InjectionError, ProbeTokenizationError, TrajectoryError)  # also in kacq_hooks.errors

