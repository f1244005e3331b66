"""Training-time parts: Trainer callbacks, sharpness-aware minimization, formatting augmentation."""
from .augment import (FormatError, Format, all_formats, augment_record, format_text, formatting_variants,
                      split_sentences, with_format_variants)
from .sam import SAM, SAMError, SAMTrainer
from .callbacks import FactTrackingCallback, InjectionCallback, KnowledgeEntropyCallback
