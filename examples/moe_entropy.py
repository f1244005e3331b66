"""Knowledge entropy of a mixture-of-experts model: over all expert slots, split into "which expert"
and "which neuron inside it", with each expert's own entropy and load.

    python examples/moe_entropy.py MODEL_DIR corpus.txt [--batch-size 8] [--max-length 512]
    python examples/moe_entropy.py --tiny      # a random tiny Mixtral on generated text, seconds
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

import kacq_hooks as kh
from kacq_hooks.corpus import load_corpus, train_bpe_tokenizer
from kacq_hooks.entropy import experts_entropy
from kacq_hooks.facts import generate_facts


def tiny_model_and_texts():
    """A random 2-layer Mixtral (4 experts, top-2), a tokenizer trained on the spot, made-up documents."""
    texts = [record.train_context for record in generate_facts(8, seed=0, n_paraphrases=1)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=600)
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             num_local_experts=4, num_experts_per_tok=2))
    return model.eval(), tokenizer, texts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="a save_pretrained folder of a mixture-of-experts model")
    parser.add_argument("data", nargs="?", help=".txt or .jsonl file")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="a random tiny Mixtral on generated text")
    args = parser.parse_args(argv)
    if args.tiny:
        model, tokenizer, texts = tiny_model_and_texts()
    elif args.model and args.data:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        texts = load_corpus(args.data)
    else:
        parser.error("give MODEL and DATA, or --tiny")

    batches = [tokenizer(texts[i:i + args.batch_size], return_tensors="pt", padding=True, truncation=True,
                         max_length=args.max_length) for i in range(0, len(texts), args.batch_size)]
    inst = kh.measure(model, batches)  # C of each expert is taken where the experts compute it: no extra matmul
    for site in inst.sites:
        print(f"{site.label}: {site.kind}, {site.experts} experts x {site.expert_d_ff} slots, {site.d_ff} slots in all")
    for split in experts_entropy(inst):
        print(f"{split.label}: entropy {split.total:.4f} = which expert {split.which_expert:.4f} "
              f"+ within experts {split.within_experts:.4f} (of at most {split.max_total:.4f})")
        for e, (h, load) in enumerate(zip(split.per_expert, split.load)):
            shown = "no token routed" if h is None else f"entropy {h:.4f}"
            print(f"    expert {e}: {load} tokens, {shown}")
    print(f"knowledge entropy {inst.knowledge_entropy().total:.4f}")


if __name__ == "__main__":
    main()
