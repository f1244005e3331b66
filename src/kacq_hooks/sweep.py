"""Knowledge entropy across checkpoints: the study behind ``kacq entropy``.

:func:`entropy_sweep` measures every model (a local ``save_pretrained`` folder, a Trainer output
folder holding ``checkpoint-N`` subfolders, or a hub id with ``--revision``s when online) on the same
documents and writes ``entropy.json``, ``entropy.csv`` and ``entropy.png``.

- A checkpoint is known by a digest of its weights (:mod:`kacq_hooks.sweep_identity`): a resumed sweep
  skips every checkpoint whose weights were measured already, under whatever name, and checkpoints
  holding the same weights as an earlier one are flagged (``duplicate_of``) and not measured twice.
- Each measured checkpoint is written atomically to ``OUT/results/<digest>.json`` before it is merged
  into ``entropy.json``, so no finished checkpoint is lost when a sweep stops; a checkpoint that fails
  becomes an error row (``errors`` in the JSON) and the others go on.
- Under ``torchrun`` (or ``accelerate launch``) every rank reads its share of the documents, the
  statistics are reduced across ranks and rank 0 writes: the numbers are those of one process.
- ``executor="local" | "ray" | "slurm"`` runs one task per checkpoint on that engine
  (:mod:`kacq_hooks.sweep_exec`).

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
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .errors import CheckpointError, ConfigError, CorpusError, KacqError
from .instrumentation import instrument
from .measuring import evaluation_mode, measure
from .report import pyplot, save_figure
from .sweep_exec import check_engine, run_specs
from .sweep_data import DataSource, Ranks, check_record_source, data_digest, data_source, read_documents
from .sweep_identity import TOKENIZER_MARKERS, IdentityCache

log = logging.getLogger(__name__)

FORMAT_NAME = "kacq_hooks.entropy_sweep"
FORMAT_VERSION = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
Progress = Callable[[str, dict], None]
DEFAULT_SEQ_LEN = 512
EXECUTORS = ("serial", "local", "ray", "slurm", "submitit-local")
COUNTS = (None, "labels", "shifted_labels")  # as instrument(count=...)
# settings fields added after version 2 files were written, at the value that means what those files measured
_ADDED_SETTINGS = {"count": None}


@dataclass(frozen=True)
class SweepSettings:
    """What a measurement depends on; a resumed sweep must use the same (checked against the JSON).

    ``data`` is the data's resolved absolute path (a hub dataset's name as given) and ``data_sha256`` the
    sha256 over the sha256 of each 64 MiB block of its contents (:func:`kacq_hooks.sweep_data.content_digest`,
    computed by the ranks together), so ``./data.txt`` and
    ``/abs/data.txt`` resume each other, and a file edited in place does not. ``tokenizer`` is the
    ``--tokenizer`` given (``None``: each checkpoint's own). ``count`` is ``--count``: ``None`` measures every
    token that is not padding, ``"labels"`` / ``"shifted_labels"`` the completions of prompt/completion records
    (the positions holding, or predicting, the completion's tokens); a result measured with another is never reused.
    """

    data: str
    data_sha256: str | None = None
    max_docs: int | None = None
    batch_size: int = 8
    seq_len: int | None = None  # None: the model's positions, at most DEFAULT_SEQ_LEN
    weighting: str = "token"
    dtype: str = "float32"
    text_column: str = "text"
    tokenizer: str | None = None
    max_tokens: int | None = None
    count: str | None = None  # None: every token that is not padding; else the positions instrument(count=) selects

    def validate(self) -> None:
        if self.batch_size < 1 or (self.seq_len is not None and self.seq_len < 1):
            raise ConfigError(f"--batch-size ({self.batch_size}) and --seq-len ({self.seq_len}) must be at least 1")
        if self.max_docs is not None and self.max_docs < 1:
            raise ConfigError(f"--max-docs must be at least 1, got {self.max_docs}")
        if self.weighting not in ("token", "document"):
            raise ConfigError(f"--weighting must be 'token' or 'document', not {self.weighting!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, not {self.dtype!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if not self.text_column:
            raise ConfigError("--text-column must name a column")
        if self.count not in COUNTS:
            raise ConfigError(f"--count must be one of {', '.join(c for c in COUNTS if c)}, not {self.count!r} (leave "
                              "it out to count every token)")


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
                raise CheckpointError(f"{model} is a folder with no config.json and no checkpoint subfolders; give a "
                                "folder written by save_pretrained (or a Trainer output_dir)")
            found += [Checkpoint(str(child), str(child)) for child in children]
        elif path.is_dir():
            found.append(Checkpoint(model, model))
        elif revisions:
            found += [Checkpoint(f"{model}@{rev}", model, rev) for rev in revisions]
        elif path.exists() or _offline() or model.startswith((".", "/")) or model.count("/") > 1:
            found.append(Checkpoint(model, model))  # not a model: refused with a clear message before work
        else:
            found.append(Checkpoint(model, model, "main"))  # a hub id: fetched like a --revision
    return found


def _step_of(name: str) -> int | None:
    """The training step in a checkpoint's name: read from the revision (``model@rev``) or the folder's own
    name, never a parent folder or the model name (``run7/final``, ``org/model-1b@main``: None). A ``step``
    or ``checkpoint`` number wins over a later one (OLMo's ``step20000-tokens84B`` is step 20000)."""
    leaf = Path(name.rsplit("@", 1)[1] if "@" in name else name).name
    match = re.search(r"(?<![a-z])(?:step|checkpoint|ckpt|iter|iteration)[-_]?(\d+)", leaf, re.IGNORECASE) \
        or re.search(r"(\d+)(?!.*\d)", leaf)
    return int(match.group(1)) if match else None


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


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
        raise CheckpointError(f"could not read the config of {checkpoint.name!r}: {error}") from error


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_MARKERS)


def load_tokenizer(source: str, name: str, revision: str | None = None, given: bool = False):
    """The tokenizer at ``source`` (a folder or hub id), padding on the right; a one-line KacqError when there
    is none (a folder without tokenizer files is refused before transformers tries, and fails, to guess one)."""
    path = Path(source)
    refused = ConfigError if given else CheckpointError  # a bad --tokenizer, or a checkpoint saved without one
    if path.is_dir() and not _has_tokenizer(path):
        raise refused(f"{source} holds no tokenizer (none of {', '.join(TOKENIZER_MARKERS[:4])}, ...)"
                        + ("" if given else f" for {name}") + "; pass --tokenizer with a folder or hub id that "
                        "holds the tokenizer the model was trained with")
    kwargs = {"revision": revision} if revision else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as error:  # transformers raises OSError, ValueError, TypeError or sentencepiece errors here
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise refused(f"could not load a tokenizer from {source} ({first}); pass --tokenizer with the "
                        "tokenizer the model was trained with") from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise refused(f"the tokenizer of {name} has neither a pad nor an EOS token; set one and save it")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def check_vocabulary(tokenizer, vocab_size: int | None, name: str) -> None:
    """Refuse a tokenizer whose ids (its pad token's included) lie beyond the model's embedding rows."""
    if not isinstance(vocab_size, int) or vocab_size < 1:
        return
    pad = tokenizer.pad_token_id
    if pad is not None and pad >= vocab_size:
        raise CheckpointError(f"the tokenizer's pad token {tokenizer.pad_token!r} has id {pad}, beyond the {vocab_size} "
                        f"embeddings of {name}: the model cannot read it. Use the tokenizer the model was trained "
                        "with (--tokenizer), or give it a pad token inside the vocabulary")
    if len(tokenizer) > vocab_size:
        raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens, more than the {vocab_size} embeddings of "
                        f"{name}: ids beyond {vocab_size - 1} cannot be read. Use the tokenizer the model was "
                        "trained with (--tokenizer)")


def load_checkpoint(checkpoint: Checkpoint, dtype: str, device: str, tokenizer: str | None = None):
    """(model, tokenizer) for a checkpoint, with a KacqError that says what is missing."""
    path = Path(checkpoint.source)
    local = path.exists()
    if local and not (path / "config.json").is_file():
        raise CheckpointError(f"{checkpoint.source} has no config.json: give a folder written by save_pretrained")
    if not local and (_offline() or checkpoint.source.startswith((".", "/")) or checkpoint.source.count("/") > 1):
        raise CheckpointError(f"model {checkpoint.source!r} not found: no such local folder"
                        + (", and the hub is offline (HF_HUB_OFFLINE)" if _offline() else "")
                        + "; check the path")
    kwargs = {"revision": checkpoint.revision} if checkpoint.revision and not local else {}
    tok = (load_tokenizer(tokenizer, checkpoint.name, given=True) if tokenizer
           else load_tokenizer(checkpoint.source, checkpoint.name, kwargs.get("revision")))
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint.source, dtype=DTYPES[dtype], **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        where = "the folder" if local else "the hub (are you online? is the name and revision right?)"
        raise CheckpointError(f"could not load model {checkpoint.name!r} from {where}: "
                              f"{str(error).strip().splitlines()[0] if str(error).strip() else error!r}") from error
    check_vocabulary(tok, model.get_input_embeddings().num_embeddings, checkpoint.name)
    return model.to(device).eval(), tok


def _check_tokenizer_up_front(checkpoint: Checkpoint, config, tokenizer: str | None, seen: dict) -> None:
    """Before any weights load: the tokenizer exists and fits the config's vocabulary."""
    source = tokenizer or checkpoint.source
    if source not in seen:
        seen[source] = load_tokenizer(source, checkpoint.name, given=tokenizer is not None)
    check_vocabulary(seen[source], getattr(config, "vocab_size", None), checkpoint.name)


# ------------------------------------------------------------------------------------------------
# Ranks under torchrun / accelerate


def init_ranks(device: str | torch.device) -> Ranks:
    """The data-parallel group this process belongs to: one started by torchrun or accelerate (their
    ``WORLD_SIZE``/``RANK`` variables) is joined, gloo on the CPU, nccl on CUDA; otherwise rank 0 of 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Ranks.current()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Ranks()
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world} but this torch has no torch.distributed; run one process")
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("RANK"):
        raise ConfigError(f"WORLD_SIZE={world} but RANK/MASTER_ADDR are not set: start the ranks with torchrun "
                          "or accelerate launch")
    # a device this process cannot use is refused before it joins: the other ranks would wait for it
    backend = "nccl" if check_device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Ranks.current()


@contextmanager
def _leaving_started_group() -> Iterator[None]:
    """A process group started inside the block (by :func:`init_ranks`) is destroyed when the block ends, error or
    not; one that was up before it is the caller's and stays.

    Destroying it joins gloo's worker threads while the interpreter still runs. Left to the end of the process,
    a worker can still be releasing the last collective's tensors (which takes the GIL) when the interpreter
    begins to finalize; Python then ends that thread inside a C++ destructor and the rank aborts with
    "terminate called without an active exception", after all its work was done."""
    import torch.distributed as dist

    running = dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        if not running and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def joined_ranks(device: str | torch.device) -> Iterator[Ranks]:
    """:func:`init_ranks` for the length of a block (a process's whole run, e.g. ``kacq entropy`` under torchrun):
    a group it starts is left again when the block ends (see :func:`_leaving_started_group`)."""
    with _leaving_started_group():
        yield init_ranks(device)


def rank_device(device: str | torch.device, ranks: Ranks) -> torch.device:
    """``cuda`` under torchrun means this rank's GPU (LOCAL_RANK)."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None and ranks.world > 1:
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(resolved)
    return resolved


def _agree(ranks: Ranks, error: str | None) -> str | None:
    """The first rank's error, on every rank (so no rank waits in a collective that another skipped)."""
    return next((e for e in ranks.gather(error) if e), None)


# ------------------------------------------------------------------------------------------------
# Measuring
def encode_batches(tokenizer, texts: Iterable[str], batch_size: int, max_length: int) -> Iterator[dict]:
    """``texts`` tokenized in batches as given: padded, cut at ``max_length``, no special tokens added."""
    for batch in _batches(texts, batch_size):
        encoded = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                            add_special_tokens=False)
        yield {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def encode_record(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], list[int]]:
    """(token ids, labels) of one record, cut at ``max_length`` (no special tokens): the tokens of the text
    ``prompt + completion``, the completion's being those after the prompt's own tokens; labels are -100 on the
    prompt's positions and the token id on the completion's. When no token boundary falls where the prompt ends
    (a token of the text spans both), the prompt and the completion are tokenized separately and joined."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    # the completion as it reads after the prompt: tokenized alone, a tokenizer that prepends a word boundary
    # (SentencePiece's "▁") would add a token the text does not hold
    whole = list(tokenizer(prompt + completion, add_special_tokens=False)["input_ids"])
    if len(whole) > len(prompt_ids) and whole[:len(prompt_ids)] == prompt_ids:
        completion_ids = whole[len(prompt_ids):]
    else:
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = (list(prompt_ids) + list(completion_ids))[:max_length]
    labels = ([-100] * len(prompt_ids) + list(completion_ids))[:max_length]
    return ids, labels


def counted_positions(labels: Sequence[int], count: str | None, length: int | None = None) -> int:
    """How many positions of one row ``count`` selects (see :func:`kacq_hooks.instrument`): ``labels`` holds the
    completion's tokens, ``shifted_labels`` the positions that predict them (the one before each)."""
    if count is None:
        return length if length is not None else len(labels)
    held = [label != -100 for label in labels]
    return sum(held) if count == "labels" else sum(held[1:])


def encode_records(tokenizer, records: Iterable[tuple[str, str]], batch_size: int, max_length: int) -> Iterator[dict]:
    """``(prompt, completion)`` records in batches: ids padded on the right, labels -100 on prompt and padding."""
    pad = tokenizer.pad_token_id
    for batch in _batches(records, batch_size):
        rows = [encode_record(tokenizer, prompt, completion, max_length) for prompt, completion in batch]
        width = max(len(ids) for ids, _ in rows)
        yield {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
               "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
               "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows])}


def check_records(records: Sequence[tuple[str, str]], tokenizer, max_length: int, count: str, *, first: int = 0,
                  name: str = "the tokenizer") -> None:
    """Refuse the run when a record keeps no counted position once cut at ``max_length`` (its prompt fills the
    sequence, or with ``shifted_labels`` an empty prompt before a one-token completion): the record would be
    measured as nothing while its document and tokens were believed counted. ``first`` is the index of
    ``records[0]`` among all records (a rank's share)."""
    for index, (prompt, completion) in enumerate(records):
        ids, labels = encode_record(tokenizer, prompt, completion, max_length)
        if counted_positions(labels, count) == 0:
            held = sum(label == -100 for label in labels)
            if held >= max_length:
                why = (f"its prompt fills all {max_length} positions (--seq-len), so no completion token survives "
                       "the cut")
            elif len(labels) == held:  # e.g. a normalizer that drops the completion's characters
                why = f"its completion {completion[:40]!r} gives no token with this tokenizer"
            else:
                why = (f"with --count {count} a completion token counts only where a position before it predicts it, "
                       "and this record has no prompt and a one-token completion")
            raise CorpusError(f"record {first + index} (prompt {prompt[:40]!r}...) has no counted position with "
                              f"{name}: {why}. The run is refused rather than the record dropped, so that every "
                              "checkpoint is measured on the records you gave: raise --seq-len, shorten the prompt, "
                              "or leave the record out")


def measure_texts(model, tokenizer, texts: Iterable, *, batch_size: int = 8, max_length: int = 512,
                  weighting: str = "token", progress: Progress | None = None, allow_empty: bool = False,
                  count: str | None = None):
    """Tokenize ``texts`` in batches and measure them with :func:`kacq_hooks.measure` (padding masked).

    With ``count`` (``"labels"`` or ``"shifted_labels"``, as :func:`kacq_hooks.instrument` takes it), ``texts``
    are ``(prompt, completion)`` records (see :func:`encode_records`) and only the positions ``count`` selects
    from their labels are measured.

    Returns the detached Instrumentation that measured them and the number of documents. ``progress``
    gets ``("batch", {"documents": done, "tokens": done})`` after each batch. With no texts: ``(None, 0)``,
    or with ``allow_empty`` an instrumentation with empty statistics (a rank with no share still reduces).
    """
    texts = list(texts)
    done = {"documents": 0, "tokens": 0}

    def counted(batches):
        for batch in batches:
            done["documents"] += int(batch["input_ids"].shape[0])
            if count is None:
                done["tokens"] += int(batch["attention_mask"].sum())
            else:  # the positions count selects, as the row's tokens and tokens_per_s count them
                done["tokens"] += sum(counted_positions(row, count) for row in batch["labels"].tolist())
            yield batch

    def report(_: int) -> None:
        if progress:
            progress("batch", dict(done))

    if not texts:
        if not allow_empty:
            return None, 0
        with evaluation_mode(model), instrument(model, weighting=weighting, count=count) as inst:
            pass
        return inst, 0
    batches = (encode_records(tokenizer, texts, batch_size, max_length) if count is not None
               else encode_batches(tokenizer, texts, batch_size, max_length))
    inst = measure(model, counted(batches), weighting=weighting, progress=report,
                   **({"count": count} if count is not None else {}))
    return inst, len(texts)


def _entropy_row(inst, documents: int, seq_len: int) -> dict:
    entropy = inst.knowledge_entropy()
    return {**entropy.to_dict(), "documents": documents, "seq_len": seq_len, "layers": len(inst.sites),
            "sites": [site.path for site in inst.sites], "labels": [site.label for site in inst.sites]}


# ------------------------------------------------------------------------------------------------
# One checkpoint: the task every executor runs (on every rank of a data-parallel group)


class HubFetcher:
    """Downloads a hub revision's files into a cache and removes them again (``huggingface_hub``).

    A stand-in with the same two methods can replace it (tests, mirrors): ``fetch`` returns a local
    folder holding the revision, ``release`` removes what ``fetch`` put on disk.
    """

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    pickles = ["pytorch_model*.bin", "pytorch_model*.bin.index.json"]  # fetched only when there are no safetensors

    def fetch(self, repo: str, revision: str, cache_dir: str | None) -> Path:
        from huggingface_hub import snapshot_download  # a dependency of transformers

        folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=self.patterns))
        if not any(folder.glob("*.safetensors")):  # older revisions (Pythia's steps) hold torch pickles only
            folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir,
                                            allow_patterns=self.pickles))
        return folder

    def release(self, repo: str, revision: str, cache_dir: str | None, folder: Path) -> None:
        from huggingface_hub import scan_cache_dir

        cache = scan_cache_dir(cache_dir)
        commits = [rev.commit_hash for entry in cache.repos if entry.repo_id == repo for rev in entry.revisions
                   if Path(rev.snapshot_path).resolve() == Path(folder).resolve()]
        if commits:  # blobs still used by another kept revision stay
            cache.delete_revisions(*commits).execute()


