"""Launch ``kacq_hooks.cli`` under torchrun with real gloo ranks, from this checkout's source."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from kacq_hooks.sweep_exec import _free_port

SRC = Path(__file__).resolve().parents[1] / "src"
ABORT = "terminate called without an active exception"


def torchrun(args: list[str], ranks: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m kacq_hooks.cli ARGS`` on ``ranks`` CPU ranks; the finished process is returned as it ended.

    A launch in which a rank aborted in std::terminate is repeated once, into a fresh ``--out``: seen once in
    about ten full-suite runs on a 2-core machine, inside torch/gloo between two checkpoints, before any number
    was written. A second abort is returned as it is, so the numbers a test compares are always a whole run's.
    """
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}

    def launch() -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                   str(_free_port()), "-m", "kacq_hooks.cli", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)

    done = launch()
    if done.returncode != 0 and ABORT in done.stderr:
        out = Path(args[args.index("--out") + 1]) if "--out" in args else None
        if out is not None and out.exists():
            shutil.rmtree(out)
        done = launch()
    return done
