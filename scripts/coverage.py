"""Coverage of kacq_hooks over every model type the installed transformers registers; writes docs/coverage.md.

    PYTHONPATH=src:tests python scripts/coverage.py [--families causal_lm,seq2seq_lm,masked_lm,base] [TYPE ...]
    PYTHONPATH=src:tests python scripts/coverage.py --update TYPE ...   # re-check these rows of docs/coverage.md

Per type: build it tiny (tests/model_zoo.py), locate its sites, and check them with hooks of its own
(independent of kacq_hooks' instrumentation): every site is called once per forward of its stack,
its input C has the layout its stack spec says, no site sits inside attention or a sequence mixer,
and there is one site per block that has an FFN module and none elsewhere. Then ``kh.instrument``
must leave the outputs bit-identical and its mean |C| must equal a float64 capture (1e-5), each
stack masked by its own mask. A type whose sites pass the structural checks but whose statistics
do not match is "stats-mismatch"; one whose sites fail them is "WRONG" (a silent wrong number).
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
from pathlib import Path

import torch

import kacq_hooks as kh
from kacq_hooks import locate
from kacq_hooks.frontends.hf import find_stacks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import model_zoo  # noqa: E402  (tests/ holds the tiny configs)

BATCH, SEQ, DEC_SEQ = 2, 8, 6
# Independent of locate's own rules: class names that mean "this is an FFN" / "this mixes positions".
_FFN_CLASS = re.compile(r"MLP|Mlp|FeedForward|FFN|Ffn|DenseReluDense|DenseGatedActDense|ChannelMix|Intermediate|"
                        r"SparseMoe|MoE|Moe|Experts", re.I)
_NOT_FFN_CLASS = re.compile(r"Attention|Attn|Mamba|Mixer|SSM|Ssm|DeltaNet|Recurrent|Rglru|LSTMLayer|ShortConv|"
                            r"TimeMix|SelfAtt", re.I)


def _inputs(model, vocab: int) -> dict | None:
    """Right-padded text inputs; an encoder-decoder also gets a decoder batch with different padding."""
    params = locate._forward_params(model)
    if "input_ids" not in params:
        return None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -3:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if "use_cache" in params:  # a prefill without a cache: some recurrent models' caches need a generate() loop
        out["use_cache"] = False
    if "decoder_input_ids" in params and getattr(model.config, "is_encoder_decoder", False):
        dec_mask = torch.ones(BATCH, DEC_SEQ, dtype=torch.long)
        dec_mask[0, -2:] = 0
        out["decoder_input_ids"] = torch.randint(3, vocab, (BATCH, DEC_SEQ), generator=g)
        out["decoder_attention_mask"] = dec_mask
    return out


def _vocab(model) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None) or model_zoo.VOCAB
    return min(n, model_zoo.VOCAB)


def _stack_mask(stack: str, inputs: dict) -> torch.Tensor:
    if stack.startswith("decoder") and "decoder_attention_mask" in inputs:
        return inputs["decoder_attention_mask"]
    return inputs["attention_mask"]


def _structure(model, sites) -> list[str]:
    """Problems with the sites found by reading the model's structure only (no forward)."""
    problems = []
    modules = dict(model.named_modules())
    for s in sites:
        if s.kind != "dense":
            continue
        chain = []
        parts = s.path.split(".")
        for k in range(1, len(parts)):
            chain.append((parts[k - 1], type(modules.get(".".join(parts[:k]))).__name__))
        lists = [k for k, (_, c) in enumerate(chain) if c == "ModuleList"]
        inner = [c for _, c in chain[lists[-1] + 2:]] if lists else [c for _, c in chain[-2:]]  # below the block
        if any(_NOT_FFN_CLASS.search(c) and not _FFN_CLASS.search(c) for c in inner):
            problems.append(f"{s.path} sits inside {inner}")
    per_stack = {}
    for stack in locate.find_stacks(model):
        ffn_layers = set()
        for i, block in enumerate(stack.blocks):
            if any(_FFN_CLASS.search(type(m).__name__) and not _NOT_FFN_CLASS.search(type(m).__name__)
                   for n, m in block.named_modules() if n):
                ffn_layers.add(i)
        per_stack[stack.name] = ffn_layers
    for stack in {s.stack for s in sites}:
        found = {s.layer for s in sites if s.stack == stack}
        expected = per_stack.get(stack)
        if expected and found != expected:
            problems.append(f"{stack}: sites on layers {sorted(found)}, FFN modules on {sorted(expected)}")
    return problems