def write_json_atomically(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    staging.replace(path)  # atomic: a task killed mid-write never leaves half a result


def result_path(out: Path, identity: str) -> Path:
    return Path(out) / "results" / (identity.split(":")[-1][:40] + ".json")


@_leaving_started_group()  # a torchrun task process (sweep_worker) or a caller that did not start the group
def run_task(spec: dict, *, fetch=None, documents: list[str] | None = None, progress: Progress | None = None,
             ranks: Ranks | None = None) -> dict:
    """Measure one checkpoint as ``spec`` says (see :func:`task_spec`); every rank of the group calls it.

    Returns ``{"status": "measured", "row": ...}`` (rank 0 has written it to ``OUT/results/``),
    ``{"status": "duplicate", "identity", "duplicate_of"}`` when a fetched revision holds weights measured
    already, or ``{"status": "error", "error": ...}``; it raises nothing for a checkpoint's own faults.
    """
    ranks = ranks or init_ranks(spec["device"])
    checkpoint = Checkpoint(**spec["checkpoint"])
    settings = SweepSettings(**spec["settings"])
    out = Path(spec["out"])
    fetcher = fetch or HubFetcher()
    fetched = None
    error = None
    try:
        source = checkpoint.source
        if checkpoint.revision is not None:  # rank 0 downloads first, the others then find it cached
            if ranks.rank == 0:
                fetched = fetcher.fetch(checkpoint.source, checkpoint.revision, spec.get("cache_dir"))
            ranks.gather(None)
            if ranks.rank != 0:
                fetched = fetcher.fetch(checkpoint.source, checkpoint.revision, spec.get("cache_dir"))
            source = str(fetched)
        identity = spec.get("identity")
        if identity is None:
            identity = IdentityCache(out / "identities.json").identity(source, ranks)
        known = spec.get("known") or {}
        if identity in known:
            return {"status": "duplicate", "identity": identity, "duplicate_of": known[identity]}
        local = Checkpoint(checkpoint.name, source)
        try:
            model, tokenizer = load_checkpoint(local, settings.dtype, str(rank_device(spec["device"], ranks)),
                                               settings.tokenizer)
            seq_len = check_seq_len(settings.seq_len, model.config, checkpoint.name)
            if documents is None:
                documents = read_documents(data_source(spec["data"]), text_column=settings.text_column,
                                           max_docs=settings.max_docs, streaming=spec.get("streaming", False),
                                           ranks=ranks, records=settings.count is not None)
        except Exception as caught:  # a checkpoint's fault becomes its error row, on every rank alike
            error = _describe(caught)
        error = _agree(ranks, error)
        if error:
            return {"status": "error", "error": error, "identity": identity}
        if settings.count is not None:  # the driver checked with the tokenizers it knew; a fetched revision's may differ
            first = sum(ranks.gather(len(documents))[:ranks.rank])
            try:
                check_records(documents, tokenizer, seq_len, settings.count, first=first,
                              name=f"the tokenizer of {checkpoint.name}")
            except KacqError as caught:
                error = str(caught)
            error = _agree(ranks, error)
            if error:
                return {"status": "error", "error": error, "identity": identity}
        if settings.max_tokens is not None:
            documents = bound_tokens(documents, tokenizer, seq_len, settings.max_tokens, ranks, count=settings.count)
        total = sum(ranks.gather(len(documents)))
        if total == 0:
            raise CorpusError(f"data {settings.data!r} holds no text to measure on")
        if progress and ranks.rank == 0:
            progress("checkpoint", {"name": checkpoint.name, "documents": len(documents), "share_of": total,
                                    "world_size": ranks.world})
        started = time.perf_counter()
        try:
            inst, _ = measure_texts(model, tokenizer, documents, batch_size=settings.batch_size, max_length=seq_len,
                                    weighting=settings.weighting, progress=progress if ranks.rank == 0 else None,
                                    allow_empty=True, count=settings.count)
        except Exception as caught:
            inst, error = None, _describe(caught)
        error = _agree(ranks, error)
        if error:
            return {"status": "error", "error": error, "identity": identity}
        if ranks.world > 1:
            inst.all_reduce()
        seconds = time.perf_counter() - started
        outcome = _finish(inst, checkpoint, spec, settings, identity, total, seq_len, seconds, ranks, out)
        return ranks.gather(outcome)[0]  # rank 0's row, on every rank
    except KacqError as caught:
        return {"status": "error", "error": str(caught)}
    finally:
        if fetched is not None and not spec.get("keep_cache"):
            ranks.gather(None)  # every rank is done with the files
            if ranks.rank == 0:
                fetcher.release(checkpoint.source, checkpoint.revision, spec.get("cache_dir"), fetched)


def _finish(inst, checkpoint, spec, settings, identity, total, seq_len, seconds, ranks, out) -> dict | None:
    """Rank 0: the row of a measured checkpoint, written to OUT/results; other ranks: None."""
    if ranks.rank != 0:
        return None
    try:
        measured = _entropy_row(inst, total, seq_len)
    except KacqError as caught:
        return {"status": "error", "error": str(caught), "identity": identity}
    row = {"name": checkpoint.name, "model": checkpoint.source, "revision": checkpoint.revision,
           "step": _step_of(checkpoint.name), "identity": identity, "duplicate_of": None, **measured,
           "count": settings.count,
           "world_size": ranks.world, "seconds": round(seconds, 3),
           "tokens_per_s": round(measured["tokens"] / seconds, 1) if seconds > 0 else None}
    if spec.get("save_stats"):
        stats = result_path(out, identity).with_suffix(".safetensors")
        stats.parent.mkdir(parents=True, exist_ok=True)
        inst.save(stats)
        row["stats_file"] = str(stats.relative_to(out))
    write_json_atomically(result_path(out, identity), {"format": FORMAT_NAME + ".result", "settings": asdict(settings),
                                              "row": row})
    return {"status": "measured", "row": row, "identity": identity}


def bound_tokens(documents: list, tokenizer, seq_len: int, max_tokens: int, ranks: Ranks = Ranks(),
                 count: str | None = None) -> list:
    """The documents, in order over all ranks, while their tokens (each cut at ``seq_len``) add up to at most
    ``max_tokens``; the first that would pass it and all after are left out. Spread evenly over the ranks.

    With ``count`` the documents are ``(prompt, completion)`` records and a record's tokens are its counted
    positions (those ``count`` selects), so the budget bounds the tokens the statistics hold, not the context
    read around them."""
    if count is not None:
        lengths = [counted_positions(encode_record(tokenizer, prompt, completion, seq_len)[1], count)
                   for prompt, completion in documents]
    else:
        lengths = [len(ids[:seq_len]) for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]] \
            if documents else []
    what = f"counted tokens (--count {count})" if count is not None else "tokens"
    every = ranks.gather(lengths)
    used, keep = 0, []
    for rank, part in enumerate(every):
        taken = 0
        for length in part:
            if used + length > max_tokens:
                break
            used, taken = used + length, taken + 1
        keep.append(taken)
        if taken < len(part):
            keep += [0] * (len(every) - rank - 1)
            break
    if sum(keep) == 0 and any(every):
        first = next(part[0] for part in every if part)
        raise ConfigError(f"--max-tokens {max_tokens} leaves no document: the first one has {first} {what} (cut at "
                          f"--seq-len {seq_len}) and only whole documents are measured; raise --max-tokens")
    mine = documents[:keep[ranks.rank]]
    if ranks.world > 1 and sum(keep) < sum(len(part) for part in every):
        kept = [doc for part in ranks.gather(mine) for doc in part]
        mine = [kept[i] for i in ranks.share(len(kept))]
    return mine


