"""A process group kacq_hooks starts under torchrun is gone before the interpreter shuts down.

Why it matters: a gloo worker thread releases a collective's tensors after the caller's ``wait`` has returned,
and that release takes the GIL. When it comes after the interpreter has begun to finalize, Python ends the
thread inside a C++ destructor and the rank aborts with "terminate called without an active exception"
(9 of 178 launches on a loaded 2-core machine). No gloo worker thread may be left at exit.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from tiny_models import tiny_model, tiny_tokenizer

from kacq_hooks import sweep
from kacq_hooks.sweep import Checkpoint, SweepSettings, entropy_sweep, run_task, task_spec
from torchrun_launch import torchrun

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the threads from /proc")

DOCS = ["alpha beta gamma delta", "epsilon zeta eta", "theta iota kappa lambda mu", "nu xi omicron"]

# Run MODULE as __main__ (or, for "entropy_sweep", the library call) and record, in the last atexit callback
# (the last thing before the interpreter finalizes), whether a group is still up and which threads are alive.
PROBE = '''
import atexit, json, os, runpy, sys
from pathlib import Path

folder, module = Path(sys.argv[1]), sys.argv[2]
sys.argv = [module, *sys.argv[3:]]


def at_exit():  # registered first, so it runs last
    import torch.distributed as dist
    threads = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    (folder / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"group": dist.is_initialized(),
                                                                      "threads": threads}))


atexit.register(at_exit)
if module == "entropy_sweep":
    from kacq_hooks.sweep import entropy_sweep
    entropy_sweep([sys.argv[1]], sys.argv[2], out=sys.argv[3], seq_len=16, batch_size=2)
else:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
'''


def checkpoint(folder: Path) -> Path:
    tiny_model("llama", seed=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def one_task(model: Path, data: Path, out: Path) -> dict:
    """The spec of one task, as the local executor writes it for ``python -m kacq_hooks.sweep_worker``."""
    return task_spec(Checkpoint("model", str(model)), SweepSettings(str(data), batch_size=2, seq_len=16),
                     data=str(data), out=out, device="cpu", identity=None, known={}, keep_cache=True)


def at_exit(tmp_path: Path, entry: list[str]) -> list[dict]:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    done = torchrun([str(tmp_path), *entry], entry=(str(probe),))
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow  # torchrun groups of 2 gloo ranks
@pytest.mark.parametrize("entry", ["cli", "sweep_worker", "entropy_sweep"])
def test_no_gloo_worker_is_alive_when_the_interpreter_shuts_down(tmp_path, entry):
    model = checkpoint(tmp_path / "model")
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(DOCS) + "\n")
    out = tmp_path / "out"
    if entry == "cli":
        args = ["kacq_hooks.cli", "entropy", str(model), "--data", str(data), "--seq-len", "16", "--out", str(out)]
    elif entry == "sweep_worker":  # one task of the local executor with --task-ranks 2
        (tmp_path / "spec.json").write_text(json.dumps(one_task(model, data, out)))
        args = ["kacq_hooks.sweep_worker", str(tmp_path / "spec.json"), str(tmp_path / "outcome.json")]
    else:
        args = ["entropy_sweep", str(model), str(data), str(out)]
    for rank in at_exit(tmp_path, args):
        assert rank["group"] is False
        assert "pt_gloo_runloop" not in rank["threads"], rank["threads"]
    if entry == "sweep_worker":  # rank 0 alone wrote the outcome, as before
        assert json.loads((tmp_path / "outcome.json").read_text())["status"] == "measured"
    else:
        row, = json.loads((out / "entropy.json").read_text())["checkpoints"]
        assert row["world_size"] == 2 and row["documents"] == len(DOCS)


def test_a_group_the_caller_started_is_left_running(tmp_path):
    # kacq_hooks leaves only the groups it started: the caller's stays up for the caller's own collectives
    model = checkpoint(tmp_path / "model")
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(DOCS) + "\n")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with sweep.joined_ranks("cpu") as ranks:
            assert (ranks.rank, ranks.world) == (0, 1)
        entropy_sweep([str(model)], str(data), out=tmp_path / "out", seq_len=16)
        assert run_task(one_task(model, data, tmp_path / "task"))["status"] == "measured"
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_the_cli_refuses_a_missing_device_before_joining(tmp_path, monkeypatch, capsys):
    from kacq_hooks.cli import main

    # torchrun's variables with no rank 1 and no store behind them: joining would wait, or fail with torch's error
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(DOCS) + "\n")
    assert main(["entropy", str(tmp_path), "--data", str(data), "--device", "no-such-device",
                 "--out", str(tmp_path / "out")]) == 2
    assert "--device no-such-device is not a device name" in capsys.readouterr().err
    assert not dist.is_initialized()