def _forward_checks(model, sites, specs, inputs) -> tuple[list[str], dict]:
    """Call counts and layouts of every site in one plain forward, with C captured for the float64 reference."""
    problems, unexercised, captured = [], [], {i: [] for i in range(len(sites))}
    shapes: dict[str, tuple] = {}
    readers = {reader.name: reader for reader in find_stacks(model, sites)[0]}  # the library's one reader

    def on_stack(name):
        def hook(module, args, kwargs):
            shapes[name] = readers[name].read(args, kwargs).shape
        return hook

    handles = [spec.root.register_forward_pre_hook(on_stack(n), with_kwargs=True) for n, spec in specs.items()]
    handles += [s.module.register_forward_pre_hook(lambda m, a, i=i: captured[i].append(a[0].detach().clone()))
                for i, s in enumerate(sites) if s.kind == "dense"]
    try:
        with torch.no_grad():
            logits = _first_tensor(model(**inputs))
    finally:
        for h in handles:
            h.remove()
    for i, s in enumerate(sites):
        if s.kind != "dense":
            continue
        calls = captured[i]
        if not calls:
            unexercised.append(s.path)
            continue
        if len(calls) != 1:
            problems.append(f"{s.path} called {len(calls)} times in one forward")
            continue
        c, shape = calls[0], shapes.get(s.stack)
        layout = specs[s.stack].layout
        want = {"batch_first": shape, "seq_first": shape and shape[::-1],
                "flat": shape and (shape[0] * shape[1],)}[layout]
        if c.shape[-1] != s.d_ff or (want is not None and tuple(c.shape[:-1]) != tuple(want)):
            problems.append(f"{s.path}: C has shape {tuple(c.shape)}, the {s.stack} stack's {layout} layout "
                            f"says {want} x {s.d_ff}")
    return problems, {"captured": captured, "logits": logits, "unexercised": unexercised}


def _first_tensor(out):
    for key in ("logits", "last_hidden_state", "prediction_logits"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0] if isinstance(out, (tuple, list)) else out


def _reference_mean_abs(c: torch.Tensor, mask: torch.Tensor, layout: str) -> torch.Tensor:
    c = c.double()
    if layout == "seq_first":
        c = c.transpose(0, 1)
    c = c.reshape(mask.shape[0], -1, c.shape[-1])
    window = mask[:, mask.shape[1] - c.shape[1]:].bool()
    return c.abs()[window].sum(0) / window.sum()


def _statistics(model, sites, specs, inputs, plain) -> list[str]:
    try:
        inst = kh.instrument(model)
    except kh.KacqError as err:
        return [f"instrument() refused: {err}"]
    try:
        with torch.no_grad():
            logits = _first_tensor(model(**inputs))
        if not torch.equal(logits, plain["logits"]):
            return ["outputs changed under instrumentation"]
        got = inst.mean_abs_coefficients()
    except Exception as err:  # what the integrator's instrumentation still gets wrong is recorded, not hidden
        return [f"instrumented forward failed: {type(err).__name__}: {str(err)[:200]}"]
    finally:
        inst.remove()
    problems = []
    by_path = {s.path: i for i, s in enumerate(sites)}
    for k, site in enumerate(inst.sites):
        i = by_path.get(site.path)
        if i is None or site.kind != "dense":
            continue
        ref = _reference_mean_abs(plain["captured"][i][0], _stack_mask(site.stack, inputs), specs[site.stack].layout)
        if not torch.allclose(got[k].double(), ref, rtol=1e-5, atol=1e-7):
            problems.append(f"{site.label}: mean |C| differs from float64 (max {float((got[k] - ref).abs().max()):.2e})")
    return problems


def check(model_type: str, family: str | None = None) -> dict:
    """One row of the coverage table for ``model_type``."""
    row = {"type": model_type, "family": family or model_zoo.mapping_types()[model_type]}
    try:
        model = model_zoo.build(model_type, row["family"])
        row["class"] = type(model).__name__
    except Exception as err:
        return {**row, "status": "build-failed", "reason": f"{type(err).__name__}: {str(err)[:160]}"}
    try:
        sites = locate.find_sites(model)
    except kh.KacqError as err:
        status = "no-ffn" if "has no FFN" in str(err) else "moe" if "mixture-of-experts" in str(err) else "refused"
        return {**row, "status": status, "reason": str(err)[:300]}
    except Exception as err:
        return {**row, "status": "locate-crash", "reason": f"{type(err).__name__}: {str(err)[:200]}"}
    row["sites"] = len(sites)
    row["stacks"] = ",".join(sorted({s.stack for s in sites}))
    row["kinds"] = ",".join(sorted({s.kind for s in sites}))
    row["layers"] = {st: [s.layer for s in sites if s.stack == st] for st in sorted({s.stack for s in sites})}
    problems = _structure(model, sites)
    specs = locate.stack_specs(model, sites)
    inputs = _inputs(model, _vocab(model))
    if inputs is None:
        return {**row, "status": "WRONG" if problems else "sites-only", "reason": "; ".join(problems)
                or "no input_ids: sites checked by structure only"}
    try:
        more, plain = _forward_checks(model, sites, specs, inputs)
    except kh.KacqError as err:
        return {**row, "status": "refused", "reason": f"refused at call: {err}"[:300]}
    except Exception as err:
        return {**row, "status": "forward-failed", "reason": f"plain forward: {type(err).__name__}: {str(err)[:160]}"}
    problems += more
    if plain["unexercised"] and not problems:
        return {**row, "status": "sites-only", "reason": f"a text-only forward does not run {plain['unexercised'][:2]}"}
    if problems:
        return {**row, "status": "WRONG", "reason": "; ".join(problems)[:300]}
    stats = _statistics(model, sites, specs, inputs, plain)
    if stats:
        return {**row, "status": "stats-mismatch", "reason": "; ".join(stats)[:300]}
    return {**row, "status": "ok", "reason": ""}