def _describe(error: BaseException) -> str:
    if isinstance(error, KacqError):
        return str(error)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


# ------------------------------------------------------------------------------------------------
# The sweep


def task_spec(checkpoint: Checkpoint, settings: SweepSettings, *, data: str, out: Path, device: str,
              identity: str | None, known: dict, streaming: bool = False, cache_dir: str | None = None,
              keep_cache: bool = False, save_stats: bool = False) -> dict:
    """Everything a task needs to measure one checkpoint, as plain JSON (it travels to Ray, SLURM, a subprocess)."""
    return {"checkpoint": asdict(checkpoint), "settings": asdict(settings), "data": str(data), "out": str(out),
            "device": str(device), "identity": identity, "known": dict(known), "streaming": streaming,
            "cache_dir": cache_dir, "keep_cache": keep_cache, "save_stats": save_stats}


@_leaving_started_group()  # the group init_ranks starts below is left before the caller's process exits
def entropy_sweep(models: Sequence[str], data: str, *, out: str | os.PathLike, revisions: Sequence[str] | None = None,
                  max_docs: int | None = None, batch_size: int = 8, seq_len: int | None = None, weighting: str = "token",
                  dtype: str = "float32", device: str = "cpu", progress: Progress | None = None,
                  text_column: str = "text", streaming: bool = False, tokenizer: str | None = None,
                  executor: str = "serial", jobs: int = 1, task_ranks: int = 1, ray_address: str | None = None,
                  slurm: dict | None = None, cache_dir: str | None = None, keep_cache: bool = False, fetch=None,
                  save_stats: bool = False, max_tokens: int | None = None, count: str | None = None) -> dict:
    """Measure every checkpoint whose weights are not yet in ``out``; write the JSON as each finishes, then CSV
    and PNG. Returns the results (``checkpoints``: measured and duplicate rows; ``errors``: this run's failures).

    ``executor`` runs one task per checkpoint: ``serial`` in this process (and its torchrun ranks),
    ``local`` in up to ``jobs`` subprocesses (each a torchrun job of ``task_ranks`` ranks when above 1),
    ``ray`` on a Ray cluster (``ray_address``, or the one this process has started), ``slurm`` through
    submitit (``slurm``: its ``slurm_*`` parameters, e.g. ``{"partition": "gpu", "timeout_min": 60}``).
    ``max_tokens`` bounds the tokens of each checkpoint's measurement (whole documents, in order; see
    :func:`bound_tokens`). ``count`` (``"labels"`` or ``"shifted_labels"``, as :func:`kacq_hooks.instrument`
    takes it) measures only the completions of ``{"prompt", "completion"}`` records: ``labels`` the positions
    holding the completion's tokens, ``shifted_labels`` the positions predicting them (see :func:`encode_record`,
    :func:`check_records`). ``fetch`` replaces the hub download of ``--revision`` sweeps (see :class:`HubFetcher`); each
    revision's files are removed after measuring unless ``keep_cache``.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS[:4])}, not {executor!r}")
    if jobs < 1 or task_ranks < 1:
        raise ConfigError(f"--jobs ({jobs}) and --task-ranks ({task_ranks}) must be at least 1")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; --out names the folder for entropy.json, entropy.csv and "
                          "entropy.png: give a folder (new or from an earlier sweep)")
    check_device(device)
    source = data_source(data)
    settings = SweepSettings(source.name, None, max_docs, batch_size, seq_len, weighting, dtype, text_column,
                             tokenizer, max_tokens, count)
    settings.validate()
    if count is not None:
        check_record_source(source)
    ranks = init_ranks(device)
    if ranks.world > 1 and executor != "serial":
        raise ConfigError(f"--executor {executor} under torchrun ({ranks.world} ranks): start the driver as one "
                          "process; use --task-ranks to make each task a torchrun job")
    if executor in ("ray", "slurm", "submitit-local"):
        check_engine(executor, ray_address)  # a missing engine fails before any hashing
    settings = SweepSettings(**{**asdict(settings), "data_sha256": data_digest(source, ranks)})
    checkpoints = expand_checkpoints(models, revisions)
    if not checkpoints:
        raise ConfigError("no models given: name at least one MODEL (a save_pretrained folder, a Trainer output "
                          "folder or a hub id)")
    for checkpoint in checkpoints:
        if checkpoint.revision is None and not Path(checkpoint.source).is_dir():  # not a folder, not a hub id
            load_checkpoint_precheck(checkpoint)
    results = _load_previous(out / "entropy.json", settings, source, ranks)
    _adopt_results(results, out, settings)
    results["errors"] = []
    by_identity = {row["identity"]: row for row in results["checkpoints"]
                   if row.get("identity") and not row.get("duplicate_of")}
    by_name = {row["name"]: row for row in results["checkpoints"]}

    records = None
    if count is not None:  # with --count every executor's driver reads the records, each field checked before
        # any checkpoint is hashed (the tasks read their shares again)
        records = read_documents(source, text_column=text_column, max_docs=max_docs, streaming=streaming,
                                 ranks=ranks, records=True)
        if sum(ranks.gather(len(records))) == 0:
            raise CorpusError(f"data {data!r} holds no records: nothing to measure on")

    # identities of local checkpoints: streamed from their weights (cached by path and file stamps)
    cache = IdentityCache(out / "identities.json")
    identities: dict[str, str | None] = {}
    for checkpoint in checkpoints:
        if checkpoint.revision is not None or checkpoint.name in by_name and not by_name[checkpoint.name].get("identity"):
            identities[checkpoint.name] = None
            continue
        try:
            identities[checkpoint.name] = cache.identity(checkpoint.source, ranks)
        except KacqError as error:
            _error(results, checkpoint, str(error), None, progress, ranks)
    if ranks.rank == 0:
        cache.save()

    todo: list[Checkpoint] = []
    first_of: dict[str, str] = {}  # identity -> the first name holding it, in this sweep
    pending_duplicates: list[tuple[Checkpoint, str]] = []
    for index, checkpoint in enumerate(checkpoints):
        if checkpoint.name not in identities:  # its weights could not be read: an error row already
            continue
        identity = identities[checkpoint.name]
        row = by_name.get(checkpoint.name)
        if row is not None and (identity is None or row.get("identity") in (None, identity)):
            _note(progress, ranks, "skip", {"name": checkpoint.name, "index": index, "count": len(checkpoints)})
            log.info("skipping %s: already in %s", checkpoint.name, out / "entropy.json")
            continue
        if row is not None:  # the folder measured under this name now holds other weights
            _error(results, checkpoint, f"{checkpoint.name} holds other weights, config or tokenizer than when "
                   f"it was measured into {out} ({row['identity']}, now {identity}), or was measured by a kacq_hooks "
                   "before 0.3, whose identities left the config and tokenizer out; its earlier row is kept. To "
                   "measure it as it is now, give the folder another name or choose another --out", identity,
                   progress, ranks)
            continue
        if identity is not None and identity in by_identity:
            pending_duplicates.append((checkpoint, identity))
        elif identity is not None and identity in first_of:
            pending_duplicates.append((checkpoint, identity))
        else:
            if identity is not None:
                first_of[identity] = checkpoint.name
            todo.append(checkpoint)

    if todo:
        seen_tokenizers: dict = {}
        lengths: dict[str, int] = {}  # tokenizer source -> the shortest --seq-len a checkpoint using it takes
        for checkpoint in todo:  # configs and tokenizers are small: refuse bad input before any weights load
            if (Path(checkpoint.source) / "config.json").is_file():
                config = _read_config(checkpoint)
                length = check_seq_len(seq_len, config, checkpoint.name)
                _check_tokenizer_up_front(checkpoint, config, tokenizer, seen_tokenizers)
                if count is not None:
                    _check_counted_model(config, checkpoint.name, count)
                    key = tokenizer or checkpoint.source
                    lengths[key] = min(lengths.get(key, length), length)
        documents = None
        if records is not None:  # a record a checkpoint would measure as nothing refuses the run here
            first = sum(ranks.gather(len(records))[:ranks.rank])
            error = None
            for key, length in lengths.items():
                try:
                    check_records(records, seen_tokenizers[key], length, count, first=first,
                                  name=f"the tokenizer of {key} at --seq-len {length}")
                except CorpusError as caught:
                    error = error or str(caught)
            error = _agree(ranks, error)
            if error:
                raise CorpusError(error)
            documents = records if executor == "serial" else None  # other executors' tasks read their shares
        elif executor == "serial":  # read once (this rank's share), checked before any model loads
            documents = read_documents(source, text_column=text_column, max_docs=max_docs, streaming=streaming,
                                       ranks=ranks)
            if sum(ranks.gather(len(documents))) == 0:
                raise CorpusError(f"data {data!r} holds no text: no documents to measure on")
        elif not read_documents(source, text_column=text_column, max_docs=1, streaming=streaming):
            raise CorpusError(f"data {data!r} holds no text: no documents to measure on")
        known = {identity: row["name"] for identity, row in by_identity.items()}
        specs = [task_spec(c, settings, data=str(data), out=out, device=device, identity=identities[c.name],
                           known=known, streaming=streaming, cache_dir=cache_dir,
                           keep_cache=keep_cache or not revisions,  # one hub model (no --revision) stays cached
                           save_stats=save_stats) for c in todo]

        def finished(checkpoint: Checkpoint, outcome: dict) -> None:
            status = outcome.get("status")
            if status == "measured":
                row = outcome["row"]
                if not any(r.get("identity") == row["identity"] and not r.get("duplicate_of")
                           for r in results["checkpoints"]):  # not adopted from OUT/results meanwhile
                    results["checkpoints"].append(row)
                by_identity[row["identity"]] = row
                by_name[row["name"]] = row
                _note(progress, ranks, "done", {"name": checkpoint.name, "row": outcome.get("row")})
            elif status == "duplicate":
                pending_duplicates.append((checkpoint, outcome["identity"]))
            else:
                _error(results, checkpoint, outcome.get("error", "the task failed"), outcome.get("identity"),
                       progress, ranks)
            if ranks.rank == 0:
                _adopt_results(results, out, settings)  # rows another driver finished into OUT meanwhile
                _write_json(out / "entropy.json", results)

        if executor == "serial":
            for index, (checkpoint, spec) in enumerate(zip(todo, specs)):
                def step(event: str, info: dict, _index=index, _name=checkpoint.name) -> None:
                    if progress:
                        progress(event, {**info, "name": _name, "index": _index, "count": len(todo)})
                spec["known"] = {identity: row["name"] for identity, row in by_identity.items()}
                finished(checkpoint, run_task(spec, fetch=fetch, documents=documents, progress=step, ranks=ranks))
        else:
            run_specs(specs, executor, jobs=jobs, task_ranks=task_ranks, ray_address=ray_address, slurm=slurm,
                      fetch=fetch, folder=out / "tasks", task=run_task,
                      on_done=lambda spec, outcome: finished(Checkpoint(**spec["checkpoint"]), outcome),
                      progress=progress)

    for checkpoint, identity in pending_duplicates:
        original = by_identity.get(identity)
        if original is None:
            first = first_of.get(identity, "an earlier checkpoint")
            _error(results, checkpoint, f"holds the same weights as {first}, which was not measured", identity,
                   progress, ranks)
            continue
        measured = {k: v for k, v in original.items() if k not in ("name", "model", "revision", "step")}
        results["checkpoints"].append({"name": checkpoint.name, "model": checkpoint.source,
                                       "revision": checkpoint.revision, "step": _step_of(checkpoint.name),
                                       **measured, "duplicate_of": original["name"]})
        log.warning("%s holds the same weights as %s: not measured again, flagged duplicate_of in the outputs",
                    checkpoint.name, original["name"])
        _note(progress, ranks, "duplicate", {"name": checkpoint.name, "duplicate_of": original["name"]})
    if ranks.rank == 0:
        _adopt_results(results, out, settings)  # another driver on this OUT: its finished rows are kept
        _write_json(out / "entropy.json", results)
        write_outputs(results, out)
    return results


def _check_counted_model(config, name: str, count: str) -> None:
    """--count reads a causal LM's decoder positions by their labels: refuse other models before weights load."""
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"--count {count} counts positions of a causal LM's decoder by their labels, but {name} is an "
                          f"encoder-decoder ({config.model_type}), whose encoder tokens no label selects; measure it "
                          "without --count")


