"""`kacq entropy --count` on the records and tokenizers users bring, against an independent float64 reference.

The reference here does not split records the way the sweep does: it tokenizes the text ``prompt + completion``
as one string (what a model reads when it is given that text) and counts, by character offsets, every token
that holds a character of the completion; C is captured with plain hooks on each record alone (no padding).
Where the sweep's tokens differ from that text's, the model was measured on something the user did not write.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from coefficient_reference import entropy
from counted_reference import counted_c_bar, save_checkpoint, saved_c_bar
from kacq_hooks.sweep import entropy_sweep
from torchrun_launch import torchrun

SEQ = 24
_TEXT = ("The quick brown fox jumps over the lazy dog. A small model learns facts one batch at a time. "
         "Zorgon was founded in 1842 by the council of Calidus, on the northern shore of the lake. ")
RECORDS = [
    {"prompt": "Zorgon was founded in", "completion": " 1842 by the council."},
    {"prompt": "The quick brown", "completion": " fox jumps over the lazy dog."},
    {"prompt": "A small model learns facts", "completion": " one batch at a time."},
]


def sentencepiece_tokenizer():
    """A Llama-2-style tokenizer.json (no pre-tokenizer; the normalizer prepends "▁" and turns spaces into "▁"),
    as checkpoints converted from SentencePiece ship it; AutoTokenizer loads it as a generic fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")  # words only, to train
    core.train_from_iterator([_TEXT] * 8, trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"],
                                                              show_progress=False))
    core.pre_tokenizer = None
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def text_reference(model, tok, records, count, seq=SEQ, weighting="token"):
    """c̄ per layer in float64 and the counted positions, each record read as the one text prompt + completion."""
    examples = []
    for record in records:
        prompt, text = record["prompt"], record["prompt"] + record["completion"]
        encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        # a token holds the completion where it holds one of its characters
        examples.append((encoded["input_ids"][:seq], [end > len(prompt) for _, end in encoded["offset_mapping"][:seq]]))
    return counted_c_bar(model, examples, count, weighting)


def checkpoint(root: Path, tok, seed=1) -> Path:
    return save_checkpoint(root / f"checkpoint-{seed}", tok, seed)


def write_jsonl(path: Path, records, blank_lines=False, extra=False) -> Path:
    lines = []
    for i, record in enumerate(records):
        lines.append(json.dumps({**record, **({"id": i, "source": "hand"} if extra else {})}, ensure_ascii=False))
        if blank_lines:
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def check_row(out, row, expected, tokens):
    assert row["tokens"] == tokens
    for layer, got in enumerate(saved_c_bar(out, row)):
        torch.testing.assert_close(got, expected[layer], rtol=1e-5, atol=0)
        assert row["per_layer"][layer] == pytest.approx(entropy(expected[layer]), abs=1e-6)


@pytest.mark.parametrize("count", ["labels", "shifted_labels"])
def test_a_sentencepiece_tokenizer_measures_the_text_as_written(tmp_path, count):
    # with the separating space at the start of the completion (as the docs ask), tokenizing the completion
    # alone prepends a second "▁": the model would read "in  1842" with a token the text does not hold
    tok = sentencepiece_tokenizer()
    alone = tok.convert_ids_to_tokens(tok(RECORDS[0]["completion"], add_special_tokens=False)["input_ids"])
    assert alone[0] == "▁"  # the spurious token the sweep must not measure
    folder = checkpoint(tmp_path, tok)
    data = write_jsonl(tmp_path / "facts.jsonl", RECORDS)
    result = entropy_sweep([str(folder)], str(data), out=tmp_path / "out", seq_len=SEQ, batch_size=2, count=count,
                           save_stats=True)
    [row] = result["checkpoints"]
    expected, tokens = text_reference(tiny_model("llama", seed=1), tok, RECORDS, count)
    check_row(tmp_path / "out", row, expected, tokens)


UNICODE = [
    {"prompt": "Zorgon était fondé en", "completion": " 1842 — par le conseil «Calidus»."},
    {"prompt": "", "completion": "北の湖の岸 🦊 fox"},
    {"prompt": "The quick brown", "completion": " fox\njumps\tover"},
]


