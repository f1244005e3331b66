"""The same measurement through Hugging Face, TransformerLens and nnsight: one set of weights, one number.

``kh.instrument`` recognises a ``HookedTransformer`` (its ``mlp.hook_post``) and an nnsight
``NNsight``/``LanguageModel`` wrapper (statistics stream from inside the trace, nothing saved), so
code that already uses either keeps its model object. The TransformerLens model here is converted in
memory from the Hugging Face one (no download), so all three give the same knowledge entropy.

    python examples/frontends.py --tiny
"""
from __future__ import annotations

import argparse
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kacq_hooks as kh
from kacq_hooks.frontends.transformer_lens import hooked_transformer_from_hf


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a random tiny Llama (the only model built here)")
    parser.parse_args(argv)
    from nnsight import NNsight  # the nnsight extra

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4)).eval()
    ids = torch.randint(0, 256, (2, 24))  # no padding: TransformerLens numbers positions past pads differently

    with kh.instrument(hf) as inst, torch.no_grad():
        hf(ids)
    results = {"Hugging Face": inst}

    hooked = hooked_transformer_from_hf(hf)
    with kh.instrument(hooked) as inst, torch.no_grad():
        hooked(ids)
    results["TransformerLens HookedTransformer"] = inst

    traced = NNsight(copy.deepcopy(hf))  # nnsight rewires its model's forwards; keep hf bare
    with kh.instrument(traced) as inst, torch.no_grad():
        with traced.trace(ids):
            pass  # your own interventions and saves go here
    results["nnsight trace"] = inst

    for name, inst in results.items():
        print(f"{name:<36} knowledge entropy {inst.knowledge_entropy().total:.6f}  ({inst.binding.name} front end)")
    totals = [inst.knowledge_entropy().total for inst in results.values()]
    assert max(totals) - min(totals) < 1e-4 * max(totals), totals


if __name__ == "__main__":
    main()
