"""``kacq demo``: the study's command, registered with the library's ``kacq`` CLI by entry point.

``pyproject.toml`` declares ``[project.entry-points."kacq.commands"] demo = "kacq_study.cli:register"``;
``kacq_hooks.cli`` calls every ``register(subparsers)`` of that group, so the library never names
this package. ``python -m kacq_study ARGS`` is the same as ``kacq demo ARGS``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from kacq_hooks import cli as kacq_cli
from kacq_hooks.errors import ConfigError
from kacq_hooks.sweep import check_device

from .arms import ARMS, ZHU_ARMS
from .config import RUN_TIME, DemoConfig, DemoConfigError
from .output import write_results
from .report import FIGURES, write_report
from .study import DEFAULT_SEEDS, run_study


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` command to the ``kacq`` parser's subparsers (the ``kacq.commands`` entry point)."""
    parser = subparsers.add_parser(
        "demo", help="pretrain a small Llama, track knowledge entropy, inject facts, and write a short report",
        description="The end-to-end study: pretrain a small Llama-style model from scratch on an offline corpus, "
                    "measuring knowledge entropy per layer; continue training with fact injection from an early "
                    "and a late checkpoint and from the late one after resuscitation; for every seed, in parallel "
                    "processes; write results.json (the same bytes for the same seeds and options), timings.json, "
                    f"report.md and figures to --out. Defaults take {RUN_TIME['default']}; --quick "
                    f"{RUN_TIME['quick']}; --arms zhu {RUN_TIME['zhu']}.")
    parser.add_argument("--quick", action="store_true", help="a smoke-sized run (what the tests run)")
    parser.add_argument("--regime", choices=("default", "decay"), default="default",
                        help="'decay': the study where knowledge entropy decays during pretraining (weight decay 1.0 "
                        "at a constant rate for 12 weight-decay time constants, the early checkpoint at the entropy "
                        f"peak, the late one after the decay; {RUN_TIME['decay']}); default: the settings above")
    parser.add_argument("--out", default=None, help="output folder (default runs/demo; runs/demo-decay with "
                        "--regime decay, so that one study's outputs never replace the other's)")
    seeds = parser.add_mutually_exclusive_group()  # one way to say which seeds run, never two that disagree
    seeds.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                       help="comma-separated distinct seeds >= 0, or a count N for seeds 0..N-1 (default "
                       "%(default)s); a finding reproduces only if it holds for every seed")
    seeds.add_argument("--seed", type=int, default=None, help="one seed only (the same as --seeds S,)")
    parser.add_argument("--workers", type=int, default=None, help="processes running the tasks (one pretraining "
                        "per seed, then one per seed and arm); default: the CPU count or the number of tasks, "
                        "whichever is smaller; 1 runs everything in this process")
    parser.add_argument("--device", default="auto", help="torch device for the model, batches and calibration: "
                        "'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ... (default auto)")
    parser.add_argument("--scale", type=float, default=1, help="a larger study, meant for a GPU: K times d_model "
                        "(kept a multiple of the heads) and d_ff, and K times the pretraining steps, corpus documents "
                        "and the early checkpoint, warmup and entropy interval (so the checkpoints stay at the same "
                        "share of training); default 1, the settings as they are")
    parser.add_argument("--corpus", default=None, help="your own .txt or .jsonl corpus instead of the offline "
                        "Wikipedia summaries")
    parser.add_argument("--facts", default=None, help="a Fictional Knowledge JSON file instead of generated facts")
    parser.add_argument("--arms", default=None, help="comma-separated arms (default early,late,late+resuscitation); "
                        "'zhu' for late,late+augment,late+sam,late+augment+sam; 'all' for every arm")
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--cache-dir", default=None, help="tokenizer cache (default $KACQ_CACHE or "
                        "~/.cache/kacq_hooks)")
    parser.set_defaults(func=run_demo_command)
    return parser


def _parse_arms(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    if text == "zhu":
        return ZHU_ARMS
    if text == "all":
        return tuple(ARMS)
    arms = tuple(a.strip() for a in text.split(",") if a.strip())
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise DemoConfigError(f"unknown arm(s) {unknown or [text]} in --arms; choose from {', '.join(ARMS)} (or 'zhu', "
                              "'all')")
    repeated = sorted({a for a in arms if arms.count(a) > 1})
    if repeated:
        raise DemoConfigError(f"--arms {text}: {', '.join(repeated)} given more than once")
    return arms


def _check_out(out: str) -> None:
    """Create ``out`` and write a file there now: a folder that cannot be written would otherwise fail only
    after the whole study has run."""
    probe = Path(out) / ".kacq-write-test"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"--out {out} cannot be written ({error.strerror or error}); choose another folder") from None


