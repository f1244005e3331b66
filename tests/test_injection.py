"""Injection: the schedule per scenario, batch rewriting (shape, labels, mask, padding), and a real learning effect."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kacq_hooks import facts
from kacq_hooks.facts.data import parse_record
from kacq_hooks.facts.injection import InjectionCollator
from tiny_models import tiny_model

DATA = Path(__file__).parents[1].parent / "shared/data/fictional_knowledge"
needs_data = pytest.mark.skipif(not DATA.exists(), reason="shared Fictional Knowledge data not present")


@needs_data
def test_paper_schedule_on_the_real_data():
    fs = facts.load_fictional_knowledge(DATA / "fictional_knowledge_paraphrased.json")
    schedule = facts.InjectionSchedule(fs, interval=100, rounds=10)
    assert schedule.steps == list(range(0, 1000, 100))
    assert len(schedule.at(0)) == 120 and len(schedule.at(100)) == 80 and schedule.at(50) == []
    assert len(schedule) == 120 + 9 * 80
    for round_index in range(10):
        texts = {i.record: i.text for i in schedule.at(100 * round_index)}
        assert texts[7] == ([fs[7].train_context] + fs[7].paraphrases)[round_index]  # i-th paraphrase at round i
        assert texts[55] == fs[55].train_context  # duplication: the same passage every round
        assert (85 in texts) == (round_index == 0)  # once: the first round only
        assert 125 not in texts  # unused: never
    assert schedule.steps_of(7) == schedule.steps_of(55) == list(range(0, 1000, 100))
    assert schedule.steps_of(85) == [0] and schedule.steps_of(125) == []
    assert {i.scenario for i in schedule.at(0)} == {"paraphrase", "duplication", "once"}

    kim = facts.InjectionSchedule(fs, interval=160, rounds=10)  # Kim et al.'s spacing
    assert kim.steps_of(0) == list(range(0, 1600, 160))

    plain = facts.load_fictional_knowledge(DATA / "fictional_knowledge.json")
    with pytest.raises(facts.InjectionError, match="record 0 is a paraphrase record with 0 paraphrases"):
        facts.InjectionSchedule(plain)
    cycled = facts.InjectionSchedule(plain, cycle_paraphrases=True)
    assert cycled.at(300)[0].text == plain[0].train_context


def _record(context: str, paraphrases=()):
    probes = {f"{k}_{p}": ["x"] for k in facts.PROBE_KINDS for p in ("input", "target")}
    return facts.FactRecord(context, paraphrases=list(paraphrases), **probes)


def test_spreading_a_round_over_steps():
    fs = facts.FactSet([_record(f"passage {i}") for i in range(5)], ["duplication"] * 4 + ["once"])
    schedule = facts.InjectionSchedule(fs, interval=10, rounds=2, start=3, max_per_step=2)
    assert [(i.step, i.record) for i in schedule] == [(3, 0), (3, 1), (4, 2), (4, 3), (5, 4), (13, 0), (13, 1),
                                                       (14, 2), (14, 3)]
    assert schedule.steps_of(2) == [4, 14] and schedule.last_step == 14
    with pytest.raises(facts.InjectionError, match="more than the interval of 2"):
        facts.InjectionSchedule(fs, interval=2, rounds=2, max_per_step=1)
    with pytest.raises(facts.InjectionError, match="interval >= 1"):
        facts.InjectionSchedule(fs, interval=0)


def _padded_batch(side: str):
    ids = torch.arange(10, 10 + 3 * 8).reshape(3, 8)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0  # row 1: 5 real tokens, row 2: 2 real tokens
    mask[2, 2:] = 0
    if side == "left":
        mask = mask.flip(1)
    ids = ids.masked_fill(mask == 0, 1)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("side", ["right", "left"])
def test_inject_rewrites_rows_and_keeps_the_shape(tokenizer, side):
    batch = _padded_batch(side)
    original = {k: v.clone() for k, v in batch.items()}
    passage = "the fox"
    passage_ids = tokenizer(passage, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(passage_ids)
    assert n <= 5  # so that row 2 (2 real tokens) still has padding afterwards
    out = facts.inject(batch, [passage, passage], tokenizer, rows=[2, 0])
    assert all(torch.equal(batch[k], original[k]) for k in batch)  # inputs untouched
    assert all(out[k].shape == (3, 8) for k in out)
    # row 0 was full: passage + EOS, then its first 8 - n tokens
    assert out["input_ids"][0].tolist() == passage_ids + original["input_ids"][0, :8 - n].tolist()
    assert out["attention_mask"][0].tolist() == [1] * 8 and out["labels"][0].tolist() == out["input_ids"][0].tolist()
    # row 2 had 2 real tokens: n + 2 now, padding stays on its side
    own = original["input_ids"][2][original["attention_mask"][2] == 1].tolist()
    real = out["attention_mask"][2] == 1
    assert out["input_ids"][2][real].tolist() == passage_ids + own and int(real.sum()) == n + 2
    assert bool(real[0]) == (side == "right") and bool(real[-1]) == (side == "left")
    assert out["labels"][2][~real].eq(-100).all() and out["input_ids"][2][~real].eq(1).all()
    assert torch.equal(out["input_ids"][1], original["input_ids"][1])  # not chosen


def test_inject_keeps_masked_labels_and_truncates_long_passages(tokenizer):
    ids = torch.arange(20, 28).reshape(1, 8)
    labels = ids.clone()
    labels[0, :3] = -100  # e.g. a prompt that is not trained on
    out = facts.inject({"input_ids": ids, "labels": labels}, ["a"], tokenizer)
    n = len(tokenizer("a", add_special_tokens=False)["input_ids"]) + 1
    assert out["labels"][0, n:n + 3].eq(-100).all() and out["labels"][0, :n].ne(-100).all()
    assert "attention_mask" not in out
    long = facts.inject({"input_ids": ids}, ["a long passage that has many more tokens than eight"], tokenizer)
    expected = tokenizer("a long passage that has many more tokens than eight", add_special_tokens=False)["input_ids"]
    assert long["input_ids"][0].tolist() == expected[:8]


def test_inject_refuses_what_it_cannot_do(tokenizer):
    batch = _padded_batch("right")
    with pytest.raises(facts.InjectionError, match="3 passages to inject into a batch of 2 rows.*max_per_step=2"):
        facts.inject({k: v[:2] for k, v in batch.items()}, ["a", "b", "c"], tokenizer)
    with pytest.raises(facts.InjectionError, match="'position_ids' is per token"):
        facts.inject({**batch, "position_ids": torch.zeros(3, 8, dtype=torch.long)}, ["a"], tokenizer)
    packed = {**batch, "attention_mask": torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]] * 3)}
    with pytest.raises(facts.InjectionError, match="row 0's attention mask is not one contiguous run"):
        facts.inject(packed, ["a"], tokenizer)
    assert facts.inject(batch, [], tokenizer)["input_ids"] is batch["input_ids"]


def test_collator_injects_on_the_first_micro_batch_of_each_step(tokenizer):
    fs = facts.FactSet([_record("the fox"), _record("the dog")], ["duplication", "once"])
    schedule = facts.InjectionSchedule(fs, interval=2, rounds=2)  # steps 0 (both) and 2 (record 0)
    collator = InjectionCollator(schedule, tokenizer, gradient_accumulation_steps=2)
    features = [{"input_ids": list(range(30, 40))} for _ in range(2)]
    starts = []
    for _ in range(8):  # 4 steps of 2 micro-batches
        batch = collator(features)
        assert batch["input_ids"].shape == (2, 10) and "labels" in batch
        starts.append(int(batch["input_ids"][0, 0]))
    fox = tokenizer("the fox", add_special_tokens=False)["input_ids"][0]
    assert starts == [fox, 30, 30, 30, fox, 30, 30, 30]
    assert collator.injected == {0: [0, 1], 2: [0]}
    collator.seek(2)
    assert collator.next_step == 2 and int(collator(features)["input_ids"][0, 0]) == fox


TRACKED = [55, 29, 63, 126, 10, 44, 95, 1, 110, 8, 47, 74]  # first mem probe = passage prefix, <= 81 tiny tokens


def _tracked_and_background():
    """Real records with only their first mem probe (a prefix of the passage), and the other passages."""
    rows = json.loads((DATA / "fictional_knowledge.json").read_text())
    records = []
    for index in TRACKED:
        row = dict(rows[index])
        for kind in facts.PROBE_KINDS:
            row[f"{kind}_input"], row[f"{kind}_target"] = row[f"{kind}_input"][:1], row[f"{kind}_target"][:1]
        records.append(parse_record(row, index))
    background = [row["train_context"] for index, row in enumerate(rows) if index not in TRACKED]
    return records, background


@needs_data
def test_injected_facts_rise_at_their_injection_steps():
    """A real effect: a tiny model trained with injection gains on the injected facts where they are injected.

    Background rows are the starts of the other 118 passages, so what all fictional passages share is
    learnt before (and between) injections, and a step's gain on a fact is specific to that fact. A
    1,024-token BPE (the project's trainer, in-process) keeps targets in word-sized tokens; with the
    320-token tiny tokenizer the same run gains about half as much. No momentum (beta1 = 0), so each
    injection's gain shows at its own step (t_w = 1).
    """
    from kacq_hooks.corpus import train_bpe_tokenizer

    records, background = _tracked_and_background()
    tokenizer = train_bpe_tokenizer([r.train_context for r in records] + background, vocab_size=1024)
    fs = facts.FactSet(records, ["duplication"] * 6 + ["unused"] * 6)
    warmup, width, rows = 30, 64, 8
    schedule = facts.InjectionSchedule(fs, interval=8, rounds=3, start=warmup, max_per_step=2)
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=1024).train()
    tracker = facts.FactTracker(model, tokenizer, fs, kinds=["mem"], store=facts.TrajectoryStore(
        None, [facts.ProbeRef(r, "mem", 0) for r in range(12)], fs.scenarios))
    assert tracker.tokenization.all_clean and max(len(e.ids) for e in tracker.encoded) <= width
    starts = [torch.tensor(tokenizer(text)["input_ids"][:width]) for text in background]
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.0, 0.99))
    tracker.record(0)
    for step in range(warmup + 24):
        picks = torch.randint(0, len(starts), (rows,), generator=generator).tolist()
        ids = torch.stack([starts[p] for p in picks])
        batch = schedule.apply({"input_ids": ids, "labels": ids.clone()}, step, tokenizer)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tracker.record(step + 1)

    values = tracker.store.values("mean")  # row t: the model before update t
    own, never = [], []
    for record in range(6):
        for t in schedule.steps_of(record):
            own.append(values[t + 1, record] - values[t, record])
            never.extend(values[t + 1, 6:] - values[t, 6:])
    own, never = torch.stack(own), torch.stack(never)
    assert own.mean() > 0.2, own  # nats per target token, in one step
    assert own.mean() - never.mean() > 0.2 and own.mean() > 5 * never.mean(), (own, never)
    gains = torch.cat([facts.effectivity(tracker.store.steps, values[:, r], schedule.steps_of(r), window=1)
                       for r in range(6)])
    torch.testing.assert_close(gains.float(), own)  # the library's effectivity is the same quantity here
    overall = values[-1] - values[warmup]
    assert overall[:6].mean() - overall[6:].mean() > 0.2, overall
