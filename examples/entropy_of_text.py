"""Knowledge entropy of a causal language model on a text file.

Documents are separated by blank lines (or one JSON object with a "text" field per line in a .jsonl
file). Each batch is padded, and the padding is left out of every statistic.

    python examples/entropy_of_text.py MODEL_DIR corpus.txt [--batch-size 8] [--max-length 512]
    python examples/entropy_of_text.py --tiny      # a random tiny model on generated text, seconds
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import kacq_hooks as kh
from kacq_hooks.corpus import load_corpus, train_bpe_tokenizer
from kacq_hooks.facts import generate_facts


def tiny_model_and_texts():
    """A random 2-layer Llama, a tokenizer trained on the spot, and made-up documents to measure."""
    texts = [record.train_context for record in generate_facts(8, seed=0, n_paraphrases=1)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=600)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    return model.eval(), tokenizer, texts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="a save_pretrained folder")
    parser.add_argument("data", nargs="?", help=".txt or .jsonl file")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="a random tiny model on generated text")
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
    inst = kh.measure(model, batches)  # no grad, eval mode, padding masked; the hooks are removed afterwards
    entropy = inst.knowledge_entropy()
    print(f"{len(texts)} documents, {int(inst.stats[0].tokens)} tokens per layer")
    for site, h in zip(inst.sites, entropy.per_layer):
        print(f"  {site.label:<20} {h:.4f}  (of at most {torch.log(torch.tensor(float(site.d_ff))).item():.4f})")
    print(f"knowledge entropy {entropy.total:.4f} of at most {entropy.max_total:.4f}")


if __name__ == "__main__":
    main()
