"""The ``kacq`` command.

Each subcommand is one ``add_<name>_parser(subparsers)`` function that registers its arguments and sets
``func`` to the function that runs it; add new ones to :data:`SUBCOMMANDS`. ``main`` returns an exit
code: 0 on success, 2 when a :class:`~kacq_hooks.errors.KacqError` (bad input) stops the command.

    kacq resuscitate MODEL_DIR --data FILE --ratio 0.5 --factor 2 --out DIR
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import KacqError

log = logging.getLogger(__name__)


# -- shared helpers ---------------------------------------------------------------------------------------------

def load_model_and_tokenizer(model_dir: str, device: str):
    """A causal LM and its tokenizer from a local ``save_pretrained`` directory (stored dtype kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise KacqError(f"{model_dir} is not a saved model directory (no config.json); give the folder written by "
                        "model.save_pretrained(...)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise KacqError(f"no tokenizer could be loaded from {model_dir} ({err}); save one there with "
                        "tokenizer.save_pretrained(...)") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise KacqError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token and save it")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_measure_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help=".txt (documents separated by blank lines) or .jsonl "
                        "(a \"text\" field per line): the calibration data")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512, help="tokens per document (longer ones are cut)")
    parser.add_argument("--device", default=_default_device())


# -- kacq resuscitate -------------------------------------------------------------------------------------------

def add_resuscitate_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "resuscitate", help="edit a model's least-used FFN neurons up (Kim et al., Algorithm 1) and save it",
        description="Measure mean |C| per FFN neuron on --data, scale the bottom --ratio of each layer so their "
                    "mean |C| becomes --factor x the layer mean (a weight edit of the gated up projection), save "
                    "the model to --out, and print the knowledge entropy before, predicted and measured after.")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a directory written by save_pretrained")
    _add_measure_arguments(parser)
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of neurons per layer to lift (0..1)")
    parser.add_argument("--factor", type=float, default=2.0, help="target mean |C| as a multiple of the layer mean")
    parser.add_argument("--max-multiplier", type=float, default=None, help="cap on a neuron's multiplier "
                        "(default 1000)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="edit only these layers")
    parser.add_argument("--out", required=True, help="directory for the edited model, tokenizer and report")
    parser.set_defaults(func=run_resuscitate)
    return parser


def run_resuscitate(args: argparse.Namespace) -> int:
    from .experiments.corpus import load_corpus
    from .experiments.sweep import measure_texts
    from .interventions import DEFAULT_MAX_MULTIPLIER, resuscitate, resuscitation_plan
    from .interventions.resuscitation import check_plan_arguments

    if args.batch_size < 1 or args.max_length < 1:
        raise KacqError("--batch-size and --max-length must be at least 1")
    cap = DEFAULT_MAX_MULTIPLIER if args.max_multiplier is None else args.max_multiplier
    try:
        check_plan_arguments(args.ratio, args.factor, cap)  # before the slow part
    except ValueError as err:
        raise KacqError(str(err)) from err
    texts = load_corpus(args.data)
    model, tokenizer = load_model_and_tokenizer(args.model_dir, args.device)
    before, _ = measure_texts(model, tokenizer, texts, batch_size=args.batch_size, max_length=args.max_length)
    try:
        plan = resuscitation_plan(before, ratio=args.ratio, factor=args.factor, max_multiplier=cap,
                                  layers=args.layers)
    except ValueError as err:  # bad --layers
        raise KacqError(str(err)) from err
    predicted = plan.predicted_entropy()
    resuscitate(model, plan, mode="weights")
    after, _ = measure_texts(model, tokenizer, texts, batch_size=args.batch_size, max_length=args.max_length)
    entropy_before, entropy_after = before.knowledge_entropy(), after.knowledge_entropy()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {"model": str(args.model_dir), "data": str(args.data), "documents": len(texts),
              "entropy_before": entropy_before.to_dict(), "entropy_predicted": predicted.to_dict(),
              "entropy_measured_after": entropy_after.to_dict(), "plan": plan.to_dict()}
    (out / "resuscitation.json").write_text(json.dumps(report, indent=1))

    edited = set(plan.edited_layers)
    print(f"{'layer':>5}  {'before':>10}  {'predicted':>10}  {'measured':>10}")
    for layer, b, p, m in zip(plan.layer_ids, entropy_before.per_layer, predicted.per_layer,
                              entropy_after.per_layer):
        mark = "*" if layer in edited else " "
        print(f"{layer:>4}{mark}  {b:10.6f}  {p:10.6f}  {m:10.6f}")
    print(f"{'total':>5}  {entropy_before.total:10.6f}  {predicted.total:10.6f}  {entropy_after.total:10.6f}"
          f"   (max {entropy_before.max_total:.6f})")
    print(f"* edited: {plan.selected} neurons in {len(edited)} layers (ratio {plan.ratio:g}, factor {plan.factor:g}); "
          f"{plan.capped} multipliers capped at {plan.max_multiplier:g}. The prediction is exact for the first "
          f"edited layer; later layers see changed inputs.")
    print(f"saved the edited model and resuscitation.json to {out}")
    return 0


# -- kacq demo ----------------------------------------------------------------------------------------------------

def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="pretrain a small Llama, track knowledge entropy, inject facts, and write a short report",
        description="The end-to-end study: pretrain a small Llama-style model from scratch on an offline corpus, "
                    "measuring knowledge entropy per layer; continue training with fact injection from an early "
                    "and a late checkpoint and from the late one after resuscitation; write results.json, "
                    "report.md and figures to --out. Defaults take about 8 minutes on 2 CPU cores; --quick under 1.")
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
    from .experiments.demo import ARMS, ZHU_ARMS

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
    from tqdm.auto import tqdm

    from .experiments.demo import DemoConfig, run_demo, write_results
    from .report import write_report

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


