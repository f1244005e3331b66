"""Checkpoints known by their weights: duplicates flagged and measured once, resume by content, error rows."""
from __future__ import annotations

import json
import shutil

import pytest
from tiny_models import forbid_loading, tiny_model, tiny_tokenizer

from kacq_hooks.cli import main
from kacq_hooks.sweep import entropy_sweep
from kacq_hooks.sweep_identity import weights_identity

DOCS = ["The quick brown fox jumps over the lazy dog.", "Zorgon was founded in 1842 by the council of Calidus.",
        "Knowledge entropy measures how evenly the feed-forward memories are used.", "Short one."]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def save(path, tokenizer, seed, **kwargs):
    model = tiny_model("llama", seed=seed)
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


def sweep(models, data, out, **kwargs):
    return entropy_sweep([str(m) for m in models], str(data), out=out, batch_size=2, seq_len=16, **kwargs)


def test_identity_is_the_weights_not_the_files(tmp_path, tokenizer):
    one = save(tmp_path / "one", tokenizer, seed=1)
    sharded = save(tmp_path / "sharded", tokenizer, seed=1, max_shard_size="20KB")  # other files, same weights
    other = save(tmp_path / "other", tokenizer, seed=2)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert weights_identity(one) == weights_identity(sharded) != weights_identity(other)
    moved = shutil.copytree(one, tmp_path / "elsewhere")
    assert weights_identity(moved) == weights_identity(one)


def test_identical_steps_are_flagged_and_measured_once(tmp_path, tokenizer, data, caplog):
    run = tmp_path / "run"
    save(run / "checkpoint-10", tokenizer, seed=1)
    save(run / "checkpoint-20", tokenizer, seed=2)
    shutil.copytree(run / "checkpoint-20", run / "checkpoint-30")  # a series serving step 20 again as 30
    save(run / "checkpoint-40", tokenizer, seed=3)
    seen = []
    result = sweep([run], data, tmp_path / "out", progress=lambda e, i: seen.append((e, i.get("name"))))
    rows = {r["step"]: r for r in result["checkpoints"]}
    assert sorted(rows) == [10, 20, 30, 40]
    assert rows[30]["duplicate_of"] == str(run / "checkpoint-20") and rows[20]["duplicate_of"] is None
    assert rows[30]["total"] == rows[20]["total"] and rows[30]["identity"] == rows[20]["identity"]
    measured = [name for event, name in seen if event == "checkpoint"]
    assert str(run / "checkpoint-30") not in measured and len(measured) == 3  # not measured twice
    assert "same weights as" in caplog.text
    saved = json.loads((tmp_path / "out" / "entropy.json").read_text())
    assert [r["duplicate_of"] for r in saved["checkpoints"]].count(str(run / "checkpoint-20")) == 1
    csv_text = (tmp_path / "out" / "entropy.csv").read_text()
    assert "duplicate_of" in csv_text.splitlines()[0] and str(run / "checkpoint-20") in csv_text.splitlines()[3]
    # one result file per distinct weights, written atomically (no staging files left)
    assert len(list((tmp_path / "out" / "results").glob("*.json"))) == 3
    assert not list((tmp_path / "out" / "results").glob(".*tmp"))


def test_a_moved_folder_is_not_measured_again(tmp_path, tokenizer, data, capsys, monkeypatch):
    first = save(tmp_path / "a" / "step-1", tokenizer, seed=1)
    out = tmp_path / "out"
    assert main(["entropy", str(first), "--data", str(data), "--out", str(out), "--batch-size", "2",
                 "--seq-len", "16"]) == 0
    moved = tmp_path / "b" / "step-1"
    shutil.move(str(first.parent), str(moved.parent))

    forbid_loading(monkeypatch, moved)  # the moved checkpoint must not even be loaded
    capsys.readouterr()
    assert main(["entropy", str(moved), "--data", str(data), "--out", str(out), "--batch-size", "2",
                 "--seq-len", "16"]) == 0
    captured = capsys.readouterr()
    assert "same weights as" in captured.err and "= same weights as step-1" in captured.out
    rows = json.loads((out / "entropy.json").read_text())["checkpoints"]
    assert [r["name"] for r in rows] == [str(first), str(moved)] and rows[1]["total"] == rows[0]["total"]


def test_a_broken_checkpoint_is_an_error_row_and_the_others_are_kept(tmp_path, tokenizer, data, capsys):
    good = save(tmp_path / "run" / "checkpoint-1", tokenizer, seed=1)
    bad = save(tmp_path / "run" / "checkpoint-2", tokenizer, seed=2)
    last = save(tmp_path / "run" / "checkpoint-3", tokenizer, seed=3)
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-500])  # a truncated download
    out = tmp_path / "out"
    code = main(["entropy", str(tmp_path / "run"), "--data", str(data), "--out", str(out), "--batch-size", "2",
                 "--seq-len", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "checkpoint-2" in err
    saved = json.loads((out / "entropy.json").read_text())
    assert [r["name"] for r in saved["checkpoints"]] == [str(good), str(last)]
    assert [e["name"] for e in saved["errors"]] == [str(bad)] and "truncated" in saved["errors"][0]["error"]
    assert "checkpoint-2" in (out / "entropy.csv").read_text()
    # repaired, a resumed sweep measures only it, and the finished rows stay as they were
    before = saved["checkpoints"]
    save(bad, tokenizer, seed=2)
    assert main(["entropy", str(tmp_path / "run"), "--data", str(data), "--out", str(out), "--batch-size", "2",
                 "--seq-len", "16"]) == 0
    after = json.loads((out / "entropy.json").read_text())
    rows = {r["name"]: r for r in after["checkpoints"]}
    assert [rows[r["name"]] for r in before] == before and list(rows) == [str(good), str(bad), str(last)]
    assert after["errors"] == []


def test_results_written_by_a_stopped_driver_are_adopted(tmp_path, tokenizer, data, monkeypatch):
    first = save(tmp_path / "a", tokenizer, seed=1)
    out = tmp_path / "out"
    sweep([first], data, out)
    (out / "entropy.json").unlink()  # the driver died before merging; the task's result file remains
    forbid_loading(monkeypatch, first)
    result = sweep([first], data, out)
    assert [r["name"] for r in result["checkpoints"]] == [str(first)]


def test_other_settings_than_the_existing_results_are_refused(tmp_path, tokenizer, data):
    first = save(tmp_path / "a", tokenizer, seed=1)
    out = tmp_path / "out"
    sweep([first], data, out)
    from kacq_hooks.errors import KacqError

    with pytest.raises(KacqError, match="other settings"):
        entropy_sweep([str(first)], str(data), out=out, batch_size=3, seq_len=16)
    assert len(json.loads((out / "entropy.json").read_text())["checkpoints"]) == 1


def test_a_tokenizer_rewritten_in_place_is_a_changed_checkpoint(tmp_path, tokenizer, data):
    # the same weights read other tokens through another tokenizer: a resumed sweep must not keep the old row as
    # if nothing changed, even when the weight files' stamps are untouched (the identity cache stamps the tokenizer)
    folder = save(tmp_path / "step-1", tokenizer, seed=1)
    before = weights_identity(folder)
    first = sweep([folder], data, tmp_path / "out")
    assert [row["name"] for row in first["checkpoints"]] == [str(folder)] and not first["errors"]
    other = tiny_tokenizer(vocab_size=200)
    other.save_pretrained(folder)  # weights and config untouched
    assert weights_identity(folder) != before
    again = sweep([folder], data, tmp_path / "out")
    assert "tokenizer" in again["errors"][0]["error"]
