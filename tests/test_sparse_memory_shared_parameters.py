"""A second sparse_memory over the same FFN parameters through another module (the inner model of a causal LM, as
a wrapper such as PEFT or a user's own module holds it) is refused as one on the same model is: each handle
writes back the slots the other chose, so only their intersection would train (nothing, for disjoint choices).
"""
from __future__ import annotations

import pytest
import torch

from kacq_hooks.errors import ConfigError
from kacq_hooks.interventions import sparse_memory
from test_sparse_memory import snapshot
from tiny_models import random_batch, tiny_model


def test_a_second_handle_on_the_inner_model_is_refused_until_the_first_is_removed():
    model = tiny_model("llama").train()
    first = sparse_memory(model, slots=[torch.arange(4)] * 2, top=4)
    with pytest.raises(ConfigError, match="already"):
        sparse_memory(model.model, slots=[torch.arange(4, 8)] * 2, top=4)
    # the refused call left nothing: the first handle's slots train
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = snapshot(model)
    ids, mask = random_batch(4, 16, "right", seed=1)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    optimizer.step()
    up = model.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(up[:4], before["model.layers.0.mlp.up_proj.weight"][:4])
    assert torch.equal(up[4:], before["model.layers.0.mlp.up_proj.weight"][4:])
    first.remove()
    sparse_memory(model.model, slots=[torch.arange(4, 8)] * 2, top=4).remove()
