"""TransformerLens and nnsight front ends: same sites, same statistics as the Hugging Face model.

One set of tiny random weights is run as a Hugging Face model, a HookedTransformer (weights
converted in-process), a TransformerBridge and through nnsight; every front end must give the same
mean |C| and knowledge entropy. Left padding: TransformerLens shifts positions past the pads, so the
HF reference gets the same ``position_ids`` (HF's default would not shift them).
"""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import kacq_hooks as kh
from kacq_hooks.errors import KacqError, LocateError, MissingExtraError
from tiny_models import random_batch, tiny_model, tiny_tokenizer

pytest.importorskip("transformer_lens")
pytest.importorskip("nnsight")

from nnsight import LanguageModel, NNsight  # noqa: E402

from kacq_hooks.frontends.transformer_lens import (  # noqa: E402
    bridge_from_hf,
    hooked_transformer_config_from_hf,
    hooked_transformer_from_hf,
)

ARCHS = ["gpt2", "llama"]
TEXTS = ["the quick brown fox jumps over the lazy dog", "a small model", "knowledge entropy of the council"]


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding, as TransformerLens computes them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def hf_reference(hf, ids, mask, **kwargs) -> kh.Instrumentation:
    with kh.instrument(hf, **kwargs) as inst, torch.no_grad():
        hf(ids, attention_mask=mask, position_ids=positions(mask))
    return inst


def assert_same_stats(inst: kh.Instrumentation, ref: kh.Instrumentation, rtol: float = 1e-5) -> None:
    assert [int(s.tokens) for s in inst.stats] == [int(s.tokens) for s in ref.stats]
    for got, want in zip(inst.mean_abs_coefficients(), ref.mean_abs_coefficients(), strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    got, want = inst.knowledge_entropy(), ref.knowledge_entropy()
    assert got.total == pytest.approx(want.total, rel=rtol)
    assert got.per_layer == pytest.approx(want.per_layer, rel=rtol)


def torch_hook_counts(module: torch.nn.Module) -> list[tuple[str, int, int, int]]:
    return [(name, len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks))
            for name, m in module.named_modules()]


# -- optional extras -----------------------------------------------------------------------------
def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_import_kacq_hooks_does_not_import_the_optional_front_ends():
    result = run_python("""
        import sys
        import kacq_hooks
        import kacq_hooks.frontends
        loaded = [m for m in ("transformer_lens", "nnsight") if m in sys.modules]
        assert not loaded, loaded
    """)
    assert result.returncode == 0, result.stderr


