"""Training-time parts: Trainer callbacks, sharpness-aware minimization, formatting augmentation."""
from __future__ import annotations

import importlib
import warnings

from kacq_hooks.errors import FormatError, SAMError  # noqa: F401  (also in kacq_hooks.errors)

from .attribution import AttributionCallback, AttributionStore, AttributionTracker
from .augment import Format, augment_record, formatting_variants, with_format_variants
from .callbacks import (FactTrackingCallback, InjectionCallback, InstrumentationCheckpointCallback,
                        KnowledgeEntropyCallback)
from .sam import SAM, SAMTrainer

__all__ = [
    "SAM", "SAMTrainer",
    "formatting_variants", "augment_record", "with_format_variants", "Format",
    "FactTrackingCallback", "KnowledgeEntropyCallback", "InjectionCallback", "InstrumentationCheckpointCallback",
    "AttributionCallback", "AttributionStore", "AttributionTracker",
]

# Names this package exported before, now internals of their modules: importable here for one more release.
_MOVED = {"format_text": "augment", "split_sentences": "augment", "all_formats": "augment"}


def __getattr__(name: str):
    if name in _MOVED:
        module = f"kacq_hooks.training.{_MOVED[name]}"
        warnings.warn(f"kacq_hooks.training.{name} is deprecated here; import it from {module}; this alias goes "
                      "away in the next release", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'kacq_hooks.training' has no attribute {name!r}")
