"""sparse_memory after the model's FFN parameters were replaced by new tensors (load_state_dict(assign=True), as
when a checkpoint is reloaded mid-finetuning): the handle's gradient hooks are on the old tensors, so the step
is refused with StateError before it changes anything. It used to train nothing (train_rest=False) or every
entry of every FFN layer while ``handle.slots`` named four per layer (train_rest=True), without a word.
"""
from __future__ import annotations

import copy

import pytest
import torch

from kacq_hooks.errors import StateError
from kacq_hooks.interventions import sparse_memory
from test_sparse_memory import reference_stats, snapshot
from tiny_models import random_batch, tiny_model


@pytest.mark.parametrize("train_rest", [False, True])
def test_a_step_after_the_slot_parameters_were_replaced_is_refused(train_rest):
    model = tiny_model("llama").train()
    handle = sparse_memory(model, reference=reference_stats(model), top=4, train_rest=train_rest)
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = snapshot(model)
    ids, mask = random_batch(4, 16, "right", seed=1)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    with pytest.raises(StateError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight.*sparse_memory"):
        optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    handle.remove()  # and after remove() the model trains as any other
    optimizer.step()
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])


def test_an_optimizer_of_another_model_still_steps():
    model = tiny_model("llama").train()
    handle = sparse_memory(model, reference=reference_stats(model), top=4)
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    other = tiny_model("llama", seed=1).train()
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    ids, mask = random_batch(4, 16, "right", seed=1)
    other(ids, attention_mask=mask, labels=ids).loss.backward()
    before = other.model.layers[0].mlp.up_proj.weight.detach().clone()
    optimizer.step()  # not this handle's model: not its business
    assert not torch.equal(other.model.layers[0].mlp.up_proj.weight, before)
    handle.remove()