def _timed(model_type, family, seconds=90):
    def alarm(*_):
        raise TimeoutError(f"over {seconds} s")
    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return check(model_type, family)
    except TimeoutError as err:
        return {"type": model_type, "family": family, "status": "timeout", "reason": str(err)}
    finally:
        signal.alarm(0)


def write_table(rows: list[dict], path: Path) -> str:
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        counts.setdefault(r["family"], {}).setdefault(r["status"], 0)
        counts[r["family"]][r["status"]] += 1
    lines = ["# Coverage over the model types of the installed transformers", "",
             "Generated by `scripts/coverage.py` (do not edit by hand). Every type is built tiny from its default",
             "config; statuses: `ok` (sites checked, statistics equal a float64 capture, outputs bit-identical),",
             "`stats-mismatch` (sites right, instrumentation statistics not yet per stack), `sites-only` (no text",
             "input to run), `no-ffn` / `moe` / `refused` (a clear LocateError), `WRONG` (a site check failed),",
             "`build-failed` (transformers could not build it tiny).", "", "## Counts", "",
             "| family | " + " | ".join(STATUSES) + " | total |", "|---|" + "---|" * (len(STATUSES) + 1)]
    for family, c in sorted(counts.items()):
        lines.append(f"| {family} | " + " | ".join(str(c.get(s, 0)) for s in STATUSES) + f" | {sum(c.values())} |")
    lines += ["", "## Per type", "", "| type | family | status | sites | stacks | kinds | reason |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["type"])):
        reason = (r.get("reason") or "").replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {r['type']} | {r['family']} | {r['status']} | {r.get('sites', '')} | {r.get('stacks', '')} "
                     f"| {r.get('kinds', '')} | {reason} |")
    text = "\n".join(lines + [""] + setups_section()) + "\n"
    path.write_text(text)
    return text


def read_table(path: Path) -> list[dict]:
    """The per-type rows of a table :func:`write_table` wrote (to update some of them)."""
    rows, keys = [], ("type", "family", "status", "sites", "stacks", "kinds", "reason")
    lines = path.read_text().splitlines()
    start = lines.index("## Per type") + 4
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        rows.append(dict(zip(keys, line[2:-2].split(" | ", len(keys) - 1))))
    return rows


