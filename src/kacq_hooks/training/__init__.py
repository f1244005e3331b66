"""Training-time parts: Trainer callbacks, sharpness-aware minimization, formatting augmentation."""
from .augment import (Format, FormatError, all_formats, augment_record, format_text, formatting_variants,
                      split_sentences, with_format_variants)
from .attribution import AttributionCallback, AttributionStore, AttributionTracker
from .callbacks import FactTrackingCallback, InjectionCallback, KnowledgeEntropyCallback
from .sam import SAM, SAMError, SAMTrainer

__all__ = [
    "SAM", "SAMTrainer", "SAMError",
    "formatting_variants", "format_text", "augment_record", "with_format_variants", "split_sentences",
    "all_formats", "Format", "FormatError",
    "FactTrackingCallback", "KnowledgeEntropyCallback", "InjectionCallback",
    "AttributionCallback", "AttributionStore", "AttributionTracker",
]
