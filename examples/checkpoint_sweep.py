"""A checkpoint sweep: train with the Trainer, then ``kacq entropy`` over its checkpoints, with its plot.

``kacq entropy OUTPUT_DIR --data FILE`` measures every ``checkpoint-N`` folder of a Trainer output
folder in step order on the same documents and writes entropy.json, entropy.csv and entropy.png.
Here it is called in-process (``kacq_hooks.cli.main``); from a shell it is the same command line, and
under ``torchrun --nproc-per-node N -m kacq_hooks.cli entropy ...`` each rank measures its share.

Checkpoints are known by their weights: the last checkpoint is copied under a later step name here (as
published series sometimes serve one checkpoint under several names); the sweep measures it once and
flags the copy (``= same weights as`` in the table, ``duplicate_of`` in the JSON, a circle on the plot).

    python examples/checkpoint_sweep.py --out runs/sweep
    python examples/checkpoint_sweep.py --tiny --out /tmp/sweep
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from kacq_hooks import cli
from kacq_hooks.corpus import pack_documents, train_bpe_tokenizer
from kacq_hooks.facts import generate_facts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/checkpoint_sweep")
    parser.add_argument("--tiny", action="store_true", help="a few steps of a tiny model")
    args = parser.parse_args(argv)
    out = Path(args.out)
    steps, every = (6, 2) if args.tiny else (600, 100)

    texts = [r.train_context for r in generate_facts(24, seed=0, n_paraphrases=1)]
    held_out = out / "held_out.txt"  # the documents every checkpoint is measured on
    out.mkdir(parents=True, exist_ok=True)
    held_out.write_text("\n\n".join(texts[:6]), encoding="utf-8")
    tokenizer = train_bpe_tokenizer(texts, vocab_size=600)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=tokenizer.pad_token_id))
    train = [{"input_ids": row.tolist()} for row in pack_documents(texts[6:], tokenizer, seq_len=64)]
    Trainer(model=model, train_dataset=train, processing_class=tokenizer,  # saved into every checkpoint
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            args=TrainingArguments(output_dir=str(out / "train"), max_steps=steps, per_device_train_batch_size=4,
                                   learning_rate=1e-3, save_strategy="steps", save_steps=every, report_to=[],
                                   use_cpu=not torch.cuda.is_available(), disable_tqdm=True)).train()

    saved = sorted((out / "train").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    copy = out / "train" / f"checkpoint-{steps + every}"
    if not copy.exists():
        shutil.copytree(saved[-1], copy)
    code = cli.main(["entropy", str(out / "train"), "--data", str(held_out), "--seq-len", "64",
                     "--device", "cpu", "--out", str(out / "entropy")])
    if code:
        raise SystemExit(code)
    print(f"plot: {out / 'entropy' / 'entropy.png'}")


if __name__ == "__main__":
    main()
