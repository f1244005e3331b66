"""Knowledge entropy across checkpoints: the study behind ``kacq entropy``.

:func:`entropy_sweep` measures every model (a local ``save_pretrained`` folder, a Trainer output
folder holding ``checkpoint-N`` subfolders, or a hub id with ``--revision``s when online) on the same
documents, and writes ``entropy.json`` after each one, so an interrupted sweep resumes where it
stopped: checkpoints already in the JSON are skipped. :func:`write_outputs` adds ``entropy.csv`` and
``entropy.png``.

>>> result = entropy_sweep(["runs/ckpt-100", "runs/ckpt-200"], "calib.jsonl", out="sweep")  # doctest: +SKIP
>>> [c["total"] for c in result["checkpoints"]]                                           # doctest: +SKIP
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from ..errors import KacqError

log = logging.getLogger(__name__)

FORMAT_NAME = "kacq_hooks.entropy_sweep"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
Progress = Callable[[str, dict], None]


@dataclass(frozen=True)
class SweepSettings:
    """What a measurement depends on; a resumed sweep must use the same (checked against the JSON)."""

    data: str
    max_docs: int | None = None
    batch_size: int = 8
    seq_len: int = 512
    weighting: str = "token"
    dtype: str = "float32"

    def validate(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1:
            raise KacqError(f"--batch-size ({self.batch_size}) and --seq-len ({self.seq_len}) must be at least 1")
        if self.max_docs is not None and self.max_docs < 1:
            raise KacqError(f"--max-docs must be at least 1, got {self.max_docs}")
        if self.weighting not in ("token", "document"):
            raise KacqError(f"--weighting must be 'token' or 'document', not {self.weighting!r}")
        if self.dtype not in DTYPES:
            raise KacqError(f"--dtype must be one of {sorted(DTYPES)}, not {self.dtype!r}")


@dataclass(frozen=True)
class Checkpoint:
    """One model to measure: ``name`` is its key in the outputs."""

    name: str
    source: str
    revision: str | None = None


# ------------------------------------------------------------------------------------------------
# Inputs


def expand_checkpoints(models: Sequence[str], revisions: Sequence[str] | None = None) -> list[Checkpoint]:
    """Local folders as given (a folder of ``checkpoint-N`` subfolders expands to them, by N); hub ids once
    per revision."""
    found: list[Checkpoint] = []
    for model in models:
        path = Path(model)
        if path.is_dir() and not (path / "config.json").is_file():
            children = sorted((p for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file()),
                              key=lambda p: (_step_of(p.name) is None, _step_of(p.name) or 0, p.name))
            if not children:
                raise KacqError(f"{model} is a folder with no config.json and no checkpoint subfolders; give a "
                                "folder written by save_pretrained (or a Trainer output_dir)")
            found += [Checkpoint(str(child), str(child)) for child in children]
        elif path.is_dir():
            found.append(Checkpoint(model, model))
        elif revisions:
            found += [Checkpoint(f"{model}@{rev}", model, rev) for rev in revisions]
        else:
            found.append(Checkpoint(model, model))
    return found


def _step_of(name: str) -> int | None:
    match = re.search(r"(\d+)(?!.*\d)", name)
    return int(match.group(1)) if match else None


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def iter_documents(data: str, max_docs: int | None = None) -> Iterator[str]:
    """Documents of a .txt / .jsonl file, or of a ``datasets`` name's "text" column (streamed; online only)."""
    path = Path(data)
    if path.suffix.lower() in (".txt", ".jsonl") or path.exists():
        from .corpus import load_corpus

        texts = load_corpus(path)
        yield from texts[:max_docs] if max_docs is not None else texts
        return
    if _offline():
        raise KacqError(f"data {data!r} is not a local file, and the hub is offline (HF_HUB_OFFLINE): give a .txt "
                        "or .jsonl file")
    try:
        import datasets
    except ImportError as error:
        raise KacqError(f"data {data!r} is not a local file; reading it as a hub dataset needs the 'datasets' "
                        "package (pip install datasets), or give a .txt / .jsonl file") from error
    try:
        stream = datasets.load_dataset(data, split="train", streaming=True)
        count = 0
        for row in stream:
            if max_docs is not None and count >= max_docs:
                return
            text = row.get("text") if isinstance(row, dict) else None
            if isinstance(text, str) and text.strip():
                count += 1
                yield text
    except KacqError:
        raise
    except Exception as error:  # network or name errors come in many types; say what was tried
        raise KacqError(f"could not stream dataset {data!r} ({type(error).__name__}: {error}); it is neither a "
                        "local .txt/.jsonl file nor a reachable hub dataset with a 'text' column") from error


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_checkpoint(checkpoint: Checkpoint, dtype: str, device: str):
    """(model, tokenizer) for a checkpoint, with a KacqError that says what is missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(checkpoint.source)
    local = path.exists()
    if local and not (path / "config.json").is_file():
        raise KacqError(f"{checkpoint.source} has no config.json: give a folder written by save_pretrained")
    if not local and (_offline() or checkpoint.source.startswith((".", "/")) or checkpoint.source.count("/") > 1):
        raise KacqError(f"model {checkpoint.source!r} not found: no such local folder"
                        + (", and the hub is offline (HF_HUB_OFFLINE)" if _offline() else "")
                        + "; check the path")
    kwargs = {"revision": checkpoint.revision} if checkpoint.revision else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint.source, dtype=DTYPES[dtype], **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.source, **kwargs)
    except (OSError, ValueError) as error:
        where = "the folder" if local else "the hub (are you online? is the name and revision right?)"
        raise KacqError(f"could not load model {checkpoint.name!r} from {where}: {error}") from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise KacqError(f"the tokenizer of {checkpoint.name} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model.to(device).eval(), tokenizer


# ------------------------------------------------------------------------------------------------
# Measuring


def measure_texts(model, tokenizer, texts: Iterable[str], *, batch_size: int = 8, max_length: int = 512,
                  weighting: str = "token", progress: Progress | None = None):
    """Run ``texts`` through ``model`` in batches as given (no grad, padding masked, no special tokens added).

    Returns the detached Instrumentation that measured them and the number of documents.
    """
    from ..instrumentation import instrument

    device = next(model.parameters()).device
    documents = 0
    with instrument(model, weighting=weighting) as inst, torch.no_grad():
        for batch in _batches(texts, batch_size):
            encoded = tokenizer(batch, return_tensors="pt", padding=True, truncation=True,
                                max_length=max_length, add_special_tokens=False)
            model(input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device))
            documents += len(batch)
            if progress:
                progress("batch", {"documents": documents})
    return inst, documents


def measure_checkpoint(model, tokenizer, texts: Iterable[str], settings: SweepSettings,
                       progress: Progress | None = None) -> dict:
    """Knowledge entropy of ``model`` on ``texts``, batched as given, padding masked; a JSON-ready dict."""
    inst, documents = measure_texts(model, tokenizer, texts, batch_size=settings.batch_size,
                                    max_length=settings.seq_len, weighting=settings.weighting, progress=progress)
    if documents == 0:
        raise KacqError(f"data {settings.data!r} has no documents to measure on")
    entropy = inst.knowledge_entropy()
    return {**entropy.to_dict(), "documents": documents, "layers": len(inst.sites),
            "sites": [site.path for site in inst.sites]}


def entropy_sweep(models: Sequence[str], data: str, *, out: str | os.PathLike, revisions: Sequence[str] | None = None,
                  max_docs: int | None = None, batch_size: int = 8, seq_len: int = 512, weighting: str = "token",
                  dtype: str = "float32", device: str = "cpu", progress: Progress | None = None) -> dict:
    """Measure every checkpoint not yet in ``out/entropy.json``; write the JSON after each, then CSV and PNG."""
    settings = SweepSettings(str(data), max_docs, batch_size, seq_len, weighting, dtype)
    settings.validate()
    checkpoints = expand_checkpoints(models, revisions)
    if not checkpoints:
        raise KacqError("no models given")
    out = Path(out)
    results = _load_previous(out / "entropy.json", settings)
    done = {c["name"] for c in results["checkpoints"]}
    texts = list(iter_documents(str(data), max_docs))  # read once, checked before any model loads
    if not texts:
        raise KacqError(f"data {data!r} has no documents")
    for index, checkpoint in enumerate(checkpoints):
        if checkpoint.name in done:
            log.info("skipping %s: already in %s", checkpoint.name, out / "entropy.json")
            if progress:
                progress("skip", {"name": checkpoint.name, "index": index, "count": len(checkpoints)})
            continue
        model, tokenizer = load_checkpoint(checkpoint, dtype, device)
        if progress:
            progress("checkpoint", {"name": checkpoint.name, "index": index, "count": len(checkpoints),
                                    "documents": len(texts)})
        measured = measure_checkpoint(model, tokenizer, texts, settings, progress)
        del model
        results["checkpoints"].append({"name": checkpoint.name, "model": checkpoint.source,
                                       "revision": checkpoint.revision, "step": _step_of(checkpoint.name),
                                       **measured})
        _write_json(out / "entropy.json", results)
    write_outputs(results, out)
    return results


def _load_previous(path: Path, settings: SweepSettings) -> dict:
    fresh = {"format": FORMAT_NAME, "version": 1, "settings": asdict(settings), "checkpoints": []}
    if not path.is_file():
        return fresh
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise KacqError(f"{path} exists but is not a readable sweep ({error}); move it away or choose another --out")
    if previous.get("format") != FORMAT_NAME:
        raise KacqError(f"{path} is not a kacq entropy sweep; choose another --out")
    if previous.get("settings") != asdict(settings):
        raise KacqError(f"{path} was measured with other settings ({previous.get('settings')}); to resume, use the "
                        f"same ones, or choose another --out for {asdict(settings)}")
    return previous


def _write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    staging.replace(path)  # atomic: an interrupted sweep never leaves half a JSON


def write_outputs(results: dict, out: str | os.PathLike) -> list[Path]:
    """entropy.csv (one row per checkpoint, one column per layer) and entropy.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = results["checkpoints"]
    layers = max((len(r["per_layer"]) for r in rows), default=0)
    csv_path = out / "entropy.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["checkpoint", "step", "total", "max_total", "tokens", "documents",
                         *[f"layer_{i}" for i in range(layers)]])
        for r in rows:
            writer.writerow([r["name"], r["step"], repr(r["total"]), repr(r["max_total"]), r["tokens"], r["documents"],
                             *[repr(v) for v in r["per_layer"]]])
    paths = [out / "entropy.json", csv_path]
    if rows:
        paths.append(_plot(rows, out / "entropy.png"))
    return paths


def _plot(rows: list[dict], path: Path) -> Path:
    from ..report import _pyplot

    plt = _pyplot()
    steps = [r["step"] for r in rows]
    use_steps = all(s is not None for s in steps) and len(set(steps)) == len(steps)
    x = steps if use_steps else list(range(len(rows)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(x, [r["total"] for r in rows], marker="o")
    left.set(xlabel="step" if use_steps else "checkpoint", ylabel="knowledge entropy (nats)", title="total")
    for layer in range(max(len(r["per_layer"]) for r in rows)):
        right.plot(x, [r["per_layer"][layer] if layer < len(r["per_layer"]) else float("nan") for r in rows],
                   marker=".", label=f"layer {layer}")
    right.set(xlabel=left.get_xlabel(), ylabel="entropy (nats)", title="per layer")
    if not use_steps:
        for ax in (left, right):
            ax.set_xticks(x, [Path(r["name"]).name for r in rows], rotation=30, fontsize=7)
    right.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
