"""The errors kacq_hooks raises: one base class, a few precise subclasses."""
from __future__ import annotations


class KacqError(Exception):
    """Base class: every error kacq_hooks raises on purpose says what was found, expected and what to do."""


class LocateError(KacqError):
    """No MLP output projection could be found, or the model's MLP shape is not supported."""


class ShapeError(KacqError, ValueError):
    """A tensor, mask or plan does not fit the model or the statistics it is meant for."""


class MissingExtraError(KacqError, ImportError):
    """An optional integration was asked for but its package is not installed."""

    def __init__(self, package: str, extra: str, what: str):
        super().__init__(
            f"{what} needs the '{package}' package, which is not installed. "
            f"Install it with: pip install 'kacq_hooks[{extra}]'"
        )
        self.package = package
        self.extra = extra


class SavedStatsError(KacqError, ValueError):
    """A saved statistics file is missing, not kacq_hooks statistics, or belongs to another model."""
