"""kacq bench: plain against instrumented passes on a tiny preset, as a table and JSON."""
from __future__ import annotations

import json

import pytest

from kacq_hooks import bench, cli
from kacq_hooks.errors import KacqError


def test_kacq_bench_on_a_tiny_preset_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--config", "llama-tiny", "--device", "cpu", "--repeats", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kacq instrument(grads=True)" in printed and "vs plain" in printed
    result = json.loads(out.read_text())
    assert set(result["forward"]) == {"plain", "kacq instrument"}
    assert set(result["training"]) == {"plain", "kacq instrument(grads=True)"}
    assert result["forward"]["plain"]["ratio"] == 1.0
    for row in (*result["forward"].values(), *result["training"].values()):
        assert row["ms"] > 0 and row["peak_mib"] > 0 and row["spread"][0] <= row["ratio"] <= row["spread"][1]


def test_kacq_bench_of_a_saved_model_folder_with_frontends(tmp_path, capsys):
    model, _, _ = bench.build_preset("gpt2-tiny")
    model.save_pretrained(tmp_path / "model")
    pytest.importorskip("transformer_lens")
    pytest.importorskip("nnsight")
    code = cli.main(["bench", str(tmp_path / "model"), "--device", "cpu", "--batch-size", "2", "--seq-len", "16",
                     "--repeats", "1", "--no-training", "--frontends", "--json", str(tmp_path / "b.json")])
    assert code == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["skipped"] == {}
    assert {"TransformerLens run_with_cache", "nnsight trace (saves C)"} <= set(result["forward"])
    assert "training" not in result


def test_kacq_bench_refuses_unclear_requests(tmp_path, capsys):
    assert cli.main(["bench", "--device", "cpu"]) == 2
    assert "either MODEL" in capsys.readouterr().err
    assert cli.main(["bench", str(tmp_path / "nothing"), "--device", "cpu"]) == 2
    with pytest.raises(KacqError, match="--device cuda"):
        bench.build_preset("olmo-1b-shape", "cpu")


def test_the_benchmark_scripts_use_the_library_harness():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import _harness

    assert _harness.time_samples is bench.time_samples and _harness.peak_during is bench.peak_during
