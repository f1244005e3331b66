"""The ``kacq`` command.

Each subcommand is one ``add_<name>_parser(subparsers)`` function that registers its arguments and sets
``func`` to the function that runs it; add new ones to :data:`SUBCOMMANDS`. ``main`` returns an exit
code: 0 on success, 2 when a :class:`~kacq_hooks.errors.KacqError` (bad input) stops the command.

    kacq resuscitate MODEL_DIR --data FILE --ratio 0.5 --factor 2 --out DIR
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm  # a dependency of transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .bench import PRESETS, bench_table, build_preset, load_model, run_bench
from .corpus import load_corpus
from .errors import CheckpointError, ConfigError, KacqError, ResuscitationError
from .interventions import DEFAULT_MAX_MULTIPLIER, resuscitate, resuscitation_plan
from .interventions.resuscitation import check_plan_arguments, check_weight_edit
from .sweep import check_device, check_seq_len, counted_description, entropy_sweep, joined_ranks, measure_texts

log = logging.getLogger(__name__)


# -- shared helpers ---------------------------------------------------------------------------------------------

def load_model_and_tokenizer(model_dir: str, device: str):
    """A causal LM and its tokenizer from a local ``save_pretrained`` directory (stored dtype kept)."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{model_dir} is not a saved model directory (no config.json); give the folder written by "
                        "model.save_pretrained(...)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"no tokenizer could be loaded from {model_dir} ({err}); save one there with "
                        "tokenizer.save_pretrained(...)") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CheckpointError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token and save it")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


DATA_HELP = ".txt (documents separated by blank lines) or .jsonl (a \"text\" field per line)"


def _add_measure_arguments(parser: argparse.ArgumentParser, data_help: str = DATA_HELP) -> None:
    """The options every measuring subcommand shares, spelled once."""
    parser.add_argument("--data", required=True, help=data_help)
    parser.add_argument("--batch-size", type=int, default=8, help="documents per forward pass (default 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per document, longer ones are cut "
                        "(default: the model's positions, at most 512)")
    parser.add_argument("--max-length", dest="seq_len", type=int, help=argparse.SUPPRESS)  # old spelling
    parser.add_argument("--device", default=_default_device(), help="cpu, cuda, cuda:N or mps (default: cuda "
                        "when available)")


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
    # every check before the slow part: options, device, positions, the model's MLPs, then the data
    if args.batch_size < 1 or (args.seq_len is not None and args.seq_len < 1):
        raise ConfigError("--batch-size and --seq-len must be at least 1")
    cap = DEFAULT_MAX_MULTIPLIER if args.max_multiplier is None else args.max_multiplier
    check_plan_arguments(args.ratio, args.factor, cap)
    check_device(args.device)
    seq_len = args.seq_len
    if (Path(args.model_dir) / "config.json").is_file():
        seq_len = check_seq_len(args.seq_len, AutoConfig.from_pretrained(args.model_dir), args.model_dir)
    model, tokenizer = load_model_and_tokenizer(args.model_dir, args.device)
    try:
        check_weight_edit(model)
    except KacqError as err:
        raise ResuscitationError(f"{err}. kacq resuscitate saves a weight edit and a hook cannot be saved, so it cannot "
                        "edit this model: apply the hook in Python, where it lasts as long as the model object") from err
    texts = load_corpus(args.data)
    before, _ = measure_texts(model, tokenizer, texts, batch_size=args.batch_size, max_length=seq_len)
    plan = resuscitation_plan(before, ratio=args.ratio, factor=args.factor, max_multiplier=cap, layers=args.layers)
    predicted = plan.predicted_entropy()
    resuscitate(model, plan, mode="weights")
    after, _ = measure_texts(model, tokenizer, texts, batch_size=args.batch_size, max_length=seq_len)
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


# -- commands of other packages (kacq demo) ----------------------------------------------------------------------

COMMAND_GROUP = "kacq.commands"