def test_a_model_from_a_missing_package_gets_a_missing_extra_error():
    result = run_python("""
        import sys
        from importlib.abc import MetaPathFinder

        class Block(MetaPathFinder):  # behave as if neither package were installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("transformer_lens", "nnsight"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, Block())
        import torch
        import kacq_hooks as kh

        for module, extra in (("transformer_lens.HookedTransformer", "transformer-lens"),
                              ("nnsight.modeling.language", "nnsight")):
            fake = type("Model", (torch.nn.Module,), {"__module__": module})()
            try:
                kh.instrument(fake)
            except kh.MissingExtraError as err:
                assert err.extra == extra and f"kacq_hooks[{extra}]" in str(err), str(err)
            else:
                raise AssertionError(f"no MissingExtraError for {module}")
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_missing_extra_error_is_a_kacq_error_and_an_import_error():
    assert issubclass(MissingExtraError, KacqError) and issubclass(MissingExtraError, ImportError)


# -- parity --------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_front_end_gives_the_hugging_face_statistics(arch, padding):
    hf = tiny_model(arch)
    ids, mask = random_batch(padding=padding)
    ref = hf_reference(hf, ids, mask)
    assert int(ref.stats[0].tokens) == int(mask.sum())

    ht = hooked_transformer_from_hf(hf)
    bridge = bridge_from_hf(copy.deepcopy(hf))
    runs = {}
    for name, model in (("hooked_transformer", ht), ("bridge", bridge)):
        with kh.instrument(model) as inst, torch.no_grad():
            model(ids, attention_mask=mask)
        runs[name] = inst
    for wrapper in (NNsight, LanguageModel):
        envoy = wrapper(copy.deepcopy(hf), **({"tokenizer": tiny_tokenizer()} if wrapper is LanguageModel else {}))
        with kh.instrument(envoy) as inst, torch.no_grad():
            with envoy.trace(ids, attention_mask=mask, position_ids=positions(mask)):
                pass
        runs[f"{wrapper.__name__} trace"] = inst
        with kh.instrument(envoy) as inst, torch.no_grad():
            envoy(ids, attention_mask=mask, position_ids=positions(mask))
        runs[f"{wrapper.__name__} call"] = inst
    envoy = NNsight(ht)  # nnsight around a HookedTransformer binds the TransformerLens front end inside
    with kh.instrument(envoy) as inst, torch.no_grad():
        with envoy.trace(ids, attention_mask=mask):
            pass
    runs["NNsight(HookedTransformer) trace"] = inst

    assert runs["hooked_transformer"].sites[0].path == "blocks.0.mlp.hook_post"
    assert runs["bridge"].sites[0].path == "blocks.0.mlp.out.hook_in"
    assert runs["NNsight trace"].binding.name == "nnsight+hf"
    assert runs["NNsight(HookedTransformer) trace"].binding.name == "nnsight+transformer_lens"
    for name, inst in runs.items():
        assert_same_stats(inst, ref), name


def test_hooked_transformer_config_reads_sizes_from_the_hf_config():
    cfg = hooked_transformer_config_from_hf(tiny_model("gpt2").config)  # n_inner = 2 * n_embd here
    assert (cfg.d_mlp, cfg.d_model, cfg.n_layers, cfg.n_heads) == (64, 32, 2, 4)
    cfg = hooked_transformer_config_from_hf(tiny_model("llama").config)
    assert (cfg.d_mlp, cfg.n_key_value_heads, cfg.gated_mlp, cfg.normalization_type) == (64, 2, True, "RMS")


def test_builders_refuse_what_they_cannot_convert():
    with pytest.raises(KacqError, match="bridge_from_hf"):
        hooked_transformer_from_hf(tiny_model("opt"))
    with pytest.raises(KacqError, match="bias"):
        hooked_transformer_from_hf(tiny_model("llama", mlp_bias=True))
    odd = tiny_model("llama")
    odd.config.architectures = ["MadeUpForCausalLM"]
    with pytest.raises(KacqError, match="no bridge adapter"):
        bridge_from_hf(odd)


# -- padding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("front_end", ["hooked_transformer", "bridge"])
def test_strings_padded_left_are_masked_and_padded_right_are_counted_as_transformer_lens_does(front_end):
    hf = tiny_model("llama")
    build = hooked_transformer_from_hf if front_end == "hooked_transformer" else bridge_from_hf
    model = build(copy.deepcopy(hf), tokenizer=tiny_tokenizer())
    for side in ("left", "right"):
        batch = tiny_tokenizer()(TEXTS, padding=True, padding_side=side, return_tensors="pt")
        assert int(batch["attention_mask"].min()) == 0  # the batch really is padded
        with kh.instrument(model) as inst, torch.no_grad():
            model(TEXTS, prepend_bos=False, padding_side=side)
        if side == "left":  # TransformerLens builds a mask, and kacq uses it
            assert_same_stats(inst, hf_reference(hf, batch["input_ids"], batch["attention_mask"]))
        else:  # no mask from TransformerLens (causal attention needs none): every position counts
            assert int(inst.stats[0].tokens) == batch["input_ids"].numel()


def test_hooked_transformer_left_padding_mask_is_inferred_from_pad_tokens_like_the_model_does():
    hf, tokenizer = tiny_model("gpt2"), tiny_tokenizer()
    batch = tokenizer(TEXTS, padding=True, padding_side="left", return_tensors="pt")
    ref = hf_reference(hf, batch["input_ids"], batch["attention_mask"])
    ht = hooked_transformer_from_hf(hf, tokenizer=tiny_tokenizer())
    ht.tokenizer.padding_side = "left"
    with kh.instrument(ht) as inst, torch.no_grad():
        ht(batch["input_ids"], prepend_bos=False)  # no mask: TransformerLens infers it from the pads
    assert_same_stats(inst, ref)


# -- living with TransformerLens's hooks ---------------------------------------------------------
def tl_models():
    hf = tiny_model("llama")
    return [("hooked_transformer", hooked_transformer_from_hf(hf)), ("bridge", bridge_from_hf(copy.deepcopy(hf)))]


def test_reset_hooks_and_the_hooks_context_leave_the_capture_attached():
    ids, mask = random_batch()
    for name, model in tl_models():
        site = "blocks.0.mlp.hook_post" if name == "hooked_transformer" else "blocks.0.mlp.out.hook_in"
        seen = []
        model.add_hook(site, lambda x, hook: seen.append(hook.name), is_permanent=True)
        inst = kh.instrument(model)
        model.reset_hooks(including_permanent=True)
        with torch.no_grad():
            model(ids, attention_mask=mask)
        assert seen == [] and int(inst.stats[0].tokens) == int(mask.sum()), name
        with model.hooks(fwd_hooks=[(site, lambda x, hook: seen.append(hook.name))]), torch.no_grad():
            model(ids, attention_mask=mask)
        with torch.no_grad():
            model(ids, attention_mask=mask)
        assert len(seen) == 1 and int(inst.stats[0].tokens) == 3 * int(mask.sum()), name
        inst.remove()
        assert kh.instrumentations_of(model) == []


def test_instrument_and_remove_leave_transformer_lens_hooks_and_outputs_as_they_were():
    ids, mask = random_batch()
    for name, model in tl_models():
        site = "blocks.1.mlp.hook_post" if name == "hooked_transformer" else "blocks.1.mlp.out.hook_in"
        model.add_hook(site, lambda x, hook: x * 0.5, is_permanent=True)  # a user's own edit stays in force
        with torch.no_grad():
            before = model(ids, attention_mask=mask)  # the bridge adds some hooks of its own on a first call
        lens_handles = [list(hp.fwd_hooks) for hp in model.hook_dict.values()]
        torch_hooks = torch_hook_counts(model)
        with torch.no_grad():
            with kh.instrument(model) as inst:
                assert kh.instrumentations_of(model) == [inst]
                during = model(ids, attention_mask=mask)
            after = model(ids, attention_mask=mask)
        assert torch.equal(before, during) and torch.equal(before, after), name
        assert [list(hp.fwd_hooks) for hp in model.hook_dict.values()] == lens_handles, name
        assert torch_hook_counts(model) == torch_hooks, name


def test_capture_sees_c_before_a_transformer_lens_edit_at_the_same_hook_point():
    ids, mask = random_batch()
    for name, model in tl_models():
        sites = kh.instrument(model).sites
        kh.instrumentations_of(model)[0].remove()
        same, upstream = sites[0].path, ("blocks.0.mlp.hook_pre" if name == "hooked_transformer"
                                          else "blocks.0.mlp.in.hook_out")
        with kh.instrument(model) as plain, torch.no_grad():
            clean = model(ids, attention_mask=mask)
        with kh.instrument(model) as edited, torch.no_grad():
            ablated = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(same, lambda x, hook: x * 0)])
        assert not torch.allclose(clean, ablated), name  # the edit took effect downstream ...
        got, want = edited.mean_abs_coefficients(), plain.mean_abs_coefficients()
        assert torch.equal(got[0], want[0]), name  # ... but layer 0's C was recorded before it,
        assert not torch.allclose(got[1], want[1]), name  # while layer 1 saw its effect
        with kh.instrument(model) as zeroed, torch.no_grad():  # an edit upstream of C reaches C
            model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(upstream, lambda x, hook: x * 0)])
        assert float(zeroed.stats[0].sum_abs.sum()) == 0.0 and float(zeroed.stats[1].sum_abs.sum()) > 0, name


def test_bind_errors_say_what_to_do():
    ht = hooked_transformer_from_hf(tiny_model("gpt2"))
    with pytest.raises(LocateError, match="must contain"):
        kh.instrument(ht, mlp_out="blocks.0.mlp.hook_post")
    with pytest.raises(LocateError, match="mlp_out="):
        kh.instrument(ht, mlp_out="blocks.{i}.mlp.hook_nothing")
    assert [s.path for s in kh.instrument(ht, mlp_out="blocks.{i}.mlp.hook_pre").sites] == \
        ["blocks.0.mlp.hook_pre", "blocks.1.mlp.hook_pre"]


# -- nnsight -------------------------------------------------------------------------------------
def test_nnsight_edit_at_the_projection_input_is_not_seen_but_an_upstream_edit_is():
    hf = tiny_model("llama")
    ids, mask = random_batch(padding=None)
    envoy = NNsight(hf)
    mlp = envoy.model.layers[0].mlp
    with kh.instrument(envoy) as plain, torch.no_grad():
        with envoy.trace(ids, attention_mask=mask):
            clean = envoy.output.logits.save()
    with kh.instrument(envoy) as edited, torch.no_grad():
        with envoy.trace(ids, attention_mask=mask):
            mlp.down_proj.input = torch.zeros_like(mlp.down_proj.input)
            out = mlp.down_proj.output.save()
            logits = envoy.output.logits.save()
    assert float(out.abs().sum()) == 0.0 and not torch.allclose(clean, logits)  # the model multiplied zeros
    got, want = edited.mean_abs_coefficients(), plain.mean_abs_coefficients()
    assert torch.equal(got[0], want[0])  # kacq recorded layer 0's C as the MLP produced it
    assert not torch.allclose(got[1], want[1])  # layer 1 runs on the edited residual stream
    with kh.instrument(envoy) as upstream, torch.no_grad():
        with envoy.trace(ids, attention_mask=mask):
            mlp.up_proj.output[:] = 0
    assert float(upstream.stats[0].sum_abs.sum()) == 0.0 and float(upstream.stats[1].sum_abs.sum()) > 0


def test_instrument_and_remove_leave_nnsight_as_it_was():
    hf = tiny_model("gpt2")
    ids, mask = random_batch()
    envoy = NNsight(hf)
    with torch.no_grad(), envoy.trace(ids, attention_mask=mask):  # installs nnsight's controllers
        before = envoy.output.logits.save()
    controllers = {name: m.__dict__.get("forward") for name, m in hf.named_modules()}
    torch_hooks = torch_hook_counts(hf)
    with kh.instrument(envoy) as inst:
        assert kh.instrumentations_of(envoy) == [inst] and kh.instrumentations_of(hf) == [inst]
        with torch.no_grad(), envoy.trace(ids, attention_mask=mask):
            during = envoy.output.logits.save()
    with torch.no_grad(), envoy.trace(ids, attention_mask=mask):
        after = envoy.output.logits.save()
    assert torch.equal(before, during) and torch.equal(before, after)
    assert {name: m.__dict__.get("forward") for name, m in hf.named_modules()} == controllers
    assert torch_hook_counts(hf) == torch_hooks and kh.instrumentations_of(envoy) == []


# -- training ------------------------------------------------------------------------------------
def backward_stats(model, ids, mask, weights, call) -> kh.Instrumentation:
    with kh.instrument(model, grads=True) as inst:
        logits = call(model, ids, mask)
        (logits * weights).sum().backward()
    return inst


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_stream_through_transformer_lens_and_nnsight(arch):
    hf = tiny_model(arch)
    ids, mask = random_batch()
    weights = torch.randn(*ids.shape, hf.config.vocab_size, generator=torch.Generator().manual_seed(1))
    weights = weights * mask[..., None]  # the loss ignores padded positions

    def hf_call(model, ids, mask):
        return model(ids, attention_mask=mask).logits

    def tl_call(model, ids, mask):
        return model(ids, attention_mask=mask)

    def nnsight_trace(envoy, ids, mask):
        with envoy.trace(ids, attention_mask=mask):
            logits = envoy.output.logits.save()
        return logits

    ref = backward_stats(hf, ids, mask, weights, hf_call)
    assert int(ref.stats[0].grad_tokens) == int(mask.sum()) and float(ref.stats[0].grad_sum_abs.sum()) > 0
    runs = {"hooked_transformer": backward_stats(hooked_transformer_from_hf(hf), ids, mask, weights, tl_call),
            "bridge": backward_stats(bridge_from_hf(copy.deepcopy(hf)), ids, mask, weights, tl_call),
            "nnsight call": backward_stats(NNsight(copy.deepcopy(hf)), ids, mask, weights, hf_call),
            "nnsight trace": backward_stats(NNsight(copy.deepcopy(hf)), ids, mask, weights, nnsight_trace)}
    for name, inst in runs.items():
        for got, want in zip(inst.stats, ref.stats, strict=True):
            assert int(got.grad_tokens) == int(want.grad_tokens), name
            torch.testing.assert_close(got.grad_sum_abs, want.grad_sum_abs, rtol=1e-4, atol=1e-7, msg=name)
            torch.testing.assert_close(got.grad_sum_cg, want.grad_sum_cg, rtol=1e-4, atol=1e-7, msg=name)


def test_a_training_step_through_a_hooked_transformer():
    ht = hooked_transformer_from_hf(tiny_model("llama")).train()
    ids, mask = random_batch(padding=None)
    optimizer = torch.optim.SGD(ht.parameters(), lr=0.5)
    losses = []
    with kh.instrument(ht, grads=True) as inst:
        for _ in range(3):
            loss = ht(ids, return_type="loss")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert int(inst.stats[0].tokens) == 3 * ids.numel() == int(inst.stats[0].grad_tokens)


def test_hooked_transformer_generation_is_counted_step_by_step():
    ht = hooked_transformer_from_hf(tiny_model("llama"))
    ids, _ = random_batch(batch=1, padding=None)
    with kh.instrument(ht) as inst:
        out = ht.generate(ids, max_new_tokens=3, use_past_kv_cache=True, verbose=False, do_sample=False,
                          stop_at_eos=False)
    assert out.shape[1] == ids.shape[1] + 3
    assert int(inst.stats[0].tokens) == ids.shape[1] + 2  # the prompt, then one token per cached step


def test_bridge_generation_is_counted_step_by_step_also_through_hf_generate():
    bridge = bridge_from_hf(tiny_model("llama"), tokenizer=tiny_tokenizer())
    ids, _ = random_batch(batch=1, seq=5, padding=None)
    for generate in (lambda: bridge.generate(ids, max_new_tokens=3, use_past_kv_cache=True, verbose=False,
                                             do_sample=False, stop_at_eos=False),
                     lambda: bridge.hf_generate(ids, max_new_tokens=3, do_sample=False)):
        with kh.instrument(bridge) as inst, torch.no_grad():
            out = generate()
        assert out.shape[1] == 5 + 3 and int(inst.stats[0].tokens) == 5 + 2