def load_checkpoint_precheck(checkpoint: Checkpoint) -> None:
    """A model that is neither a local folder nor (online) a hub id: refused before any work."""
    source = checkpoint.source
    if _offline() or source.startswith((".", "/")) or source.count("/") > 1 or Path(source).exists():
        raise CheckpointError(f"model {source!r} not found: no such local folder"
                        + (", and the hub is offline (HF_HUB_OFFLINE)" if _offline() else "") + "; check the path")
    raise ConfigError(f"model {source!r} is not a local folder; a hub model is swept with --revision (one or more), "
                    "which downloads each revision and removes it after measuring")


def _note(progress: Progress | None, ranks: Ranks, event: str, info: dict) -> None:
    if progress and ranks.rank == 0:
        progress(event, info)


def _error(results: dict, checkpoint: Checkpoint, message: str, identity: str | None, progress, ranks) -> None:
    results["errors"].append({"name": checkpoint.name, "model": checkpoint.source, "revision": checkpoint.revision,
                              "step": _step_of(checkpoint.name), "identity": identity, "error": message})
    log.error("%s failed: %s", checkpoint.name, message)
    _note(progress, ranks, "error", {"name": checkpoint.name, "error": message})


def _adopt_results(results: dict, out: Path, settings: SweepSettings) -> None:
    """Rows that tasks wrote to OUT/results but no driver merged (it stopped first) join the results."""
    folder = out / "results"
    if not folder.is_dir():
        return
    merged = {row.get("identity") for row in results["checkpoints"]}
    for path in sorted(folder.glob("*.json")):
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("ignoring %s: not a readable result (a task stopped while writing it?)", path)
            continue
        if _with_added(saved.get("settings")) != asdict(settings):  # another --count too: never reused
            raise ConfigError(f"{path} was measured with other settings ({saved.get('settings')}); to resume, use the "
                            f"same ones, or choose another --out for {asdict(settings)}")
        row = saved.get("row") or {}
        if row.get("identity") and row["identity"] not in merged:
            results["checkpoints"].append(row)
            merged.add(row["identity"])


