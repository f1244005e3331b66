"""Eager experts followed through tagged tensors (the routing index, ``down_proj``) instead of a torch-function
mode: the same handoffs as the mode, bit for bit, and the module left as it was in every way out of a forward."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

import kacq_hooks as kh
from kacq_hooks import experts
from kacq_hooks.experts import ExpertsError, ExpertsTap, find_experts
from test_experts import FAMILIES, build
from tiny_models import random_batch

_SHADOWS = ("down_proj", "__getstate__")


@pytest.fixture(scope="module")
def models():
    models = {}
    for model_type in FAMILIES:
        model = build(model_type)
        model.set_experts_implementation("eager")
        models[model_type] = model
    return models


def _layers(model):
    return [layer for layer in find_experts(model) if layer.kind == "experts"]


def _clean(model) -> bool:
    """No forward's entry is left in any experts module's instance dict."""
    return not any(name in layer.module.__dict__ for layer in _layers(model) for name in _SHADOWS)


def _mode_only(monkeypatch):
    monkeypatch.setattr(experts._Hub, "_can_tag", lambda self, module, index: False)


def _handoffs(model, ids, mask, on_call=None):
    got = []

    def record(e, t, w, c):
        got.append((e.clone(), t.clone(), w.clone(), c.detach().clone()))
        if on_call is not None:
            on_call()

    taps = [ExpertsTap(layer, record).attach() for layer in _layers(model)]
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=mask).logits
    finally:
        for tap in taps:
            tap.remove()
    return out, got


@pytest.mark.parametrize("model_type", FAMILIES)
def test_tagged_forward_hands_off_what_the_mode_does_and_keeps_the_logits(models, model_type, monkeypatch):
    model = models[model_type]
    ids, mask = random_batch(batch=3, seq=11, padding="right", seed=4)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
    tagged_calls = []
    real = experts._Hub._tag_forward
    monkeypatch.setattr(experts._Hub, "_tag_forward", lambda *a: tagged_calls.append(1) or real(*a))
    out, tagged = _handoffs(model, ids, mask)
    assert tagged_calls, "the tagged path did not run"
    assert torch.equal(out, plain)  # bit-identical to the uninstrumented eager forward
    assert type(out) is torch.Tensor and _clean(model)
    monkeypatch.undo()
    _mode_only(monkeypatch)
    out_mode, by_mode = _handoffs(model, ids, mask)
    assert torch.equal(out_mode, plain)
    assert len(tagged) == len(by_mode) > 0
    for mine, theirs in zip(tagged, by_mode):
        for a, b in zip(mine, theirs):
            assert a.dtype == b.dtype and torch.equal(a, b)


def _instrumented(model, ids, mask):
    inst = kh.instrument(model, grads=True)
    inst.loss_scale(None)
    try:
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
    finally:
        inst.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return inst, out.logits.detach(), grads


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_statistics_and_gradient_statistics_equal_the_modes(models, model_type, monkeypatch):
    model = models[model_type]
    ids, mask = random_batch(batch=2, seq=9, padding="left", seed=5)
    tagged, logits, grads = _instrumented(model, ids, mask)
    assert _clean(model)
    _mode_only(monkeypatch)
    mode, logits_mode, grads_mode = _instrumented(model, ids, mask)
    assert torch.equal(logits, logits_mode)
    assert grads.keys() == grads_mode.keys()
    for name in grads:  # the alias of down_proj is the identity backward too: the weights' gradients are the same
        assert torch.equal(grads[name], grads_mode[name]), name
    experts_sites = [i for i, s in enumerate(tagged.sites) if s.kind == "experts"]
    assert experts_sites
    for i in range(len(tagged.sites)):
        torch.testing.assert_close(tagged.mean_abs_coefficients()[i], mode.mean_abs_coefficients()[i], rtol=0, atol=0)
        torch.testing.assert_close(tagged.mean_abs_gradients()[i], mode.mean_abs_gradients()[i], rtol=0, atol=0)
    for i in experts_sites:
        assert float(tagged.mean_abs_gradients()[i].sum()) > 0
    assert tagged.knowledge_entropy().total == mode.knowledge_entropy().total


def test_an_exception_inside_the_forward_leaves_the_module_as_it_was(models):
    model = models["mixtral"]
    ids, mask = random_batch(batch=2, seq=6, seed=6)
    [layer, *_] = _layers(model)
    down = layer.module.down_proj

    def fail(e, t, w, c):
        assert layer.module.__dict__.get("down_proj") is not None  # the shadow is in place while C flows
        raise RuntimeError("consumer failed")

    with ExpertsTap(layer, fail), pytest.raises(RuntimeError, match="consumer failed"):
        model(ids, attention_mask=mask)
    assert _clean(model) and layer.module.down_proj is down
    out, got = _handoffs(model, ids, mask)  # and the next instrumented forward is whole again
    k = model.config.num_experts_per_tok
    assert sum(c.shape[0] for *_, c in got) == len(_layers(model)) * ids.numel() * k


def test_a_copy_taken_inside_the_forward_is_the_plain_model(models):
    model = models["mixtral"]
    ids, mask = random_batch(batch=2, seq=7, seed=7)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
    copies = {}

    def take_copies():
        if not copies:
            module = _layers(model)[0].module
            assert isinstance(module.__dict__.get("down_proj"), torch.Tensor)
            copies["deep"] = copy.deepcopy(model)
            copies["pickled"] = pickle.loads(pickle.dumps(model))

    out, _ = _handoffs(model, ids, mask, on_call=take_copies)
    assert torch.equal(out, plain) and _clean(model)
    for name, clone in copies.items():
        assert _clean(clone), name
        for layer in _layers(clone):
            assert layer.module.down_proj is layer.module._parameters["down_proj"], name
        with torch.no_grad():
            assert torch.equal(clone(ids, attention_mask=mask).logits, plain), name
        out, got = _handoffs(clone, ids, mask)  # a copy can be instrumented anew, on its own parameters
        assert torch.equal(out, plain) and got and _clean(clone), name
    after = copy.deepcopy(model)  # and after the forward
    assert _clean(after)


def test_several_taps_share_one_shadow_and_a_replacing_tap_acts_first(models):
    model = models["olmoe"]
    ids, mask = random_batch(batch=2, seq=8, seed=8)
    [layer, *_] = _layers(model)
    seen_a, seen_b = [], []
    a = ExpertsTap(layer, lambda e, t, w, c: seen_a.append(c.detach().clone())).attach()
    doubled = ExpertsTap(layer, lambda e, t, w, c: c * 2, replaces=True).attach()
    b = ExpertsTap(layer, lambda e, t, w, c: seen_b.append(c.detach().clone())).attach()
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask)
        assert _clean(model)
        doubled.remove()
        with torch.no_grad():
            model(ids, attention_mask=mask)
    finally:
        a.remove()
        b.remove()
    n = len(seen_a) // 2
    assert n and len(seen_b) == len(seen_a)
    for x, y in zip(seen_a, seen_b):
        assert torch.equal(x, y)
    for twice, once in zip(seen_a[:n], seen_a[n:]):
        assert torch.equal(twice, once * 2)
    assert _clean(model) and not layer.module._forward_pre_hooks and not layer.module._forward_hooks


@pytest.mark.parametrize("model_type", FAMILIES)
def test_expert_rows_describe_the_rows_handed_to_on_coefficients(models, model_type):
    """A tap that takes on_expert_rows gets each expert's rows as (expert, token, top-k position) of the routing
    the module received: gathered, they are exactly the per-row tensors a plain tap gets, in the same order.
    Beside a tap without it, both get on_coefficients (the same rows); a replacing tap cannot take it."""
    model = models[model_type]
    ids, mask = random_batch(batch=3, seq=10, padding="left", seed=12)
    layers = _layers(model)
    _, plain = _handoffs(model, ids, mask)
    described = {k: [] for k in range(len(layers))}

    def rows_of(k):
        def rows(expert, token_index, top_k_pos, weights, c):
            described[k].append((torch.full_like(token_index, expert), token_index.clone(),
                                 weights[token_index, top_k_pos].clone(), c.detach().clone()))
        return rows

    def fail(*a):
        pytest.fail("on_coefficients was called though every tap takes on_expert_rows")

    taps = [ExpertsTap(layer, fail, on_expert_rows=rows_of(k)).attach() for k, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask)
        flat = [h for k in range(len(layers)) for h in described[k]]  # layers run in order
        assert len(flat) == len(plain) > 0
        for mine, theirs in zip(flat, plain):
            for a, b in zip(mine, theirs):
                assert a.dtype == b.dtype and torch.equal(a, b)
        first_layer = described[0][:]
        got = {"with": [], "without": []}
        taps[0].on_coefficients = lambda *a: got["with"].append([t.detach().clone() for t in a])
        beside = ExpertsTap(layers[0], lambda *a: got["without"].append([t.detach().clone() for t in a])).attach()
        with torch.no_grad():
            model(ids, attention_mask=mask)
        beside.remove()
    finally:
        for tap in taps:
            tap.remove()
    assert len(got["with"]) == len(got["without"]) == len(first_layer)
    for a, b, c in zip(got["with"], got["without"], first_layer):
        assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))
    assert _clean(model)
    with pytest.raises(ExpertsError, match="observing taps only"):
        ExpertsTap(layers[0], lambda *a: a[-1], replaces=True, on_expert_rows=rows_of(0))


def test_a_removed_tap_leaves_no_shadow_and_a_stale_tag_is_inert(models):
    model = models["mixtral"]
    ids, mask = random_batch(batch=2, seq=5, seed=9)
    [layer, *_] = _layers(model)
    kept = {}

    def keep(e, t, w, c):
        kept.setdefault("down", layer.module.__dict__["down_proj"])

    with ExpertsTap(layer, keep):
        with torch.no_grad():
            model(ids, attention_mask=mask)
    assert _clean(model)
    stale = kept["down"]  # a tagged alias kept past its forward: plain arithmetic, no handoff, no error
    x = torch.randn(3, stale.shape[-1])
    linear = torch.nn.functional.linear
    assert torch.equal(linear(x, stale[0]), linear(x, layer.module.down_proj[0]))


def test_a_down_projection_without_its_own_where_is_refused(models, monkeypatch):
    """If the where of an expert is not seen (a family whose loop computes its rows another way), the matmul is
    refused rather than labelled with the previous expert's rows."""
    model = models["mixtral"]
    ids, mask = random_batch(batch=2, seq=6, seed=10)
    monkeypatch.setattr(experts, "_WHERES", set())
    [layer, *_] = _layers(model)
    with ExpertsTap(layer, lambda *a: None), pytest.raises(ExpertsError, match="torch.where"):
        with torch.no_grad():
            model(ids, attention_mask=mask)
    assert _clean(model)


