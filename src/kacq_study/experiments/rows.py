"""``augmentation-rows``: whether formatting augmentation (Zhu et al.) still puts the facts into the rows. In row
injection each passage + EOS starts a row and is cut to ``seq_len`` tokens, and a layout adds markup around every
sentence: the share of each record's probe targets inside its row, for the plain and the augmentation arm's
passages, per seed and injection round. No training, only the tokenizer and the schedule.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

from kacq_hooks.report import pyplot, save_figure

from .. import pipeline
from ..arms import augmented_passage
from ..config import DemoConfig
from ..findings import KINDS, spread
from ..pipeline import deterministic
from ..study import DEFAULT_SEEDS, checked_seeds
from .common import mean_or_none, quiet
from .registry import Experiment, register


def augmentation_rows(seeds: Sequence[int] = DEFAULT_SEEDS, config: DemoConfig | None = None,
                      workers: int | None = None) -> dict:
    """Whether formatting augmentation still puts the facts into the rows. In row injection each passage + EOS
    starts a row and is cut to ``seq_len`` tokens; a layout adds markup around every sentence. For every seed
    and every scheduled injection of the study's facts, as the plain arm (``late``) and the augmentation arm
    (``late+augment``) inject it: the passage's length in tokens and the share of the record's probe targets
    whose tokens (as the probes score them) are inside the row, and the share that are anywhere in the uncut
    passage (a layout can change how a name tokenizes). No training, only the tokenizer and the schedule,
    so it runs in this process (``workers`` is accepted for the CLI and checked, not used)."""
    base = config or DemoConfig()
    base.validate()
    seeds = list(checked_seeds(seeds, workers))
    per_seed = {}
    for seed in seeds:
        c = dataclasses.replace(base, seed=seed)
        with deterministic(c.threads, "cpu"):
            data = pipeline.prepare(dataclasses.replace(c, device="cpu"), quiet)
        tokenizer = data.tokenizer
        targets = {}
        for index, record in enumerate(data.facts):
            targets[index] = [_target_ids(tokenizer, prompt, target) for kind in KINDS for prompt, target in record.probes(kind)]
        rows = {"plain": [], "augment": []}
        for injection in c.schedule(data.facts):
            for arm, text in (("plain", injection.text), ("augment", augmented_passage(injection, data.facts, c))):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                row = ids[:c.seq_len]
                inside = [contains(row, t) for t in targets[injection.record]]
                # a layout can also change a target's tokens (markup right before a name): not in the passage at all
                present = [contains(ids, t) for t in targets[injection.record]]
                rows[arm].append({"round": injection.round, "record": injection.record, "tokens": len(ids),
                                  "cut": len(ids) > c.seq_len, "targets_inside": sum(inside) / len(inside),
                                  "targets_in_passage": sum(present) / len(present)})
        per_seed[str(seed)] = {arm: {"injections": len(r), "mean_tokens": mean_or_none([x["tokens"] for x in r]),
                                     "share_cut": mean_or_none([float(x["cut"]) for x in r]),
                                     "targets_inside": mean_or_none([x["targets_inside"] for x in r]),
                                     "targets_in_passage": mean_or_none([x["targets_in_passage"] for x in r]),
                                     "by_round": [mean_or_none([x["targets_inside"] for x in r if x["round"] == k])
                                                  for k in range(c.injection_rounds)]}
                               for arm, r in rows.items()}
    summary = {arm: {key: spread([per_seed[str(s)][arm][key] for s in seeds])
                     for key in ("mean_tokens", "share_cut", "targets_inside", "targets_in_passage")}
               for arm in ("plain", "augment")}
    return {"experiment": "augmentation-rows", "seeds": seeds, "seq_len": base.seq_len,
            "augment_variants": base.augment_variants, "per_seed": per_seed, "summary": summary}


def _target_ids(tokenizer, prompt: str, target: str) -> list[int]:
    """A target's tokens as a probe scores them: the ids after the prompt's in the tokenized prompt + target."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + " " + target, add_special_tokens=False)["input_ids"]
    return full[len(prompt_ids):]


def contains(sequence: list[int], part: list[int]) -> bool:
    n = len(part)
    return n > 0 and any(sequence[i:i + n] == part for i in range(len(sequence) - n + 1))


def plot_augmentation_rows(result: dict, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8), constrained_layout=True)
    for j, arm in enumerate(("plain", "augment")):
        for i, seed in enumerate(result["seeds"]):
            by_round = result["per_seed"][str(seed)][arm]["by_round"]
            ax.plot(range(len(by_round)), [math.nan if v is None else v for v in by_round], color=f"C{j}", lw=0.8,
                    alpha=0.5, label=f"{arm} arm: one thin line per seed" if i == 0 else None)
        mean = [mean_or_none([result["per_seed"][str(s)][arm]["by_round"][k] for s in result["seeds"]])
                for k in range(len(result["per_seed"][str(result["seeds"][0])][arm]["by_round"]))]
        ax.plot(range(len(mean)), [math.nan if v is None else v for v in mean], color=f"C{j}", lw=2.5,
                label=f"{arm} arm: mean of {len(result['seeds'])} seeds")
    ax.set(xlabel="injection round", ylim=(0, 1.05),
           ylabel=f"share of the record's probe targets\ninside its {result['seq_len']}-token row",
           title="facts that reach the row, plain passages against formatted layouts")
    ax.legend(fontsize=7)
    return save_figure(fig, path)



register(Experiment("augmentation-rows", augmentation_rows, plot_augmentation_rows, multi_seed=True, about=__doc__))
