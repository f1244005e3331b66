"""`kacq entropy`: a sweep over saved tiny checkpoints equals the library API, resumes, and fails cleanly."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from tiny_models import forbid_loading, tiny_model, tiny_tokenizer

import kacq_hooks as kh
from kacq_hooks.cli import main

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model learns facts one batch at a time, and forgets some of them.",
    "Zorgon was founded in 1842 by the council of Calidus.",
    "Knowledge entropy measures how evenly the feed-forward memories are used.",
    "Short one.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def save_checkpoint(path, tokenizer, seed: int, model_type: str = "llama"):
    model = tiny_model(model_type, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


def library_entropy(path, texts, batch_size: int, seq_len: int, weighting: str = "token"):
    """The same measurement written directly against the public API."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with kh.instrument(model, weighting=weighting) as inst, torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=seq_len, add_special_tokens=False)
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return inst.knowledge_entropy()


def test_sweep_writes_files_and_matches_library(tmp_path, tokenizer, data_file, capsys):
    first = save_checkpoint(tmp_path / "run" / "checkpoint-20", tokenizer, seed=1)
    second = save_checkpoint(tmp_path / "run" / "checkpoint-100", tokenizer, seed=2)
    out = tmp_path / "out"
    code = main(["entropy", str(first), str(second), "--data", str(data_file), "--out", str(out),
                 "--batch-size", "2", "--seq-len", "16", "--device", "cpu"])
    assert code == 0
    for name in ("entropy.json", "entropy.csv", "entropy.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "entropy.json").read_text())
    assert [c["name"] for c in saved["checkpoints"]] == [str(first), str(second)]
    assert [c["step"] for c in saved["checkpoints"]] == [20, 100]
    for row, path in zip(saved["checkpoints"], (first, second)):
        expected = library_entropy(path, DOCS, batch_size=2, seq_len=16)
        assert row["total"] == pytest.approx(expected.total, rel=1e-9, abs=1e-9)
        assert row["per_layer"] == pytest.approx(expected.per_layer, rel=1e-9, abs=1e-9)
        assert row["tokens"] == expected.tokens and row["documents"] == len(DOCS)
    assert saved["checkpoints"][0]["total"] != saved["checkpoints"][1]["total"]  # two different models
    rows = list(csv.DictReader((out / "entropy.csv").open()))
    assert [float(r["total"]) for r in rows] == [c["total"] for c in saved["checkpoints"]]
    assert float(rows[1]["decoder.layer_1"]) == saved["checkpoints"][1]["per_layer"][1]
    assert "checkpoint-100" in capsys.readouterr().out


def test_document_weighting_and_trainer_folder_expansion(tmp_path, tokenizer, data_file):
    run = tmp_path / "trainer_out"
    save_checkpoint(run / "checkpoint-10", tokenizer, seed=3)
    save_checkpoint(run / "checkpoint-2", tokenizer, seed=4)
    out = tmp_path / "out"
    assert main(["entropy", str(run), "--data", str(data_file), "--out", str(out), "--weighting", "document",
                 "--batch-size", "3", "--seq-len", "12", "--max-docs", "4"]) == 0
    saved = json.loads((out / "entropy.json").read_text())
    assert [c["step"] for c in saved["checkpoints"]] == [2, 10]  # numeric, not string, order
    expected = library_entropy(run / "checkpoint-2", DOCS[:4], batch_size=3, seq_len=12, weighting="document")
    assert saved["checkpoints"][0]["total"] == pytest.approx(expected.total, rel=1e-9)
    assert saved["checkpoints"][0]["weighting"] == "document" and saved["checkpoints"][0]["documents"] == 4


def test_resume_skips_measured_checkpoints(tmp_path, tokenizer, data_file, capsys, monkeypatch):
    first = save_checkpoint(tmp_path / "a", tokenizer, seed=5)
    second = save_checkpoint(tmp_path / "b", tokenizer, seed=6)
    out = tmp_path / "out"
    args = ["--data", str(data_file), "--out", str(out), "--batch-size", "2", "--seq-len", "16"]
    assert main(["entropy", str(first), *args]) == 0
    before = json.loads((out / "entropy.json").read_text())["checkpoints"][0]
    forbid_loading(monkeypatch, first)  # a resumed sweep must not load it again
    capsys.readouterr()
    assert main(["entropy", str(first), str(second), *args]) == 0
    assert "skipping" in capsys.readouterr().err
    after = json.loads((out / "entropy.json").read_text())["checkpoints"]
    assert after[0] == before and [c["name"] for c in after] == [str(first), str(second)]
    # other settings cannot extend the same file
    assert main(["entropy", str(second), "--data", str(data_file), "--out", str(out), "--seq-len", "8"]) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["missing_model", "empty_data", "bad_jsonl", "missing_data", "no_config"])