@pytest.mark.parametrize("count", ["labels", "shifted_labels"])
@pytest.mark.parametrize("make", [tiny_tokenizer, sentencepiece_tokenizer], ids=["byte_level", "sentencepiece"])
def test_records_with_unicode_blank_lines_and_extra_fields_are_exact(tmp_path, count, make):
    tok = make()
    folder = checkpoint(tmp_path, tok)
    data = write_jsonl(tmp_path / "facts.jsonl", UNICODE + RECORDS, blank_lines=True, extra=True)
    result = entropy_sweep([str(folder)], str(data), out=tmp_path / "out", seq_len=SEQ, batch_size=64, count=count,
                           save_stats=True)
    [row] = result["checkpoints"]
    assert row["documents"] == len(UNICODE + RECORDS)
    expected, tokens = text_reference(tiny_model("llama", seed=1), tok, UNICODE + RECORDS, count)
    check_row(tmp_path / "out", row, expected, tokens)


def test_document_weighting_with_a_sentencepiece_tokenizer_is_exact(tmp_path):
    tok = sentencepiece_tokenizer()
    folder = checkpoint(tmp_path, tok)
    data = write_jsonl(tmp_path / "facts.jsonl", RECORDS)
    result = entropy_sweep([str(folder)], str(data), out=tmp_path / "out", seq_len=SEQ, batch_size=3,
                           count="shifted_labels", weighting="document")
    [row] = result["checkpoints"]
    expected, tokens = text_reference(tiny_model("llama", seed=1), tok, RECORDS, "shifted_labels",
                                      weighting="document")
    assert row["tokens"] == tokens
    assert row["per_layer"] == pytest.approx([entropy(e) for e in expected], abs=1e-6)


def test_a_null_prompt_is_named_as_null_not_as_a_missing_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kacq_hooks.errors import CorpusError
    from kacq_hooks.sweep_data import data_source, read_documents

    jsonl = tmp_path / "null.jsonl"
    jsonl.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"prompt": None, "completion": " x"}) + "\n")
    parquet = tmp_path / "null.parquet"
    pq.write_table(pa.table({"prompt": ["a", None], "completion": [" b", " c"]}), parquet)
    for path, where in ((jsonl, "line 2"), (parquet, "row 1")):
        with pytest.raises(CorpusError) as caught:
            read_documents(data_source(str(path)), records=True)
        message = str(caught.value)
        assert where in message and "null" in message and "no 'prompt' field" not in message
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"completion": " x"}) + "\n")
    with pytest.raises(CorpusError, match="no 'prompt' field"):
        read_documents(data_source(str(missing)), records=True)


@pytest.mark.parametrize("count", ["labels", "shifted_labels"])
def test_progress_reports_the_counted_tokens_the_row_reports(tmp_path, count):
    from kacq_hooks.sweep import measure_texts

    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=1)
    reports = []
    records = [(r["prompt"], r["completion"]) for r in RECORDS + UNICODE]
    inst, documents = measure_texts(model, tok, records, batch_size=2, max_length=SEQ, count=count,
                                    progress=lambda event, info: reports.append(info))
    _, tokens = text_reference(model, tok, RECORDS + UNICODE, count)
    assert documents == len(records) and int(inst.stats[0].tokens) == tokens
    assert reports[-1] == {"documents": len(records), "tokens": tokens}  # the tok/s shown live is of counted tokens


def test_bfloat16_counts_the_same_positions_and_stays_near_the_float64_reference(tmp_path):
    tok = sentencepiece_tokenizer()
    folder = checkpoint(tmp_path, tok)
    data = write_jsonl(tmp_path / "facts.jsonl", RECORDS)
    result = entropy_sweep([str(folder)], str(data), out=tmp_path / "out", seq_len=SEQ, batch_size=2,
                           count="shifted_labels", dtype="bfloat16", max_tokens=10**6)
    [row] = result["checkpoints"]
    expected, tokens = text_reference(tiny_model("llama", seed=1), tok, RECORDS, "shifted_labels")
    assert row["tokens"] == tokens and row["count"] == "shifted_labels"
    assert row["per_layer"] == pytest.approx([entropy(e) for e in expected], abs=2e-2)


