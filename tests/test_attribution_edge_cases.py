"""Hostile checks of per-fact attribution: each test is a defect once found by attack, failing before its fix;
each docstring says what was wrong and what right looks like."""
from __future__ import annotations

import json

import pytest

from kacq_hooks import facts
from kacq_hooks.attribution import ablate, attribute, mean_baseline
from kacq_hooks.errors import KacqError
from kacq_hooks.training.attribution import AttributionStore
from tiny_models import random_batch, tiny_model

FACTS = [("Zorgon was founded in", "1842"), ("The lazy dog sleeps under the", "brown fox")]


# -- mixture-of-experts models ------------------------------------------------------------------------------------

@pytest.mark.parametrize("call", ["grad_x_act", "integrated_gradients", "ablation", "ablate_slot", "ablate_all",
                                  "mean_baseline"])
def test_moe_models_are_refused_with_a_kacq_error(tokenizer, call):
    """find_sites gives a fused-experts site whose module input is the hidden state [.., d_model], not C [.., d_ff].

    The pre-hook then scales/ablates hidden-state columns as if they were memory slots: most calls die
    in torch with a bare RuntimeError (size 256 vs 32), and ``ablate(..., "all")`` returns a number,
    computed by zeroing the experts' input rather than their coefficients. Until MoE slots are
    supported, every attribution entry point should refuse an experts site with a KacqError that says so.
    """
    model = tiny_model("mixtral")
    with pytest.raises(KacqError):
        if call in ("grad_x_act", "integrated_gradients", "ablation"):
            attribute(model, tokenizer, FACTS, call, steps=2)
        elif call == "ablate_slot":
            ablate(model, tokenizer, FACTS, [(0, 3)])
        elif call == "ablate_all":
            ablate(model, tokenizer, FACTS, "all")
        else:
            mean_baseline(model, [random_batch()[0]])


# -- the attribution store ------------------------------------------------------------------------------------

PROBES = [facts.ProbeRef(0, "mem", 0)]
SETTINGS = dict(labels=["decoder.layer_0"], d_ff=[4], k=2)


def _header() -> str:
    return json.dumps({"format": "kacq_hooks.attribution", "version": 1, "probes": [[0, "mem", 0]], **SETTINGS,
                       "method": "grad_x_act"})


def test_a_header_torn_before_its_newline_still_resumes(tmp_path):
    """A crash after the header's JSON but before its newline (a header of 1,950 probes is written in several
    system calls) leaves a parseable header with no newline. Reopening accepts it, and the next record is
    appended on the header's line: the file can never be opened again ("does not start with an attribution
    header"). Reopening should complete (or cut) the torn header line."""
    path = tmp_path / "attribution.jsonl"
    path.write_text(_header())  # no trailing newline: the crash came before it
    store = AttributionStore(path, PROBES, **SETTINGS)
    store.append(0, [[(0, 1), (0, 2)]], [[1.0, 0.5]])
    assert AttributionStore.open(path).steps == [0]


def test_a_torn_header_is_a_store_to_start_again(tmp_path):
    """A crash while the header itself was written (the file's only, unterminated line) leaves a file that
    every later run refuses, although no record was lost: the module promises that a torn last line is cut
    on reopening. Reopening with the settings should start the store afresh."""
    path = tmp_path / "attribution.jsonl"
    path.write_text(_header()[:25])
    store = AttributionStore(path, PROBES, **SETTINGS)
    store.append(0, [[(0, 1), (0, 2)]], [[1.0, 0.5]])
    assert AttributionStore.open(path).steps == [0]


def test_reading_a_live_store_does_not_cut_the_writers_line(tmp_path):
    """``AttributionStore.open(path)`` (e.g. to compute ``stability`` in a notebook while training runs) truncates
    whatever follows the last newline. If the training process is in the middle of writing a record (a
    record with c̄ of a real model is megabytes, written in many system calls), the reader cuts its first
    part; the writer's rest then lands as a broken line in the middle, the record is lost, and the next
    open refuses the file. Opening to read should not modify the file (cut only when resuming to append)."""
    path = tmp_path / "attribution.jsonl"
    writer = AttributionStore(path, PROBES, **SETTINGS)
    writer.append(0, [[(0, 1), (0, 2)]], [[1.0, 0.5]])
    line = json.dumps({"step": 1, "slots": [[[0, 1], [0, 3]]], "scores": [[1.0, 0.5]], "cbar": None}) + "\n"
    with open(path, "a", encoding="utf-8") as handle:  # the writer's first system call
        handle.write(line[:15])
    assert AttributionStore.open(path).steps == [0]  # a reader sees the complete records only
    with open(path, "a", encoding="utf-8") as handle:  # the writer's second system call
        handle.write(line[15:])
    assert AttributionStore.open(path).steps == [0, 1]


def test_a_store_with_repeated_steps_is_refused(tmp_path):
    """``append`` refuses a step not after the last one, but loading does not check: a file holding step 0
    twice (two ranks of a distributed run writing one path, or two runs sharing it) loads as steps [0, 0],
    and ``stability`` then compares a record with its twin. Loading should refuse non-increasing steps
    with a TrajectoryError naming the line."""
    path = tmp_path / "attribution.jsonl"
    store = AttributionStore(path, PROBES, **SETTINGS)
    store.append(0, [[(0, 1), (0, 2)]], [[1.0, 0.5]])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": 0, "slots": [[[0, 3], [0, 2]]], "scores": [[1.0, 0.5]], "cbar": None}) + "\n")
    with pytest.raises(facts.TrajectoryError):
        AttributionStore.open(path)


# -- refusals that are not KacqErrors ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["grad_x_act", "integrated_gradients"])
def test_gradient_methods_inside_inference_mode_refuse_with_a_kacq_error(tokenizer, method):
    """Called inside ``torch.inference_mode()`` (common in evaluation code), ``enable_grad`` cannot turn autograd
    back on and the backward dies in torch ("element 0 of tensors does not require grad"). The gradient
    methods should refuse with a KacqError that says to call them outside inference mode."""
    import torch

    model = tiny_model("llama")
    with torch.inference_mode(), pytest.raises(KacqError):
        attribute(model, tokenizer, FACTS, method, steps=2)


def test_callback_every_below_one_is_a_kacq_error(tokenizer, tmp_path):
    """``AttributionCallback(every=0)`` raises a bare ValueError (training/attribution.py), outside the hierarchy."""
    from kacq_hooks.training.attribution import AttributionCallback, AttributionTracker

    tracker = AttributionTracker(tiny_model("llama"), tokenizer, FACTS, store=tmp_path / "a.jsonl")
    with pytest.raises(KacqError, match="every"):
        AttributionCallback(tracker, every=0)


def test_open_reads_a_store_of_any_method(tmp_path):
    """``AttributionStore.open(path)`` passes no settings, but the constructor's ``method`` defaults to "grad_x_act"
    and is compared with the header like a given setting: a store recorded with integrated gradients (or
    ablation) cannot be opened for reading ("written with another method"). ``open`` should take the
    method from the header."""
    path = tmp_path / "attribution.jsonl"
    store = AttributionStore(path, PROBES, **SETTINGS, method="integrated_gradients")
    store.append(0, [[(0, 1), (0, 2)]], [[1.0, 0.5]])
    reopened = AttributionStore.open(path)
    assert reopened.method == "integrated_gradients" and reopened.steps == [0]
