"""Launch ``kacq_hooks.cli`` under torchrun with real gloo ranks, from this checkout's source."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kacq_hooks.sweep_exec import _free_port

SRC = Path(__file__).resolve().parents[1] / "src"
ABORT = "terminate called without an active exception"
RELAUNCHES = 3  # two aborts in a row were seen once in a full-suite run (2026-12-07), never in 15 launches alone


def torchrun(args: list[str], ranks: int = 2, timeout: int = 300,
             entry: tuple[str, ...] = ("-m", "kacq_hooks.cli")) -> subprocess.CompletedProcess:
    """Run ``python -m kacq_hooks.cli ARGS`` on ``ranks`` CPU ranks; the finished process is returned as it ended.
    ``entry`` replaces ``-m kacq_hooks.cli`` (a script path, for a test that wraps the CLI).

    A launch in which a rank aborted in std::terminate is repeated, into a fresh ``--out``, up to RELAUNCHES
    times: seen in about one full-suite run in four on a 2-core machine, inside torch/gloo at a checkpoint's
    start, before any number was written (cause not found). A launch that fails otherwise, or aborts every time,
    is returned as it is, so the numbers a test compares are always a whole run's.
    """
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}

    def launch() -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                   str(_free_port()), *entry, *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)

    done = launch()
    for _ in range(RELAUNCHES):
        if done.returncode == 0 or ABORT not in done.stderr:
            break
        out = Path(args[args.index("--out") + 1]) if "--out" in args else None
        if out is not None and out.exists():
            shutil.rmtree(out)
        time.sleep(2)
        done = launch()
    return done
