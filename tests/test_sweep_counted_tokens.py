"""`kacq entropy --count`: a sweep over {prompt, completion} records measures only the completions.

"labels" counts the positions holding the completion's tokens, "shifted_labels" the positions predicting them
(the last prompt token through the second-to-last completion token). Checked through the real CLI against a
float64 reference that tokenizes, cuts and selects positions by hand, runs each record alone (no padding), and
averages |C| over the selected positions; then --max-tokens, document weighting, resume and the refusals.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import forbid_loading, tiny_model, tiny_tokenizer

from coefficient_reference import entropy
from counted_reference import counted_c_bar, save_checkpoint, saved_c_bar
from kacq_hooks.cli import main
from kacq_hooks.errors import ConfigError, CorpusError
from kacq_hooks.sweep import entropy_sweep
from torchrun_launch import torchrun

SRC = str(Path(__file__).resolve().parents[1] / "src")
SEQ = 20
RECORDS = [
    {"prompt": "Zorgon was founded in", "completion": " 1842 by the council."},
    {"prompt": "", "completion": "The quick brown fox"},  # no context: shifted_labels cannot count its first token
    {"prompt": "Knowledge entropy measures", "completion": " how evenly the feed-forward memories are used."},  # cut
    {"prompt": "The council of", "completion": " Calidus"},
    {"prompt": "A small model learns", "completion": " facts one batch at a time."},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("counted")
    tok = tiny_tokenizer()
    for step, seed in ((1, 1), (2, 2)):
        save_checkpoint(root / "run" / f"checkpoint-{step}", tok, seed)
    data = root / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root, data, tok


def reference(folder, tok, records, count, weighting="token"):
    """c̄ per layer in float64: each record alone, prompt and completion tokenized apart and cut by hand."""
    model = tiny_model("llama", seed=int(Path(folder).name.split("-")[1]))
    examples = []
    for record in records:
        prompt = tok(record["prompt"], add_special_tokens=False)["input_ids"] if record["prompt"] else []
        completion = tok(record["completion"], add_special_tokens=False)["input_ids"]
        ids = (prompt + completion)[:SEQ]
        examples.append((ids, [False] * min(len(prompt), SEQ) + [True] * (len(ids) - min(len(prompt), SEQ))))
    return counted_c_bar(model, examples, count, weighting)


@pytest.mark.parametrize("count", ["labels", "shifted_labels"])
def test_the_cli_measures_exactly_the_counted_positions_of_each_record(run, tmp_path, count):
    root, data, tok = run
    out = tmp_path / "out"
    assert main(["entropy", str(root / "run"), "--data", str(data), "--count", count, "--seq-len", str(SEQ),
                 "--batch-size", "2", "--device", "cpu", "--save-stats", "--out", str(out)]) == 0
    saved = json.loads((out / "entropy.json").read_text())
    assert saved["settings"]["count"] == count
    assert len(saved["checkpoints"]) == 2
    for row in saved["checkpoints"]:
        expected, tokens = reference(row["name"], tok, RECORDS, count)
        assert row["count"] == count and row["tokens"] == tokens and row["documents"] == len(RECORDS)
        for layer, got in enumerate(saved_c_bar(out, row)):
            torch.testing.assert_close(got, expected[layer], rtol=1e-5, atol=0)
            assert row["per_layer"][layer] == pytest.approx(entropy(expected[layer]), abs=1e-6)
    header, first = (out / "entropy.csv").read_text().splitlines()[:2]
    assert header.split(",")[-1] == "counted" and first.endswith(f"(--count {count})")


def test_document_weighting_weighs_each_record_by_its_counted_positions(run, tmp_path):
    root, data, tok = run
    result = entropy_sweep([str(root / "run" / "checkpoint-1")], str(data), out=tmp_path / "out", seq_len=SEQ,
                           batch_size=3, count="shifted_labels", weighting="document")
    [row] = result["checkpoints"]
    expected, tokens = reference(row["name"], tok, RECORDS, "shifted_labels", weighting="document")
    assert row["tokens"] == tokens and row["documents"] == len(RECORDS)
    assert row["per_layer"] == pytest.approx([entropy(e) for e in expected], abs=1e-6)


def test_max_tokens_bounds_the_counted_tokens_with_whole_records(run, tmp_path):
    root, data, tok = run
    _, first_two = reference(str(root / "run" / "checkpoint-1"), tok, RECORDS[:2], "labels")
    _, first_three = reference(str(root / "run" / "checkpoint-1"), tok, RECORDS[:3], "labels")
    assert first_two < first_three  # the budget falls inside the third record
    result = entropy_sweep([str(root / "run" / "checkpoint-1")], str(data), out=tmp_path / "out", seq_len=SEQ,
                           count="labels", max_tokens=first_three - 1, save_stats=True)
    [row] = result["checkpoints"]
    expected, _ = reference(row["name"], tok, RECORDS[:2], "labels")
    assert row["tokens"] == first_two and row["documents"] == 2
    assert row["per_layer"] == pytest.approx([entropy(e) for e in expected], abs=1e-6)
    small = entropy_sweep([str(root / "run" / "checkpoint-1")], str(data), out=tmp_path / "small", seq_len=SEQ,
                          count="labels", max_tokens=1)
    assert not small["checkpoints"] and "counted tokens (--count labels)" in small["errors"][0]["error"]


def test_a_result_measured_with_another_count_is_never_reused(run, tmp_path, monkeypatch):
    root, data, _ = run
    checkpoint = str(root / "run" / "checkpoint-1")
    out = tmp_path / "out"
    counted = entropy_sweep([checkpoint], str(data), out=out, seq_len=SEQ, count="labels")
    for other in ("shifted_labels", None):  # another selection, or every token: refused before any work
        with pytest.raises(ConfigError, match="other settings"):
            entropy_sweep([checkpoint], str(data), out=out, seq_len=SEQ, count=other)
    # a finished result in OUT/results (its driver stopped before entropy.json) is not adopted under another count
    fresh = tmp_path / "fresh"
    shutil.copytree(out / "results", fresh / "results")
    with pytest.raises(ConfigError, match="other settings"):
        entropy_sweep([checkpoint], str(data), out=fresh, seq_len=SEQ, count="shifted_labels")
    # the same count resumes without loading the checkpoint again
    forbid_loading(monkeypatch, checkpoint)
    again = entropy_sweep([checkpoint], str(data), out=out, seq_len=SEQ, count="labels")
    assert again["checkpoints"] == counted["checkpoints"]


def test_a_sweep_written_before_count_existed_resumes_as_counting_every_token(run, tmp_path, monkeypatch):
    root, _, _ = run
    checkpoint = str(root / "run" / "checkpoint-1")
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": r["prompt"] + r["completion"]}) + "\n" for r in RECORDS))
    out = tmp_path / "out"
    first = entropy_sweep([checkpoint], str(text), out=out, seq_len=SEQ)
    for path in [out / "entropy.json", *(out / "results").glob("*.json")]:  # as written before --count
        saved = json.loads(path.read_text())
        del saved["settings"]["count"]
        path.write_text(json.dumps(saved))
    forbid_loading(monkeypatch, checkpoint)
    again = entropy_sweep([checkpoint], str(text), out=out, seq_len=SEQ)
    assert [r["total"] for r in again["checkpoints"]] == [r["total"] for r in first["checkpoints"]]
    with pytest.raises(ConfigError, match="other settings"):
        entropy_sweep([checkpoint], str(text), out=out, seq_len=SEQ, count="labels")


def test_bad_records_are_refused_before_any_weights_load(run, tmp_path, monkeypatch):
    root, data, _ = run
    checkpoint = str(root / "run" / "checkpoint-1")
    forbid_loading(monkeypatch, checkpoint)
    plain = tmp_path / "plain.txt"
    plain.write_text("one document\n\nanother\n")
    with pytest.raises(CorpusError, match="plain text with no completions"):
        entropy_sweep([checkpoint], str(plain), out=tmp_path / "a", count="labels")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"prompt": "Zorgon", "text": "x"}) + "\n")
    with pytest.raises(CorpusError, match=r"missing.jsonl, line 2: the record has no 'completion' field"):
        entropy_sweep([checkpoint], str(missing), out=tmp_path / "b", count="labels")
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "a document"}) + "\n")
    with pytest.raises(CorpusError, match="no 'prompt' and no 'completion' field"):
        entropy_sweep([checkpoint], str(text), out=tmp_path / "c", count="labels")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "Zorgon", "completion": "  "}) + "\n")
    with pytest.raises(CorpusError, match="the completion is empty"):
        entropy_sweep([checkpoint], str(empty), out=tmp_path / "d", count="labels")
    # the first record's prompt (11 tokens) fills 8 positions: the run is refused, naming the record
    with pytest.raises(CorpusError, match=r"record 0 .* its prompt fills all 8 positions"):
        entropy_sweep([checkpoint], str(data), out=tmp_path / "e", seq_len=8, count="labels")
    lone = tmp_path / "lone.jsonl"
    lone.write_text(json.dumps({"prompt": "", "completion": "The"}) + "\n")
    with pytest.raises(CorpusError, match="no prompt and a one-token completion"):
        entropy_sweep([checkpoint], str(lone), out=tmp_path / "f", count="shifted_labels")
    with pytest.raises(ConfigError, match="--count must be one of labels, shifted_labels"):
        entropy_sweep([checkpoint], str(data), out=tmp_path / "g", count="answers")
    # records without --count: the error says how to measure them
    with pytest.raises(CorpusError, match="pass --count"):
        entropy_sweep([checkpoint], str(data), out=tmp_path / "h")
    assert main(["entropy", checkpoint, "--data", str(plain), "--count", "labels", "--out", str(tmp_path / "i"),
                 "--device", "cpu"]) == 2


def test_records_are_read_and_checked_before_any_checkpoint_is_hashed(run, tmp_path, monkeypatch):
    from kacq_hooks.sweep_identity import IdentityCache

    root, _, _ = run
    monkeypatch.setattr(IdentityCache, "identity", lambda *a, **k: pytest.fail("a checkpoint was hashed"))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"prompt": "Zorgon"}) + "\n")
    with pytest.raises(CorpusError, match="no 'completion' field"):
        entropy_sweep([str(root / "run")], str(missing), out=tmp_path / "out", count="labels", executor="local")


def test_an_encoder_decoder_is_refused_before_its_weights_load(tmp_path, run, monkeypatch):
    from transformers import T5Config, T5ForConditionalGeneration

    from tiny_models import VOCAB

    _, data, tok = run
    folder = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=1, num_heads=4,
                                        d_kv=8)).save_pretrained(folder)
    tok.save_pretrained(folder)
    forbid_loading(monkeypatch, folder)
    with pytest.raises(ConfigError, match="encoder-decoder"):
        entropy_sweep([str(folder)], str(data), out=tmp_path / "out", seq_len=SEQ, count="labels")


def test_parquet_records_equal_jsonl_records(run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, data, _ = run
    table = pa.table({"prompt": [r["prompt"] for r in RECORDS], "completion": [r["completion"] for r in RECORDS]})
    pq.write_table(table, tmp_path / "facts.parquet", row_group_size=2)
    checkpoint = str(root / "run" / "checkpoint-1")
    a = entropy_sweep([checkpoint], str(data), out=tmp_path / "a", seq_len=SEQ, count="labels")
    b = entropy_sweep([checkpoint], str(tmp_path / "facts.parquet"), out=tmp_path / "b", seq_len=SEQ, count="labels")
    assert a["checkpoints"][0]["per_layer"] == pytest.approx(b["checkpoints"][0]["per_layer"], rel=1e-9)
    assert a["checkpoints"][0]["tokens"] == b["checkpoints"][0]["tokens"]
    holes = pa.table({"prompt": ["a", "b", "c"], "completion": [" x", " y", None]})
    pq.write_table(holes, tmp_path / "holes.parquet", row_group_size=2)
    with pytest.raises(CorpusError, match=r"holes.parquet, row group 1, row 0: the record has no 'completion'"):
        entropy_sweep([checkpoint], str(tmp_path / "holes.parquet"), out=tmp_path / "c", seq_len=SEQ, count="labels")
    pq.write_table(pa.table({"text": ["a document"]}), tmp_path / "text.parquet")
    with pytest.raises(CorpusError, match="no column 'prompt' and no 'completion'"):
        entropy_sweep([checkpoint], str(tmp_path / "text.parquet"), out=tmp_path / "d", seq_len=SEQ, count="labels")


@pytest.mark.slow  # subprocesses each import torch and transformers
def test_the_local_executor_equals_serial_with_count(run, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root, data, _ = run
    kwargs = dict(seq_len=SEQ, batch_size=2, count="shifted_labels", max_tokens=30)
    serial = entropy_sweep([str(root / "run")], str(data), out=tmp_path / "serial", **kwargs)
    local = entropy_sweep([str(root / "run")], str(data), out=tmp_path / "local", executor="local", jobs=2, **kwargs)
    assert not local["errors"]
    for a, b in zip(local["checkpoints"], serial["checkpoints"], strict=True):
        assert (a["name"], a["tokens"], a["documents"], a["count"]) == (b["name"], b["tokens"], b["documents"],
                                                                         "shifted_labels")
        assert a["per_layer"] == pytest.approx(b["per_layer"], rel=1e-9)


@pytest.mark.slow  # a torchrun group of 2 gloo ranks
def test_two_gloo_ranks_read_their_shares_of_the_records_and_equal_one_process(run, tmp_path):
    root, data, _ = run
    common = ["entropy", str(root / "run" / "checkpoint-2"), "--data", str(data), "--count", "labels", "--seq-len",
              str(SEQ), "--batch-size", "2", "--weighting", "document", "--max-tokens", "30", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert torchrun([*common, "--out", str(tmp_path / "two")]).returncode == 0
    one = json.loads((tmp_path / "one" / "entropy.json").read_text())
    two = json.loads((tmp_path / "two" / "entropy.json").read_text())
    assert one["settings"] == two["settings"]
    [a], [b] = one["checkpoints"], two["checkpoints"]
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert (a["tokens"], a["documents"]) == (b["tokens"], b["documents"]) and a["documents"] < len(RECORDS)
    assert b["per_layer"] == pytest.approx(a["per_layer"], rel=1e-6)
    # a record that leaves nothing counted is refused under torchrun too, by the rank that holds it
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in [*RECORDS, {"prompt": "Zorgon " * 30, "completion": " x"}]))
    done = torchrun(["entropy", str(root / "run" / "checkpoint-2"), "--data", str(bad), "--count", "labels",
                     "--seq-len", str(SEQ), "--device", "cpu", "--out", str(tmp_path / "bad")])
    assert done.returncode != 0 and not (tmp_path / "bad" / "entropy.json").exists()
    assert "record 5" in done.stderr and "fills all 20 positions" in done.stderr
