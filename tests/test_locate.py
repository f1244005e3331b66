"""locate: stacks, hybrids, models without an FFN, MoE detection, odd layouts and stack specs, on real tiny models."""
from __future__ import annotations

import pytest
import torch

import kacq_hooks as kh
from kacq_hooks import locate
import model_zoo
from model_zoo import build


@pytest.mark.parametrize("model_type", ["mamba", "falcon_mamba", "mamba2"])
def test_models_without_an_ffn_are_refused_not_measured(model_type):
    with pytest.raises(kh.LocateError, match="has no FFN"):
        locate.find_sites(build(model_type))


def test_state_space_out_proj_is_never_a_site_in_hybrids():
    for model_type in ("bamba", "falcon_h1", "granitemoehybrid", "olmo_hybrid", "lfm2"):
        model = build(model_type)
        try:
            sites = locate.find_sites(model)
        except kh.LocateError as err:  # MoE hybrids are refused until expert capture is installed
            assert "mixture-of-experts" in str(err)
            continue
        assert sites and all("mamba" not in s.path and "mixer.out_proj" not in s.path
                             and "linear_attn" not in s.path for s in sites), (model_type, sites)


def test_hybrid_sites_keep_the_models_own_layer_numbers():
    sites = locate.find_sites(build("nemotron_h"), mlp_out="layers.{i}.mixer.down_proj")
    assert [s.layer for s in sites] == [3]  # mamba, moe, attention, mlp: the MLP is block 3
    sites = locate.find_sites(build("nemotron_h"))  # never the mamba or attention mixers
    assert [(s.kind, s.layer) for s in sites] == [("experts", 1), ("dense", 3)]


def test_recurrent_gemma_rwkv_and_xlstm_ffns():
    assert [s.path for s in locate.find_sites(build("recurrent_gemma"))] == [
        "model.layers.0.mlp_block.down_proj", "model.layers.1.mlp_block.down_proj"]
    rwkv = locate.find_sites(build("rwkv"))
    assert [s.path for s in rwkv] == ["rwkv.blocks.0.feed_forward.value", "rwkv.blocks.1.feed_forward.value"]
    assert [s.path for s in locate.find_sites(build("xlstm"))] == [
        "backbone.blocks.0.ffn.proj_down", "backbone.blocks.1.ffn.proj_down"]


def test_encoder_decoder_stacks_and_their_roots():
    model = build("t5")
    sites = locate.find_sites(model)
    assert [(s.stack, s.layer) for s in sites] == [("encoder", 0), ("encoder", 1), ("decoder", 0), ("decoder", 1)]
    assert sites[2].path == "decoder.block.0.layer.2.DenseReluDense.wo"
    specs = locate.stack_specs(model, sites)
    assert specs["encoder"].root is model.encoder and specs["decoder"].root is model.decoder
    assert locate.find_stack_roots(model, sites) == {"encoder": model.encoder, "decoder": model.decoder}
    # what each root received is read by frontends' StackReader: tests/test_stack_reader.py
    assert specs["encoder"].mask_name == specs["decoder"].mask_name == "attention_mask"
    assert specs["encoder"].ids_names[0] == specs["decoder"].ids_names[0] == "input_ids"


def test_bart_bert_and_decoder_only_roots():
    bart = build("bart")
    assert set(locate.find_stack_roots(bart, locate.find_sites(bart)).values()) == {bart.model.encoder,
                                                                                    bart.model.decoder}
    bert = build("bert", "masked_lm")
    sites = locate.find_sites(bert)
    assert {s.stack for s in sites} == {"encoder"} and sites[0].path == "bert.encoder.layer.0.output.dense"
    assert locate.find_stack_roots(bert, sites) == {"encoder": bert.bert}
    llama = build("llama")
    spec = locate.stack_specs(llama, locate.find_sites(llama))["decoder"]
    assert spec.root is llama.model and spec.layout == "batch_first"


def test_vision_tower_only_when_asked():
    model = build("llava")
    assert {s.stack for s in locate.find_sites(model)} == {"decoder"}
    vision = locate.find_sites(model, stacks=("vision",))
    assert vision and all(s.stack == "vision" and "vision_tower" in s.path for s in vision)
    both = locate.find_sites(model, stacks=("language", "vision"))
    assert len(both) == len(vision) + len(locate.find_sites(model))
    assert locate.find_stack_roots(model, vision)["vision"] is not model.language_model


