"""Shared test setup: make ``from tiny_models import ...`` work from any test module."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_TESTS = str(Path(__file__).parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# Tiny models gain nothing from intra-op threads, and spinning OpenMP workers slow everything down when
# several test processes (gloo ranks, interpreter subprocesses) share the machine's two cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny byte-level BPE of tiny_models, trained once per test session."""
    from tiny_models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """The one-pass CPU kernel built into an empty cache and forgotten afterwards (the loaded library is
    process-wide)."""
    from kacq_hooks.kernels import native

    monkeypatch.setenv("KACQ_CACHE", str(tmp_path))
    monkeypatch.delenv("KACQ_KERNELS", raising=False)
    monkeypatch.setattr(native, "_state", {})
    return tmp_path
