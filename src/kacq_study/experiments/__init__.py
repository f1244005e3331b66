"""Dedicated experiments behind ``docs/findings.md``: small studies of why a finding does or does not
reproduce at the demo's scale, each one command that writes a figure and a JSON of its numbers.

    python -m kacq_study.experiments NAME --out docs/findings

One module of this package per experiment; each registers an :class:`~kacq_study.experiments.registry.Experiment`
(its name, run and plot functions, whether it runs over several seeds, its summary lines) with
:func:`~kacq_study.experiments.registry.register` when imported, and every module here is imported with the
package. Adding an experiment is adding one module. :mod:`~kacq_study.experiments.common` holds what several
share.

The multi-seed experiments take ``--seeds`` and ``--workers`` and run their tasks in parallel processes
(:func:`kacq_study.study.run_variants`), as the study does; the one-seed ones take ``--seed`` and ``--steps``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path
from typing import Sequence

from kacq_hooks.errors import KacqError

from ..output import json_ready, write_text_atomic
from ..study import DEFAULT_SEEDS, checked_seeds
from .registry import EXPERIMENTS, Experiment, register

# the modules that are not experiments; every other module of the package registers one
_HELPERS = {"common", "registry", "__main__"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _HELPERS:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["EXPERIMENTS", "Experiment", "main", "register"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give at least 1")
    return value


def _description() -> str:
    return "\n\n".join([__doc__.strip(), *(EXPERIMENTS[name].about.strip() for name in sorted(EXPERIMENTS)
                                           if EXPERIMENTS[name].about)])


def main(argv: Sequence[str] | None = None) -> int:
    multi = sorted(name for name, e in EXPERIMENTS.items() if e.multi_seed)
    single = sorted(name for name, e in EXPERIMENTS.items() if not e.multi_seed)
    parser = argparse.ArgumentParser(prog="python -m kacq_study.experiments", description=_description(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--out", default="docs/findings", help="folder for the figure and the JSON")
    parser.add_argument("--steps", type=_positive, default=None,
                        help=f"pretraining steps, >= 1 ({' and '.join(single)}; experiment's default if omitted)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of a one-seed experiment")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                        help=f"comma-separated seeds of {' and '.join(multi)} (default: the study's)")
    parser.add_argument("--workers", type=int, default=None, help="processes for the multi-seed experiments")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    experiment = EXPERIMENTS[args.experiment]
    if experiment.multi_seed:
        if args.steps is not None:
            parser.error(f"--steps is not an option of {args.experiment}: it runs the study's own pretraining")
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
            checked_seeds(seeds, args.workers)  # none, repeated, --workers < 1: refused here, before any work
        except ValueError:
            parser.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
        except KacqError as error:
            parser.error(f"--seeds {args.seeds!r} / --workers {args.workers}: {error}")
        kwargs = {"seeds": seeds, "workers": args.workers}
    else:
        kwargs = {"seed": args.seed, **({"steps": args.steps} if args.steps is not None else {})}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the run: an unwritable folder fails in seconds, not after it
    started = time.perf_counter()
    result = json_ready(experiment.run(**kwargs))
    name = args.experiment.replace("-", "_")
    write_text_atomic(out / f"{name}.json", json.dumps(result, indent=1, sort_keys=True) + "\n")
    figure = experiment.plot(result, out / f"{name}.png")
    print(f"wrote {figure} and {name}.json in {time.perf_counter() - started:.0f} s")
    for line in experiment.summary(result):
        print(line)
    return 0
