"""sparse_memory with the optimizers a researcher really uses: a wrapper whose step runs an inner optimizer's
step (torch's ZeroRedundancyOptimizer), two models, two optimizers on one model, a step that raises, a
reloaded optimizer state, an optimizer made afresh, and remove() in the middle of training.

After every step each entry outside the chosen slots is bit-identical and the chosen entries moved.
"""
from __future__ import annotations

import copy
import tempfile

import pytest
import torch
import torch.distributed as dist

from kacq_hooks.interventions import sparse_memory
from test_sparse_memory import expected_mask, reference_stats, snapshot
from tiny_models import random_batch, tiny_model


def _step(model, handle, optimizer, seed: int, closure: bool = False) -> int:
    """One real training step; asserts the promise and returns how many chosen entries moved."""
    before = snapshot(model)
    ids, mask = random_batch(4, 16, "right", seed=seed)

    def loss():
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        out.backward()
        return out

    if closure:
        optimizer.zero_grad()
        optimizer.step(loss)
    else:
        loss()
        optimizer.step()
    chosen = [set(s.tolist()) for s in handle.slots]
    optimizer.zero_grad()
    d_ff = [s.d_ff for s in handle.sites]
    moved = 0
    for name, p in model.named_parameters():
        allowed = expected_mask("llama", name, p, chosen, d_ff)
        assert torch.equal(p[~allowed], before[name][~allowed]), f"{name} changed outside the chosen slots"
        moved += int((p[allowed] != before[name][allowed]).sum())
    return moved


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


@pytest.fixture
def process_group():
    """A one-rank gloo group (ZeroRedundancyOptimizer needs one), gone after the test."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def test_an_optimizer_whose_step_runs_another_optimizers_step_still_trains_the_slots(process_group):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = tiny_model("llama").train()
    handle = sparse_memory(model, reference=reference_stats(model), top=4)
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2,
                                        weight_decay=0.1)
    assert all(_step(model, handle, optimizer, seed) > 0 for seed in (1, 2))  # the chosen slots do train
    handle.remove()


def test_two_models_each_under_sparse_memory_train_as_each_alone():
    alone = tiny_model("llama", seed=1).train()
    handle = sparse_memory(alone, reference=reference_stats(alone), top=4)
    optimizer = _adamw(alone.parameters())
    for seed in (1, 2):
        _step(alone, handle, optimizer, seed)
    handle.remove()

    first, second = tiny_model("llama", seed=1).train(), tiny_model("llama", seed=2).train()
    handles = [sparse_memory(m, reference=reference_stats(m), top=4) for m in (first, second)]
    optimizers = [_adamw(m.parameters()) for m in (first, second)]
    for seed in (1, 2):
        for model, handle, optimizer in zip((first, second), handles, optimizers):
            assert _step(model, handle, optimizer, seed) > 0
    for (name, a), b in zip(alone.named_parameters(), first.parameters()):
        assert torch.equal(a, b), name  # the other model's hooks and steps changed nothing here
    for handle in handles:
        handle.remove()


def test_two_optimizers_on_one_model_keep_the_promise():
    model = tiny_model("llama").train()
    handle = sparse_memory(model, reference=reference_stats(model), top=4, train_rest=False)
    mlp = [p for n, p in model.named_parameters() if ".mlp." in n]
    rest = [p for n, p in model.named_parameters() if ".mlp." not in n]

    class Both:  # steps both optimizers, as a loop that keeps one per parameter group does
        def __init__(self):
            self.parts = [_adamw(mlp), torch.optim.SGD(rest, lr=0.1, momentum=0.9, weight_decay=0.1)]

        def step(self):
            for part in self.parts:
                part.step()

        def zero_grad(self):
            for part in self.parts:
                part.zero_grad()

    both = Both()
    assert all(_step(model, handle, both, seed) > 0 for seed in (1, 2))
    handle.remove()


def test_a_step_that_raises_then_training_on():
    model = tiny_model("llama").train()
    handle = sparse_memory(model, reference=reference_stats(model), top=4)
    optimizer = _adamw(model.parameters())
    _step(model, handle, optimizer, 1)

    def failing():
        raise RuntimeError("loss is NaN")

    with pytest.raises(RuntimeError, match="NaN"):
        optimizer.step(failing)
    optimizer.zero_grad()
    assert all(_step(model, handle, optimizer, seed, closure=True) > 0 for seed in (2, 3))
    handle.remove()


def test_a_reloaded_optimizer_state_and_a_fresh_optimizer_keep_the_promise():
    model = tiny_model("llama").train()
    handle = sparse_memory(model, reference=reference_stats(model), top=4)
    optimizer = _adamw(model.parameters())
    _step(model, handle, optimizer, 1)
    saved = copy.deepcopy(optimizer.state_dict())
    _step(model, handle, optimizer, 2)
    optimizer.load_state_dict(saved)  # back to the moments of step 1
    assert _step(model, handle, optimizer, 3) > 0
    fresh = _adamw(model.parameters())  # an optimizer made while the handle is active: its state starts here
    assert _step(model, handle, fresh, 4) > 0
    handle.remove()


def test_remove_mid_training_twice_then_every_parameter_trains_as_a_never_hooked_copy():
    model = tiny_model("llama").train()
    handle = sparse_memory(model, reference=reference_stats(model), top=4)
    optimizer = _adamw(model.parameters())
    _step(model, handle, optimizer, 1)
    handle.remove()
    handle.remove()
    twin, twin_optimizer = copy.deepcopy((model, optimizer))  # taken after remove: never hooked
    for seed in (2, 3):
        for m, o in ((model, optimizer), (twin, twin_optimizer)):
            ids, mask = random_batch(4, 16, "right", seed=seed)
            m(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
            o.step()
            o.zero_grad()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