# Setups beyond one padded forward, tested against a float64 reference by the named tests: per family, the
# model types tried ("refused": a clear KacqError before any work; "-": not tried in that family).
SETUPS = (
    ("packed rows, document weighting: position-id restarts (DataCollatorWithFlattening), cu_seq_lens_q, "
     "document-id mask, block-causal 4-D mask", "llama", "-", "-", "-", "tests/test_packed_documents.py"),
    ("counted tokens: count='labels' / 'shifted_labels' (instrument, measure, KnowledgeEntropyCallback with a "
     "Trainer)", "llama, olmoe (routed experts)", "t5: refused", "-", "-", "tests/test_counted_tokens.py"),
    ("generate(cache_implementation='static'), padded batch", "llama (sdpa, eager), mistral (sliding window), "
     "gemma3_text (sliding + full)", "-", "-", "-", "tests/test_static_cache_masks.py"),
    ("generate(cache_implementation='hybrid' / 'dynamic'), padded batch ('offloaded*' need CUDA: not tried)",
     "mistral (sliding window), gemma3_text", "-", "-", "-", "tests/test_static_cache_masks.py"),
    ("generate(cache_implementation='static'), one prompt without a mask", "llama, gemma3_text", "-", "-", "-",
     "tests/test_static_cache_masks.py"),
    ("a 4-D mask passed by hand (right padding)", "llama", "-", "-", "-", "tests/test_static_cache_masks.py"),
    ("a vision tower with its own patches beside a padded text stack (token and document)", "-", "-", "-",
     "qwen2_vl (decoder + vision)", "tests/test_tower_and_mask_arguments.py"),
    ("a tower's images packed in one row, document weighting (block-diagonal 4-D mask)", "-", "-", "-",
     "mistral3 (Pixtral)", "tests/test_tower_and_mask_arguments.py"),
    ("packed rows with seq_idx only, or beside position ids / cu_seq_lens; a packed row whose last document is cut",
     "llama", "-", "-", "-", "tests/test_training_setups_edge_cases.py"),
    ("DataCollatorForSeq2Seq prompts (labels -100), left and right padding, count='labels' / 'shifted_labels'; "
     "padded positions whose labels are set", "llama", "-", "-", "-", "tests/test_training_setups_edge_cases.py"),
    ("generate(num_beams=3) over left-padded prompts, dynamic and static cache", "llama", "-", "-", "-", "tests/test_training_setups_edge_cases.py"),
    ("peft LoHa, LoKr, DoRA, LoRA on gate/up, IA3 on up_proj (before and after wrapping); disable_adapter(), a "
     "second adapter; IA3 on down_proj after wrapping = merged",
     "llama (IA3 scaling down_proj's input added after instrument(): refused)", "-", "-", "-", "tests/test_training_setups_edge_cases.py"),
    ("GradScaler(enabled=False) declared, a scale set between micro-batches, an unscaled backward beside the "
     "scaled one; Trainer(fp16) gradient accumulation across a skipped step", "llama", "-", "-", "-", "tests/test_training_setups_edge_cases.py"),
    ("a custom stack whose mask argument is padding_mask", "custom module: refused", "-", "-", "-",
     "tests/test_tower_and_mask_arguments.py"),
    ("grads=True under a torch.amp.GradScaler (plain loop, accelerate Accelerator, Trainer via LossScaleCallback), "
     "a forced skipped step, gradient accumulation", "llama", "-", "-", "-", "tests/test_loss_scaling.py"),
    ("grads=True under a declared GradScaler, routed and shared expert slots (against the unscaled run, not "
     "float64)", "mixtral, qwen2_moe", "-", "-", "-", "tests/test_gradient_accessors.py"),
    ("fp16 autocast training with grads=True and no declared loss scale; DeepSpeed fp16", "llama: warned, "
     "accessors refused; DeepSpeed fp16: refused", "-", "-", "-", "tests/test_loss_scaling.py"),
    ("peft LoRA: on down_proj only (layer 0's C needs no gradient), on every MLP projection, merge_and_unload "
     "(instrumented after and before wrapping)", "llama (down_proj only: layer 0 warned and refused by the "
     "accessors; a merged adapter's modules: refused)", "-", "-", "-", "tests/test_peft_edges.py"),
)


def setups_section() -> list[str]:
    """The "Setups" section of docs/coverage.md (also written alone by ``--setups-only``)."""
    lines = ["## Setups", "", "Beyond one padded forward: which setups were tested, per family, against a float64",
             "reference with plain hooks. `refused`: a clear error before any work; `-`: not tried in that family.", "",
             "| setup | causal_lm | seq2seq_lm | masked_lm | multimodal | test |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in SETUPS]
    return lines


def write_setups(path: Path) -> None:
    """Replace (or add) the Setups section of an existing coverage file, leaving the per-type tables as they are."""
    text = path.read_text()
    head = text.split("\n## Setups\n")[0].rstrip("\n")
    path.write_text(head + "\n\n" + "\n".join(setups_section()) + "\n")


STATUSES = ("ok", "stats-mismatch", "sites-only", "no-ffn", "moe", "refused", "WRONG", "forward-failed",
            "locate-crash", "build-failed", "timeout")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*")
    parser.add_argument("--families", default="causal_lm,seq2seq_lm,masked_lm,base")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "coverage.md"))
    parser.add_argument("--jsonl", default=None, help="also append one JSON row per type here")
    parser.add_argument("--update", action="store_true",
                        help="check only the types given and replace their rows in the existing table at --out")
    parser.add_argument("--setups-only", action="store_true", help="rewrite only the Setups section of --out")
    args = parser.parse_args(argv)
    if args.setups_only:
        write_setups(Path(args.out))
        return 0
    torch.set_num_threads(1)
    families = args.families.split(",")
    types = {t: f for t, f in model_zoo.mapping_types().items() if f in families and (not args.types or t in args.types)}
    rows = []
    sink = open(args.jsonl, "a") if args.jsonl else None
    for model_type, family in sorted(types.items()):
        t0 = time.time()
        row = _timed(model_type, family)
        row["seconds"] = round(time.time() - t0, 2)
        rows.append(row)
        if sink:
            sink.write(json.dumps(row, default=str) + "\n")
            sink.flush()
    if args.update:
        checked = {r["type"] for r in rows}
        rows += [r for r in read_table(Path(args.out)) if r["type"] not in checked]
    write_table(rows, Path(args.out))
    return int(any(r["status"] == "WRONG" for r in rows))


if __name__ == "__main__":
    sys.exit(main())