def test_errors_exit_2_with_message(tmp_path, tokenizer, data_file, capsys, monkeypatch, problem):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tmp_path / "model"
    data = data_file
    expected = {"missing_model": "not found", "empty_data": "no text", "bad_jsonl": "line 2",
                "missing_data": "does not exist", "no_config": "config.json"}
    if problem == "no_config":
        model.mkdir()
        (model / "weights.bin").write_bytes(b"")
    elif problem != "missing_model":
        save_checkpoint(model, tokenizer, seed=0)
    if problem == "missing_model":
        model = tmp_path / "nowhere" / "model"
    if problem == "empty_data":
        data = tmp_path / "empty.jsonl"
        data.write_text("\n  \n")
    elif problem == "bad_jsonl":
        data = tmp_path / "bad.jsonl"
        data.write_text('{"text": "fine"}\n{"text": broken\n')
    elif problem == "missing_data":
        data = tmp_path / "absent.txt"
    code = main(["entropy", str(model), "--data", str(data), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert expected[problem] in err and "Traceback" not in err
    assert "kacq entropy: error:" in err


def test_seq_len_beyond_the_models_positions_is_refused_before_measuring(tmp_path, tokenizer, data_file, capsys):
    first = save_checkpoint(tmp_path / "a", tokenizer, seed=1)  # tiny models take 128 positions
    code = main(["entropy", str(first), "--data", str(data_file), "--out", str(tmp_path / "out"),
                 "--seq-len", "4096", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--seq-len 4096" in err and "128" in err
    assert not (tmp_path / "out" / "entropy.json").exists()  # refused before any measurement


@pytest.mark.parametrize("device, message", [
    ("gpu9", "not a device"),
    ("cuda", "not available"),
    ("cuda:7", "not available"),
])
def test_bad_or_unavailable_device_is_refused(tmp_path, tokenizer, data_file, capsys, device, message):
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    first = save_checkpoint(tmp_path / "a", tokenizer, seed=1)
    for command in (["entropy", str(first)], ["resuscitate", str(first)]):
        code = main([*command, "--data", str(data_file), "--out", str(tmp_path / "out"), "--device", device])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        assert f"--device {device}" in err and message in err


def test_an_all_nan_model_is_reported_as_non_finite(tmp_path, tokenizer, data_file, capsys):
    model = tiny_model("llama", seed=1)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan")
    tokenizer.save_pretrained(tmp_path / "nan")
    code = main(["entropy", str(tmp_path / "nan"), "--data", str(data_file), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "non-finite" in err and "dead layer" not in err  # the core's message, shown as it is


def test_cli_spells_shared_options_the_same(tmp_path):
    from kacq_hooks.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    shared = ("--data", "--batch-size", "--seq-len", "--device", "--out")
    for name in ("entropy", "resuscitate"):
        options = {s for action in subcommands[name]._actions for s in action.option_strings}
        assert set(shared) <= options, (name, set(shared) - options)


def test_resume_by_resolved_path_and_content_hash(tmp_path, tokenizer, data_file, capsys, monkeypatch):
    first = save_checkpoint(tmp_path / "a", tokenizer, seed=5)
    second = save_checkpoint(tmp_path / "b", tokenizer, seed=6)
    out = tmp_path / "out"
    common = ["--out", str(out), "--batch-size", "2", "--seq-len", "16"]
    monkeypatch.chdir(data_file.parent)
    assert main(["entropy", str(first), "--data", f"./{data_file.name}", *common]) == 0  # relative
    saved = json.loads((out / "entropy.json").read_text())
    assert saved["settings"]["data"] == str(data_file.resolve()) and len(saved["settings"]["data_sha256"]) == 64
    forbid_loading(monkeypatch, first)  # a resumed sweep must not load it again
    capsys.readouterr()
    assert main(["entropy", str(first), str(second), "--data", str(data_file.resolve()), *common]) == 0  # absolute
    assert "skipping" in capsys.readouterr().err
    assert len(json.loads((out / "entropy.json").read_text())["checkpoints"]) == 2
    assert main(["entropy", str(second), "--data", data_file.name, *common]) == 0  # and bare relative again
    # the same path with other contents is other data: refused, not mixed into the file
    data_file.write_text(data_file.read_text() + json.dumps({"text": "One more document."}) + "\n")
    assert main(["entropy", str(second), "--data", str(data_file), *common]) == 2
    assert "other settings" in capsys.readouterr().err


def test_out_naming_an_existing_file_is_refused_before_any_work(tmp_path, tokenizer, data_file, capsys):
    first = save_checkpoint(tmp_path / "a", tokenizer, seed=1)
    taken = tmp_path / "results.txt"
    taken.write_text("keep me")
    code = main(["entropy", str(first), "--data", str(data_file), "--out", str(taken), "--seq-len", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "--out" in err and "is a file" in err
    assert taken.read_text() == "keep me" and "[1/1]" not in err  # nothing was measured


def test_a_pad_token_beyond_the_vocabulary_is_refused_before_work(tmp_path, tokenizer, data_file, capsys):
    from tiny_models import VOCAB

    path = tmp_path / "a"
    tiny_model("llama", seed=1).save_pretrained(path)
    wide = tiny_tokenizer()
    wide.add_special_tokens({"pad_token": "<|extra-pad|>"})
    assert wide.pad_token_id >= VOCAB
    wide.save_pretrained(path)
    code = main(["entropy", str(path), "--data", str(data_file), "--out", str(tmp_path / "out"), "--seq-len", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "IndexError" not in err
    assert "pad token" in err and str(VOCAB) in err and "--tokenizer" in err
    assert not (tmp_path / "out" / "entropy.json").exists()


def test_a_model_without_a_tokenizer_asks_for_tokenizer(tmp_path, tokenizer, data_file, capsys):
    bare = tmp_path / "bare"
    tiny_model("llama", seed=1).save_pretrained(bare)  # weights and config, no tokenizer files
    out = tmp_path / "out"
    code = main(["entropy", str(bare), "--data", str(data_file), "--out", str(out), "--seq-len", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "sentencepiece" not in err.lower()
    said = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "model shards" not in line]
    assert len(said) == 1 and said[0].startswith("kacq entropy: error:") and "--tokenizer" in said[0]
    # --tokenizer names one: the same numbers as a folder that holds it
    tokenizer.save_pretrained(tmp_path / "tok")
    assert main(["entropy", str(bare), "--tokenizer", str(tmp_path / "tok"), "--data", str(data_file),
                 "--out", str(out), "--batch-size", "2", "--seq-len", "16"]) == 0
    saved = json.loads((out / "entropy.json").read_text())
    assert saved["settings"]["tokenizer"] == str(tmp_path / "tok")
    expected = library_entropy(save_checkpoint(tmp_path / "full", tokenizer, seed=1), DOCS, 2, 16)
    assert saved["checkpoints"][0]["total"] == pytest.approx(expected.total, rel=1e-9)
