"""The default run's verdicts that README.md and docs/findings.md publish are generated from a results.json
(kacq_study.published): they agree with the committed docs/demo_results.json, and the check fails when a
results.json of the same seeds says otherwise."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from kacq_study import published

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads((ROOT / published.COPY).read_text(encoding="utf-8"))


def test_published_verdicts_agree_with_the_committed_results(committed):
    assert published.differences(committed, ROOT) == []


def test_the_published_blocks_cover_the_readme_and_every_finding(committed):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert published.START.format(name="readme-findings") in readme
    for finding in committed["findings"]:  # every verdict of the run is in the README's list, with its seed count
        assert finding["claim"] in readme
    table = published.findings_table(committed)
    assert all(f["claim"] in table for f in committed["findings"])


def _repo_copy(tmp_path: Path) -> Path:
    for name in published.FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, tmp_path / name)
    return tmp_path


def test_check_fails_when_a_fresh_run_gives_another_verdict(committed, tmp_path, capsys):
    root = _repo_copy(tmp_path)
    fresh = copy.deepcopy(committed)
    finding = next(f for f in fresh["findings"] if f["checked"] == f["seeds"])
    finding["per_seed"][0] = not finding["per_seed"][0]  # one seed's verdict flips
    finding["held"] = sum(v is True for v in finding["per_seed"])
    finding["reproduces"] = finding["held"] == finding["seeds"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(fresh), encoding="utf-8")
    assert published.main([str(path), "--check", "--root", str(root)]) == 1
    assert "README.md: readme-findings" in capsys.readouterr().out
    # --write regenerates the blocks from the fresh run, and the check then passes on it
    assert published.main([str(path), "--write", "--root", str(root)]) == 0
    assert published.main([str(path), "--check", "--root", str(root)]) == 0
    assert json.loads((root / published.COPY).read_text(encoding="utf-8")) == fresh


def test_check_fails_on_a_number_that_changed(committed, tmp_path):
    fresh = copy.deepcopy(committed)
    loss = next(c for c in fresh["regime"] if c["id"] == "loss_flattened")["values"]
    loss["relative_change"]["mean"] += 0.01  # the published relative change of the loss moves by 1%
    assert published.differences(fresh, _repo_copy(tmp_path))


def test_a_file_without_a_published_block_fails_the_check(committed, tmp_path):
    root = _repo_copy(tmp_path)
    (root / "README.md").write_text("no block here\n", encoding="utf-8")
    assert published.differences(committed, root) == ["README.md: no published block"]


def _comparison(values: list, verdicts: list) -> dict:
    spread = {"mean": None, "min": None, "max": None, "values": values}
    zero = {"mean": 0.0, "min": 0.0, "max": 0.0, "values": [0.0 if v is not None else None for v in values]}
    return {"id": "duplication_more_effective", "claim": "duplication gives higher effectivity than paraphrase",
            "paper": "Chang et al. 2024", "values": {"duplication": spread, "paraphrase": zero},
            "per_seed": verdicts, "held": sum(v is True for v in verdicts),
            "checked": sum(v is not None for v in verdicts), "seeds": len(verdicts)}


def test_a_verdict_within_the_seeds_spread_is_marked_fragile():
    # margins 0.041, 0.089, 0.002: mean 0.044 within their range 0.087 -> fragile, though it held for every seed
    assert published.fragile(_comparison([0.041, 0.089, 0.002], [True, True, True]))
    # margins 0.13 to 0.21: mean 0.17 beyond their range 0.08 -> not fragile
    assert not published.fragile(_comparison([0.128, 0.162, 0.208], [True, True, True]))
    # the same margins failing for every seed are as firm
    assert not published.fragile(_comparison([-0.128, -0.162, -0.208], [False, False, False]))
    # a verdict checked in one seed only has no spread to stand out from
    assert published.fragile(_comparison([0.5, None, None], [True, None, None]))


def test_a_seed_where_the_finding_was_not_checked_has_no_margin():
    finding = _comparison([0.2, -0.4, 0.3], [True, None, True])
    assert published.margins(finding) == [0.2, None, 0.3]
    assert "margin per seed 0.200, n/a, 0.300" in published.finding_line(finding)


def test_every_margin_agrees_in_sign_with_its_seeds_verdict(committed):
    """A margin says how far a verdict was from flipping: > 0 where the finding held, <= 0 where it did not."""
    for finding in committed["findings"]:
        for margin, verdict in zip(published.margins(finding), finding["per_seed"]):
            if margin is not None:
                assert (margin > 0) == verdict, (finding["id"], margin, verdict)
