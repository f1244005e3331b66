"""Fact tracking (Chang et al. 2024): data, injection, per-probe scoring, acquisition and forgetting metrics.

>>> from kacq_hooks import facts
>>> facts.fit_power_law([1, 10, 100], [1.0, 0.5, 0.0]).decay
0.5
"""
from __future__ import annotations

from kacq_hooks.facts.data import FactDataError, load_fictional_knowledge, parse_record
from kacq_hooks.facts.generator import assign_scenarios, generate_facts, invented_names, max_paraphrases
from kacq_hooks.facts.injection import (
    Injection,
    InjectionCollator,
    InjectionError,
    InjectionSchedule,
    inject,
)
from kacq_hooks.facts.metrics import (
    PowerLawFit,
    acquisition,
    effectivity,
    fit_power_law,
    forgetting,
    iqr_mask,
    knowledge_score,
    local_acquisition_maximum,
    mean_without_outliers,
    retainability,
    summarize_acquisition,
)
from kacq_hooks.facts.records import PAPER_SPLIT, PROBE_KINDS, SCENARIOS, FactRecord, FactSet
from kacq_hooks.facts.scoring import EncodedProbe, ProbeTokenizationError, TokenizationReport, encode_probe
from kacq_hooks.facts.tracker import FactTracker, ProbeScores
from kacq_hooks.facts.trajectory import ProbeRef, TrajectoryError, TrajectoryStore

__all__ = [
    "generate_facts",
    "assign_scenarios",
    "invented_names",
    "max_paraphrases",
    "PAPER_SPLIT",
    "PROBE_KINDS",
    "SCENARIOS",
    "EncodedProbe",
    "FactDataError",
    "FactRecord",
    "FactSet",
    "FactTracker",
    "Injection",
    "InjectionCollator",
    "InjectionError",
    "InjectionSchedule",
    "PowerLawFit",
    "ProbeRef",
    "ProbeScores",
    "ProbeTokenizationError",
    "TokenizationReport",
    "TrajectoryError",
    "TrajectoryStore",
    "acquisition",
    "effectivity",
    "encode_probe",
    "fit_power_law",
    "forgetting",
    "inject",
    "iqr_mask",
    "knowledge_score",
    "load_fictional_knowledge",
    "local_acquisition_maximum",
    "mean_without_outliers",
    "parse_record",
    "retainability",
    "summarize_acquisition",
]
