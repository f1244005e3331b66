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
import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .errors import ConfigError, KacqError
from .corpus import load_corpus
from .measuring import measure
from .report import pyplot, save_figure

log = logging.getLogger(__name__)

FORMAT_NAME = "kacq_hooks.entropy_sweep"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
Progress = Callable[[str, dict], None]
DEFAULT_SEQ_LEN = 512


@dataclass(frozen=True)
class SweepSettings:
    """What a measurement depends on; a resumed sweep must use the same (checked against the JSON).

    ``data`` is the data file's resolved absolute path (a hub dataset's name as given) and
    ``data_sha256`` the hash of its contents, so ``./data.txt`` and ``/abs/data.txt`` resume each
    other, and a file edited in place does not.
    """

    data: str
    data_sha256: str | None = None
    max_docs: int | None = None
    batch_size: int = 8
    seq_len: int | None = None  # None: the model's positions, at most DEFAULT_SEQ_LEN
    weighting: str = "token"
    dtype: str = "float32"

    def validate(self) -> None:
        if self.batch_size < 1 or (self.seq_len is not None and self.seq_len < 1):
            raise ConfigError(f"--batch-size ({self.batch_size}) and --seq-len ({self.seq_len}) must be at least 1")
        if self.max_docs is not None and self.max_docs < 1:
            raise ConfigError(f"--max-docs must be at least 1, got {self.max_docs}")
        if self.weighting not in ("token", "document"):
            raise ConfigError(f"--weighting must be 'token' or 'document', not {self.weighting!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, not {self.dtype!r}")


def data_identity(data: str | os.PathLike) -> tuple[str, str | None]:
    """(resolved absolute path, sha256 of the contents) of a local data file; (name, None) for a hub dataset."""
    path = Path(data)
    if not path.is_file():
        return str(data), None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return str(path.resolve()), digest.hexdigest()


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine; a :class:`ConfigError` saying why not."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ConfigError(f"--device {device} is not a device name ({error}); use cpu, cuda, cuda:N or mps") from error
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {device} is not available: this machine has no CUDA device (or this torch "
                              f"is built without CUDA, torch {torch.__version__}); use --device cpu")
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"--device {device} is not available: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device} is not available on this machine; use --device cpu")
    elif resolved.type not in ("cpu", "cuda", "mps") and not hasattr(torch, resolved.type):
        raise ConfigError(f"--device {device} is not available on this machine; use --device cpu")
    return resolved


def max_positions(config) -> int | None:
    """The longest sequence a model config takes (``max_position_embeddings`` or its older spellings)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(seq_len: int | None, config, name: str) -> int:
    """The tokens per document for this model: ``seq_len``, refused when longer than the model's positions;
    ``None`` gives the model's positions, at most :data:`DEFAULT_SEQ_LEN`."""
    limit = max_positions(config)
    if seq_len is None:
        return min(DEFAULT_SEQ_LEN, limit) if limit is not None else DEFAULT_SEQ_LEN
    if limit is not None and seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len} is longer than {name} takes ({limit} positions, from its config); "
                          f"use --seq-len {limit} or less")
    return seq_len


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
        texts = load_corpus(path)
        yield from texts[:max_docs] if max_docs is not None else texts
        return
    if _offline():
        raise KacqError(f"data {data!r} is not a local file, and the hub is offline (HF_HUB_OFFLINE): give a .txt "
                        "or .jsonl file")
    try:
        import datasets  # an optional extra ('data')
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


def _read_config(checkpoint: Checkpoint):
    try:
        return AutoConfig.from_pretrained(checkpoint.source)
    except (OSError, ValueError) as error:
        raise KacqError(f"could not read the config of {checkpoint.name!r}: {error}") from error


def load_checkpoint(checkpoint: Checkpoint, dtype: str, device: str):
    """(model, tokenizer) for a checkpoint, with a KacqError that says what is missing."""
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


