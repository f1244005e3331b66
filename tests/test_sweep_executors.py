"""One task per checkpoint on subprocesses, Ray and submitit: the same numbers as a serial sweep, faults as rows."""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny_models import tiny_model, tiny_tokenizer

from kacq_hooks.errors import ConfigError, KacqError, MissingExtraError
from kacq_hooks.sweep import entropy_sweep
from kacq_hooks.sweep_exec import sbatch_script

SRC = str(Path(__file__).resolve().parents[1] / "src")
DOCS = ["The quick brown fox jumps over the lazy dog.", "Zorgon was founded in 1842 by the council of Calidus.",
        "Knowledge entropy measures how evenly the feed-forward memories are used.", "Short one.", "And a fifth."]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Three checkpoints of a run and their serial sweep, the reference every executor must equal."""
    root = tmp_path_factory.mktemp("series")
    tok = tiny_tokenizer()
    for step, seed in ((1, 1), (2, 2), (3, 3)):
        tiny_model("llama", seed=seed).save_pretrained(root / "run" / f"checkpoint-{step}")
        tok.save_pretrained(root / "run" / f"checkpoint-{step}")
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    serial = sweep(root, root / "serial")
    return root, serial


@pytest.fixture(autouse=True)
def child_path(monkeypatch):
    """Subprocess tasks import this worktree's kacq_hooks, one thread each."""
    monkeypatch.setenv("PYTHONPATH", SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def sweep(root, out, **kwargs):
    return entropy_sweep([str(root / "run")], str(root / "calib.jsonl"), out=out, batch_size=2, seq_len=16, **kwargs)


def same_numbers(result, serial):
    assert [r["name"] for r in result["checkpoints"]] == [r["name"] for r in serial["checkpoints"]]
    for a, b in zip(result["checkpoints"], serial["checkpoints"]):
        assert a["tokens"] == b["tokens"] and a["identity"] == b["identity"]
        assert a["total"] == pytest.approx(b["total"], rel=1e-9)
        assert a["per_layer"] == pytest.approx(b["per_layer"], rel=1e-9)


@pytest.mark.slow  # subprocesses each import torch and transformers
def test_local_executor_equals_serial_and_resumes(series, tmp_path):
    root, serial = series
    result = sweep(root, tmp_path / "out", executor="local", jobs=2)
    same_numbers(result, serial)
    assert (tmp_path / "out" / "entropy.png").stat().st_size > 0
    csv_rows = (tmp_path / "out" / "entropy.csv").read_text().splitlines()
    assert csv_rows[1:] and len(csv_rows) == 4
    seen = []
    again = sweep(root, tmp_path / "out", executor="local", jobs=2, progress=lambda e, i: seen.append(e))
    assert again["checkpoints"] == result["checkpoints"] and "task" not in seen and seen.count("skip") == 3


@pytest.mark.slow  # subprocesses each import torch and transformers
def test_a_task_killed_mid_checkpoint_is_an_error_row(series, tmp_path):
    psutil = pytest.importorskip("psutil")
    root, serial = series
    killed = []

    def kill_the_second_task():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for child in psutil.Process().children(recursive=True):
                try:
                    if any("checkpoint-2.spec.json" in part for part in child.cmdline()):
                        time.sleep(0.5)  # let it start measuring
                        child.kill()
                        killed.append(child.pid)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_second_task)
    killer.start()
    result = sweep(root, tmp_path / "out", executor="local", jobs=1)
    killer.join()
    assert killed
    assert [r["name"] for r in result["checkpoints"]] == [str(root / "run" / f"checkpoint-{s}") for s in (1, 3)]
    (error,) = result["errors"]
    assert error["name"].endswith("checkpoint-2") and "SIGKILL" in error["error"]
    # resumed: only the killed checkpoint is measured, and the sweep equals the serial one
    same_numbers(sweep(root, tmp_path / "out", executor="local", jobs=1), serial)


@pytest.mark.slow
def test_ray_executor_equals_serial(series, tmp_path):
    ray = pytest.importorskip("ray")
    root, serial = series
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"],
                                                                            "OMP_NUM_THREADS": "1"}})
    try:
        same_numbers(sweep(root, tmp_path / "out", executor="ray", jobs=2), serial)
    finally:
        ray.shutdown()


@pytest.mark.slow  # subprocesses each import torch and transformers
def test_submitit_local_executor_equals_serial(series, tmp_path):
    pytest.importorskip("submitit")
    root, serial = series
    same_numbers(sweep(root, tmp_path / "out", executor="submitit-local", jobs=2), serial)


@pytest.mark.parametrize("executor, package, extra", [("ray", "ray", "ray"), ("slurm", "submitit", "slurm")])
def test_a_missing_engine_is_one_line_naming_the_extra(series, tmp_path, monkeypatch, executor, package, extra):
    root, _ = series
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    with pytest.raises(MissingExtraError) as caught:
        sweep(root, tmp_path / "out", executor=executor)
    message = str(caught.value)
    assert "\n" not in message and f"kacq_hooks[{extra}]" in message
    assert not (tmp_path / "out").exists()  # refused before any work


def test_slurm_without_sbatch_is_refused(series, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    root, _ = series
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(ConfigError, match="sbatch"):
        sweep(root, tmp_path / "out", executor="slurm")


def test_an_unreachable_ray_address_is_refused(series, tmp_path):
    pytest.importorskip("ray")
    root, _ = series
    started = time.monotonic()
    with pytest.raises(KacqError, match="cannot reach the Ray cluster at 127.0.0.1:9"):
        sweep(root, tmp_path / "out", executor="ray", ray_address="127.0.0.1:9")
    assert time.monotonic() - started < 30


def test_the_sbatch_script(tmp_path):
    pytest.importorskip("submitit")
    script = sbatch_script(tmp_path, {"partition": "gpu", "timeout_min": 90, "gpus_per_node": 1, "mem_gb": 64},
                           jobs=4, task_ranks=2)
    lines = script.splitlines()
    assert lines[0].startswith("#!/bin/bash")
    for expected in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --ntasks-per-node=2",
                     "#SBATCH --gpus-per-node=1", "#SBATCH --mem=64GB", "#SBATCH --job-name=kacq-entropy"):
        assert expected in lines, (expected, script)
    assert any(line.startswith("srun") and "submitit.core._submit" in line for line in lines)


@pytest.mark.slow  # a torchrun group of 2 ranks per task
def test_a_task_can_itself_be_a_torchrun_job(series, tmp_path):
    root, serial = series
    result = sweep(root, tmp_path / "out", executor="local", jobs=1, task_ranks=2)
    assert [r["world_size"] for r in result["checkpoints"]] == [2, 2, 2]
    for a, b in zip(result["checkpoints"], serial["checkpoints"]):
        assert a["tokens"] == b["tokens"] and a["total"] == pytest.approx(b["total"], rel=1e-6)
