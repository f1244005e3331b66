"""Per-fact slot attribution: completeness, faithfulness on a model that memorised facts, batching, restored state,
and its recording through a real Trainer run."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import kacq_hooks as kh
from kacq_hooks import facts
from kacq_hooks.attribution import AttributionError, ablate, attribute, mean_baseline
from kacq_hooks.facts.scoring import ModelCaller, target_log_probs
from kacq_hooks.training.attribution import (AttributionCallback, AttributionStore, AttributionTracker,
                                             low_activity_mask, low_activity_share, overlap, stability)
from tiny_models import VOCAB, random_batch, tiny_model

FACTS = [
    ("Zorgon was founded in", "1842"),
    ("The council of Calidus sat on the", "northern shore"),
    ("The lazy dog sleeps under the", "brown fox"),
    ("A small model learns facts one", "batch at a time"),
]


def _memorise(tokenizer, seed: int, steps: int = 200):
    """A tiny Llama trained with AdamW on the fact sentences until it has them by heart."""
    model = tiny_model("llama", seed=seed)
    texts = [f"{i} {t}{tokenizer.eos_token}" for i, t in FACTS]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    torch.manual_seed(seed)
    model.train()
    for _ in range(steps):
        loss = model(**encoded, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def memorised(tokenizer):
    return {seed: _memorise(tokenizer, seed) for seed in (0, 1, 2)}


def test_the_models_have_memorised_the_facts(memorised, tokenizer):
    for model in memorised.values():
        assert attribute(model, tokenizer, FACTS).logp.min() > -0.5  # mean per-token log prob: near certain


@pytest.mark.parametrize("baseline", ["zero", "mean"])
@pytest.mark.parametrize("positions", ["predicting", "all"])
def test_integrated_gradients_are_complete(memorised, tokenizer, baseline, positions):
    model = memorised[0]
    if baseline == "mean":
        baseline = mean_baseline(model, [random_batch(batch=4, seq=16, padding="right")[0]])
    result = attribute(model, tokenizer, FACTS, "integrated_gradients", steps=64, baseline=baseline,
                       positions=positions, rows_per_pass=128)
    # the baseline end of the path, computed independently: every slot ablated at once
    gap = ablate(model, tokenizer, FACTS, "all", baseline=baseline, positions=positions)
    assert torch.allclose(gap.ablated, result.baseline_logp, atol=1e-5)
    expected = result.logp - gap.ablated
    assert expected.abs().min() > 0.05  # the slots matter: the check below is not 0 ≈ 0
    assert torch.allclose(result.totals(), expected, rtol=1e-2, atol=0)


def test_grad_x_act_matches_autograd_on_the_unhooked_model(memorised, tokenizer):
    model = memorised[1]
    result = attribute(model, tokenizer, FACTS[:1], "grad_x_act")
    # by hand: retain C's gradient in a plain forward and backward (parameters requiring grad as usual)
    tracker = facts.FactTracker(model, tokenizer, facts.FactSet([facts.FactRecord("", [FACTS[0][0]], [FACTS[0][1]],
                                                                                   [], [], [], [])]), ("mem",))
    batch = next(tracker.batches())
    kept = []
    handles = [site.module.register_forward_pre_hook(lambda m, a: kept.append(a[0]) or a[0].retain_grad())
               for site in kh.find_sites(model)]
    try:
        logits, offset = ModelCaller(model).logits(batch, torch.device("cpu"))
        target_log_probs(logits, offset, batch)["mean"].sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    start, end = int(batch.target_start[0]), int(batch.target_end[0])
    for layer, c in enumerate(kept):
        expected = (c * c.grad)[0, start - 1:end - 1].sum(0)
        assert torch.allclose(result.scores[layer][0], expected, atol=1e-6)


def test_top_slots_carry_the_fact_more_than_random_slots_of_the_same_layers(memorised, tokenizer):
    k = 6
    for seed, model in memorised.items():
        result = attribute(model, tokenizer, FACTS)
        top = result.top_slots(k)
        drop_top = ablate(model, tokenizer, FACTS, top).delta
        widths = [s.d_ff for s in result.sites]
        generator = torch.Generator().manual_seed(seed)
        random_drops = []
        for _ in range(5):  # k random slots per fact, in the same layers as its top k
            chosen = [[(layer, int(torch.randint(widths[layer], (1,), generator=generator)))
                       for layer, _ in row] for row in top.tolist()]
            chosen = [list(dict.fromkeys(row)) for row in chosen]
            random_drops.append(ablate(model, tokenizer, FACTS, chosen).delta)
        random_drops = torch.stack(random_drops)
        assert (drop_top < 0).all(), seed
        assert (drop_top < random_drops.median(0).values).all(), (seed, drop_top, random_drops)
        assert drop_top.mean() < 2 * random_drops.mean(), seed


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("method", ["grad_x_act", "integrated_gradients"])
def test_batched_results_equal_one_probe_at_a_time(memorised, tokenizer, padding_side, method):
    model = memorised[2]
    together = attribute(model, tokenizer, FACTS, method, steps=8, batch_size=4, padding_side=padding_side)
    alone = attribute(model, tokenizer, FACTS, method, steps=8, batch_size=1, padding_side=padding_side)
    assert len({len(tokenizer(f"{i} {t}")["input_ids"]) for i, t in FACTS}) > 1  # the batch really is padded
    assert torch.allclose(together.logp, alone.logp, atol=1e-5)
    assert torch.allclose(together.tensor(), alone.tensor(), atol=1e-5, rtol=1e-4)


def test_single_slot_ablation_is_the_exact_change(memorised, tokenizer):
    model = memorised[0]
    result = attribute(model, tokenizer, FACTS[:2], "ablation")
    for layer, neuron, score, _ in result.top_k(2)[1]:
        exact = ablate(model, tokenizer, FACTS[:2], [(layer, neuron)])
        assert score == pytest.approx(-float(exact.delta[1]), abs=1e-6)


def test_model_mode_rng_grads_and_instrumentations_are_left_as_they_were(tokenizer):
    model = tiny_model("llama").train()
    model.model.layers[0].self_attn.eval()  # a mixed mode must come back as it was
    frozen = model.model.embed_tokens.weight
    frozen.requires_grad_(False)
    grad = torch.randn_like(model.lm_head.weight)
    model.lm_head.weight.grad = grad
    flags = {name: m.training for name, m in model.named_modules()}
    inst = kh.instrument(model, grads=True)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    for method in ("grad_x_act", "integrated_gradients", "ablation"):
        attribute(model, tokenizer, FACTS[:2], method, steps=4)
    ablate(model, tokenizer, FACTS[:2], [(0, 1)])
    assert torch.equal(torch.rand(3), expected_draw)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert not frozen.requires_grad and all(p.requires_grad for n, p in model.named_parameters() if p is not frozen)
    assert model.lm_head.weight.grad is grad and all(p.grad is None for p in model.parameters() if p is not
                                                     model.lm_head.weight)
    assert all(int(s.tokens) == 0 and int(s.grad_tokens) == 0 for s in inst.stats)
    inst.remove()
    assert not [h for m in model.modules() for h in m._forward_pre_hooks.values()]


def test_refusals(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(AttributionError, match="unknown method"):
        attribute(model, tokenizer, FACTS, "saliency")
    with pytest.raises(AttributionError, match="one \\[d_ff\\] tensor per site"):
        attribute(model, tokenizer, FACTS, baseline=[torch.zeros(3)])
    with pytest.raises(AttributionError, match="outside"):
        ablate(model, tokenizer, FACTS, [(5, 0)])
    with pytest.raises(AttributionError, match="probes must be"):
        attribute(model, tokenizer, "Zorgon")


# -- through training -------------------------------------------------------------------------------------------

def _record(context, inputs, targets):
    probes = {f"{k}_{p}": list(inputs if p == "input" else targets) for k in facts.PROBE_KINDS for p in ("input", "target")}
    return facts.FactRecord(context, **probes)


def test_store_resumes_and_cuts_a_torn_record(tmp_path):
    path = tmp_path / "attribution.jsonl"
    probes = [facts.ProbeRef(0, "mem", 0), facts.ProbeRef(1, "mem", 0)]
    store = AttributionStore(path, probes, labels=["decoder.layer_0"], d_ff=[4], k=2)
    store.append(0, [[(0, 0), (0, 1)], [(0, 2), (0, 3)]], [[1.0, 0.5], [2.0, 1.0]], [torch.tensor([0.1, 0.2, 0.3, 0.4])])
    store.append(3, [[(0, 0), (0, 2)], [(0, 2), (0, 3)]], [[1.0, 0.5], [2.0, 1.0]])
    with open(path, "a") as handle:
        handle.write('{"step": 6, "slots": [[[0, 1')  # a crash while writing
    resumed = AttributionStore(path, probes, labels=["decoder.layer_0"], d_ff=[4], k=2)
    assert resumed.steps == [0, 3] and torch.equal(resumed.records[0].cbar[0], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert stability(resumed)[0].tolist() == pytest.approx([1 / 3, 1.0])
    assert torch.allclose(overlap(resumed), torch.tensor([[1.0, 1 / 3], [1 / 3, 1.0]]))
    resumed.append(6, [[(0, 1), (0, 2)], [(0, 0), (0, 1)]], [[1.0, 0.5], [2.0, 1.0]])
    share = low_activity_share(AttributionStore.open(path), {0: 0, 1: 3})
    # c̄ at step 0 makes slots 0 and 1 the low half: record 0 (injected at 0) has 1 of 2, then 2 of 2... of its top-k
    assert share.chance.tolist() == [0.5, 0.5]
    assert share.share[:, 0].tolist() == pytest.approx([float("nan"), 0.5, 0.5], nan_ok=True)
    assert share.share[:, 1].tolist() == pytest.approx([float("nan"), float("nan"), 1.0], nan_ok=True)
    with pytest.raises(facts.TrajectoryError, match="another k"):
        AttributionStore(path, probes, labels=["decoder.layer_0"], d_ff=[4], k=3)


def test_low_activity_mask_is_resuscitations_selection():
    cbar = [torch.tensor([0.4, 0.1, 0.3, 0.2]), torch.tensor([1.0, 1.0, 2.0, 3.0])]
    assert [m.tolist() for m in low_activity_mask(cbar, 0.5)] == [[False, True, False, True], [True, True, False, False]]


def test_attribution_callback_in_a_real_trainer_run(tmp_path, tokenizer):
    model = tiny_model("llama")
    fact_set = facts.FactSet([_record("Zorgon was founded in 1842.", ["Zorgon was founded in"], ["1842"]),
                              _record("The fox jumps over the lazy dog.", ["The fox jumps over the"], ["lazy dog"])],
                             ["once", "once"])
    calibration = [random_batch(batch=2, seq=16, padding="right", seed=s)[0] for s in range(2)]
    path = tmp_path / "attribution.jsonl"
    tracker = AttributionTracker(model, tokenizer, fact_set, store=path, k=5, kinds=("mem",), calibration=calibration)
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(2, VOCAB, (24,), generator=generator).tolist()} for _ in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], logging_steps=1000, save_strategy="steps", save_steps=3,
                             use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    AttributionCallback(tracker, every=2).attach(trainer)
    trainer.train()
    store = AttributionStore.open(path)
    assert store.steps == [0, 2, 4, 6] and store.k == 5 and store.labels == ["decoder.layer_0", "decoder.layer_1"]
    assert all(len(row) == 5 and len(set(row)) == 5 for record in store.records for row in record.slots)
    assert store.records[0].slots != store.records[-1].slots  # training moved where the facts live
    history = [entry for entry in trainer.state.log_history if "attribution/stability" in entry]
    assert [entry["step"] for entry in history] == [2, 4, 6]
    assert history[-1]["attribution/stability"] == pytest.approx(float(stability(store)[-1].mean()))
    assert model.training and all(p.requires_grad for p in model.parameters())
    share = low_activity_share(store, {0: 0, 1: 0})
    assert share.share.shape == (4, 2) and torch.isnan(share.share[0]).all() and not torch.isnan(share.share[1:]).any()
    assert 0.4 < float(share.chance[0]) < 0.6
    # resume from the step-3 checkpoint: records after it are dropped, then training continues
    trainer2 = Trainer(model=model, args=args, train_dataset=data,
                       data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    resumed = AttributionTracker(model, tokenizer, fact_set, store=path, k=5, kinds=("mem",), calibration=calibration)
    AttributionCallback(resumed, every=2).attach(trainer2)
    trainer2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    assert AttributionStore.open(path).steps == [0, 2, 3, 4, 6]  # the checkpoint step is recorded on resuming
    lines = path.read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["format"] == "kacq_hooks.attribution"


# -- the JSONL step file under both stores --------------------------------------------------------------------------

def _trajectory(path):
    store = facts.TrajectoryStore(path, [facts.ProbeRef(0, "mem", 0)])
    store.append(0, {"mean": [-1.0], "first": [-2.0], "sum": [-3.0]})
    return store


def test_trajectory_open_reads_without_cutting_and_refuses_repeated_steps(tmp_path):
    path = tmp_path / "facts.jsonl"
    _trajectory(path)
    line = '{"step": 1, "mean": [-0.5], "first": [-1.0], "sum": [-1.5]}\n'
    with open(path, "a") as handle:
        handle.write(line[:20])  # a live writer's step in progress
    size = path.stat().st_size
    reader = facts.TrajectoryStore.open(path)
    assert reader.steps == [0] and path.stat().st_size == size
    with pytest.raises(facts.TrajectoryError, match="opened to read"):
        reader.append(1, {"mean": [0.0], "first": [0.0], "sum": [0.0]})
    with open(path, "a") as handle:
        handle.write(line[20:] + line)  # two writers: step 1 twice
    with pytest.raises(facts.TrajectoryError, match="line 4: step 1 is not after step 1"):
        facts.TrajectoryStore.open(path)


def test_a_writer_keeps_a_whole_record_missing_only_its_newline(tmp_path):
    path = tmp_path / "facts.jsonl"
    _trajectory(path)
    with open(path, "a") as handle:
        handle.write('{"step": 4, "mean": [-0.5], "first": [-1.0], "sum": [-1.5]}')  # the crash came before "\n"
    assert facts.TrajectoryStore.open(path).steps == [0]  # a reader waits for the newline
    resumed = facts.TrajectoryStore(path, [facts.ProbeRef(0, "mem", 0)])
    assert resumed.steps == [0, 4]
    resumed.append(5, {"mean": [0.0], "first": [0.0], "sum": [0.0]})
    assert facts.TrajectoryStore.open(path).steps == [0, 4, 5]


def test_a_torn_header_of_another_format_is_not_overwritten(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"format": "somebody.else", "ver')
    with pytest.raises(facts.TrajectoryError, match="does not start with"):
        AttributionStore(path, [facts.ProbeRef(0, "mem", 0)], labels=["decoder.layer_0"], d_ff=[4], k=2)
    assert path.read_text() == '{"format": "somebody.else", "ver'


def test_the_store_keeps_the_trackers_settings_and_refuses_others(tmp_path, tokenizer):
    model = tiny_model("llama")
    path = tmp_path / "attribution.jsonl"
    AttributionTracker(model, tokenizer, FACTS[:2], store=path, k=3, by="abs", reduction="sum")
    header = json.loads(path.read_text().splitlines()[0])
    assert {key: header[key] for key in ("method", "by", "baseline", "reduction", "positions")} == dict(
        method="grad_x_act", by="abs", baseline="zero", reduction="sum", positions="predicting")
    with pytest.raises(facts.TrajectoryError, match="another by"):
        AttributionTracker(model, tokenizer, FACTS[:2], store=path, k=3, reduction="sum")
    with pytest.raises(facts.TrajectoryError, match="another baseline"):
        AttributionTracker(model, tokenizer, FACTS[:2], store=path, k=3, by="abs", reduction="sum",
                           baseline=[torch.zeros(s.d_ff) for s in kh.find_sites(model)])
    resumed = AttributionTracker(model, tokenizer, FACTS[:2], store=path, k=3, by="abs", reduction="sum")
    resumed.record(0)
    store = AttributionStore.open(path)
    assert store.steps == [0] and store.by == "abs" and store.reduction == "sum"
    other = [torch.ones(s.d_ff) for s in kh.find_sites(model)]
    path2 = tmp_path / "mean.jsonl"
    AttributionTracker(model, tokenizer, FACTS[:2], store=path2, k=3, baseline=other)
    assert AttributionStore.open(path2).baseline.startswith("tensors:")
    with pytest.raises(facts.TrajectoryError, match="another baseline"):
        AttributionTracker(model, tokenizer, FACTS[:2], store=path2, k=3, baseline=[2 * b for b in other])


def test_callbacks_write_only_from_the_main_process(tmp_path, tokenizer):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from kacq_hooks.training import FactTrackingCallback

    model = tiny_model("llama")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    fact_set = facts.FactSet([_record("Zorgon was founded in 1842.", ["Zorgon was founded in"], ["1842"])])
    attribution = AttributionCallback(AttributionTracker(model, tokenizer, FACTS[:1], store=tmp_path / "a.jsonl",
                                                         k=3), every=1)
    tracking = FactTrackingCallback(facts.FactTracker(model, tokenizer, fact_set, store=tmp_path / "f.jsonl"))
    for callback in (attribution, tracking):
        for step in (0, 1):
            state, control = TrainerState(global_step=step, is_world_process_zero=False), TrainerControl()
            (callback.on_train_begin if step == 0 else callback.on_step_end)(args, state, control)
            assert control.should_log == (step == 1)  # a log line at the main process's steps, on every process
    assert AttributionStore.open(tmp_path / "a.jsonl").steps == []
    assert facts.TrajectoryStore.open(tmp_path / "f.jsonl").steps == []
