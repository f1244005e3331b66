"""Documents and content digests for sweeps, read in shares: each rank (or task) reads only its own part.

A sweep measures every checkpoint on the same documents. Under ``torchrun`` each rank reads a
contiguous share of them (byte ranges of a ``.txt``/``.jsonl`` file, row groups of parquet files,
row ranges of Arrow data) and the shares of all ranks are, in order, the documents one process reads.
The data's identity is a digest of its bytes, computed in 64 MiB blocks that the ranks share out, so
it does not depend on how many ranks computed it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import ConfigError, CorpusError, KacqError, MissingExtraError

BLOCK = 64 << 20  # digest block: large enough to stream well, small enough to share a file out
_READ = 8 << 20
TEXT_SUFFIXES = (".txt", ".jsonl")
TABLE_SUFFIXES = (".parquet", ".arrow")
RECORD_FIELDS = ("prompt", "completion")  # what a record read for a counted sweep holds (see read_documents)


# ------------------------------------------------------------------------------------------------
# Ranks


@dataclass(frozen=True)
class Ranks:
    """This process's place in the data-parallel group (``rank`` of ``world``); one process is 0 of 1."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order (one process: ``[value]``)."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        found = [None] * self.world
        dist.all_gather_object(found, value)
        return found

    def share(self, count: int) -> range:
        """The contiguous share of ``count`` units this rank takes (earlier ranks take one more when uneven)."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))


# ------------------------------------------------------------------------------------------------
# Digests


def _file_blocks(path: Path) -> list[tuple[Path, int, int]]:
    size = path.stat().st_size
    return [(path, start, min(BLOCK, size - start)) for start in range(0, size, BLOCK)] or [(path, 0, 0)]


def hash_range(path: Path, start: int, length: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(start)
        left = length
        while left > 0:
            chunk = handle.read(min(_READ, left))
            if not chunk:
                raise CorpusError(f"{path} changed while it was read (shorter than {start + length} bytes)")
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def content_digest(paths: Sequence[Path], root: Path | None = None, ranks: Ranks = Ranks()) -> str:
    """A digest of the bytes of ``paths`` (their names relative to ``root`` too, when given): sha256 over the
    sha256 of each 64 MiB block. Rank r hashes blocks r, r + world, ...; every rank returns the same digest."""
    units = [(index, block) for index, path in enumerate(paths) for block in _file_blocks(path)]
    mine = {i: hash_range(*unit[1]) for i, unit in enumerate(units) if i % ranks.world == ranks.rank}
    merged: dict[int, str] = {}
    for part in ranks.gather(mine):
        merged.update(part)
    total = hashlib.sha256()
    for i, (index, (path, start, length)) in enumerate(units):
        name = path.relative_to(root).as_posix() if root is not None else ""
        total.update(f"{name}\0{start}\0{length}\0{merged[i]}\n".encode())
    return total.hexdigest()


# ------------------------------------------------------------------------------------------------
# What --data names


@dataclass(frozen=True)
class DataSource:
    """Where documents come from: ``kind`` is text (.txt/.jsonl), parquet, arrow, saved (a ``save_to_disk``
    folder) or hub (a dataset name, streamed); ``files`` are the local files, in order."""

    kind: str
    name: str
    files: tuple[Path, ...] = ()
    root: Path | None = None

    @property
    def local(self) -> bool:
        return self.kind != "hub"


def data_source(data: str | os.PathLike) -> DataSource:
    """What ``data`` is, checked before any slow work: a clear error for a missing or unreadable path."""
    path = Path(data)
    suffix = path.suffix.lower()
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            files = tuple(sorted(p for p in path.rglob("*") if p.is_file()))
            return DataSource("saved", str(path.resolve()), files, path)
        for kind, pattern in (("parquet", "*.parquet"), ("arrow", "*.arrow"), ("text", "*.jsonl")):
            files = tuple(sorted(path.glob(pattern)))
            if files:
                return DataSource(kind, str(path.resolve()), files, path)
        raise CorpusError(f"data folder {data} holds no dataset: give a folder written by Dataset.save_to_disk, or "
                          "one holding .parquet, .arrow or .jsonl files")
    if suffix in TEXT_SUFFIXES + TABLE_SUFFIXES:
        if not path.exists():
            raise CorpusError(f"data file {data} does not exist; check the path (relative paths start at {Path.cwd()})")
        if not path.is_file():
            raise CorpusError(f"data path {data} is not a regular file")
        kind = "text" if suffix in TEXT_SUFFIXES else suffix[1:]
        return DataSource(kind, str(path.resolve()), (path,), None)
    if path.exists() or suffix or str(data).startswith((".", "/")):
        raise CorpusError(f"cannot read data {data}: unknown file type {path.suffix!r}. Give a .txt file (documents "
                          "separated by blank lines), .jsonl, .parquet or .arrow files, a save_to_disk folder, or a "
                          "hub dataset name (online)")
    return DataSource("hub", str(data))


def data_digest(source: DataSource, ranks: Ranks = Ranks()) -> str | None:
    """The content digest of local data (``None`` for a hub dataset, known by name only)."""
    if not source.local:
        return None
    return content_digest(source.files, source.root, ranks)


# ------------------------------------------------------------------------------------------------
# Documents


def read_documents(source: DataSource, *, text_column: str = "text", max_docs: int | None = None,
                   streaming: bool = False, ranks: Ranks = Ranks(), records: bool = False) -> list:
    """This rank's share of the documents (blank ones dropped), the first ``max_docs`` of all when given.

    Concatenated in rank order, the shares of all ranks are the documents one process reads. No rank reads
    more than its share (plus, with ``max_docs``, nothing beyond the first ``max_docs`` of its share).

    With ``records``, each document is a ``(prompt, completion)`` pair of strings read from the fields (or
    columns) ``prompt`` and ``completion``, kept exactly as written (the space between them belongs to one of
    the two); the completion must not be empty. A ``.txt`` file holds no such records and is refused.
    """
    if max_docs is not None and max_docs < 1:
        raise ConfigError(f"--max-docs must be at least 1, got {max_docs}")
    if records:
        check_record_source(source)
        text_column = RECORD_FIELDS  # type: ignore[assignment]  # the readers take a pair of columns
    if source.kind == "text":
        docs = []
        for path in _shared_files(source.files, ranks):
            docs += _text_share(path, ranks if len(source.files) == 1 else Ranks(), text_column, max_docs)
    elif source.kind == "parquet":
        docs = _parquet_share(source.files, text_column, max_docs, ranks)
    elif source.kind in ("arrow", "saved"):
        docs = _arrow_share(source, text_column, max_docs, ranks)
    else:
        docs = _hub_share(source.name, text_column, max_docs, streaming, ranks)
    if max_docs is None:
        return docs
    # keep the documents whose index among all ranks' is below max_docs
    counts = ranks.gather(len(docs))
    before = sum(counts[:ranks.rank])
    docs = docs[:max(0, max_docs - before)]
    if ranks.world > 1 and sum(counts) > max_docs:
        # the first max_docs documents sit in the first ranks' ranges: spread them evenly, so every rank
        # tokenizes and measures its part (only these documents travel, never the data)
        kept = [doc for part in ranks.gather(docs) for doc in part]
        docs = [kept[i] for i in ranks.share(len(kept))]
    return docs


def check_record_source(source: DataSource) -> None:
    """Refuse data that cannot hold (prompt, completion) records (a blank-line separated .txt file)."""
    plain = [path for path in source.files if path.suffix.lower() == ".txt"]
    if source.kind == "text" and plain:
        raise CorpusError(f"--count counts the tokens of each record's completion, but {plain[0]} is plain text "
                          "with no completions: give a .jsonl file (or parquet/arrow data) whose records have "
                          "\"prompt\" and \"completion\" fields, or leave --count out to count every token")


def _shared_files(files: Sequence[Path], ranks: Ranks) -> list[Path]:
    """One file: every rank reads its byte range of it; several: each rank takes a contiguous run of files."""
    if len(files) == 1:
        return list(files)
    return [files[i] for i in ranks.share(len(files))]


def _line_starts_document(handle, position: int) -> bool:
    """Whether the line starting at ``position`` follows a blank line (or the file's start)."""
    if position == 0:
        return True
    back = position - 1  # the newline that ends the previous line
    while back > 0:
        handle.seek(back - 1)
        byte = handle.read(1)
        if byte == b"\n":
            return True
        if byte not in (b" ", b"\t", b"\r"):
            return False
        back -= 1
    return True  # the previous line is the file's first and holds only blanks


def _text_share(path: Path, ranks: Ranks, text_column: str, max_docs: int | None) -> list[str]:
    """Documents of a .txt (blank-line separated) or .jsonl file whose first byte lies in this rank's range."""
    jsonl = path.suffix.lower() == ".jsonl"
    size = path.stat().st_size
    start, end = size * ranks.rank // ranks.world, size * (ranks.rank + 1) // ranks.world
    docs: list[str] = []
    current: list[str] = []
    with path.open("rb") as handle:
        position = start
        if start > 0:  # begin at the first line that starts inside the range
            handle.seek(start - 1)
            if handle.read(1) != b"\n":
                handle.readline()
            position = handle.tell()
        at_document = jsonl or _line_starts_document(handle, position)
        handle.seek(position)
        number = 1 if position == 0 else None  # line numbers are known from the file's start only
        while True:
            line_start = handle.tell()
            raw = handle.readline()
            if not raw:
                break
            in_range = line_start < end
            text = _decode(raw, path, line_start)
            blank = not text.strip(" \t\r\n")
            if jsonl:
                if not in_range or (max_docs is not None and len(docs) >= max_docs):
                    break
                if not blank:
                    doc = _jsonl_text(text, path, number, line_start, text_column)
                    if doc:
                        docs.append(doc)
            elif blank:
                if current:
                    doc = "\n".join(current).strip()
                    if doc:
                        docs.append(doc)
                    current = []
                    if max_docs is not None and len(docs) >= max_docs:
                        break
                at_document = True
            elif current:
                current.append(text.rstrip("\r\n"))
            elif at_document and in_range:
                current.append(text.rstrip("\r\n"))
            elif not in_range:
                break
            if number is not None:
                number += 1
        if current:
            doc = "\n".join(current).strip()
            if doc:
                docs.append(doc)
    return docs


def _decode(raw: bytes, path: Path, offset: int) -> str:
    try:
        # a byte order mark (Windows editors write one) starts the file, not its first document
        return raw.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError as error:
        raise CorpusError(f"data file {path} is not UTF-8 text (byte {offset + error.start}: {error.reason}); "
                          "convert it to UTF-8 first") from error


def _jsonl_text(line: str, path: Path, number: int | None, offset: int, column):
    where = f"{path}, line {number}" if number is not None else f"{path}, the line at byte {offset}"
    if isinstance(column, tuple):
        return _jsonl_record(line, where)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as error:
        raise CorpusError(f"{where}: not valid JSON ({error.msg} at column {error.colno}); each line must be one "
                          f"object like {{\"{column}\": \"...\"}}") from error
    if not isinstance(obj, dict) or column not in obj:
        found = f"keys {sorted(obj)}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
        hint = "; name the text field with --text-column" if isinstance(obj, dict) else ""
        if isinstance(obj, dict) and set(RECORD_FIELDS) <= set(obj):
            hint += ", or pass --count to measure the completions of these prompt/completion records"
        raise CorpusError(f"{where}: expected an object with a \"{column}\" field, found {found}{hint}")
    if not isinstance(obj[column], str):
        raise CorpusError(f"{where}: \"{column}\" must be a string, found {type(obj[column]).__name__}")
    return obj[column].strip()


def _jsonl_record(line: str, where: str) -> tuple[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as error:
        raise CorpusError(f"{where}: not valid JSON ({error.msg} at column {error.colno}); each line must be one "
                          "object like {\"prompt\": \"...\", \"completion\": \"...\"}") from error
    if not isinstance(obj, dict):
        raise CorpusError(f"{where}: expected an object with \"prompt\" and \"completion\" fields, found a JSON "
                          f"{type(obj).__name__}")
    return _record(obj.get("prompt"), obj.get("completion"), where, sorted(obj))


def _record(prompt, completion, where: str, keys=None) -> tuple[str, str]:
    """One (prompt, completion) record, refused unless both are strings and the completion holds text."""
    # a field absent from a JSON object is missing; one present as null (or a null parquet/arrow cell) is null
    null = [name for name, value in zip(RECORD_FIELDS, (prompt, completion))
            if value is None and (keys is None or name in keys)]
    if null:
        raise CorpusError(f"{where}: the record has no {' and no '.join(repr(n) for n in null)} value (null); --count "
                          "needs every record's \"prompt\" as text (an empty string for no context) and its "
                          "\"completion\" as text")
    missing = [name for name, value in zip(RECORD_FIELDS, (prompt, completion)) if value is None]
    if missing:
        found = f" (it has {keys})" if keys is not None else ""
        raise CorpusError(f"{where}: the record has no {' and no '.join(repr(m) for m in missing)} field{found}; "
                          "--count counts the tokens of each record's completion, so every record needs a \"prompt\" "
                          "(context, not counted; may be empty) and a \"completion\" (counted)")
    for name, value in zip(RECORD_FIELDS, (prompt, completion)):
        if not isinstance(value, str):
            raise CorpusError(f"{where}: \"{name}\" must be a string, found {type(value).__name__}")
    if not completion.strip():
        raise CorpusError(f"{where}: the completion is empty, so no token of this record would count; give every "
                          "record a completion, or leave the record out")
    return prompt, completion


def _records_of(prompts, completions, where: str, first: int) -> list[tuple[str, str]]:
    return [_record(p, c, f"{where}, row {first + i}") for i, (p, c) in enumerate(zip(prompts, completions))]


def _column_values(table_column, column, where: str, first: int = 0):
    """The documents of one or (for records) two columns: ``table_column(name)`` gives a column's values, the
    first of them row ``first`` of ``where``."""
    if isinstance(column, tuple):
        return _records_of(table_column(column[0]), table_column(column[1]), where, first)
    return _texts_of(table_column(column), column, where)


def _texts_of(values, column: str, where: str) -> list[str]:
    docs = []
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str):
            raise CorpusError(f"{where}: column {column!r} holds {type(value).__name__} values, not text; name the "
                              "text column with --text-column")
        if value.strip():
            docs.append(value.strip())
    return docs


def _check_column(column, names: Sequence[str], where: str) -> None:
    if isinstance(column, tuple):
        missing = [c for c in column if c not in names]
        if missing:
            raise CorpusError(f"{where} has no column {' and no '.join(repr(m) for m in missing)} (it has "
                              f"{sorted(names)}); --count counts the tokens of each record's completion, so the data "
                              "needs a \"prompt\" and a \"completion\" column")
        return
    if column not in names:
        raise CorpusError(f"{where} has no column {column!r} (it has {sorted(names)}); name the text column with "
                          "--text-column")


def _parquet_share(files: Sequence[Path], column: str, max_docs: int | None, ranks: Ranks) -> list[str]:
    """The row groups of all files, shared out in order: each rank reads only its groups' text column."""
    import pyarrow.parquet as pq  # a dependency of datasets

    groups = []
    for path in files:
        meta = pq.ParquetFile(path)
        _check_column(column, meta.schema_arrow.names, str(path))
        groups += [(path, g) for g in range(meta.num_row_groups)]
    docs: list[str] = []
    for path, group in (groups[i] for i in ranks.share(len(groups))):
        names = list(column) if isinstance(column, tuple) else [column]
        table = pq.ParquetFile(path).read_row_group(group, columns=names)
        where = f"{path}, row group {group}" if isinstance(column, tuple) else str(path)
        docs += _column_values(lambda name: table.column(name).to_pylist(), column, where)
        if max_docs is not None and len(docs) >= max_docs:
            break
    return docs


def _datasets():
    try:
        import datasets
    except ImportError as error:
        raise MissingExtraError("datasets", "data", "reading Hugging Face datasets") from error
    return datasets


def _arrow_share(source: DataSource, column: str, max_docs: int | None, ranks: Ranks) -> list[str]:
    """Arrow files or a save_to_disk folder, memory-mapped: each rank reads its contiguous run of rows."""
    datasets = _datasets()
    if source.kind == "saved":
        loaded = datasets.load_from_disk(str(source.root))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise CorpusError(f"{source.name} holds splits {sorted(loaded)} and no 'train'; save the split to "
                                  "measure on by itself")
            loaded = loaded["train"]
        tables = [loaded]
    else:
        tables = [datasets.Dataset.from_file(str(path)) for path in source.files]
    for table in tables:
        _check_column(column, table.column_names, source.name)
    whole = tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
    rows = ranks.share(len(whole))
    docs: list[str] = []
    step = 4096
    names = list(column) if isinstance(column, tuple) else [column]
    for begin in range(rows.start, rows.stop, step):
        part = whole.select_columns(names)[begin:min(begin + step, rows.stop)]
        docs += _column_values(lambda name: part[name], column, source.name, begin)
        if max_docs is not None and len(docs) >= max_docs:
            break
    return docs


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_share(name: str, column: str, max_docs: int | None, streaming: bool, ranks: Ranks) -> list[str]:
    """A hub dataset's train split. Streamed: with max_docs only its first rows are read (shared out in order),
    without, each rank streams its own shards (``split_dataset_by_node``). Not streamed: downloaded to the
    datasets cache once, then each rank reads its run of rows."""
    if _hub_offline():
        raise CorpusError(f"data {name!r} is not a local file or folder, and the hub is offline (HF_HUB_OFFLINE)")
    datasets = _datasets()
    try:
        if not streaming:
            table = datasets.load_dataset(name, split="train")
            _check_column(column, table.column_names, name)
            rows = ranks.share(min(len(table), max_docs) if max_docs is not None else len(table))
            part = table[rows.start:rows.stop]
            return _column_values(lambda key: part[key], column, name, rows.start)
        stream = datasets.load_dataset(name, split="train", streaming=True)
        if max_docs is not None:
            rows = list(stream.take(max_docs))
            mine = [rows[i] for i in ranks.share(len(rows))]
        else:
            from datasets.distributed import split_dataset_by_node

            mine = list(split_dataset_by_node(stream, rank=ranks.rank, world_size=ranks.world))
    except KacqError:
        raise
    except Exception as error:  # network and name errors come in many types; say what was tried
        raise CorpusError(f"could not read dataset {name!r} ({type(error).__name__}: {error}); it is neither a "
                          "local file or folder nor a reachable hub dataset") from error
    if mine:
        _check_column(column, list(mine[0]), name)
    return _column_values(lambda key: [row.get(key) for row in mine], column, name)
