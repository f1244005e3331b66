"""A checkpoint sweep three ways, side by side: serial, ``--executor ray --jobs 2``, and torchrun with 2 ranks.

Builds 8 checkpoints of a ~100M-parameter Llama (random weights, perturbed per step, saved with
save_pretrained), a BPE tokenizer trained on the offline Wikipedia summaries, and one document file;
then runs ``kacq entropy`` on them in a fresh subprocess per way, each into its own output folder,
and reports wall time (the whole command: start-up, hashing, loading, measuring) and tokens/s
(tokens measured over all checkpoints / wall time), the tokens/s of one task while it measures, and
the machine's load average before and after each way (other jobs share the cores). The three must agree on every checkpoint's
entropy (checked). All ways use the same cores: serial runs torch's threads in one process, the
others one thread per task or rank.

    python benchmarks/sweep.py                      # the README's table (several minutes on 2 cores)
    python benchmarks/sweep.py --quick              # a tiny model, to check the script
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))

from kacq_hooks.corpus import train_bpe_tokenizer, wikipedia_summaries  # noqa: E402
from kacq_hooks.sweep_exec import _free_port  # noqa: E402

SHAPES = {  # name -> Llama config overrides (vocab from the tokenizer)
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, max_position_embeddings=512),
    "quick": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512),
}


def build(folder: Path, shape: str, checkpoints: int, documents: int, vocab: int) -> tuple[Path, Path, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = wikipedia_summaries()
    tokenizer = train_bpe_tokenizer(texts[:2000], vocab_size=vocab)
    data = folder / "docs.txt"
    data.write_text("\n\n".join(t.replace("\n\n", "\n") for t in texts[5000:5000 + documents]), encoding="utf-8")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                         **SHAPES[shape]))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    run = folder / "run"
    for step in range(1, checkpoints + 1):
        with torch.no_grad():  # a stand-in for training: every checkpoint's weights differ
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.02)
        model.save_pretrained(run / f"checkpoint-{step * 1000}")
        tokenizer.save_pretrained(run / f"checkpoint-{step * 1000}")
    return run, data, params


def way(name: str, run: Path, data: Path, out: Path, seq_len: int) -> dict:
    common = ["entropy", str(run), "--data", str(data), "--seq-len", str(seq_len), "--batch-size", "4",
              "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if name == "serial":
        command = [sys.executable, "-m", "kacq_hooks.cli", *common]
    elif name == "ray --jobs 2":
        command = [sys.executable, "-m", "kacq_hooks.cli", *common, "--executor", "ray", "--jobs", "2"]
        env["RAY_ADDRESS"] = ""  # a fresh local cluster
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                   str(_free_port()), "-m", "kacq_hooks.cli", *common]
        env["OMP_NUM_THREADS"] = "1"
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    rows = json.loads((out / "entropy.json").read_text())["checkpoints"]
    tokens = sum(r["tokens"] for r in rows)
    return {"way": name, "wall_s": round(wall, 1), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "measure_tokens_per_s": round(sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows), 1),
            "world_size": rows[0]["world_size"], "totals": [r["total"] for r in rows],
            "load_average": [round(load_before, 1), round(load_after, 1)]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model and 3 checkpoints")
    parser.add_argument("--json", default=str(HERE / "results" / "sweep.json"))
    args = parser.parse_args(argv)
    shape, checkpoints, documents, seq_len, vocab = (("quick", 3, 8, 64, 600) if args.quick
                                                     else ("100m", 8, 16, 256, 8192))
    folder = Path(tempfile.mkdtemp(prefix="kacq-sweep-bench-"))
    try:
        run, data, params = build(folder, shape, checkpoints, documents, vocab)
        results = [way(name, run, data, folder / f"out{i}", seq_len)
                   for i, name in enumerate(["serial", "ray --jobs 2", "torchrun 2 ranks"])]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for r in results[1:]:  # the same numbers whichever way measured them
        assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(r["totals"], results[0]["totals"])), r["way"]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    print(f"{checkpoints} checkpoints of a {params:.0f}M-parameter Llama, {documents} documents x {seq_len} tokens "
          f"at most, on {machine}")
    print(f"{'way':<18} {'wall s':>8} {'tokens':>8} {'tok/s (wall)':>13} {'tok/s per task':>15} {'load avg':>11}")
    for r in results:
        print(f"{r['way']:<18} {r['wall_s']:>8.1f} {r['tokens']:>8} {r['tokens_per_s']:>13.1f} "
              f"{r['measure_tokens_per_s']:>15.1f} {r['load_average'][0]:>5} {r['load_average'][1]:>5}")
    if not args.quick:
        Path(args.json).write_text(json.dumps({"machine": machine, "params_m": round(params, 1),
                                               "checkpoints": checkpoints, "documents": documents,
                                               "seq_len": seq_len, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
