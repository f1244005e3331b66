"""kacq_hooks: measure and steer how language models acquire factual knowledge, with PyTorch hooks.

>>> import torch, kacq_hooks as kh
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                                      num_attention_heads=4, vocab_size=64))
>>> ids, mask = torch.randint(64, (2, 8)), torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
>>> with kh.instrument(model) as inst:
...     _ = model(ids, attention_mask=mask)
>>> ke = inst.knowledge_entropy()
>>> ke.labels, int(inst.stats[0].tokens)
(['decoder.layer_0', 'decoder.layer_1'], 13)

Subpackages: ``kacq_hooks.facts`` (fact data, injection, tracking, metrics), ``kacq_hooks.training``
(callbacks, SAM, augmentation), ``kacq_hooks.attribution`` (which slots carry a fact),
``kacq_hooks.frontends`` (TransformerLens, nnsight). The science is in docs/science.md.
"""
from .entropy import KnowledgeEntropy, knowledge_entropy
from .errors import KacqError, LocateError, MissingExtraError, ShapeError
from .instrumentation import Instrumentation, instrument, instrumentations_of, paused
from .interventions import Resuscitation, ResuscitationPlan, resuscitate, resuscitation_plan
from .locate import Site, find_sites
from .measuring import measure
from .stats import CoefficientStats, LayerStats
from ._version import __version__  # noqa: F401  (the package's version, kacq_hooks.__version__)

__all__ = [
    "instrument", "measure", "Instrumentation", "instrumentations_of", "paused",
    "knowledge_entropy", "KnowledgeEntropy",
    "find_sites", "Site", "CoefficientStats", "LayerStats",
    "KacqError", "LocateError", "ShapeError", "MissingExtraError",
    "resuscitation_plan", "resuscitate", "ResuscitationPlan", "Resuscitation",
]
