"""Hostile tests of the call transaction, gradients and saved statistics: each asserts the right number or a KacqError.

Every expected value comes from independent hooks (float64) or from a run that does not take the path under test.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kacq_hooks as kh
from tiny_models import random_batch, tiny_model


def tokens(inst) -> list[int]:
    return [int(s.tokens) for s in inst.stats]


def test_remove_inside_a_forward_then_attach_does_not_commit_the_stale_half_call():
    """remove() from a hook mid-forward drops the open call, but its staged layer-0 sums must not leak into the next."""
    model = tiny_model("llama")
    ids, mask = random_batch(batch=3, seq=10, padding="right")
    inst = kh.instrument(model)
    handle = model.model.layers[0].register_forward_hook(lambda module, args, output: inst.remove())
    with torch.no_grad():
        model(ids, attention_mask=mask)
    handle.remove()
    inst.attach()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert tokens(inst) == [int(mask.sum())] * 2


def _gradient_stats(checkpointing: bool, reentrant: bool):
    model = tiny_model("llama").train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    inst = kh.instrument(model, grads=True)
    loss = 0
    for padding, seed in (("right", 1), ("left", 2)):  # two micro-batches, one backward (gradient accumulation)
        ids, mask = random_batch(batch=3, seq=10, padding=padding, seed=seed)
        loss = loss + model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    inst.remove()
    return inst


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_gradient_accumulation_gives_the_gradient_statistics_of_the_plain_model(reentrant):
    """Reentrant recomputation of micro-batch 1 must use micro-batch 1's mask, not the last call's, or refuse."""
    plain = _gradient_stats(checkpointing=False, reentrant=False)
    if reentrant:  # which micro-batch a recomputed layer belongs to cannot be known: refused, not guessed
        with pytest.raises(kh.KacqError, match="reentrant activation checkpointing with gradient accumulation"):
            _gradient_stats(checkpointing=True, reentrant=True)
        return
    checkpointed = _gradient_stats(checkpointing=True, reentrant=reentrant)
    for want, got in zip(plain.stats, checkpointed.stats):
        assert int(got.grad_tokens) == int(want.grad_tokens)
        torch.testing.assert_close(got.grad_sum_abs, want.grad_sum_abs, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(got.grad_sum_cg, want.grad_sum_cg, rtol=1e-4, atol=1e-9)


def _batches():
    return [random_batch(batch=3, seq=10, padding=padding, seed=seed) for padding, seed in (("right", 1), ("left", 2))]


def _document_entropy_of_both(model):
    (ids1, mask1), (ids2, mask2) = _batches()
    return kh.measure(model, [{"input_ids": ids1, "attention_mask": mask1},
                              {"input_ids": ids2, "attention_mask": mask2}], weighting="document").knowledge_entropy()


def test_loading_token_weighted_statistics_into_a_document_weighted_instrumentation_is_refused_or_right():
    model = tiny_model("llama")
    (ids1, mask1), (ids2, mask2) = _batches()
    saved = kh.measure(model, [{"input_ids": ids1, "attention_mask": mask1}]).state_dict()  # weighting="token"
    inst = kh.instrument(model, weighting="document")
    try:
        inst.load_state_dict(saved)
    except kh.KacqError:
        return  # refusing is right: the saved statistics have no document sums
    with torch.no_grad():
        model(ids2, attention_mask=mask2)
    inst.remove()
    got = inst.knowledge_entropy("document")  # must cover both batches, as the token counts do
    want = _document_entropy_of_both(model)
    assert got.per_layer == pytest.approx(want.per_layer, rel=1e-5)


def test_merging_token_weighted_into_document_weighted_statistics_is_refused_or_right():
    model = tiny_model("llama")
    (ids1, mask1), (ids2, mask2) = _batches()
    tok = kh.measure(model, [{"input_ids": ids1, "attention_mask": mask1}])
    doc = kh.measure(model, [{"input_ids": ids2, "attention_mask": mask2}], weighting="document")
    try:
        doc.merge(tok)
    except kh.KacqError:
        return
    got = doc.knowledge_entropy("document")
    want = _document_entropy_of_both(model)
    assert got.per_layer == pytest.approx(want.per_layer, rel=1e-5)


def test_merging_statistics_measured_with_and_without_padding_is_refused():
    """A sum of masked and unmasked counts is neither measurement."""
    model = tiny_model("llama")
    (ids1, mask1), (ids2, mask2) = _batches()
    masked = kh.measure(model, [{"input_ids": ids1, "attention_mask": mask1}])
    unmasked = kh.measure(model, [{"input_ids": ids2, "attention_mask": mask2}], mask_padding=False)
    with pytest.raises(kh.KacqError):
        masked.merge(unmasked)


class ReturnsNothing(nn.Module):
    """A wrapper whose forward stores the logits and returns None (a training step that keeps its own outputs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.logits = None

    def forward(self, input_ids, attention_mask=None):
        self.logits = self.model(input_ids, attention_mask=attention_mask).logits
        return None


def test_a_forward_that_returns_none_normally_is_counted_or_refused_not_silently_dropped():
    model = ReturnsNothing(tiny_model("llama"))
    ids, mask = random_batch(batch=3, seq=10, padding="right")
    inst = kh.instrument(model)
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask)
    except kh.KacqError:
        return
    assert tokens(inst) == [int(mask.sum())] * 2