# -- kacq entropy -------------------------------------------------------------------------------------------------

def add_entropy_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "entropy", help="knowledge entropy of models or checkpoints on a data file; JSON, CSV and a plot",
        description="Measure knowledge entropy (Kim et al. 2025) of each MODEL on the same documents. MODEL is a "
                    "save_pretrained folder, a Trainer output folder (its checkpoint-N subfolders are measured in "
                    "order) or, when online, a hub id (with --revision for several revisions). Checkpoints already "
                    "in OUT/entropy.json are skipped, so an interrupted sweep resumes.")
    parser.add_argument("models", nargs="+", metavar="MODEL")
    parser.add_argument("--data", required=True, help=".txt (documents separated by blank lines), .jsonl (a "
                        "\"text\" field per line), or a hub dataset name when online")
    parser.add_argument("--revision", action="append", default=None, help="hub revision (repeatable)")
    parser.add_argument("--max-docs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per document (longer ones are cut)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--device", default=_default_device())
    parser.add_argument("--weighting", default="token", choices=["token", "document"])
    parser.add_argument("--out", default="runs/entropy", help="output folder (default runs/entropy)")
    parser.set_defaults(func=run_entropy_command)
    return parser


def run_entropy_command(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .experiments.sweep import entropy_sweep

    state: dict = {}

    def progress(event: str, info: dict) -> None:
        if event == "checkpoint":
            if state.get("bar") is not None:
                state["bar"].close()
            state["bar"] = tqdm(total=info["documents"], unit="doc", file=sys.stderr, dynamic_ncols=True,
                                desc=f"[{info['index'] + 1}/{info['count']}] {Path(info['name']).name}")
        elif event == "batch" and state.get("bar") is not None:
            state["bar"].update(info["documents"] - state["bar"].n)
        elif event == "skip":
            print(f"skipping {info['name']}: already measured", file=sys.stderr)

    try:
        results = entropy_sweep(args.models, args.data, out=args.out, revisions=args.revision,
                                max_docs=args.max_docs, batch_size=args.batch_size, seq_len=args.seq_len,
                                weighting=args.weighting, dtype=args.dtype, device=args.device, progress=progress)
    finally:
        if state.get("bar") is not None:
            state["bar"].close()
    print(f"{'checkpoint':<40} {'total':>12} {'max':>10}")
    for row in results["checkpoints"]:
        print(f"{row['name'][-40:]:<40} {row['total']:12.6f} {row['max_total']:10.4f}")
    print(f"wrote entropy.json, entropy.csv and entropy.png to {args.out}")
    return 0


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    from .bench import PRESETS

    parser = subparsers.add_parser(
        "bench", help="what instrumentation costs on a model: forward and training step, time and memory",
        description="Time plain against instrumented forward passes and training steps (grads=True) in "
                    "interleaved turns, with peak memory, on the CPU or a GPU. MODEL is a save_pretrained folder "
                    "or, when online, a hub id; --config builds a random model offline instead.")
    parser.add_argument("model", nargs="?", metavar="MODEL")
    parser.add_argument("--config", choices=sorted(PRESETS), help="a random model of this shape (no download)")
    parser.add_argument("--device", default=_default_device())
    parser.add_argument("--batch-size", type=int, default=8, help="with MODEL: rows of random tokens")
    parser.add_argument("--seq-len", type=int, default=256, help="with MODEL: tokens per row")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved turns per variant")
    parser.add_argument("--no-training", action="store_true", help="time forward passes only")
    parser.add_argument("--frontends", action="store_true", help="also TransformerLens run_with_cache and an "
                        "nnsight trace that saves C, where installed")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    parser.set_defaults(func=run_bench_command)
    return parser


def run_bench_command(args: argparse.Namespace) -> int:
    from .bench import bench_table, build_preset, load_model, run_bench

    if (args.model is None) == (args.config is None):
        raise KacqError("give either MODEL (a save_pretrained folder or hub id) or --config PRESET")
    if args.config:
        model, ids, mask = build_preset(args.config, args.device)
    else:
        model, ids, mask = load_model(args.model, args.device, args.batch_size, args.seq_len)
    result = run_bench(model, ids, mask, repeats=args.repeats, training=not args.no_training,
                       frontends=args.frontends)
    result["model"] = args.config or args.model
    print(bench_table(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"wrote {args.json_out}")
    return 0


# -- entry point ------------------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable] = [add_resuscitate_parser, add_demo_parser, add_entropy_parser, add_bench_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kacq", description="Measure and steer factual knowledge acquisition "
                                     "in language models with PyTorch hooks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KacqError as err:
        print(f"kacq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
