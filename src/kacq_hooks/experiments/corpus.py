"""Deprecated alias of :mod:`kacq_hooks.corpus` (kept for one release): import from there instead."""
from __future__ import annotations

import warnings

from kacq_hooks.corpus import *  # noqa: F401,F403  (the alias re-exports the module's public names)
from kacq_hooks.corpus import __all__  # noqa: F401

warnings.warn("kacq_hooks.experiments.corpus is deprecated and will be removed in the next release; "
              "import from kacq_hooks.corpus", DeprecationWarning, stacklevel=2)
