"""A checkpoint's identity: a digest of its weights, streamed from its files, never loaded as tensors, of
its config and of its tokenizer's files.

For safetensors files it hashes every tensor's name, dtype, shape and bytes (read from the files'
byte ranges), so the identity ignores file metadata and how the weights are split into shards: two
folders holding the same weights have the same identity whatever their names. The config is part of it
(the same weights under another activation or norm give other coefficients), parsed and without the fields
that only say who wrote it (``transformers_version``, ``_name_or_path``), so re-saving it changes nothing.
The tokenizer files are part of it too: the same weights read other tokens through another tokenizer (and,
under ``--count``, count other positions). Ranks share the tensors out. Digests are remembered by path, size, mtime, ctime and inode, so a resumed sweep does not read
unchanged files again.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from .errors import CheckpointError
from .sweep_data import Ranks, hash_range, content_digest

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")
_CONFIG = "config.json"
# config fields that record who saved it, not how the model computes
_PROVENANCE = ("transformers_version", "_name_or_path", "_commit_hash")
# files that tell a folder holds a tokenizer, and all the files a saved tokenizer may consist of
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                     "vocab.txt")
TOKENIZER_FILES = TOKENIZER_MARKERS + ("merges.txt", "special_tokens_map.json", "added_tokens.json",
                                       "chat_template.jinja")


def config_digest(folder: str | os.PathLike) -> str:
    """The digest of a checkpoint's config.json without its provenance fields ("" when it has none); a config that
    is not JSON is hashed as its bytes."""
    path = Path(folder) / _CONFIG
    if not path.is_file():
        return ""
    raw = path.read_bytes()
    try:
        config = json.loads(raw)
    except ValueError:
        return hashlib.sha256(raw).hexdigest()
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k not in _PROVENANCE}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def tokenizer_files(folder: str | os.PathLike) -> list[Path]:
    """The tokenizer files a checkpoint folder holds (none when it was saved without its tokenizer)."""
    return [Path(folder) / name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]


def tokenizer_digest(folder: str | os.PathLike) -> str:
    """The digest of a checkpoint folder's tokenizer files, by name and bytes ("" when it holds none)."""
    files = tokenizer_files(folder)
    if not files:
        return ""
    total = hashlib.sha256()
    for path in files:
        total.update(f"{path.name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return total.hexdigest()


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a ``save_pretrained`` folder: its safetensors files, else its torch pickles."""
    folder = Path(folder)
    for pattern in _WEIGHT_PATTERNS:
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if found:
            return found
    return []


def _safetensors_index(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """name -> (dtype, shape, absolute start, length) from a safetensors header."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 << 20:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}); the checkpoint is damaged "
                              "or was written partially") from error
    size = path.stat().st_size
    index = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end <= size - 8 - length:
            raise CheckpointError(f"{path}: tensor {name} lies beyond the end of the file (truncated?)")
        index[name] = (entry["dtype"], list(entry["shape"]), 8 + length + begin, end - begin)
    return index


def weights_identity(folder: str | os.PathLike, ranks: Ranks = Ranks()) -> str:
    """The digest of a checkpoint folder's weights; every rank returns the same one."""
    files = weight_files(folder)
    if not files:
        raise CheckpointError(f"{folder} holds no weight files (*.safetensors or pytorch_model*.bin); give a "
                              "folder written by save_pretrained")
    config, tokenizer = config_digest(folder), tokenizer_digest(folder)
    if files[0].suffix != ".safetensors":
        weights = content_digest(files, None, ranks)
        if not (config or tokenizer):
            return "files-" + weights
        return "files-" + hashlib.sha256(f"{weights}\0{config}\0{tokenizer}".encode()).hexdigest()
    tensors: dict[str, tuple[Path, str, list[int], int, int]] = {}
    for path in files:
        for name, (dtype, shape, start, length) in _safetensors_index(path).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name} is stored twice in {folder} ({tensors[name][0].name} and "
                                      f"{path.name})")
            tensors[name] = (path, dtype, shape, start, length)
    names = sorted(tensors)
    mine = {i: hash_range(tensors[n][0], tensors[n][3], tensors[n][4])
            for i, n in enumerate(names) if i % ranks.world == ranks.rank}
    merged: dict[int, str] = {}
    for part in ranks.gather(mine):
        merged.update(part)
    total = hashlib.sha256()
    for i, name in enumerate(names):
        _, dtype, shape, _, _ = tensors[name]
        total.update(f"{name}\0{dtype}\0{shape}\0{merged[i]}\n".encode())
    if config:
        total.update(f"{_CONFIG}\0{config}\n".encode())
    if tokenizer:
        total.update(f"tokenizer\0{tokenizer}\n".encode())
    return "tensors-sha256:" + total.hexdigest()


class IdentityCache:
    """Identities remembered by resolved folder and each weight file's (name, size, mtime, ctime, inode), in a JSON
    file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):
            self.entries = {}  # a damaged cache only costs a re-read of the weights

    @staticmethod
    def _stamp(folder: Path) -> list:
        # mtime alone is not enough: rsync -a and cp -p give new weights the old file's mtime (and often its
        # size); the inode and ctime change with any rewrite and cannot be set back
        stamp = []
        config = folder / _CONFIG
        for path in weight_files(folder) + ([config] if config.is_file() else []) + tokenizer_files(folder):
            stat = path.stat()
            stamp.append([path.name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino])
        return stamp

    def identity(self, folder: str | os.PathLike, ranks: Ranks = Ranks()) -> str:
        folder = Path(folder).resolve()
        stamp = self._stamp(folder)
        entry = self.entries.get(str(folder))
        # every rank must agree whether to hash (hashing is collective); rank 0's view decides
        cached = entry["identity"] if entry and entry.get("files") == stamp else None
        cached = ranks.gather(cached)[0]
        if cached is not None:
            return cached
        found = weights_identity(folder, ranks)
        self.entries[str(folder)] = {"files": stamp, "identity": found}
        return found

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        staging.write_text(json.dumps(self.entries, indent=0), encoding="utf-8")
        staging.replace(self.path)