def test_compiled_eager_experts_use_the_mode_and_match(models):
    torch._dynamo.reset()
    model = models["mixtral"]
    ids, mask = random_batch(batch=2, seq=6, seed=11)
    out, got = _handoffs(model, ids, mask)
    compiled = torch.compile(model, backend="eager")
    try:
        out_c, got_c = _handoffs(compiled, ids, mask)
    except kh.KacqError:
        return  # a refusal that says why is acceptable
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out_c, out)
    assert len(got_c) == len(got)
    for mine, theirs in zip(got_c, got):
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b)
    assert _clean(model)


def test_on_expert_rows_set_on_an_attached_tap_is_what_the_next_forward_calls(models):
    """on_expert_rows is an attribute like on_coefficients: set on an attached tap, the next forward calls what it
    holds now (None: on_coefficients), not the callable it held when it was attached."""
    model = models["mixtral"]
    ids, mask = random_batch(batch=2, seq=6, seed=4)
    [layer, *_] = _layers(model)
    calls = []
    tap = ExpertsTap(layer, lambda *a: calls.append("coefficients"),
                     on_expert_rows=lambda *a: calls.append("first rows")).attach()
    try:
        for rows, want in ((None, "coefficients"), (lambda *a: calls.append("second rows"), "second rows")):
            tap.on_expert_rows = rows
            calls.clear()
            with torch.no_grad():
                model(ids, attention_mask=mask)
            assert calls and set(calls) == {want}
    finally:
        tap.remove()
    assert _clean(model)
    replacing = ExpertsTap(layer, lambda *a: a[-1], replaces=True)
    with pytest.raises(ExpertsError, match="observing taps only"):
        replacing.on_expert_rows = lambda *a: None