def encode_batches(tokenizer, texts: Iterable[str], batch_size: int, max_length: int) -> Iterator[dict]:
    """``texts`` tokenized in batches as given: padded, cut at ``max_length``, no special tokens added."""
    for batch in _batches(texts, batch_size):
        encoded = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                            add_special_tokens=False)
        yield {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def measure_texts(model, tokenizer, texts: Iterable[str], *, batch_size: int = 8, max_length: int = 512,
                  weighting: str = "token", progress: Progress | None = None):
    """Tokenize ``texts`` in batches and measure them with :func:`kacq_hooks.measure` (padding masked).

    Returns the detached Instrumentation that measured them and the number of documents.
    """
    texts = list(texts)
    sizes = [len(batch) for batch in _batches(texts, batch_size)]

    def report(done: int) -> None:
        if progress:
            progress("batch", {"documents": sum(sizes[:done])})

    if not texts:
        return None, 0
    inst = measure(model, encode_batches(tokenizer, texts, batch_size, max_length), weighting=weighting,
                   progress=report)
    return inst, len(texts)


def measure_checkpoint(model, tokenizer, texts: Iterable[str], settings: SweepSettings,
                       progress: Progress | None = None, *, seq_len: int | None = None) -> dict:
    """Knowledge entropy of ``model`` on ``texts``, batched as given, padding masked; a JSON-ready dict.

    Documents are cut at ``seq_len`` (default: ``settings.seq_len`` checked against the model's positions).
    """
    seq_len = seq_len if seq_len is not None else check_seq_len(settings.seq_len, model.config, "the model")
    inst, documents = measure_texts(model, tokenizer, texts, batch_size=settings.batch_size,
                                    max_length=seq_len, weighting=settings.weighting, progress=progress)
    if documents == 0:
        raise KacqError(f"data {settings.data!r} has no documents to measure on")
    entropy = inst.knowledge_entropy()
    return {**entropy.to_dict(), "documents": documents, "seq_len": seq_len, "layers": len(inst.sites),
            "sites": [site.path for site in inst.sites], "labels": [site.label for site in inst.sites]}


def entropy_sweep(models: Sequence[str], data: str, *, out: str | os.PathLike, revisions: Sequence[str] | None = None,
                  max_docs: int | None = None, batch_size: int = 8, seq_len: int | None = None, weighting: str = "token",
                  dtype: str = "float32", device: str = "cpu", progress: Progress | None = None) -> dict:
    """Measure every checkpoint not yet in ``out/entropy.json``; write the JSON after each, then CSV and PNG."""
    check_device(device)
    settings = SweepSettings(*data_identity(data), max_docs, batch_size, seq_len, weighting, dtype)
    settings.validate()
    checkpoints = expand_checkpoints(models, revisions)
    if not checkpoints:
        raise KacqError("no models given")
    out = Path(out)
    results = _load_previous(out / "entropy.json", settings)
    done = {c["name"] for c in results["checkpoints"]}
    for checkpoint in checkpoints:  # configs are small: refuse a bad --seq-len before any weights load
        if checkpoint.name not in done and (Path(checkpoint.source) / "config.json").is_file():
            check_seq_len(seq_len, _read_config(checkpoint), checkpoint.name)
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
        model_seq_len = check_seq_len(seq_len, model.config, checkpoint.name)  # hub models: known only now
        if progress:
            progress("checkpoint", {"name": checkpoint.name, "index": index, "count": len(checkpoints),
                                    "documents": len(texts)})
        measured = measure_checkpoint(model, tokenizer, texts, settings, progress, seq_len=model_seq_len)
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
    labels = list(dict.fromkeys(label for r in rows for label in _labels(r)))
    csv_path = out / "entropy.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["checkpoint", "step", "total", "max_total", "tokens", "documents", *labels])
        for r in rows:
            by_label = dict(zip(_labels(r), r["per_layer"]))
            writer.writerow([r["name"], r["step"], repr(r["total"]), repr(r["max_total"]), r["tokens"], r["documents"],
                             *[repr(by_label[label]) if label in by_label else "" for label in labels]])
    paths = [out / "entropy.json", csv_path]
    if rows:
        paths.append(_plot(rows, out / "entropy.png"))
    return paths


def _labels(row: dict) -> list[str]:
    """The layer labels of a result row (``decoder.layer_3``); rows written before labels existed: by index."""
    return row.get("labels") or [f"layer_{i}" for i in range(len(row["per_layer"]))]


def _plot(rows: list[dict], path: Path) -> Path:

    plt = pyplot()
    steps = [r["step"] for r in rows]
    use_steps = all(s is not None for s in steps) and len(set(steps)) == len(steps)
    x = steps if use_steps else list(range(len(rows)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(x, [r["total"] for r in rows], marker="o")
    left.set(xlabel="step" if use_steps else "checkpoint", ylabel="knowledge entropy (nats)", title="total")
    for label in dict.fromkeys(label for r in rows for label in _labels(r)):
        values = [dict(zip(_labels(r), r["per_layer"])).get(label, float("nan")) for r in rows]
        right.plot(x, values, marker=".", label=label)
    right.set(xlabel=left.get_xlabel(), ylabel="entropy (nats)", title="per layer")
    if not use_steps:
        for ax in (left, right):
            ax.set_xticks(x, [Path(r["name"]).name for r in rows], rotation=30, fontsize=7)
    right.legend(fontsize=7)
    return save_figure(fig, path)