def _load_previous(path: Path, settings: SweepSettings, source: DataSource, ranks: Ranks) -> dict:
    fresh = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "settings": asdict(settings), "checkpoints": [],
             "errors": []}
    if not path.is_file():
        return fresh
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} exists but is not a readable sweep ({error}); move it away or choose another --out")
    if previous.get("format") != FORMAT_NAME:
        raise ConfigError(f"{path} is not a kacq entropy sweep; choose another --out")
    if previous.get("version", 1) == 1:
        previous = _upgrade_v1(previous, settings, source, ranks)
    previous["settings"] = _with_added(previous.get("settings"))
    if previous.get("settings") != asdict(settings):
        raise ConfigError(f"{path} was measured with other settings ({previous.get('settings')}); to resume, use the "
                        f"same ones, or choose another --out for {asdict(settings)}")
    previous.setdefault("errors", [])
    return previous


def _with_added(saved):
    """Saved settings with the fields added since they were written, at the value that means what they measured
    (a sweep from before --count counted every token)."""
    if not isinstance(saved, dict):
        return saved
    return {**saved, **{k: v for k, v in _ADDED_SETTINGS.items() if k not in saved}}


def _upgrade_v1(previous: dict, settings: SweepSettings, source: DataSource, ranks: Ranks) -> dict:
    """A sweep written before content identities: its data hash was one sha256 of the file. Rows keep their
    names (matched by name, as then); settings gain the fields added since, at their defaults."""
    old = dict(previous.get("settings") or {})
    digest = old.get("data_sha256")
    if digest is not None and len(source.files) == 1:
        whole = hashlib.sha256()
        with source.files[0].open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                whole.update(block)
        if whole.hexdigest() == digest:
            old["data_sha256"] = settings.data_sha256
    known = {f.name for f in fields(SweepSettings)}
    defaults = asdict(SweepSettings(data=""))
    upgraded = {k: old.get(k, defaults[k]) for k in known}
    upgraded["data"] = old.get("data")
    return {**previous, "version": FORMAT_VERSION, "settings": upgraded}


