"""Task functions that fail the way a real task can, for run_study's error handling (importable by a spawned
worker: run_study pickles a task function by reference)."""
from __future__ import annotations

import os
import time


class UnpicklableError(Exception):
    """Like many library errors: a custom __init__, so pickle cannot rebuild it in the parent."""

    def __init__(self, head_dim: int, detail: str):
        super().__init__(f"head_dim={head_dim} must be even for RoPE ({detail})")


def raise_unpicklable(config, workdir, progress=None):
    raise UnpicklableError(config.d_model // config.n_heads, "raised in the task")


def raise_unpicklable_in_seed_0(config, workdir, progress=None):
    """Seed 0's task fails at once; the others wait (the runner kills them), so which task failed is fixed."""
    if config.seed == 0:
        raise_unpicklable(config, workdir, progress)
    time.sleep(120)
    raise AssertionError("the runner should have stopped this task when seed 0 failed")


def raise_value_error(config, workdir, progress=None):
    raise ValueError("head_dim must be even for RoPE")


def die(config, workdir, progress=None):
    os._exit(3)  # the worker process ends without a word, as when the OOM killer takes it