def test_odd_layouts_are_declared_or_refused_before_any_forward():
    xlnet = build("xlnet")
    spec = locate.stack_specs(xlnet, locate.find_sites(xlnet))["decoder"]
    assert spec.layout == "seq_first" and spec.inverted_mask_name == "input_mask"
    assert [name for name, _ in spec.refuse_kwargs] == ["target_mapping", "perm_mask"]  # refused by StackReader.read
    opt = build("opt")
    assert locate.stack_specs(opt, locate.find_sites(opt))["decoder"].layout == "flat"
    with pytest.raises(kh.LocateError, match="prompt positions"):
        locate.find_sites(build("cpmant"))
    prophet = build("prophetnet")
    with pytest.raises(kh.LocateError, match="n-gram.*stacks=\\('encoder',\\)"):
        locate.find_sites(prophet)
    assert {s.stack for s in locate.find_sites(prophet, stacks=("encoder",))} == {"encoder"}


def test_moe_layers_are_found_in_one_place_with_dense_layers_and_shared_experts_named():
    moe = locate.find_moe_layers(build("qwen2_moe"))
    assert [(m.layer, m.layout, m.experts) for m in moe] == [(0, "fused", 4), (1, "fused", 4)]
    assert moe[0].shared_paths == ("model.layers.0.mlp.shared_expert", "model.layers.0.mlp.shared_expert_gate")
    [first, _] = locate.find_sites(build("qwen2_moe"))
    assert first.kind == "experts" and first.experts_layer.shared[0].gate is not None
    assert first.d_ff == first.experts * first.expert_d_ff + first.experts_layer.shared[0].d_ff
    deepseek = locate.find_sites(build("deepseek_v3"))
    assert [(s.kind, s.label) for s in deepseek][0] == ("dense", "decoder.layer_0")  # first_k_dense_replace
    assert {s.kind for s in deepseek[1:]} == {"experts"}


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_decoder_only_models_with_a_classification_head_keep_their_decoder(model_type):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(model_zoo.tiny_config(model_type)).eval()
    sites = locate.find_sites(model)
    assert [s.label for s in sites] == ["decoder.layer_0", "decoder.layer_1"]
    bert = AutoModelForSequenceClassification.from_config(model_zoo.tiny_config("bert")).eval()
    assert {s.stack for s in locate.find_sites(bert)} == {"encoder"}  # a masked-LM type stays an encoder


def test_bitnet_c_is_the_normalised_input_of_its_down_projection():
    """BitNet normalises C (ffn_sub_norm, d_ff wide) before the down projection: the stack's width is still
    the residual stream's, and C is the down projection's input, checked against float64 from the weights."""
    model = build("bitnet")
    with torch.no_grad():  # the norm's weight starts at 1: other values test that it is part of C
        for layer in model.model.layers:
            layer.mlp.ffn_sub_norm.weight.uniform_(0.5, 1.5)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, -4:] = 0
    sites = locate.find_sites(model)
    assert [(s.path, s.d_ff, s.d_model) for s in sites] == [
        (f"model.layers.{i}.mlp.down_proj", model.config.intermediate_size, model.config.hidden_size) for i in range(2)]
    seen = {}
    handles = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
               for i, layer in enumerate(model.model.layers)]
    with kh.instrument(model) as inst, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    valid = mask.reshape(-1).bool()
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        x = seen[i].double().reshape(-1, model.config.hidden_size)[valid]
        c = mlp.act_fn(x @ mlp.gate_proj.weight.double().T) * (x @ mlp.up_proj.weight.double().T)
        norm = mlp.ffn_sub_norm
        c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()
        torch.testing.assert_close(inst.mean_abs_coefficients()[i].double(), c.abs().mean(0), rtol=1e-5, atol=1e-7)



def test_inklings_fused_shared_experts_are_refused_saying_why():
    from kacq_hooks.errors import ExpertsError

    with pytest.raises(ExpertsError, match=r"'model\.layers\.0\.mlp\.shared_experts' \(InklingSharedExperts\) holds its "
                                           r"shared experts as 3-D weights \(gate_proj, up_proj, down_proj\)"):
        locate.find_sites(build("inkling_text"))
