"""Fact tracking (Chang et al. 2024): data, injection, per-probe scoring, acquisition and forgetting metrics.

>>> from kacq_hooks import facts
>>> facts.fit_power_law([1, 10, 100], [1.0, 0.5, 0.0]).decay
0.5
"""
from __future__ import annotations

import importlib
import warnings

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

# Names this package exported before, now internals of their modules: importable here for one more release.
_MOVED = {
    "iqr_mask": "metrics", "mean_without_outliers": "metrics", "parse_record": "data", "invented_names": "generator",
    "EncodedProbe": "scoring", "encode_probe": "scoring", "TokenizationReport": "scoring",
    "InjectionCollator": "injection",
}


def __getattr__(name: str):
    if name in _MOVED:
        module = f"kacq_hooks.facts.{_MOVED[name]}"
        warnings.warn(f"kacq_hooks.facts.{name} is deprecated here; import it from {module} (or use "
                      + ("kacq_hooks.training.InjectionCallback" if name == "InjectionCollator" else "the public API")
                      + "); this alias goes away in the next release", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'kacq_hooks.facts' has no attribute {name!r}")
