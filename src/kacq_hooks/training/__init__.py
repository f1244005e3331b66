"""Training-time parts: Trainer callbacks, sharpness-aware minimization, formatting augmentation."""
from __future__ import annotations

from kacq_hooks.errors import FormatError, SAMError  # noqa: F401  (also in kacq_hooks.errors)

from .attribution import AttributionCallback, AttributionStore, AttributionTracker
from .augment import Format, augment_record, formatting_variants, with_format_variants
from .callbacks import (FactTrackingCallback, InjectionCallback, InstrumentationCheckpointCallback,
                        KnowledgeEntropyCallback, LossScaleCallback)
from .sam import SAM, SAMTrainer

__all__ = [
    "SAM", "SAMTrainer",
    "formatting_variants", "augment_record", "with_format_variants", "Format",
    "FactTrackingCallback", "KnowledgeEntropyCallback", "InjectionCallback", "InstrumentationCheckpointCallback",
    "LossScaleCallback",
    "AttributionCallback", "AttributionStore", "AttributionTracker",
]

