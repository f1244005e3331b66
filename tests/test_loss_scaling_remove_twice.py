"""inst.remove() may be called again (after ``with inst:`` has removed the hooks, or twice by a user's cleanup) when a
GradScaler is declared: the second call found no instance ``update`` on the scaler, read that as "ours", and
deleted it, raising AttributeError; the scaler must keep working and be unwrapped exactly once."""
from __future__ import annotations

import torch

import kacq_hooks as kh
from tiny_models import random_batch, tiny_model


def test_remove_after_the_with_block_and_twice_leaves_the_scaler_working():
    model = tiny_model("mixtral", seed=0).train()
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ids, mask = random_batch(batch=2, seq=6, padding="right", seed=1)
    inst = kh.instrument(model, grads=True).loss_scale(scaler)
    with inst:
        scaler.scale(model(ids, attention_mask=mask, labels=ids).loss).backward()
        scaler.step(opt)
        scaler.update()
    inst.remove()  # again
    inst.remove()
    assert "update" not in scaler.__dict__ and "scale" not in scaler.__dict__
    assert float(inst.mean_abs_gradients()[0].sum()) > 0
    scaler.scale(model(ids, attention_mask=mask, labels=ids).loss).backward()  # the scaler still works
    scaler.step(opt)
    scaler.update()
    inst.attach()  # and can be followed again
    assert "update" in scaler.__dict__
    inst.remove()
    assert "update" not in scaler.__dict__
