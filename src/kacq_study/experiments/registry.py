"""The registry of dedicated experiments: each experiment module registers one :class:`Experiment` at import, and
``python -m kacq_study.experiments NAME`` runs the one named."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import DemoConfigError


def no_summary(result: dict) -> list[str]:
    return []


@dataclass(frozen=True)
class Experiment:
    """One experiment as the CLI runs it.

    Attributes:
        name: the CLI's name for it (``python -m kacq_study.experiments NAME``); its outputs are
            ``NAME.json`` and ``NAME.png`` with "-" as "_".
        run: the experiment; returns its numbers as a dict. A multi-seed experiment is called with ``seeds`` and
            ``workers``, a one-seed one with ``seed`` and, when ``--steps`` is given, ``steps``.
        plot: ``plot(result, path) -> path`` writes its figure from the (JSON-ready) result.
        multi_seed: whether it runs over several seeds (``--seeds``, ``--workers``) or one (``--seed``, ``--steps``).
        summary: ``summary(result) -> lines`` printed after the files are written.
        about: a paragraph for the CLI's ``--help``.
    """

    name: str
    run: Callable[..., dict]
    plot: Callable[[dict, Path], Path]
    multi_seed: bool
    summary: Callable[[dict], list[str]] = no_summary
    about: str = ""


EXPERIMENTS: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    """Add ``experiment`` under its name; a second experiment under a taken name is refused (it would replace one)."""
    if experiment.name in EXPERIMENTS and EXPERIMENTS[experiment.name] is not experiment:
        raise DemoConfigError(f"two experiments named {experiment.name!r}")
    EXPERIMENTS[experiment.name] = experiment
    return experiment
