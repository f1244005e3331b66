"""The callbacks' scalars for a hand-written training loop: the same names, written to a SummaryWriter.

:class:`~kacq_hooks.training.callbacks.KnowledgeEntropyCallback` logs ``knowledge_entropy/total`` and
``knowledge_entropy/{label}`` per layer (the model's own layer labels, e.g. ``decoder.layer_3``); :class:`~kacq_hooks.training.callbacks.FactTrackingCallback` logs
``facts/{kind}`` and ``facts/{scenario}/{kind}``. A plain loop gets the same tags, so runs trained
with and without the Trainer line up in TensorBoard:

>>> from torch.utils.tensorboard import SummaryWriter                 # doctest: +SKIP
>>> writer = SummaryWriter("runs/plain")  # doctest: +SKIP
>>> log_knowledge_entropy(writer, inst.knowledge_entropy(), step)  # doctest: +SKIP
>>> log_facts(writer, tracker, step)  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Mapping

from ..entropy import KnowledgeEntropy


def entropy_scalars(entropy: KnowledgeEntropy, prefix: str = "knowledge_entropy",
                    per_layer: bool = True) -> dict[str, float]:
    """``{prefix}/total`` and, with ``per_layer``, ``{prefix}/{label}`` for each layer's label.

    >>> from kacq_hooks.entropy import knowledge_entropy
    >>> from kacq_hooks.stats import CoefficientStats
    >>> stats = CoefficientStats([4, 4])
    >>> for s in stats:
    ...     _ = s.sum_abs.fill_(1.0), s.tokens.fill_(1)
    >>> sorted(entropy_scalars(knowledge_entropy(stats, labels=["decoder.layer_1", "decoder.layer_3"])))
    ['knowledge_entropy/decoder.layer_1', 'knowledge_entropy/decoder.layer_3', 'knowledge_entropy/total']
    """
    scalars = {f"{prefix}/total": float(entropy.total)}
    if per_layer:
        scalars.update({f"{prefix}/{label}": float(h) for label, h in entropy.by_label.items()})
    return scalars


def fact_scalars(summary: Mapping[str, float], prefix: str = "facts") -> dict[str, float]:
    """``{prefix}/{key}`` for each entry of :meth:`kacq_hooks.facts.FactTracker.summary`."""
    return {f"{prefix}/{key}": float(value) for key, value in summary.items()}


def log_scalars(writer, scalars: Mapping[str, float], step: int) -> None:
    """``writer.add_scalar`` for each entry (any SummaryWriter: torch's, tensorboardX's)."""
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)


def log_knowledge_entropy(writer, entropy: KnowledgeEntropy, step: int, *, prefix: str = "knowledge_entropy",
                          per_layer: bool = True) -> dict[str, float]:
    """Write the entropy under the callback's tags; returns what was written."""
    scalars = entropy_scalars(entropy, prefix, per_layer)
    log_scalars(writer, scalars, step)
    return scalars


def log_facts(writer, tracker, step: int, scores=None, *, prefix: str = "facts",
              reduction: str = "mean") -> dict[str, float]:
    """Score the tracker's probes (or use ``scores``) and write the per-kind summaries; returns them."""
    scalars = fact_scalars(tracker.summary(scores, reduction), prefix)
    log_scalars(writer, scalars, step)
    return scalars


__all__ = ["entropy_scalars", "fact_scalars", "log_scalars", "log_knowledge_entropy", "log_facts"]
