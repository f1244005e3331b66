"""Every hook kacq_hooks places is owned by a HookSet, and a deep copy of the model never feeds the original.

One test per kind of hook: the instrumentation's (dense sites, call transaction), the experts and
shared-expert taps, attribution's site hooks, resuscitation's hook mode, the injection callback's
input hook, slot usage's forward hooks and sparse memory finetuning's gradient and optimizer step hooks. Each copies a model with the hook attached, runs the copy, and checks that the original's
state did not move; then runs the original, to show the hook there is live.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.optim.optimizer as optim_hooks
from tiny_models import random_batch, tiny_model

import kacq_hooks as kh
from kacq_hooks import facts
from kacq_hooks._hooks import HookSet
from kacq_hooks.attribution import _hooks as attribution_hooks
from kacq_hooks.attribution import attributable_sites
from kacq_hooks.interventions import resuscitate, resuscitation_plan, sparse_memory
from kacq_hooks.usage import measure_usage
from kacq_hooks.training.callbacks import InjectionCallback


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_hook_set_removes_everything_once_and_as_a_context():
    model = tiny_model("llama")
    bare = _hook_count(model)
    hooks = HookSet()
    hooks.pre(model, lambda module, args: None)
    hooks.post(model.model, lambda module, args, output: None, always_call=True)
    assert len(hooks) == 2 and _hook_count(model) == bare + 2
    hooks.remove()
    hooks.remove()  # idempotent
    assert not hooks and _hook_count(model) == bare
    with HookSet() as hooks:
        hooks.pre(model, lambda module, args: None)
        assert _hook_count(model) == bare + 1
    assert _hook_count(model) == bare


@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe"])  # dense sites; routed experts and a shared expert
def test_a_copy_of_an_instrumented_model_does_not_feed_the_instrumentation(model_type):
    model = tiny_model(model_type).eval()
    ids, mask = random_batch()
    inst = kh.instrument(model, grads=True)
    if model_type == "qwen2_moe":
        assert inst.sites[0].kind == "experts" and inst.sites[0].experts_layer.shared
    twin = copy.deepcopy(model)
    out = twin(input_ids=ids, attention_mask=mask)
    out.logits.sum().backward()
    assert all(int(layer.tokens) == 0 and int(layer.grad_tokens) == 0 for layer in inst.stats)
    assert inst.discarded_calls == 0 and kh.instrumentations_of(twin) == []
    twin(input_ids=ids, attention_mask=mask)  # the copied hooks removed themselves at their first call
    assert all(int(layer.tokens) == 0 for layer in inst.stats)
    model(input_ids=ids, attention_mask=mask)
    assert all(int(layer.tokens) == int(mask.sum()) for layer in inst.stats)
    inst.remove()
    assert not inst.attached


def test_a_copy_does_not_run_attribution_hooks():
    model = tiny_model("llama").eval()
    ids, mask = random_batch()
    sites = attributable_sites(model)
    seen = []
    with attribution_hooks(sites, lambda index, module, args: seen.append(index)):
        twin = copy.deepcopy(model)
        twin(input_ids=ids, attention_mask=mask)
        assert seen == []
        model(input_ids=ids, attention_mask=mask)
        assert seen == list(range(len(sites)))
    model(input_ids=ids, attention_mask=mask)
    assert seen == list(range(len(sites)))  # removed on leaving


def test_a_copy_of_a_hook_resuscitated_model_keeps_its_own_edit_and_leaves_the_original_alone():
    model = tiny_model("llama").eval()
    ids, mask = random_batch()
    with kh.instrument(model) as inst:
        model(input_ids=ids, attention_mask=mask)
    plan = resuscitation_plan(inst)
    handle = resuscitate(model, plan, mode="hook")
    scales = [hook for m in model.modules() for hook in m._forward_pre_hooks.values()
              if type(hook).__name__ == "_ScaleInput"]
    assert scales and all(not hook._cast for hook in scales)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        edited = twin(input_ids=ids, attention_mask=mask).logits
    assert all(not hook._cast for hook in scales)  # the copy ran its own hooks, not these
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, edited)
    handle.revert()
    handle.revert()
    assert not any(type(h).__name__ == "_ScaleInput" for m in model.modules() for h in m._forward_pre_hooks.values())


def test_a_copy_does_not_take_the_injection_callbacks_passages(tokenizer):
    record = facts.FactRecord("The fox jumps over the lazy dog.", **{
        f"{k}_{p}": ["The fox jumps over the"] if p == "input" else ["lazy dog"]
        for k in facts.PROBE_KINDS for p in ("input", "target")})
    callback = InjectionCallback(facts.InjectionSchedule(facts.FactSet([record], ["once"]), interval=2, rounds=1),
                                 tokenizer)
    model = tiny_model("llama").train()

    class State:
        global_step = 0

    callback.on_train_begin(None, State(), None, model=model)
    callback.on_step_begin(None, State(), None)
    assert callback._due is not None
    ids = torch.randint(2, 100, (2, 48))
    twin = copy.deepcopy(model)
    reached = []
    twin.model.register_forward_pre_hook(lambda m, a, k: reached.append(k["input_ids"].clone()), with_kwargs=True)
    twin(input_ids=ids, labels=ids)
    assert torch.equal(reached[0], ids)  # the copy's batch is its own: nothing injected into it
    assert callback._due is not None and callback.injected == {}
    model(input_ids=ids, labels=ids)
    assert callback._due is None and callback.injected == {0: [0]}
    callback.on_train_end(None, State(), None)
    assert not callback._hooks


def _every_hook(model) -> dict[str, int]:
    """How many hooks of each kind torch holds for ``model`` and for every optimizer."""
    params = list(model.parameters())
    return {"forward": _hook_count(model),
            "grad": sum(len(p._backward_hooks or {}) for p in params),
            "accumulated": sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in params),
            "step": len(optim_hooks._global_optimizer_pre_hooks) + len(optim_hooks._global_optimizer_post_hooks)}


def _train(model, optimizer, steps=2):
    for step in range(steps):
        ids, mask = random_batch(4, 16, "right", seed=step)
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _reference(model):
    ids, mask = random_batch(4, 16, "right", seed=100)
    with kh.instrument(model) as inst, torch.no_grad():
        model(ids, attention_mask=mask)
    return inst


@pytest.mark.parametrize("per_batch", [True, False])
def test_sparse_memory_removes_every_gradient_and_step_hook(per_batch):
    model = tiny_model("llama").train()
    reference = _reference(model)
    bare = _every_hook(model)
    handle = sparse_memory(model, None if per_batch else reference, reference, top=4)
    placed = _every_hook(model)
    assert placed["grad"] > 0 and placed["accumulated"] > 0 and placed["step"] == bare["step"] + 2
    assert (placed["forward"] > bare["forward"]) == per_batch  # the per-batch choice reads each training forward
    handle.remove()
    assert _every_hook(model) == bare
    handle.remove()  # idempotent
    assert _every_hook(model) == bare


def test_a_copy_of_a_model_and_optimizer_under_sparse_memory_trains_as_without_it():
    model = tiny_model("llama").train()
    plain = copy.deepcopy(model)
    handle = sparse_memory(model, reference=_reference(model), top=4)
    twin, twin_optimizer = copy.deepcopy((model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)))
    assert _every_hook(twin)["grad"] == 0 and _every_hook(twin)["accumulated"] == 0
    _train(twin, twin_optimizer)
    _train(plain, torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1))
    for (name, a), b in zip(plain.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name  # every entry trained, exactly as a model never under the intervention
    assert handle.slots is None and not handle._saved  # the copy's forwards and steps fed nothing back
    handle.remove()


def test_a_copy_of_a_model_under_slot_usage_does_not_feed_it():
    model = tiny_model("llama").eval()
    ids, mask = random_batch()
    bare = _every_hook(model)
    with measure_usage(model, k=2) as usage:
        twin = copy.deepcopy(model)
        twin(input_ids=ids, attention_mask=mask)
        assert usage.forwards == 0 and not any(usage.tokens)
        model(input_ids=ids, attention_mask=mask)
        assert usage.forwards == 1 and all(t == int(mask.sum()) for t in usage.tokens)
    assert _every_hook(model) == bare


@pytest.mark.parametrize("per_batch", [True, False])
def test_a_copied_sparse_memory_handle_is_a_removed_one(per_batch):
    model = tiny_model("llama").train()
    reference = _reference(model)
    handle = sparse_memory(model, None if per_batch else reference, reference, top=4)
    _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    twin = copy.deepcopy(handle)  # copies the model it holds; the copy's hooks are not placed anywhere
    assert handle.active and "active" in repr(handle)
    assert not twin.active and "removed" in repr(twin)
    assert _every_hook(twin.model)["grad"] == 0
    assert (twin.slots is None) == (handle.slots is None)  # what was chosen is still readable
    twin.remove()  # nothing to remove, and the original is untouched
    assert handle.active and _every_hook(model)["grad"] > 0
    handle.remove()
