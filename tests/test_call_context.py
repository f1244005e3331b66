"""A forward is a transaction, each stack is read with its own mask, and no call is counted wrongly (issue 11).

Every test here gave a silently wrong number (or a crash) with the root-mask design of version 0.1.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, DynamicCache

import kacq_hooks as kh
from tiny_models import VOCAB, random_batch, tiny_model


def captured_inputs(modules, run):
    """Inputs of ``modules`` captured by independent hooks while ``run()`` executes."""
    seen = {id(m): [] for m in modules}
    handles = [m.register_forward_pre_hook(lambda mod, a: seen[id(mod)].append(a[0].detach().double().clone()))
               for m in modules]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return [seen[id(m)] for m in modules]


def tokens(inst) -> list[int]:
    return [int(s.tokens) for s in inst.stats]


def test_inner_module_call_does_not_reuse_the_previous_calls_mask():
    model = tiny_model("llama")
    ids, mask = random_batch(batch=3, seq=4, padding="right")  # 4 + 1 + 1... fewer real tokens than 12
    inst = kh.instrument(model)
    with torch.no_grad():
        model(ids, attention_mask=mask)
        assert tokens(inst) == [int(mask.sum())] * 2
        inst.reset()
        model.model(ids)  # no mask: every one of the 12 positions is a token
    assert tokens(inst) == [12, 12]


class DictWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict):
        return self.model(**batch)


def test_a_wrapper_whose_forward_takes_a_dict_still_masks_padding():
    model = tiny_model("llama")
    ids, mask = random_batch(batch=3, seq=10, padding="right")
    wrapper = DictWrapper(model)
    with kh.instrument(wrapper) as inst, torch.no_grad():
        wrapper({"input_ids": ids, "attention_mask": mask})
    assert tokens(inst) == [int(mask.sum())] * 2


def test_a_pre_hook_that_rewrites_the_mask_after_instrument_is_seen():
    """Injection rewrites the batch in a root pre-hook registered after kacq's: kacq counts what the model saw."""
    model = tiny_model("llama")
    ids, mask = random_batch(batch=3, seq=10, padding="right")
    inst = kh.instrument(model)

    def fill_padding(module, args, kwargs):
        return args, {**kwargs, "attention_mask": torch.ones_like(kwargs["attention_mask"])}

    handle = model.register_forward_pre_hook(fill_padding, with_kwargs=True)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    handle.remove()
    assert tokens(inst) == [ids.numel()] * 2 != [int(mask.sum())] * 2


