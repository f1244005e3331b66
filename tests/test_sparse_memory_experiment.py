"""The sparse-memory experiment's criteria and intervals on hand-made per-seed rows (no training)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kacq_study.experiments.sparse_memory import CRITERIA, interval, judge


def _row(a, f):
    return {"acquisition": a, "forgetting": f, "retention": 0.5}


def test_interval_is_the_t_interval_over_seeds():
    # values 1, 2, 3: mean 2, sd 1, half-width t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.7320508 = 2.4843
    got = interval([1.0, 2.0, 3.0, None])
    assert got["mean"] == 2.0 and got["n"] == 3 and got["ci95"] == pytest.approx(2.48434, abs=1e-4)
    assert interval([1.0])["ci95"] is None


def test_findings_follow_their_fixed_criteria():
    per_seed = {
        # seed 0: sparse forgets less (0.01 < 0.05), acquires 0.06 >= 0.5 x 0.1, more than least (0.02)
        "0": {"late": _row(0.1, 0.05), "tfidf t=16": _row(0.06, 0.01), "least t=16": _row(0.02, 0.0)},
        # seed 1: forgets more (0.2 > 0.05), acquires too little (0.04 < 0.05), less than least (0.05)
        "1": {"late": _row(0.1, 0.05), "tfidf t=16": _row(0.04, 0.2), "least t=16": _row(0.05, 0.0)},
        # seed 2: forgets less, acquires 0.05 = 0.5 x 0.1 (comparable: >=), F unknown for least only
        "2": {"late": _row(0.1, 0.05), "tfidf t=16": _row(0.05, 0.0), "least t=16": _row(0.01, None)},
    }
    found = judge(per_seed, [16])
    assert set(found) == {f"{name} (t=16)" for name in CRITERIA}
    forgets = found["sparse_memory_forgets_less (t=16)"]
    assert forgets["per_seed"] == [True, False, True] and forgets["holds"]
    comparable = found["sparse_memory_acquires_comparably (t=16)"]
    assert comparable["per_seed"] == [True, False, True] and comparable["holds"]
    contrast = found["tfidf_slots_acquire_more_than_least_active (t=16)"]
    assert contrast["per_seed"] == [True, False, True] and contrast["held"] == 2
    # a seed without a forgetting value is not checked, and 1 of 2 checked does not hold
    per_seed["2"]["tfidf t=16"]["forgetting"] = None
    forgets = judge(per_seed, [16])["sparse_memory_forgets_less (t=16)"]
    assert forgets["checked"] == 2 and forgets["held"] == 1 and not forgets["holds"]


ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "docs" / "findings" / "sparse_memory.json"


def test_the_registered_experiment_writes_its_files_from_a_result(tmp_path, monkeypatch):
    from kacq_study import experiments as ex

    result = json.loads(PUBLISHED.read_text())
    monkeypatch.setitem(ex.EXPERIMENTS, "sparse-memory",
                        dataclasses.replace(ex.EXPERIMENTS["sparse-memory"], run=lambda **kw: result))
    assert ex.main(["sparse-memory", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "sparse_memory.png").stat().st_size > 0
    assert json.loads((tmp_path / "sparse_memory.json").read_text())["findings"] == result["findings"]


def test_the_published_table_is_the_published_result():
    result = json.loads(PUBLISHED.read_text())
    page = (ROOT / "docs" / "findings.md").read_text()
    section = page[page.index("## Sparse memory finetuning"):]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "±" in line]
    assert len(rows) == len(result["labels"])
    for label, row in zip(result["labels"], rows):
        s = result["summary"][label]
        for key in ("acquisition", "retention", "forgetting"):
            assert f"{s[key]['mean']:.3f} ± {s[key]['ci95']:.3f}" in row, (label, key)
    verdicts = section[section.index("| finding (criterion"):]
    for name, found in result["findings"].items():
        assert found["holds"] == (found["held"] >= 2)
        assert f"{found['held']} of {found['checked']}: {'holds' if found['holds'] else 'does not hold'}" in verdicts
