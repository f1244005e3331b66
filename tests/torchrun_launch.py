"""Launch ``kacq_hooks.cli`` under torchrun with real gloo ranks, from this checkout's source."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kacq_hooks.sweep_exec import _free_port

SRC = Path(__file__).resolve().parents[1] / "src"


def torchrun(args: list[str], ranks: int = 2, timeout: int = 300,
             entry: tuple[str, ...] = ("-m", "kacq_hooks.cli")) -> subprocess.CompletedProcess:
    """Run ``python -m kacq_hooks.cli ARGS`` on ``ranks`` CPU ranks; the finished process is returned as it ended.
    ``entry`` replaces ``-m kacq_hooks.cli`` (a script path, for a test that wraps the CLI).

    Launched once: the std::terminate abort that a relaunch used to hide (a gloo worker still releasing tensors as
    a finished rank's interpreter shut down) is gone since the CLI leaves its process group before it returns
    (see tests/test_process_group_teardown.py).
    """
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(_free_port()), *entry, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