@pytest.mark.parametrize("order", ["hook_first", "kacq_first"])
def test_a_call_whose_forward_hook_raises_adds_nothing_so_the_retry_counts_once(order):
    """A forward hook on the model that raises (an OOM while computing a loss in it) fails the call like any error."""
    model = tiny_model("llama")
    ids, mask = random_batch(batch=3, seq=10, padding="right")
    failing = [True]

    def fail_once(module, args, output):
        if failing[0]:
            failing[0] = False
            raise RuntimeError("out of memory, say")

    if order == "hook_first":
        handle = model.register_forward_hook(fail_once)
        inst = kh.instrument(model)
    else:
        inst = kh.instrument(model)
        handle = model.register_forward_hook(fail_once)
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            model(ids, attention_mask=mask)
        model(ids, attention_mask=mask)  # the retry
    handle.remove()
    assert tokens(inst) == [int(mask.sum())] * 2


def test_a_base_model_call_after_a_keyboard_interrupt_is_counted():
    """An interrupted forward leaves its call open (always-called hooks do not run on KeyboardInterrupt)."""
    model = tiny_model("llama")
    ids, mask = random_batch(batch=3, seq=10, padding="right")
    inst = kh.instrument(model)

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    handle = model.model.layers[1].register_forward_hook(interrupt)
    with torch.no_grad():
        with pytest.raises(KeyboardInterrupt):
            model(ids, attention_mask=mask)
        handle.remove()
        model.model(ids, attention_mask=mask)  # the base model on its own, as test_call_context counts it
    assert tokens(inst) == [int(mask.sum())] * 2


@pytest.mark.parametrize("instrument_first", [False, True])
def test_a_compiled_model_counts_each_batch_with_its_own_mask(instrument_first):
    """Three calls, two masks and a shape change: guards and replays must not reuse a traced call's mask."""
    model = tiny_model("llama")
    batches = [random_batch(batch=3, seq=10, padding="right", seed=1), random_batch(batch=3, seq=10, padding="left",
                                                                                    seed=2),
               random_batch(batch=2, seq=6, padding="left", seed=3)]
    want = kh.measure(model, [{"input_ids": ids, "attention_mask": mask} for ids, mask in batches])
    torch._dynamo.reset()
    if instrument_first:
        inst = kh.instrument(model)
        compiled = torch.compile(model, backend="eager")
    else:
        compiled = torch.compile(model, backend="eager")
        inst = kh.instrument(compiled)
    try:
        with torch.no_grad():
            for ids, mask in batches:
                compiled(ids, attention_mask=mask)
    except kh.KacqError:
        return  # a refusal that says why is acceptable; a Dynamo internal error is not
    finally:
        inst.remove()
        torch._dynamo.reset()
    assert tokens(inst) == tokens(want)
    for got, ref in zip(inst.stats, want.stats):
        torch.testing.assert_close(got.sum_abs, ref.sum_abs, rtol=1e-5, atol=1e-7)


