"""``kacq demo``: the study's command, registered with the library's ``kacq`` CLI by entry point.

``pyproject.toml`` declares ``[project.entry-points."kacq.commands"] demo = "kacq_study.cli:register"``;
``kacq_hooks.cli`` calls every ``register(subparsers)`` of that group, so the library never names
this package. ``python -m kacq_study ARGS`` is the same as ``kacq demo ARGS``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from kacq_hooks import cli as kacq_cli
from kacq_hooks.errors import KacqError

from .demo import ARMS, RUN_TIME, ZHU_ARMS, DemoConfig, run_demo, write_results
from .report import write_report


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` command to the ``kacq`` parser's subparsers (the ``kacq.commands`` entry point)."""
    parser = subparsers.add_parser(
        "demo", help="pretrain a small Llama, track knowledge entropy, inject facts, and write a short report",
        description="The end-to-end study: pretrain a small Llama-style model from scratch on an offline corpus, "
                    "measuring knowledge entropy per layer; continue training with fact injection from an early "
                    "and a late checkpoint and from the late one after resuscitation; write results.json, "
                    f"report.md and figures to --out. Defaults take {RUN_TIME['default']}; --quick "
                    f"{RUN_TIME['quick']}; --arms zhu {RUN_TIME['zhu']}.")
    parser.add_argument("--quick", action="store_true", help="a smoke-sized run (what the tests run)")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0)
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
        raise KacqError(f"unknown arm(s) {unknown or [text]} in --arms; choose from {', '.join(ARMS)} (or 'zhu', "
                        "'all')")
    return arms


def run_demo_command(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm  # optional extra "demo"

    overrides = {"seed": args.seed, "corpus": args.corpus, "facts": args.facts, "cache_dir": args.cache_dir}
    arms = _parse_arms(args.arms)
    if arms is not None:
        overrides["arms"] = arms
    if args.pretrain_steps is not None:
        overrides["pretrain_steps"] = args.pretrain_steps
    config = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    bars: dict[str, tqdm] = {}

    def progress(phase: str, info: dict) -> None:
        if "total" not in info:
            return
        bar = bars.get(phase)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[phase] = tqdm(total=info["total"], desc=phase, unit="step", file=sys.stderr,
                                     dynamic_ncols=True, leave=True)
        bar.update(info["step"] - bar.n)
        bar.set_postfix(loss=f"{info['loss']:.3f}", entropy=f"{info['entropy']:.4f}", refresh=False)

    try:
        results = run_demo(config, progress)
    finally:
        for bar in bars.values():
            bar.close()
    path = write_results(results, args.out)
    written = write_report(results, args.out)
    holds = sum(f["holds"] is True for f in results["findings"])
    print(f"wrote {path}, {', '.join(p.name for p in written)} to {args.out}; {holds} of "
          f"{len(results['findings'])} findings reproduce at this scale (see report.md)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``kacq demo`` with ``argv`` (default: the command line's arguments), through the library's CLI."""
    return kacq_cli.main(["demo", *(sys.argv[1:] if argv is None else argv)])
