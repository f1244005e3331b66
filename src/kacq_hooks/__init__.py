"""kacq_hooks: measure and steer how language models acquire factual knowledge, with PyTorch hooks.

>>> import kacq_hooks as kh   # doctest: +SKIP
>>> inst = kh.instrument(model)
>>> with inst:
...     model(input_ids, attention_mask=mask)
>>> inst.knowledge_entropy().total
"""
from .entropy import KnowledgeEntropy, entropy, knowledge_entropy
from .errors import KacqError, LocateError, MissingExtraError, ShapeError
from .instrumentation import Instrumentation, instrument, instrumentations_of, paused
from .measuring import measure
from .interventions import Resuscitation, ResuscitationPlan, resuscitate, resuscitation_plan
from .locate import Site, find_sites
from .stats import CoefficientStats, LayerStats

__all__ = [
    "instrument", "measure", "Instrumentation", "instrumentations_of", "paused",
    "knowledge_entropy", "entropy", "KnowledgeEntropy",
    "find_sites", "Site", "CoefficientStats", "LayerStats",
    "KacqError", "LocateError", "ShapeError", "MissingExtraError",
    "resuscitation_plan", "resuscitate", "ResuscitationPlan", "Resuscitation",
]
__version__ = "0.1.0"
