"""Trainer resume is exact: a run killed with SIGKILL between checkpoints and resumed in a new process logs the
same entropy at the same steps, injects the same facts at the same steps, and ends with the same statistics
as an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


def _run(out: Path, mode: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(TESTS / "trainer_child.py"), str(out), mode]
    if kill_at is not None:
        command.append(str(kill_at))
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    straight, interrupted = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("interrupted")
    done = _run(straight, "fresh")
    assert done.returncode == 0, done.stderr[-3000:]
    killed = _run(interrupted, "fresh", kill_at=7)  # after checkpoint-4, the injection at 5 and the report at 6
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in (interrupted / "run").iterdir()) == ["checkpoint-4"]
    assert (interrupted / "run" / "checkpoint-4" / "kacq_knowledge_entropy.pt").is_file()
    resumed = _run(interrupted, "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    load = lambda folder, mode: torch.load(folder / f"result-{mode}.pt", weights_only=True)  # noqa: E731
    return load(straight, "fresh"), load(interrupted, "resume")


def test_resumed_run_logs_the_same_entropy_at_the_same_steps(runs):
    straight, resumed = runs
    assert [step for step, _ in straight["history"]] == [3, 6] == [step for step, _ in resumed["history"]]
    for (_, a), (_, b) in zip(straight["history"], resumed["history"]):
        assert a["tokens"] == b["tokens"]  # the window across the checkpoint is whole, not its resumed part
        assert b["per_layer"] == pytest.approx(a["per_layer"], rel=1e-6)
    assert [e["step"] for e in straight["logged"]] == [3, 6] == [e["step"] for e in resumed["logged"]]
    assert set(straight["logged"][0]) == {"step", "knowledge_entropy/total", "knowledge_entropy/decoder.layer_0",
                                          "knowledge_entropy/decoder.layer_1"}
    for a, b in zip(straight["logged"], resumed["logged"]):
        assert b == pytest.approx(a, rel=1e-6)


def test_resumed_run_injects_the_same_facts_at_the_same_steps(runs):
    straight, resumed = runs
    assert straight["injected"] == {1: [0, 1], 5: [0]} == resumed["injected"]


def test_resumed_run_ends_with_the_same_statistics(runs):
    straight, resumed = runs
    assert set(straight["own"]) == set(resumed["own"])
    for key, value in straight["own"].items():
        if value.is_floating_point():
            torch.testing.assert_close(resumed["own"][key], value, rtol=1e-6, atol=1e-12, msg=key)
        else:
            assert torch.equal(resumed["own"][key], value), key  # token counts exact
    assert int(straight["own"]["0.grad_tokens"]) > 0  # gradient statistics were kept and restored too
    assert straight["facts_steps"] == resumed["facts_steps"] == [0, 2, 4, 6, 8]
    torch.testing.assert_close(resumed["facts_values"], straight["facts_values"], rtol=1e-6, atol=1e-6)
