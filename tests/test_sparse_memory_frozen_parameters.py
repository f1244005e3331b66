"""sparse_memory on a model whose FFN slot parameters are partly frozen (requires_grad=False, as when lower
layers are kept fixed): refused before any hook, and the model afterwards trains exactly as one never offered
to sparse_memory. Before, torch's RuntimeError came out of the hook registration with the gradient hooks of the
layers before the frozen one left on the model and no handle to remove them: every later backward then raised
(per-batch choice) or masked those layers' gradients for good (slots= given).
"""
from __future__ import annotations

import copy

import pytest
import torch

from kacq_hooks.errors import ConfigError
from kacq_hooks.interventions import sparse_memory
from test_hooks_in_copies import _every_hook
from test_sparse_memory import reference_stats
from tiny_models import random_batch, tiny_model


def _train(model, steps: int = 2) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        ids, mask = random_batch(4, 16, "right", seed=step + 1)
        model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("how", ["per_batch", "slots"])
def test_frozen_slot_parameters_are_refused_before_any_hook(how):
    model = tiny_model("llama").train()
    reference = reference_stats(model)
    for p in model.model.layers[1].mlp.parameters():  # the second layer frozen: the first one's hooks came first
        p.requires_grad_(False)
    plain = copy.deepcopy(model)
    bare = _every_hook(model)
    kwargs = {"slots": [torch.arange(4), torch.arange(4)]} if how == "slots" else {"reference": reference}
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.\w+_proj\.weight"):
        sparse_memory(model, top=4, **kwargs)
    assert _every_hook(model) == bare
    _train(model)
    _train(plain)
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name  # nothing of the refused call is left in training
