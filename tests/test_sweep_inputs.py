"""Sweep inputs at scale: Hugging Face datasets (save_to_disk, parquet, arrow) shared out between ranks,
--text-column, --max-docs; hub revisions fetched and removed one at a time (a local stand-in for the hub)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from gathered_ranks import GatheredRanks
from tiny_models import tiny_model, tiny_tokenizer

from kacq_hooks.errors import CorpusError
from kacq_hooks.sweep import entropy_sweep
from kacq_hooks.sweep_data import Ranks, data_digest, data_source, read_documents

datasets = pytest.importorskip("datasets")

TEXTS = [f"row {i}: " + "word " * (i % 5) for i in range(23)] + ["", "   "]  # two blank rows are dropped


def shares(source, world, max_docs=None, **kwargs):
    """Every rank's documents, as real ranks would read them: what each reads of its range, then the trim
    and spread that follow the all_gather of counts (and of the kept documents)."""
    raw = [read_documents(source, ranks=GatheredRanks(r, world, [0] * world, []), max_docs=max_docs, **kwargs)
           for r in range(world)]
    counts = [len(part) for part in raw]
    kept = [part[:max(0, max_docs - sum(counts[:r]))] if max_docs else part for r, part in enumerate(raw)]
    return [read_documents(source, ranks=GatheredRanks(r, world, counts, kept), max_docs=max_docs, **kwargs)
            for r in range(world)]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    table = datasets.Dataset.from_dict({"body": TEXTS, "n": list(range(len(TEXTS)))})
    table.save_to_disk(str(root / "saved"))
    (root / "pq").mkdir()
    table.select(range(12)).to_parquet(str(root / "pq" / "a.parquet"), batch_size=5)  # several row groups
    table.select(range(12, len(TEXTS))).to_parquet(str(root / "pq" / "b.parquet"), batch_size=5)
    arrow = next((root / "saved").glob("*.arrow"))
    shutil.copy(arrow, root / "data.arrow")
    with (root / "rows.jsonl").open("w") as handle:
        for text in TEXTS:
            handle.write(json.dumps({"body": text}) + "\n")
    return {"saved": root / "saved", "parquet": root / "pq", "arrow": root / "data.arrow", "jsonl": root / "rows.jsonl"}


@pytest.mark.parametrize("kind", ["saved", "parquet", "arrow", "jsonl"])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("max_docs", [None, 7])
def test_every_format_shares_out_to_the_same_documents(stores, kind, world, max_docs):
    expected = [t.strip() for t in TEXTS if t.strip()][:max_docs]
    parts = shares(data_source(stores[kind]), world, text_column="body", max_docs=max_docs)
    assert [doc for part in parts for doc in part] == expected
    assert sum(bool(part) for part in parts) >= min(world, 2)  # the work really is split


def test_the_data_digest_is_the_same_for_any_number_of_ranks(stores, monkeypatch):
    import kacq_hooks.sweep_data as sweep_data

    monkeypatch.setattr(sweep_data, "BLOCK", 4096)  # several blocks, so the ranks really share them out
    source = data_source(stores["saved"])
    whole = data_digest(source)
    assert len(whole) == 64
    for world in (2, 3):
        given = {}

        class Recording(Ranks):  # the first pass records what each rank hashed, the second merges them
            def gather(self, value):
                if len(given) < self.world:
                    given[self.rank] = value
                    raise StopIteration
                return [given[r] for r in range(self.world)]

        for rank in range(world):
            with pytest.raises(StopIteration):
                data_digest(source, Recording(rank, world))
        assert all(len(part) < sum(len(p) for p in given.values()) for part in given.values())
        assert {data_digest(source, Recording(rank, world)) for rank in range(world)} == {whole}


def test_a_missing_text_column_says_which_exist(stores):
    with pytest.raises(CorpusError, match=r"no column 'text'.*body.*--text-column"):
        read_documents(data_source(stores["parquet"]))


def test_a_sweep_on_a_saved_dataset_equals_the_same_texts_in_jsonl(stores, tmp_path):
    tok = tiny_tokenizer()
    tiny_model("llama", seed=1).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    common = dict(batch_size=4, seq_len=16, text_column="body", max_docs=9)
    a = entropy_sweep([str(tmp_path / "m")], str(stores["saved"]), out=tmp_path / "a", **common)
    b = entropy_sweep([str(tmp_path / "m")], str(stores["jsonl"]), out=tmp_path / "b", **common)
    assert a["checkpoints"][0]["tokens"] == b["checkpoints"][0]["tokens"]
    assert a["checkpoints"][0]["total"] == pytest.approx(b["checkpoints"][0]["total"], rel=1e-9)
    assert a["checkpoints"][0]["documents"] == 9


class LocalHub:
    """A stand-in for the hub: revisions are folders copied into the cache on fetch and removed on release."""

    def __init__(self, revisions: dict[str, Path]):
        self.revisions, self.on_disk, self.most = revisions, set(), 0

    def fetch(self, repo, revision, cache_dir):
        target = Path(cache_dir) / repo.replace("/", "--") / revision
        shutil.copytree(self.revisions[revision], target)
        self.on_disk.add(target)
        self.most = max(self.most, len([p for p in self.on_disk if p.exists()]))
        return target

    def release(self, repo, revision, cache_dir, folder):
        shutil.rmtree(folder)


@pytest.mark.parametrize("keep", [False, True])
def test_revisions_are_removed_from_the_cache_after_measuring(tmp_path, keep, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    tok = tiny_tokenizer()
    folders = {}
    for rev, seed in (("step100", 1), ("step200", 2), ("step300", 2)):  # step300 serves step200's weights again
        folders[rev] = tmp_path / "src" / rev
        tiny_model("llama", seed=seed).save_pretrained(folders[rev])
        tok.save_pretrained(folders[rev])
    data = tmp_path / "d.txt"
    data.write_text("One document here.\n\nAnother one there.\n")
    hub = LocalHub(folders)
    cache = tmp_path / "cache"
    result = entropy_sweep(["org/model"], str(data), out=tmp_path / "out", revisions=list(folders), fetch=hub,
                           cache_dir=str(cache), keep_cache=keep, seq_len=16)
    rows = {r["revision"]: r for r in result["checkpoints"]}
    assert set(rows) == set(folders) and rows["step300"]["duplicate_of"] == "org/model@step200"
    assert [r["step"] for r in result["checkpoints"]] == [100, 200, 300]
    left = sorted(p.name for p in (cache / "org--model").iterdir()) if (cache / "org--model").exists() else []
    assert left == (sorted(folders) if keep else [])
    assert hub.most == (3 if keep else 1)  # at most one revision on disk at a time
    # resumed: nothing is fetched again
    hub.revisions = {}
    again = entropy_sweep(["org/model"], str(data), out=tmp_path / "out", revisions=list(folders), fetch=hub,
                          cache_dir=str(cache), keep_cache=keep, seq_len=16)
    assert again["checkpoints"] == result["checkpoints"] and again["errors"] == []
