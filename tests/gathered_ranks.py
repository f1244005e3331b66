"""A rank of a data-parallel group read without processes: its all_gather answers with what every rank gave."""
from __future__ import annotations

from kacq_hooks.sweep_data import Ranks


class GatheredRanks(Ranks):
    """Rank ``rank`` of ``world`` whose gather returns ``counts`` (for an int) or ``parts`` (anything else), the
    values every real rank would have contributed beforehand."""

    def __init__(self, rank, world, counts, parts=None):
        object.__setattr__(self, "rank", rank)
        object.__setattr__(self, "world", world)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "parts", parts)

    def gather(self, value):
        return self.counts if isinstance(value, int) else self.parts
