"""The benchmark scripts' own code on tiny models, so their GPU-size paths are exercised without a GPU.

The GPU size is an OLMo-1B-shaped Llama: its TransformerLens conversion and nnsight route are checked
here on tiny models, and every variant must report the same knowledge entropy as ``instrument``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import random_batch, tiny_model

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _harness  # noqa: E402
import end_to_end  # noqa: E402
import training_step  # noqa: E402

HAS_FRONT_ENDS = all(importlib.util.find_spec(name) for name in ("transformer_lens", "nnsight"))


@pytest.mark.skipif(not HAS_FRONT_ENDS, reason="needs the transformer-lens and nnsight extras")
@pytest.mark.parametrize("model_type", ["llama"])
def test_end_to_end_variants_measure_the_same_entropy(model_type):
    model = tiny_model(model_type)
    ids, mask = random_batch(batch=3, seq=12, padding="right")
    setup = end_to_end.Setup(model, ids, mask)
    entropies = {name: make(setup)() for name, make in end_to_end.VARIANTS.items()}
    assert entropies.pop("plain") is None
    reference = entropies["kacq instrument"]
    assert 0 < reference <= 2 * torch.log(torch.tensor(64.0)).item()
    for name, value in entropies.items():
        assert value == pytest.approx(reference, abs=1e-6), name
    assert not [h for m in model.modules() for h in m._forward_pre_hooks.values()]  # every variant cleaned up


def test_training_step_variants_update_the_model_and_leave_no_hooks():
    import kacq_hooks as kh

    model = tiny_model("llama")
    ids, mask = random_batch(batch=2, seq=8)
    before = model.lm_head.weight.detach().clone()
    runs = training_step.training_runs(model, ids, mask, list(training_step.VARIANTS))
    for run in runs.values():
        run()
    assert not torch.equal(before, model.lm_head.weight)
    assert kh.instrumentations_of(model) == []


def test_peak_memory_sees_what_a_run_allocates():
    def allocate():
        block = torch.ones(48 * 2**20 // 4)  # 48 MiB, touched
        return float(block[-1])

    cpu = torch.device("cpu")
    grown = _harness.peak_during(allocate, cpu)
    idle = _harness.peak_during(lambda: None, cpu)
    assert grown["extra_mib"] > 40 and idle["extra_mib"] < 10 and grown["peak_mib"] >= grown["extra_mib"]


def test_interleaved_timing_reports_a_median_per_run():
    calls = []
    seconds = _harness.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                        repeats=3, device=torch.device("cpu"))
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # one warm-up each, then turns in alternating order


def test_paired_ratio_is_the_median_of_per_turn_ratios():
    samples = {"plain": [1.0, 2.0, 4.0], "kacq": [1.1, 2.0, 8.0]}
    assert _harness.paired_ratio(samples, "kacq", "plain") == pytest.approx(1.1)


def test_scaling_reduces_saved_sums_to_knowledge_entropy():
    import math

    import scaling

    uniform = scaling.mean_abs_entropy([torch.ones(4) * 3.0, torch.ones(2)], tokens=3)
    assert uniform == pytest.approx(math.log(4) + math.log(2))