def installed_commands() -> list[Callable]:
    """The ``register(subparsers)`` functions installed packages declare in the ``kacq.commands`` entry-point
    group, by name: ``kacq demo`` comes from the study package (``kacq_study``), which the library never imports
    by name. A command whose package fails to import is left out with a warning."""
    found = []
    for entry in sorted(importlib.metadata.entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            found.append(entry.load())
        except Exception as err:  # any failure of another package's import must not take down the library's commands
            log.warning("kacq %s is unavailable: %s could not be loaded (%s: %s); reinstall the package that "
                        "provides it", entry.name, entry.value, type(err).__name__, err)
    return found


# -- kacq entropy -------------------------------------------------------------------------------------------------

def add_entropy_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "entropy", help="knowledge entropy of models or checkpoints on a data file; JSON, CSV and a plot",
        description="Measure knowledge entropy (Kim et al. 2025) of each MODEL on the same documents. MODEL is a "
                    "save_pretrained folder, a Trainer output folder (its checkpoint-N subfolders are measured in "
                    "order) or, when online, a hub id (with --revision for several revisions). A checkpoint is known "
                    "by a digest of its weights: those already in OUT are skipped (so an interrupted sweep resumes, "
                    "and a moved folder is not measured again), and checkpoints holding the same weights as an "
                    "earlier one are flagged and not measured twice. Runs unchanged under torchrun / accelerate "
                    "launch (each rank reads its share of the documents).")
    parser.add_argument("models", nargs="+", metavar="MODEL")
    _add_measure_arguments(parser, DATA_HELP + ", .parquet/.arrow files or a folder of them, a folder written by "
                           "Dataset.save_to_disk, or a hub dataset name when online")
    parser.add_argument("--text-column", default="text", help="the column (or JSON field) holding the text "
                        "(default text)")
    parser.add_argument("--streaming", action="store_true", help="stream a hub dataset instead of downloading it")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder or hub id, for checkpoints saved "
                        "without one (default: each checkpoint's own)")
    parser.add_argument("--revision", action="append", default=None, help="hub revision (repeatable)")
    parser.add_argument("--cache-dir", default=None, help="where hub revisions are downloaded (default: the "
                        "Hugging Face cache)")
    parser.add_argument("--keep-cache", action="store_true", help="keep each revision's files after measuring "
                        "(default: removed, so a long series does not fill the disk)")
    parser.add_argument("--max-docs", type=int, default=None, help="the first N documents of the data")
    parser.add_argument("--max-tokens", type=int, default=None, help="at most N tokens per checkpoint: whole "
                        "documents in order (each cut at --seq-len) while they fit; with --count, N counted tokens")
    parser.add_argument("--count", default=None, choices=["labels", "shifted_labels"],
                        help="measure only the completions of prompt/completion records: --data holds records with "
                        "\"prompt\" (context, not counted) and \"completion\" fields (JSONL fields or parquet/arrow "
                        "columns), tokenized as the text prompt + completion, split where the prompt's tokens end. "
                        "labels: the positions holding the completion's tokens; shifted_labels: the positions "
                        "predicting them (the last prompt token through the "
                        "second-to-last completion token), those a causal-LM loss on the completion scores. As "
                        "instrument(count=...). A record whose prompt fills --seq-len refuses the run. Default: every "
                        "token that is not padding")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--weighting", default="token", choices=["token", "document"])
    parser.add_argument("--out", default="runs/entropy", help="output folder (default runs/entropy)")
    parser.add_argument("--save-stats", action="store_true", help="also save each checkpoint's per-neuron "
                        "statistics (OUT/results/*.safetensors)")
    parser.add_argument("--executor", default="serial", choices=["serial", "local", "ray", "slurm"],
                        help="serial (default): one checkpoint after the other in this process; local: --jobs "
                        "subprocesses; ray: tasks on a Ray cluster (pip install 'kacq_hooks[ray]'); slurm: one "
                        "SLURM job per checkpoint through submitit (pip install 'kacq_hooks[slurm]')")
    parser.add_argument("--jobs", type=int, default=1, help="checkpoints measured at once (default 1)")
    parser.add_argument("--task-ranks", type=int, default=1, help="ranks per task: above 1 each task is a "
                        "data-parallel torchrun job (or SLURM tasks), for a checkpoint too big for one device")
    parser.add_argument("--ray-address", default=None, help="the Ray cluster (host:port or auto; default: a new "
                        "local one)")
    parser.add_argument("--slurm-partition", default=None)
    parser.add_argument("--slurm-time", type=int, default=60, help="minutes per checkpoint (default 60)")
    parser.add_argument("--slurm-gpus", type=int, default=None, help="GPUs per job")
    parser.add_argument("--slurm-cpus", type=int, default=None, help="CPUs per task")
    parser.set_defaults(func=run_entropy_command)
    return parser


