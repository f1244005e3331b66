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
