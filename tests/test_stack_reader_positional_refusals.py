"""A call argument the stack refuses is refused however it is passed: by keyword or by position.

The StackReader reads every argument by name after binding the positional ones (a positional mask is read
as a keyword one), but its refusals looked at the keywords only: XLNet given ``perm_mask`` and
``target_mapping`` by position ran its query stream through the FFN a second time, and nothing said why
until the guard against a layer running twice refused the call with a message about shared layers.
A real tiny XLNet from its config; its base model is instrumented and called directly.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import kacq_hooks as kh
from model_zoo import build


def test_xlnet_query_stream_arguments_are_refused_when_passed_by_position():
    model = build("xlnet").transformer  # the stack's own module, called directly (the head passes keywords)
    params = list(inspect.signature(type(model).forward).parameters)[1:]
    ids = torch.randint(3, 100, (1, 4))
    perm_mask = torch.zeros(1, 4, 4)
    perm_mask[:, :, -1] = 1.0  # no token sees the last one
    target_mapping = torch.zeros(1, 1, 4)
    target_mapping[0, 0, -1] = 1.0
    given = {"input_ids": ids, "perm_mask": perm_mask, "target_mapping": target_mapping}
    last = max(params.index(name) for name in given)
    args = tuple(given.get(name) for name in params[:last + 1])  # None for what sits between them
    with kh.instrument(model) as inst, torch.no_grad():
        with pytest.raises(kh.LocateError, match="perm_mask|target_mapping"):
            model(**given)
        with pytest.raises(kh.LocateError, match="perm_mask|target_mapping"):
            model(*args)
    assert all(int(layer.tokens) == 0 for layer in inst.stats)