def run_demo_command(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm  # optional extra "demo"

    # every value is checked here, before the corpus, the tokenizer or a worker starts
    overrides = {"corpus": args.corpus, "facts": args.facts, "cache_dir": args.cache_dir,
                 "device": str(check_device(resolve_device(args.device)))}
    arms = _parse_arms(args.arms)
    if arms is not None:
        overrides["arms"] = arms
    if args.pretrain_steps is not None:
        overrides["pretrain_steps"] = args.pretrain_steps
    if args.regime == "decay" and args.quick:
        raise DemoConfigError("--quick and --regime decay are two different studies: give one of them")
    if args.regime == "decay":
        config = DemoConfig.decay(**overrides)
    else:
        config = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    config = config.scaled(args.scale)
    config.validate()
    seeds = parse_seeds(f"{args.seed}," if args.seed is not None else args.seeds)
    if args.workers is not None and args.workers < 1:
        raise DemoConfigError(f"--workers {args.workers}: give at least 1 (1 runs every task in this process)")
    if args.out is None:
        args.out = "runs/demo-decay" if args.regime == "decay" else "runs/demo"
    _check_out(args.out)
    progress = _Bars(tqdm, config, len(seeds))
    try:
        results = run_study(config, seeds, workers=args.workers, progress=progress)
    except KeyboardInterrupt:  # run_study has already ended its workers
        progress.close()
        print("interrupted: the study's worker processes were stopped; nothing written", file=sys.stderr)
        return 130
    finally:
        progress.close()
    path, written = _publish(results, Path(args.out))
    reproduced = sum(f["reproduces"] for f in results["findings"])
    print(f"wrote {path}, {', '.join(p.name for p in written)} to {args.out}; {reproduced} of "
          f"{len(results['findings'])} findings reproduce for all {len(seeds)} seeds at this scale (see report.md); "
          f"{results['timings']['wall_s']:.0f} s with {results['timings']['workers']} worker(s)")
    return 0


def _publish(results: dict, out: Path) -> tuple[Path, list[Path]]:
    """Write results.json, timings.json, report.md and the figures into a folder inside ``out``, then move them
    into ``out`` and remove the outputs of a previous run that this one did not write (a figure of other
    numbers). Interrupted while writing, ``out`` keeps the previous run's outputs as they were."""
    staging = Path(tempfile.mkdtemp(prefix=".kacq-demo-", dir=out))
    try:
        write_results(results, staging)
        written = [Path(p).name for p in write_report(results, staging)]
        made = {p.name for p in staging.iterdir()}
        for name in {"results.json", "timings.json", *FIGURES, "report.md"} - made:
            (out / name).unlink(missing_ok=True)
        for name in sorted(made):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "results.json", [out / name for name in written]


def resolve_device(name: str) -> str:
    """'auto' is cuda when torch sees a GPU, else cpu; anything else as given."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def parse_seeds(text: str) -> tuple[int, ...]:
    """"0,1,2" -> (0, 1, 2); a single count "3" -> (0, 1, 2); "5," -> (5,). Seeds are distinct and >= 0
    (a seed given twice would run twice and count as two seeds agreeing); they are returned sorted, as
    results.json stores them, so "1,0" and "0,1" are the same study.

    >>> parse_seeds("3"), parse_seeds("4,7"), parse_seeds("5,"), parse_seeds("2,0")
    ((0, 1, 2), (4, 7), (5,), (0, 2))
    """
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ValueError
            return tuple(range(count))
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise DemoConfigError(f"--seeds {text!r}: give comma-separated seeds >= 0 (0,1,2) or a count (3)")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise DemoConfigError(f"--seeds {text!r}: seed(s) {repeated} given more than once")
    return tuple(sorted(seeds))


class _Bars:
    """One overall bar (every task's steps) and one bar per running task at its own position; the task
    bars show the latest loss and entropy their worker reported."""

    def __init__(self, tqdm, config: DemoConfig, seeds: int):
        self.tqdm, self.tasks, self.done, self.free = tqdm, {}, set(), []
        total = seeds * (config.pretrain_steps + len(config.arms) * config.continue_steps)
        self.overall = tqdm(total=total, desc="study", unit="step", file=sys.stderr, dynamic_ncols=True, position=0)

    def __call__(self, phase: str, info: dict) -> None:
        if "total" not in info or phase in self.done:
            return
        if phase not in self.tasks:
            position = self.free.pop(0) if self.free else len(self.tasks) + 1
            self.tasks[phase] = (self.tqdm(total=info["total"], desc=phase, unit="step", file=sys.stderr,
                                           dynamic_ncols=True, position=position, leave=False), position)
        bar, position = self.tasks[phase]
        self.overall.update(info["step"] - bar.n)
        bar.update(info["step"] - bar.n)
        bar.set_postfix(loss=f"{info['loss']:.3f}", entropy=f"{info['entropy']:.4f}", refresh=False)
        if info["step"] >= info["total"]:  # the task is done: its line goes to the next task
            bar.close()
            del self.tasks[phase]
            self.done.add(phase)
            self.free = sorted(self.free + [position])

    def close(self) -> None:
        for bar, _ in self.tasks.values():
            bar.close()
        self.overall.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``kacq demo`` with ``argv`` (default: the command line's arguments), through the library's CLI."""
    return kacq_cli.main(["demo", *(sys.argv[1:] if argv is None else argv)])
