"""Figures for the library's commands: matplotlib loaded on demand (extra ``demo``), Agg backend.

:func:`pyplot` returns ``matplotlib.pyplot`` or raises :class:`~kacq_hooks.errors.MissingExtraError`
naming the extra to install; :func:`save_figure` writes a PNG whose bytes depend on the data alone.

>>> plt = pyplot()
>>> fig, ax = plt.subplots()
>>> _ = ax.plot([0, 1], [1, 0])
>>> import tempfile, pathlib
>>> save_figure(fig, pathlib.Path(tempfile.mkdtemp()) / "line.png").read_bytes()[:4]
b'\\x89PNG'
"""
from __future__ import annotations

from pathlib import Path

from .errors import MissingExtraError

__all__ = ["pyplot", "save_figure"]


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    try:
        import matplotlib  # optional extra "demo"
    except ImportError as error:
        raise MissingExtraError("matplotlib", "demo", "writing figures") from error
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # the demo extra
    return plt


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as a PNG at ``path`` and close it; no software/date metadata, so equal data give equal bytes."""
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    pyplot().close(fig)
    return path