def _write_json(path: Path, results: dict) -> None:
    rows = results["checkpoints"]
    if all(isinstance(r.get("step"), int) for r in rows):  # a series reads in step order, duplicates in place
        rows.sort(key=lambda r: r["step"])
    write_json_atomically(path, results)


def write_outputs(results: dict, out: str | os.PathLike) -> list[Path]:
    """entropy.csv (one row per checkpoint, one column per layer) and entropy.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = results["checkpoints"]
    labels = list(dict.fromkeys(label for r in rows for label in _labels(r)))
    csv_path = out / "entropy.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["checkpoint", "step", "total", "max_total", "tokens", "documents", *labels, "duplicate_of",
                         "identity", "world_size", "tokens_per_s", "error", "counted"])
        counted = counted_description(results.get("settings", {}).get("count"))
        for r in rows:
            by_label = dict(zip(_labels(r), r["per_layer"]))
            writer.writerow([r["name"], r["step"], repr(r["total"]), repr(r["max_total"]), r["tokens"], r["documents"],
                             *[repr(by_label[label]) if label in by_label else "" for label in labels],
                             r.get("duplicate_of") or "", r.get("identity") or "", r.get("world_size", ""),
                             r.get("tokens_per_s") or "", "", counted])
        for e in results.get("errors", []):  # a failed checkpoint: its row says why, its numbers stay empty
            writer.writerow([e["name"], e["step"], "", "", "", "", *[""] * len(labels), "", e.get("identity") or "",
                             "", "", e["error"], counted])
    paths = [out / "entropy.json", csv_path]
    if rows:
        paths.append(_plot(rows, out / "entropy.png"))
    return paths


def counted_description(count: str | None) -> str:
    """What the ``tokens`` of a sweep are, for its CSV: every unpadded token, or the positions --count selects."""
    return {None: "tokens", "labels": "completion tokens (--count labels)",
            "shifted_labels": "positions predicting completion tokens (--count shifted_labels)"}[count]


def _labels(row: dict) -> list[str]:
    """The layer labels of a result row (``decoder.layer_3``); rows written before labels existed: by index."""
    return row.get("labels") or [f"layer_{i}" for i in range(len(row["per_layer"]))]


def _plot(rows: list[dict], path: Path) -> Path:

    plt = pyplot()
    steps = [r["step"] for r in rows]
    use_steps = all(s is not None for s in steps) and len(set(steps)) == len(steps)
    x = steps if use_steps else list(range(len(rows)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    order = sorted(range(len(rows)), key=lambda i: x[i]) if use_steps else list(range(len(rows)))
    rows, x = [rows[i] for i in order], [x[i] for i in order]
    left.plot(x, [r["total"] for r in rows], marker="o")
    left.set(xlabel="step" if use_steps else "checkpoint", ylabel="knowledge entropy (nats)", title="total")
    for label in dict.fromkeys(label for r in rows for label in _labels(r)):
        values = [dict(zip(_labels(r), r["per_layer"])).get(label, float("nan")) for r in rows]
        right.plot(x, values, marker=".", label=label)
    same = [i for i, r in enumerate(rows) if r.get("duplicate_of")]
    if same:  # the same weights under another name: a flat stretch that is not a measurement of training
        left.scatter([x[i] for i in same], [rows[i]["total"] for i in same], s=90, facecolors="none",
                     edgecolors="red", zorder=3, label="same weights as an earlier checkpoint")
        for i in same:
            right.axvline(x[i], color="red", alpha=0.25, linewidth=3)
        left.legend(fontsize=7)
    right.set(xlabel=left.get_xlabel(), ylabel="entropy (nats)", title="per layer")
    if not use_steps:
        for ax in (left, right):
            ax.set_xticks(x, [Path(r["name"]).name for r in rows], rotation=30, fontsize=7)
    right.legend(fontsize=7)
    counts = {r.get("count") for r in rows}
    if counts != {None}:  # say which tokens the entropy is over, on the figure itself
        fig.suptitle(f"counted: {', '.join(counted_description(c) for c in sorted(counts, key=str))}", fontsize=9)
    return save_figure(fig, path)