def _tiny_t5():
    cfg = AutoConfig.for_model("t5", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                               num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(cfg).eval()


def test_t5_decoder_sites_use_the_decoder_mask_not_the_encoders():
    model = _tiny_t5()
    enc_ids, enc_mask = random_batch(batch=2, seq=8, padding="right", seed=1)
    dec_ids = torch.randint(2, VOCAB, (2, 5))
    dec_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    inst = kh.instrument(model, mlp_out="decoder.block.{i}.layer.2.DenseReluDense.wo")
    modules = [s.module for s in inst.sites]
    seen = captured_inputs(modules, lambda: model(input_ids=enc_ids, attention_mask=enc_mask,
                                                   decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask))
    inst.remove()
    assert tokens(inst) == [int(dec_mask.sum())] * 2  # 8 of 10, not the encoder mask's last positions
    for (c,), got in zip(seen, inst.mean_abs_coefficients()):
        want = c.abs()[dec_mask.bool()].mean(0)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_sequence_first_layout_is_masked_by_position_even_when_batch_equals_seq():
    cfg = AutoConfig.for_model("xlnet", vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_inner=64)
    torch.manual_seed(0)
    model = AutoModel.from_config(cfg).eval()
    ids = torch.randint(2, VOCAB, (4, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])  # not symmetric: a transpose shows
    inst = kh.instrument(model, mlp_out="layer.{i}.ff.layer_2")
    seen = captured_inputs([s.module for s in inst.sites],
                           lambda: model(ids, attention_mask=mask.float()))
    inst.remove()
    assert tokens(inst) == [int(mask.sum())] * 2
    for (c,), got in zip(seen, inst.mean_abs_coefficients()):
        want = c.transpose(0, 1).abs()[mask.bool()].mean(0)  # XLNet's hidden states are [seq, batch, d]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_a_layer_shared_across_depth_is_refused_not_pooled():
    cfg = AutoConfig.for_model("albert", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                               intermediate_size=64, embedding_size=16)
    model = AutoModel.from_config(cfg).eval()
    inst = kh.instrument(model, mlp_out="encoder.albert_layer_groups.{i}.albert_layers.0.ffn_output")
    with pytest.raises(kh.KacqError, match="ran 2 times in one forward"), torch.no_grad():
        model(torch.randint(2, VOCAB, (1, 11)))
    assert tokens(inst) == [0]


class Boom(Exception):
    pass


def test_a_forward_that_raises_midway_adds_nothing():
    model = tiny_model("llama")
    ids, mask = random_batch(batch=3, seq=10, padding="right")
    inst = kh.instrument(model)
    failing = [True]

    def fail_once(module, args, output):
        if failing[0]:
            failing[0] = False
            raise Boom("out of memory, say")

    handle = model.model.layers[1].register_forward_hook(fail_once)
    with torch.no_grad():
        with pytest.raises(Boom):
            model(ids, attention_mask=mask)
        assert tokens(inst) == [0, 0]  # layer 0 had run; nothing of that call is kept
        model(ids, attention_mask=mask)  # the retry
    handle.remove()
    assert tokens(inst) == [int(mask.sum())] * 2
    assert inst.discarded_calls == 1


def test_a_keyboard_interrupt_midway_leaves_no_open_call_behind():
    model = tiny_model("llama")
    ids, mask = random_batch(batch=3, seq=10, padding="left")
    inst = kh.instrument(model)

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    handle = model.model.layers[1].register_forward_hook(interrupt)
    with torch.no_grad():
        with pytest.raises(KeyboardInterrupt):
            model(ids, attention_mask=mask)
        handle.remove()
        model(ids, attention_mask=mask)
    assert tokens(inst) == [int(mask.sum())] * 2


def test_document_weighting_refuses_cached_generation():
    model = tiny_model("llama")
    ids = torch.randint(2, VOCAB, (2, 5))
    inst = kh.instrument(model, weighting="document")
    with torch.no_grad():
        out = model(ids, attention_mask=torch.ones_like(ids), use_cache=True)
        with pytest.raises(kh.KacqError, match="KV cache"):
            model(ids[:, :1], attention_mask=torch.ones(2, 6, dtype=torch.long), past_key_values=out.past_key_values)
    assert [int(s.documents) for s in inst.stats] == [2, 2]


def test_results_carry_the_models_layer_numbers():
    model = tiny_model("llama", num_hidden_layers=4)

    class NoMLP(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    for i in (0, 2):
        model.model.layers[i].mlp = NoMLP()
    with kh.instrument(model) as inst, torch.no_grad():
        model(torch.randint(2, VOCAB, (2, 6)))
    ke = inst.knowledge_entropy()
    assert [s.layer for s in inst.sites] == [1, 3]
    assert ke.labels == ["decoder.layer_1", "decoder.layer_3"]
    assert list(ke.by_label) == ke.labels


def test_statistics_created_under_inference_mode_work_outside_it():
    model = tiny_model("gpt2")
    ids = torch.randint(2, VOCAB, (2, 6))
    with torch.inference_mode():
        inst = kh.instrument(model)
        model(ids)
    with torch.no_grad():
        model(ids)
    assert tokens(inst) == [24, 24]


def test_a_deep_copy_or_pickle_of_an_instrumented_model_is_not_instrumented():
    model = tiny_model("llama")
    inst = kh.instrument(model)
    ids = torch.randint(2, VOCAB, (2, 6))
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(clone(ids).logits, model(ids).logits, rtol=0, atol=0)
        loaded(ids)
    assert tokens(inst) == [12, 12]  # only the original's forward
    assert kh.instrumentations_of(clone) == [] and kh.instrumentations_of(loaded) == []
    leftover = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in clone.modules())
    assert leftover == 0  # the copied hooks removed themselves at their first call
    pickle.dumps(inst.stats.state_dict())


def test_an_all_nan_layer_is_reported_as_non_finite():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
    with kh.instrument(model) as inst, torch.no_grad():
        model(torch.randint(2, VOCAB, (2, 6)))
    with pytest.raises(kh.KacqError, match="non-finite"):
        inst.knowledge_entropy()


def test_a_layer_called_on_its_own_is_refused_unless_paused():
    model = tiny_model("llama")
    inst = kh.instrument(model)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        with pytest.raises(kh.KacqError, match="outside a call"):
            model.model.layers[0].mlp(x)
        with inst.pause():
            model.model.layers[0].mlp(x)
    assert tokens(inst) == [0, 0]


def test_a_model_that_ignores_the_mask_still_has_the_callers_padding_left_out():
    """RWKV's causal LM never hands attention_mask to its body: the padding the caller marked is still padding."""
    from model_zoo import build

    model = build("rwkv", "causal_lm")
    ids, mask = random_batch(batch=2, seq=8, padding="right")
    inst = kh.instrument(model)
    seen = captured_inputs([s.module for s in inst.sites], lambda: model(ids, attention_mask=mask, use_cache=False))
    inst.remove()
    assert tokens(inst) == [int(mask.sum())] * 2
    for (c,), got in zip(seen, inst.mean_abs_coefficients()):
        torch.testing.assert_close(got.double(), c.abs()[mask.bool()].mean(0), rtol=1e-5, atol=0)


def test_encoder_decoder_model_names_its_bert_decoder_the_decoder_stack():
    from model_zoo import build

    model = build("encoder-decoder", "seq2seq_lm")
    assert {s.stack for s in kh.find_sites(model)} == {"encoder", "decoder"}


def test_a_finished_call_keeps_no_reference_to_the_forwards_outputs():
    """The call's frame (held to tell a live forward from a dead one) must not outlive it: its locals hold the
    logits, which would stay alive through the next forward (and its peak memory)."""
    import gc
    import weakref

    model = tiny_model("llama")
    inst = kh.instrument(model)
    with torch.no_grad():
        out = model(torch.randint(2, VOCAB, (2, 6))).logits
    ref = weakref.ref(out)
    del out
    gc.collect()
    assert ref() is None
    assert tokens(inst) == [12, 12]
