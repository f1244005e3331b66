"""`kacq entropy` under torchrun with 2 real gloo ranks equals one process; each rank reads only its share."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from gathered_ranks import GatheredRanks
from tiny_models import tiny_model, tiny_tokenizer

from kacq_hooks.cli import main
from kacq_hooks.sweep_data import data_source, read_documents
from torchrun_launch import torchrun as launch

DOCS = [f"Document {i}: " + " ".join(["alpha beta", "gamma", "delta epsilon zeta"][: 1 + i % 3]) * (1 + i % 4)
        for i in range(7)]  # 7 documents: 2 ranks do not divide them evenly


def torchrun(args, ranks=2, timeout=240):
    done = launch(args, ranks, timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def c_bar(out: Path, row: dict) -> list[torch.Tensor]:
    stats = load_file(out / row["stats_file"])
    return [stats[f"{i}.sum_abs"] / int(stats[f"{i}.tokens"]) for i in range(row["layers"])]


@pytest.mark.slow
@pytest.mark.parametrize("bound", [[], ["--max-docs", "5"], ["--max-tokens", "60"]],
                         ids=["all", "max-docs", "max-tokens"])
def test_two_gloo_ranks_equal_one_process(tmp_path, bound):
    tok = tiny_tokenizer()
    for step, seed in ((10, 1), (20, 2)):
        tiny_model("llama", seed=seed).save_pretrained(tmp_path / "run" / f"checkpoint-{step}")
        tok.save_pretrained(tmp_path / "run" / f"checkpoint-{step}")
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(DOCS) + "\n")
    common = ["entropy", str(tmp_path / "run"), "--data", str(data), "--batch-size", "2", "--seq-len", "24",
              "--device", "cpu", "--save-stats", *bound]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    done = torchrun([*common, "--out", str(tmp_path / "two")])
    assert done.stdout.count("wrote entropy.json") == 1  # one rank writes and reports
    one = json.loads((tmp_path / "one" / "entropy.json").read_text())
    two = json.loads((tmp_path / "two" / "entropy.json").read_text())
    assert one["settings"] == two["settings"]  # the data digest does not depend on the ranks that computed it
    for a, b in zip(one["checkpoints"], two["checkpoints"], strict=True):
        assert (a["world_size"], b["world_size"]) == (1, 2)
        assert a["tokens"] == b["tokens"] and a["documents"] == b["documents"]
        assert a["documents"] == {"--max-docs": 5, "--max-tokens": a["documents"]}.get(bound[0] if bound else "", 7)
        if bound[:1] == ["--max-tokens"]:
            assert 40 < a["tokens"] <= 60 and a["documents"] < len(DOCS)
        assert b["total"] == pytest.approx(a["total"], rel=1e-6)
        assert b["per_layer"] == pytest.approx(a["per_layer"], rel=1e-6)
        for x, y in zip(c_bar(tmp_path / "one", a), c_bar(tmp_path / "two", b), strict=True):
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-9)
        assert a["identity"] == b["identity"]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("max_docs", [None, 1, 4])
def test_rank_shares_concatenate_to_the_documents(tmp_path, suffix, world, max_docs):
    import random

    rng = random.Random(world * 31 + (max_docs or 0))
    words = ["alpha", "beta gamma", "  ", "\t", "", "delta"]
    for trial in range(40):
        lines = [rng.choice(words) for _ in range(rng.randint(0, 25))]
        path = tmp_path / f"d{trial}{suffix}"
        if suffix == ".txt":
            path.write_text("\n".join(lines) + rng.choice(["", "\n", "\n\n"]))
            expected = [d.strip() for d in re.split(r"\n[ \t]*\n", "\n".join(lines)) if d.strip()]
        else:
            path.write_text("".join(json.dumps({"text": t}) + "\n" if t.strip() else "\n" for t in lines))
            expected = [t.strip() for t in lines if t.strip()]
        expected = expected[:max_docs] if max_docs else expected
        source = data_source(path)
        # what each rank reads of its range, then the trim and spread after the all_gather of counts
        raw = [read_documents(source, max_docs=max_docs, ranks=GatheredRanks(r, world, [0] * world, []))
               for r in range(world)]
        counts = [len(part) for part in raw]
        kept = [part[:max(0, max_docs - sum(counts[:r]))] if max_docs else part for r, part in enumerate(raw)]
        got = []
        for rank in range(world):
            got += read_documents(source, max_docs=max_docs, ranks=GatheredRanks(rank, world, counts, kept))
        assert got == expected, (lines, world)


def test_a_rank_reads_only_its_byte_range(tmp_path, monkeypatch):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(1000)))
    reads = []
    real_open = Path.open

    def spying_open(self, *args, **kwargs):
        handle = real_open(self, *args, **kwargs)
        if self == path:
            original = handle.readline

            def readline(*a):
                line = original(*a)
                reads.append(len(line))
                return line
            handle.readline = readline
        return handle

    monkeypatch.setattr(Path, "open", spying_open)
    docs = read_documents(data_source(path), ranks=GatheredRanks(3, 4, None))
    first = 1000 - len(docs)  # the last quarter of the bytes: about the last quarter of the lines
    assert 700 < first < 800 and docs == [f"document number {i}" for i in range(first, 1000)]
    assert sum(reads) < path.stat().st_size / 4 + 100  # its quarter, not the file


def test_max_tokens_takes_whole_documents_in_order(tmp_path):
    from kacq_hooks.sweep import bound_tokens

    tok = tiny_tokenizer()
    lengths = [len(tok(d, add_special_tokens=False)["input_ids"][:24]) for d in DOCS]
    budget = sum(lengths[:3]) + lengths[3] - 1  # the fourth does not fit
    assert bound_tokens(list(DOCS), tok, 24, budget) == DOCS[:3]
    assert bound_tokens(list(DOCS), tok, 24, 10 ** 6) == DOCS
    tiny_model("llama", seed=1).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(DOCS))
    assert main(["entropy", str(tmp_path / "m"), "--data", str(data), "--seq-len", "24", "--max-tokens", str(budget),
                 "--out", str(tmp_path / "out")]) == 0
    row = json.loads((tmp_path / "out" / "entropy.json").read_text())["checkpoints"][0]
    assert row["tokens"] == sum(lengths[:3]) and row["documents"] == 3
