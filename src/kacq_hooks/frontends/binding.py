"""What every front end produces: the :class:`Binding` of a model (see :mod:`kacq_hooks.frontends`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..locate import Site
from .stacks import StackReader


@dataclass
class Binding:
    """What an Instrumentation needs from a model (see the notes of :mod:`kacq_hooks.frontends`)."""

    root: nn.Module
    sites: list[Site]
    stacks: list[StackReader]
    site_stack: list[int]                       # per site, its index into ``stacks``
    root_reader: StackReader                    # reads the call of the whole model (the root's own inputs)
    name: str = "hf"
    closer: nn.Module | None = None
    frame_owner: nn.Module | None = None    # the module whose running forward bounds a call (default: root)
    notes: list[str] = field(default_factory=list)