class SweepProgress:
    """A bar per checkpoint with tokens/s (documents of this rank's share), messages for skipped, duplicate and
    failed checkpoints, and a bar over tasks for the parallel executors; on stderr."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr  # looked up now: tests and wrappers replace sys.stderr
        self.bar, self.tasks, self.started = None, None, 0.0

    def __call__(self, event: str, info: dict) -> None:
        import time

        if event == "checkpoint":
            self.close()
            where = f" x {info['world_size']} ranks" if info.get("world_size", 1) > 1 else ""
            self.bar = tqdm(total=info["documents"], unit="doc", file=self.stream, dynamic_ncols=True,
                            desc=f"[{info.get('index', 0) + 1}/{info.get('count', 1)}] {Path(info['name']).name}{where}")
            self.started = time.perf_counter()
        elif event == "batch" and self.bar is not None:
            self.bar.update(info["documents"] - self.bar.n)
            elapsed = time.perf_counter() - self.started
            if elapsed > 0:
                self.bar.set_postfix_str(f"{info['tokens'] / elapsed:,.0f} tok/s", refresh=False)
        elif event == "skip":
            print(f"skipping {info['name']}: already measured", file=self.stream)
        elif event == "duplicate":
            print(f"{info['name']}: same weights as {info['duplicate_of']}, not measured again", file=self.stream)
        elif event == "error":
            self.close()
            print(f"{info['name']}: failed: {info['error']}", file=self.stream)
        elif event == "task":
            if self.tasks is None:
                self.tasks = tqdm(total=info["count"], unit="ckpt", file=self.stream, dynamic_ncols=True,
                                  desc="checkpoints")
            self.tasks.update(1)

    def close(self) -> None:
        for bar in (self.bar, self.tasks):
            if bar is not None:
                bar.close()
        self.bar = self.tasks = None


def entropy_table(results: dict) -> str:
    """The sweep as a table: one line per checkpoint, ``=`` marking weights identical to an earlier one."""
    lines = [f"{'checkpoint':<40} {'step':>8} {'total':>12} {'max':>10} {'tokens':>10} {'tok/s':>10}  note"]
    for row in results["checkpoints"]:
        note = f"= same weights as {Path(row['duplicate_of']).name}" if row.get("duplicate_of") else ""
        speed = f"{row['tokens_per_s']:10,.0f}" if row.get("tokens_per_s") and not note else f"{'':>10}"
        lines.append(f"{row['name'][-40:]:<40} {str(row.get('step') or ''):>8} {row['total']:12.6f} "
                     f"{row['max_total']:10.4f} {row['tokens']:>10} {speed}  {note}".rstrip())
    for row in results.get("errors", []):
        lines.append(f"{row['name'][-40:]:<40} {str(row.get('step') or ''):>8} {'failed':>12}  {row['error']}")
    count = (results.get("settings") or {}).get("count")
    if count is not None:
        lines.append(f"tokens counted: {counted_description(count)}")
    return "\n".join(lines)


def run_entropy_command(args: argparse.Namespace) -> int:
    progress = SweepProgress()
    slurm = {k: v for k, v in (("partition", args.slurm_partition), ("timeout_min", args.slurm_time),
                               ("gpus_per_node", args.slurm_gpus), ("cpus_per_task", args.slurm_cpus))
             if v is not None}
    try:
        # under torchrun the group is joined here and left before this process exits (see joined_ranks)
        with joined_ranks(args.device) as ranks:
            results = entropy_sweep(args.models, args.data, out=args.out, revisions=args.revision,
                                    max_docs=args.max_docs, batch_size=args.batch_size, seq_len=args.seq_len,
                                    weighting=args.weighting, dtype=args.dtype, device=args.device, progress=progress,
                                    text_column=args.text_column, streaming=args.streaming, tokenizer=args.tokenizer,
                                    executor=args.executor, jobs=args.jobs, task_ranks=args.task_ranks,
                                    ray_address=args.ray_address, slurm=slurm, cache_dir=args.cache_dir,
                                    keep_cache=args.keep_cache, save_stats=args.save_stats, max_tokens=args.max_tokens,
                                    count=args.count)
    finally:
        progress.close()
    if ranks.rank != 0:
        return 0
    print(entropy_table(results))
    print(f"wrote entropy.json, entropy.csv and entropy.png to {args.out}")
    for row in results.get("errors", []):
        print(f"kacq entropy: error: {row['name']}: {row['error']}", file=sys.stderr)
    return 2 if results.get("errors") else 0


def add_bench_parser(subparsers) -> argparse.ArgumentParser:

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

    if (args.model is None) == (args.config is None):
        raise ConfigError("give either MODEL (a save_pretrained folder or hub id) or --config PRESET")
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

SUBCOMMANDS: list[Callable] = [add_resuscitate_parser, add_entropy_parser, add_bench_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kacq", description="Measure and steer factual knowledge acquisition "
                                     "in language models with PyTorch hooks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in [*SUBCOMMANDS, *installed_commands()]:
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
