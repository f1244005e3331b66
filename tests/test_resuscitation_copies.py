"""A deep copy of a hook-resuscitated model: the copy is documented to be resuscitated too.

``resuscitate(..., mode="hook")`` marks the edited modules, and the docstring says a deep copy copies the
hooks with the marks, "so the copy is resuscitated too and refuses a second plan". For dense sites the
scale hooks travel (``travels=True``). For mixture-of-experts sites the routed slots are scaled by an
ExpertsTap whose hooks are OwnerHooks, which turn inert in a copy: the copy keeps the mark (it refuses a
second plan) but would run the unedited model, so whatever it measured would be of another model: it refuses.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from tiny_models import random_batch, tiny_model

import kacq_hooks as kh
from kacq_hooks.errors import StateError
from kacq_hooks.interventions import resuscitate, resuscitation_plan


def _edited(model_type):
    model = tiny_model(model_type)
    ids, mask = random_batch()
    with kh.instrument(model) as inst:
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    resuscitate(model, resuscitation_plan(inst), mode="hook")
    with torch.no_grad():
        edited = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(base, edited)
    return model, ids, mask, edited


def test_a_copy_of_a_hook_resuscitated_dense_model_runs_the_edit():
    model, ids, mask, edited = _edited("llama")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(twin(input_ids=ids, attention_mask=mask).logits, edited)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_a_copy_of_a_hook_resuscitated_moe_model_refuses_to_run_unedited(model_type):
    # the routed-experts scale lives in a hub shared with every tap of the module, which cannot travel: the copy
    # keeps the mark, so running it unedited would measure another model than the one copied
    model, ids, mask, edited = _edited(model_type)
    for twin in (copy.deepcopy(model), _pickled(model)):
        with pytest.raises(StateError, match="cannot travel with a copy"), torch.no_grad():
            twin(input_ids=ids, attention_mask=mask)
    with torch.no_grad():  # the original still runs its edit
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, edited)


def test_a_copy_of_an_instrumented_moe_model_runs_uninstrumented():
    model = tiny_model("mixtral")
    ids, mask = random_batch()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    with kh.instrument(model) as inst:
        twin = copy.deepcopy(model)
        with torch.no_grad():
            assert torch.equal(twin(input_ids=ids, attention_mask=mask).logits, plain)
        assert all(int(s.tokens) == 0 for s in inst.stats)  # the copy's forward fed nothing back


def _pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)