def test_hooked_transformer_start_at_layer_after_a_stop_at_layer_run_is_not_glued_onto_it():
    """stop_at_layer leaves the call open at the first block; a later start_at_layer run on another batch must not
    close it with the old batch's mask (start_at_layer is documented as unsupported: refuse, or count nothing)."""
    pytest.importorskip("transformer_lens")
    from kacq_hooks.frontends.transformer_lens import hooked_transformer_from_hf

    ht = hooked_transformer_from_hf(tiny_model("llama"))
    ids, mask = random_batch(batch=3, seq=10, padding="left", seed=1)
    other_residual = torch.randn(3, 10, ht.cfg.d_model)  # another, unpadded batch's residual stream
    inst = kh.instrument(ht)
    with torch.no_grad():
        ht(ids, attention_mask=mask, stop_at_layer=1)
        try:
            ht(other_residual, start_at_layer=1)
        except kh.KacqError:
            return
    assert tokens(inst) == [0, 0]  # layer 1 never saw the masked batch that layer 0 saw


class RetryOnOOM(nn.Module):
    """A wrapper that retries row by row when the whole batch fails (an out-of-memory on the logits, say)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        try:
            return self.model(input_ids, attention_mask=attention_mask).logits
        except RuntimeError:
            return torch.cat([self.model(input_ids[i:i + 1], attention_mask=attention_mask[i:i + 1]).logits
                              for i in range(input_ids.shape[0])])


def test_an_inner_attempt_that_raised_after_every_layer_ran_is_not_counted_with_the_retry():
    model = tiny_model("llama")
    wrapper = RetryOnOOM(model)
    ids, mask = random_batch(batch=3, seq=10, padding="right")
    failing = [True]

    def fail_in_the_head(module, args, output):
        if failing[0]:
            failing[0] = False
            raise RuntimeError("out of memory on the logits")

    handle = model.lm_head.register_forward_hook(fail_in_the_head)
    inst = kh.instrument(wrapper)
    with torch.no_grad():
        wrapper(ids, attention_mask=mask)
    handle.remove()
    assert tokens(inst) == [int(mask.sum())] * 2  # the row-by-row retry only; the failed attempt added nothing


def test_gradients_of_a_paused_forward_are_not_counted_under_reentrant_checkpointing():
    """Reentrant checkpointing recomputes in backward; a forward run inside pause() must stay uncounted there too."""
    model = tiny_model("llama").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    inst = kh.instrument(model, grads=True)
    ids, mask = random_batch(batch=3, seq=10, padding="right", seed=1)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    counted = [int(s.grad_tokens) for s in inst.stats]
    with inst.pause():
        probe_loss = model(ids, attention_mask=mask, labels=ids).loss
    probe_loss.backward()
    inst.remove()
    assert [int(s.grad_tokens) for s in inst.stats] == counted == [int(mask.sum())] * 2


def test_merging_statistics_of_other_sites_is_refused_as_loading_them_is():
    """load_state_dict refuses statistics of other site paths; merge must not pool another model's layers."""
    ids = torch.randint(2, 300, (2, 6))
    llama = kh.measure(tiny_model("llama"), [ids])
    gpt2 = kh.measure(tiny_model("gpt2"), [ids])  # also 2 layers of d_ff 64
    with pytest.raises(kh.KacqError):
        llama.load_state_dict(gpt2.state_dict())
    with pytest.raises(kh.KacqError):
        llama.merge(gpt2)
