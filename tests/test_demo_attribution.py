"""Where the study's injected facts land: the low-activity share of the probes' top-k attributed slots
(kacq_study.metrics.Landing), its finding, its paragraph and its figure, on a tiny model (no demo run)."""
from __future__ import annotations

import copy
from statistics import mean

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kacq_hooks import facts as kf
from kacq_hooks.attribution import attribute
from kacq_hooks.training.attribution import low_activity_mask
from kacq_study.config import ATTRIBUTION_K
from kacq_study.metrics import Landing
from kacq_study.pipeline import Calibration
from kacq_study.findings import LANDING_ARMS, LANDING_MARGIN, landing
from kacq_study.report import LANDING_FIGURE, _landing_section, plot_landing


def _facts() -> kf.FactSet:
    facts = kf.generate_facts(3, seed=0, n_paraphrases=2)
    return kf.assign_scenarios(facts, {"paraphrase": 1 / 3, "duplication": 1 / 3, "once": 1 / 3})


def _model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True))


def _train_on(model, tokenizer, text: str) -> None:
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:48]])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_landing_share_is_the_top_k_slots_low_activity_at_the_checkpoint(tokenizer):
    facts = _facts()
    model = _model(len(tokenizer))
    calibration = Calibration(torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(1)))
    cbar = calibration.mean_abs_coefficients(model)
    tracker = kf.FactTracker(model, tokenizer, facts, batch_size=64)
    schedule = kf.InjectionSchedule(facts, interval=2, rounds=2, start=1, cycle_paraphrases=True)
    where = Landing(model, tokenizer, tracker, cbar)
    # an edit after the checkpoint (half the slots x10): the low-activity set stays the checkpoint's
    with torch.no_grad():
        for up in [m for n, m in model.named_modules() if n.endswith("mlp.up_proj")]:
            up.weight[:48].mul_(10.0)
    edited = low_activity_mask(calibration.mean_abs_coefficients(model), 0.5)
    assert edited[0].tolist() != low_activity_mask(cbar, 0.5)[0].tolist()
    where.record(0)
    _train_on(model, tokenizer, facts[0].train_context)
    where.record(2)
    _train_on(model, tokenizer, facts[1].train_context)
    where.record(5)
    summary = where.summary(schedule, facts, 0.5)

    masks = low_activity_mask(cbar, 0.5)
    slots = sum(m.numel() for m in masks)
    best = attribute(model, tokenizer, tracker).top_slots(ATTRIBUTION_K).tolist()  # the model as at step 5
    expected = [sum(bool(masks[layer][neuron]) for layer, neuron in row) / ATTRIBUTION_K for row in best]
    assert summary["steps"] == [0, 2, 5] and summary["first_injection"] == 1
    assert summary["slots"] == slots == 2 * 96
    assert summary["low_activity_slots"] == sum(int(m.sum()) for m in masks)
    assert summary["chance"] == pytest.approx(summary["low_activity_slots"] / slots)
    assert summary["share"]["mean"][-1] == pytest.approx(mean(expected))
    assert summary["share"]["min"][-1] == pytest.approx(min(expected))
    assert summary["share"]["max"][-1] == pytest.approx(max(expected))
    mem = [e for e, probe in zip(expected, tracker.probes) if probe.kind == "mem"]
    assert summary["share_by_kind"]["mem"]["mean"][-1] == pytest.approx(mean(mem))
    once = [e for e, probe in zip(expected, tracker.probes) if facts.scenarios[probe.record] == "once"]
    assert summary["share_by_scenario"]["once"]["mean"][-1] == pytest.approx(mean(once))
    assert set(summary["share_by_scenario"]) == {"paraphrase", "duplication", "once"}  # no empty groups
    assert len(summary["stability"]) == 2 and all(0 <= j <= 1 for j in summary["stability"])
    assert where.seconds > 0


def _results(share_end: float, chance: float = 0.5) -> dict:
    attribution = {"method": "grad_x_act", "k": 50, "by": "score", "quantile": 0.5, "slots": 512,
                   "low_activity_slots": round(chance * 512), "chance": chance, "steps": [0, 6, 38],
                   "first_injection": 5, "stability": [0.5, 0.4],
                   "share": {"mean": [0.3, 0.4, share_end], "min": [0.1, 0.2, share_end - 0.1],
                             "max": [0.5, 0.6, share_end + 0.1]},
                   "share_by_kind": {k: {"mean": [0.3, 0.4, share_end]} for k in ("mem", "gen", "hard_gen")}}
    return {"arms": {name: {"attribution": copy.deepcopy(attribution)} for name in LANDING_ARMS}}


def test_landing_finding_needs_more_than_chance_plus_the_margin():
    assert landing(_results(0.5 + LANDING_MARGIN + 0.01), "late")["holds"] is True
    assert landing(_results(0.5 + LANDING_MARGIN), "late")["holds"] is False  # not above the margin
    assert landing(_results(0.3), "late+resuscitation")["holds"] is False
    assert landing({"arms": {}}, "late")["holds"] is None  # arm not run: not checked
    results = _results(0.7)
    results["arms"]["late"]["attribution"]["share"]["mean"][-1] = None  # no finite share
    assert landing(results, "late")["holds"] is None
    finding = landing(_results(0.7), "late+resuscitation")
    assert finding["values"] == {"share_end": 0.7, "chance": 0.5, "share_start": 0.3,
                                 "share_after_first_injection": 0.4}
    assert "top-50" in finding["criterion"] and str(LANDING_MARGIN) in finding["criterion"]


def test_landing_paragraph_and_figure(tmp_path):
    results = _results(0.62)
    results["data"] = {"calibration_sequences": 8}
    text = "\n".join(_landing_section(results))
    assert "## Where the injected facts land" in text and f"]({LANDING_FIGURE})" in text
    assert "In arm late+resuscitation" in text and "low-activity was 0.62 at the end" in text
    assert "\"Facts land preferentially in low-activity slots\": held for 1 of 1 seed: reproduced" in text
    assert f"end share > chance + {LANDING_MARGIN}" in text
    path = plot_landing(results, tmp_path / LANDING_FIGURE)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
