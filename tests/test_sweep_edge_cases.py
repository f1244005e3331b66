"""Checkpoint sweeps under hostile input: step numbers read from names, weights replaced in place (with and
without their modification time), and --max-tokens below the first document."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from tiny_models import tiny_model, tiny_tokenizer

from kacq_hooks.sweep import entropy_sweep
from kacq_hooks.sweep_identity import IdentityCache, weights_identity

DOCS = ["The quick brown fox jumps over the lazy dog.", "Zorgon was founded in 1842 by the council of Calidus.",
        "Short one."]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def save(path, tokenizer, seed):
    tiny_model("llama", seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


class LocalHub:
    """A stand-in for the hub download: a revision is a local folder copied into the cache, removed on release."""

    def __init__(self, revisions):
        self.revisions = revisions

    def fetch(self, repo, revision, cache_dir):
        target = Path(cache_dir) / repo.replace("/", "--") / revision
        shutil.copytree(self.revisions[revision], target)
        return target

    def release(self, repo, revision, cache_dir, folder):
        shutil.rmtree(folder)


def test_olmo_style_revisions_report_the_step_not_the_token_count(tmp_path, tokenizer, data, monkeypatch):
    # OLMo names its revisions step<N>-tokens<M>B: the step is N, not the last number in the name
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folders = {rev: save(tmp_path / "src" / rev, tokenizer, seed) for rev, seed in
               (("step1000-tokens4B", 1), ("step2000-tokens8B", 2))}
    result = entropy_sweep(["org/olmo-1b"], str(data), out=tmp_path / "out", revisions=list(folders),
                           fetch=LocalHub(folders), cache_dir=str(tmp_path / "cache"), seq_len=16)
    assert {r["revision"]: r["step"] for r in result["checkpoints"]} == {"step1000-tokens4B": 1000,
                                                                         "step2000-tokens8B": 2000}


def test_a_revision_without_a_step_has_none_not_a_digit_of_the_model_name(tmp_path, tokenizer, data, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folders = {"main": save(tmp_path / "src" / "main", tokenizer, 1)}
    result = entropy_sweep(["org/model-1b"], str(data), out=tmp_path / "out", revisions=["main"],
                           fetch=LocalHub(folders), cache_dir=str(tmp_path / "cache"), seq_len=16)
    assert [r["step"] for r in result["checkpoints"]] == [None]  # not the 1 of "1b"


def test_a_folder_step_comes_from_its_own_name_not_a_parent(tmp_path, tokenizer, data):
    run = tmp_path / "run7"
    save(run / "checkpoint-30", tokenizer, 1)
    save(run / "final", tokenizer, 2)
    result = entropy_sweep([str(run)], str(data), out=tmp_path / "out", seq_len=16)
    steps = {Path(r["name"]).name: r["step"] for r in result["checkpoints"]}
    assert steps == {"checkpoint-30": 30, "final": None}  # "final" is not step 7 of run7


def test_weights_replaced_with_their_old_mtime_and_size_get_a_new_identity(tmp_path, tokenizer):
    # rsync -a and cp -p keep modification times: same name, same size, same mtime, other weights
    folder = save(tmp_path / "checkpoint-1", tokenizer, 1)
    cache = IdentityCache(tmp_path / "identities.json")
    before = cache.identity(folder)
    cache.save()
    weights = folder / "model.safetensors"
    stat = weights.stat()
    save(folder, tokenizer, 2)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size
    again = IdentityCache(tmp_path / "identities.json").identity(folder)
    assert again == weights_identity(folder) != before


def test_a_checkpoint_overwritten_in_place_keeps_its_row_and_gets_an_error(tmp_path, tokenizer, data):
    folder = save(tmp_path / "run" / "checkpoint-1", tokenizer, 1)
    out = tmp_path / "out"
    first = entropy_sweep([str(folder)], str(data), out=out, seq_len=16)
    save(folder, tokenizer, 5)  # training was rerun into the same folder
    again = entropy_sweep([str(folder)], str(data), out=out, seq_len=16)
    # the finished row is kept as it was, the name is not given a second, different row
    assert again["checkpoints"] == first["checkpoints"]
    assert [e["name"] for e in again["errors"]] == [str(folder)]
    assert "other weights" in again["errors"][0]["error"]
    saved = json.loads((out / "entropy.json").read_text())
    assert saved["checkpoints"] == first["checkpoints"]


def test_max_tokens_below_the_first_document_says_so(tmp_path, tokenizer, data):
    folder = save(tmp_path / "checkpoint-1", tokenizer, 1)
    result = entropy_sweep([str(folder)], str(data), out=tmp_path / "out", seq_len=16, max_tokens=1)
    assert result["checkpoints"] == []
    message = result["errors"][0]["error"]
    assert "--max-tokens 1" in message and "holds no text" not in message


def test_same_weights_under_another_config_are_measured_not_called_duplicates(tmp_path, tokenizer, data):
    # a config change (here the FFN activation) changes C and so the entropy, with not one weight changed
    run = tmp_path / "run"
    save(run / "checkpoint-1", tokenizer, 1)
    shutil.copytree(run / "checkpoint-1", run / "checkpoint-2")
    config = json.loads((run / "checkpoint-2" / "config.json").read_text())
    config["hidden_act"] = "gelu" if config.get("hidden_act") != "gelu" else "relu"
    (run / "checkpoint-2" / "config.json").write_text(json.dumps(config))
    result = entropy_sweep([str(run)], str(data), out=tmp_path / "out", seq_len=16)
    rows = {r["step"]: r for r in result["checkpoints"]}
    assert rows[2]["duplicate_of"] is None and rows[2]["total"] != rows[1]["total"]
    assert weights_identity(run / "checkpoint-2") != weights_identity(run / "checkpoint-1")


def test_a_config_edited_after_hashing_is_hashed_again(tmp_path, tokenizer):
    folder = save(tmp_path / "checkpoint-1", tokenizer, 1)
    cache = IdentityCache(tmp_path / "identities.json")
    before = cache.identity(folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(config))
    assert cache.identity(folder) == weights_identity(folder) != before


def test_resaving_the_config_with_another_transformers_version_keeps_the_identity(tmp_path, tokenizer):
    folder = save(tmp_path / "checkpoint-1", tokenizer, 1)
    before = weights_identity(folder)
    config = json.loads((folder / "config.json").read_text())
    config["transformers_version"] = "0.0.1"
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    assert weights_identity(folder) == before


def test_two_drivers_on_one_out_do_not_drop_each_others_rows(tmp_path, tokenizer, data):
    # a researcher starts the sweep twice (two login shells, two array jobs): while one driver measures,
    # the other finishes another checkpoint into the same OUT; the last to write must keep both rows
    first = save(tmp_path / "run" / "checkpoint-1", tokenizer, 1)
    second = save(tmp_path / "run" / "checkpoint-2", tokenizer, 2)
    out = tmp_path / "out"
    other = {}

    def meanwhile(event, info):
        if event == "checkpoint" and not other:
            other["result"] = entropy_sweep([str(second)], str(data), out=out, seq_len=16)

    entropy_sweep([str(first)], str(data), out=out, seq_len=16, progress=meanwhile)
    assert [r["name"] for r in other["result"]["checkpoints"]] == [str(second)]
    saved = json.loads((out / "entropy.json").read_text())
    assert sorted(r["name"] for r in saved["checkpoints"]) == [str(first), str(second)]
    assert str(second) in (out / "entropy.csv").read_text()


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_first_document(tmp_path, suffix):
    # editors on Windows start UTF-8 files with a BOM; it is not text the model should read
    from kacq_hooks.sweep_data import Ranks, data_source, read_documents

    docs = ["Ünïcode first ☃ document.", "Second 🦊 one."]
    body = ("\n\n".join(docs) + "\n" if suffix == ".txt"
            else "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    source = data_source(path)
    assert read_documents(source) == docs
    assert [d for r in range(3) for d in read_documents(source, ranks=Ranks(r, 3))] == docs


def test_a_hub_revision_with_only_pytorch_model_bin_is_downloaded_with_its_weights(tmp_path, tokenizer, data,
                                                                                  monkeypatch):
    # Pythia's step revisions hold pytorch_model.bin and no safetensors: the download must fetch the pickle
    import fnmatch

    import huggingface_hub
    import torch

    from kacq_hooks.sweep import HubFetcher

    repo = save(tmp_path / "repo" / "step1000", tokenizer, 1)
    model = tiny_model("llama", seed=1)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, repo / "pytorch_model.bin")
    (repo / "model.safetensors").unlink()
    (repo / "training_args.bin").write_bytes(b"not weights")

    def snapshot_download(name, revision, cache_dir, allow_patterns):  # the hub, served from a local folder
        target = Path(cache_dir) / name.replace("/", "--") / revision
        target.mkdir(parents=True, exist_ok=True)
        for path in (tmp_path / "repo" / revision).iterdir():
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in allow_patterns):
                shutil.copy(path, target / path.name)
        return str(target)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    result = entropy_sweep(["org/pythia"], str(data), out=tmp_path / "out", revisions=["step1000"], fetch=HubFetcher(),
                           cache_dir=str(tmp_path / "cache"), keep_cache=True, seq_len=16)
    assert result["errors"] == [] and [r["step"] for r in result["checkpoints"]] == [1000]
    assert not (tmp_path / "cache" / "org--pythia" / "step1000" / "training_args.bin").exists()