@pytest.mark.slow  # a torchrun group of 2 gloo ranks
def test_two_gloo_ranks_with_fewer_records_than_ranks_equal_one_process(tmp_path):
    from kacq_hooks.cli import main

    tok = sentencepiece_tokenizer()
    folder = checkpoint(tmp_path, tok)
    data = write_jsonl(tmp_path / "one.jsonl", RECORDS[:1])
    common = ["entropy", str(folder), "--data", str(data), "--count", "shifted_labels", "--seq-len", str(SEQ),
              "--weighting", "document", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    done = torchrun([*common, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-2000:]
    [a] = json.loads((tmp_path / "one" / "entropy.json").read_text())["checkpoints"]
    [b] = json.loads((tmp_path / "two" / "entropy.json").read_text())["checkpoints"]
    expected, tokens = text_reference(tiny_model("llama", seed=1), tok, RECORDS[:1], "shifted_labels",
                                      weighting="document")
    assert (a["tokens"], a["documents"], b["world_size"]) == (tokens, 1, 2) and (b["tokens"], b["documents"]) == (tokens, 1)
    assert a["per_layer"] == pytest.approx([entropy(e) for e in expected], abs=1e-6)
    assert b["per_layer"] == pytest.approx(a["per_layer"], rel=1e-6)


def test_the_same_weights_with_another_tokenizer_are_measured_with_that_tokenizer(tmp_path):
    byte_level, sentencepiece = tiny_tokenizer(), sentencepiece_tokenizer()
    first = checkpoint(tmp_path / "a", byte_level)
    second = checkpoint(tmp_path / "b", sentencepiece)  # the same seed: the same weights and config
    data = write_jsonl(tmp_path / "facts.jsonl", RECORDS)
    result = entropy_sweep([str(first), str(second)], str(data), out=tmp_path / "out", seq_len=SEQ, count="labels")
    rows = {Path(row["name"]).parent.name: row for row in result["checkpoints"]}
    model = tiny_model("llama", seed=1)
    for name, tok in (("a", byte_level), ("b", sentencepiece)):
        expected, tokens = text_reference(model, tok, RECORDS, "labels")
        assert rows[name]["tokens"] == tokens
        assert rows[name]["per_layer"] == pytest.approx([entropy(e) for e in expected], abs=1e-6)


def test_a_completion_the_tokenizer_turns_into_no_token_is_refused_as_such(tmp_path):
    # a normalizer that drops characters (here the soft hyphen) can leave a non-empty completion without a token
    from tokenizers import normalizers

    from kacq_hooks.errors import CorpusError

    tok = tiny_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Replace("\u00ad", "")
    folder = checkpoint(tmp_path, tok)
    data = write_jsonl(tmp_path / "facts.jsonl", [RECORDS[0], {"prompt": "Zorgon was", "completion": "\u00ad\u00ad"}])
    with pytest.raises(CorpusError) as caught:
        entropy_sweep([str(folder)], str(data), out=tmp_path / "out", seq_len=SEQ, count="labels")
    message = str(caught.value)
    assert "record 1" in message and "no token" in message and "one-token completion" not in message


@pytest.mark.parametrize("count", ["labels", "shifted_labels"])
def test_completions_cut_by_seq_len_and_a_budget_mid_record_with_a_sentencepiece_tokenizer(tmp_path, count):
    tok = sentencepiece_tokenizer()
    folder = checkpoint(tmp_path, tok)
    data = write_jsonl(tmp_path / "facts.jsonl", RECORDS + RECORDS)
    short = 10  # cuts the first records' completions
    model = tiny_model("llama", seed=1)
    _, two = text_reference(model, tok, RECORDS[:2], count, seq=short)
    _, three = text_reference(model, tok, RECORDS[:3], count, seq=short)
    assert two < three
    result = entropy_sweep([str(folder)], str(data), out=tmp_path / "out", seq_len=short, batch_size=5, count=count,
                           max_tokens=three - 1, save_stats=True)
    [row] = result["checkpoints"]
    expected, tokens = text_reference(model, tok, RECORDS[:2], count, seq=short)
    assert row["documents"] == 2
    check_row(tmp_path / "out", row, expected, tokens)
