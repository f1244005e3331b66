"""`kacq demo` (the kacq_study package): the quick study end to end (every output, same seed -> same
bytes), its parts, and how it hangs off the library (the library never imports it)."""
from __future__ import annotations

import ast
import copy
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kacq_hooks.cli import main
from kacq_hooks.facts import FactRecord, FactSet
from kacq_study.demo import (
    ARMS,
    RUN_TIME,
    DemoConfig,
    DemoConfigError,
    inject_spanning,
)
from kacq_study.findings import assess
from kacq_study.report import FIGURES, render_markdown

ROOT = Path(__file__).resolve().parents[1]

OUTPUTS = ("results.json", "report.md", "timings.json", *FIGURES)


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Two `kacq demo --quick` runs with the same seed (the only place the study runs in the suite)."""
    root = tmp_path_factory.mktemp("demo")
    cache = root / "cache"
    for name in ("a", "b"):
        assert main(["demo", "--quick", "--out", str(root / name), "--cache-dir", str(cache)]) == 0
    return root / "a", root / "b"


@pytest.mark.slow
def test_quick_demo_writes_every_output(quick_runs):
    out, _ = quick_runs
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    config = DemoConfig.quick()
    entropy = results["pretraining"]["entropy"]
    assert entropy["steps"][0] == 0 and entropy["steps"][-1] == config.pretrain_steps
    assert len(entropy["total"]) == len(entropy["steps"]) == len(entropy["per_layer"])
    assert all(0 < total <= entropy["max_total"] + 1e-9 for total in entropy["total"])
    assert all(len(layers) == config.n_layers for layers in entropy["per_layer"])
    assert sum(entropy["per_layer"][-1]) == pytest.approx(entropy["total"][-1], rel=1e-6)
    assert set(results["arms"]) == set(config.arms)
    for arm in results["arms"].values():
        assert len(arm["kim"]["K"]) == config.continue_steps + 1  # every probe scored before every update
        assert len(arm["groups"]) == 9  # 3 scenarios x 3 probe kinds
        fits = [g["retainability"]["fit"] for g in arm["groups"].values()]
        assert any(f["decay"] is not None and f["r_squared"] is not None for f in fits)
        for group in arm["groups"].values():
            assert len(group["effectivity_per_round"]) == len(group["injection_steps"])
    assert results["arms"]["late"]["groups"]["once/mem"]["injection_steps"] == [config.lead_steps]
    edit = results["arms"]["late+resuscitation"]["edit"]
    assert edit["kind"] == "resuscitation" and edit["selected"] > 0
    assert results["arms"]["late+resuscitation"]["entropy_start"]["total"] != results["arms"]["late"]["entropy_start"]["total"]
    ids = {f["id"] for f in results["findings"]}
    assert {"entropy_decays", "power_law_forgetting", "resuscitation_improves_acquisition"} <= ids
    # where the facts land: the late arms only, against the checkpoint's low-activity slots (those resuscitation scaled)
    assert "attribution" not in results["arms"]["early"]
    for name in ("late", "late+resuscitation"):
        landing = results["arms"][name]["attribution"]
        assert landing["steps"] == [0, config.lead_steps + 1, config.continue_steps]
        assert landing["slots"] == config.n_layers * config.d_ff and landing["k"] == 50
        assert landing["low_activity_slots"] == edit["selected"]
        assert landing["chance"] == pytest.approx(landing["low_activity_slots"] / landing["slots"])
        for key in ("mean", "min", "max"):
            assert all(0 <= v <= 1 for v in landing["share"][key])
        assert f"facts_land_in_low_activity_slots[{name}]" in ids
    timings = json.loads((out / "timings.json").read_text())
    assert timings["arm:late_attribution_s"] > 0 and "arm:early_attribution_s" not in timings
    report = (out / "report.md").read_text()
    assert "## Which findings reproduce at this scale" in report
    for figure in FIGURES:
        assert f"({figure})" in report


@pytest.mark.slow
def test_same_seed_gives_identical_results_json(quick_runs):
    first, second = quick_runs
    assert (first / "results.json").read_bytes() == (second / "results.json").read_bytes()


def test_inject_spanning_keeps_passages_whole_and_batch_shape():
    batch = torch.arange(12).view(3, 4)
    out, starts = inject_spanning(batch, [[100, 101, 102, 103, 104], [200]], seq_len=4)
    assert out.shape == batch.shape and starts == [0, 2]
    assert out.tolist() == [[100, 101, 102, 103], [104, 5, 6, 7], [200, 9, 10, 11]]
    assert batch[0, 0] == 0  # the input is not modified
    with pytest.raises(DemoConfigError, match="raise batch_size"):
        inject_spanning(batch, [[1] * 9, [2]], seq_len=4)


def test_paper_passage_schedule():
    probes = {f"{k}_{p}": ["x"] for k in ("mem", "gen", "hard_gen") for p in ("input", "target")}
    record = FactRecord("original", paraphrases=["first", "second"], **probes)
    config = DemoConfig.quick()
    schedule = config.schedule(FactSet([record] * 3, ["paraphrase", "duplication", "once"]))
    steps = config.injection_steps()
    texts = {scenario: [next((i.text for i in schedule.at(s) if i.scenario == scenario), None) for s in steps]
             for scenario in ("paraphrase", "duplication", "once")}
    assert texts["paraphrase"] == ["original", "first", "second"]
    assert texts["duplication"] == ["original"] * 3
    assert texts["once"] == ["original", None, None]


def test_config_validation_names_the_problem():
    with pytest.raises(DemoConfigError, match="early_step"):
        DemoConfig.quick(early_step=500).validate()
    with pytest.raises(DemoConfigError, match="unknown arm"):
        DemoConfig.quick(arms=("late", "nonsense")).validate()
    assert {"late", "late+augment", "late+sam", "late+augment+sam"} <= set(ARMS)


def test_bad_arms_option_exits_2(capsys, tmp_path):
    assert main(["demo", "--quick", "--arms", "late,bogus", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "Traceback" not in err


def _synthetic_results() -> dict:
    """A minimal results dict with hand-set numbers, so verdicts can be checked against them."""
    group = {"effectivity": 0.5, "effectivity_positive_fraction": 0.9, "injection_steps": [0],
             "retainability": {"t": [1, 2], "R": [0.9, 0.8], "fit": {"decay": 0.3, "intercept": 0.9,
                                                                      "r_squared": 0.8, "x_intercept_steps": 1000.0}}}
    groups = {f"{s}/{k}": copy.deepcopy(group) for s in ("paraphrase", "duplication", "once")
              for k in ("mem", "gen", "hard_gen")}
    for kind, value in (("mem", 0.9), ("gen", 0.5), ("hard_gen", 0.1)):
        for scenario in ("paraphrase", "duplication", "once"):
            groups[f"{scenario}/{kind}"]["effectivity"] = value
    kim = {"acquisition": 0.2, "retention": 0.5, "forgetting": 0.1}
    return {"pretraining": {"entropy": {"steps": [0, 10, 20], "total": [3.0, 2.9, 2.8],
                                        "per_layer": [[1.5, 1.5], [1.45, 1.45], [1.45, 1.35]]}},
            "arms": {"early": {"kim": dict(kim, acquisition=0.3, forgetting=0.05), "groups": groups},
                     "late": {"kim": dict(kim), "groups": groups},
                     "late+resuscitation": {"kim": dict(kim, acquisition=0.25, retention=0.4), "groups": groups}}}


def test_findings_follow_the_numbers():
    results = _synthetic_results()
    verdicts = {f["id"]: f["holds"] for f in assess(results)}
    assert verdicts["entropy_decays"] and verdicts["last_layer_falls_most"]
    assert verdicts["late_acquires_less"] and verdicts["late_forgets_more"]
    assert verdicts["resuscitation_improves_acquisition"] is True
    assert verdicts["resuscitation_improves_retention"] is False
    assert verdicts["mem_gen_hard_gen_order"] and verdicts["power_law_forgetting"]
    assert verdicts["duplication_more_effective"] is False  # equal effectivity: not higher

    results["pretraining"]["entropy"]["total"] = [2.8, 2.9, 3.0]
    results["arms"]["early"]["kim"]["acquisition"] = 0.1
    del results["arms"]["late+resuscitation"]
    verdicts = {f["id"]: f["holds"] for f in assess(results)}
    assert verdicts["entropy_decays"] is False and verdicts["late_acquires_less"] is False
    assert verdicts["resuscitation_improves_acquisition"] is None  # arm not run: not checked


def test_report_states_verdicts_from_findings():
    results = _synthetic_results()
    results["findings"] = assess(results)
    base = {"config": DemoConfig.quick().to_dict(),
            "data": {"vocab_size": 768, "corpus": "c", "documents": 1, "tokens": 2, "calibration_sequences": 1,
                     "records": 6, "facts": "generated", "injection_steps": [3]}}
    results.update(base)
    results["pretraining"].update(checkpoints={"early": 15, "late": 60})
    results["pretraining"]["entropy"]["max_total"] = 3.5
    for arm in results["arms"].values():
        arm.update(entropy_start={"total": 2.8}, edit=None)
        arm["kim"].update(K_before=-5.0, K_after=-4.0)
    text = render_markdown(results)
    assert "**knowledge entropy decays during pretraining** (Kim et al. 2025): reproduces" in text
    assert "**resuscitation improves retention at the late checkpoint** (Kim et al. 2025): does not reproduce" in text
    assert "(fresh AdamW, lr 0.004, beta1 0.5, 4 warmup steps, 24 sequences a step; each passage + EOS from the start" in text
    del results["config"]["continue_beta1"]  # an older results file: the sentence is left out, not guessed
    assert "fresh AdamW" not in render_markdown(results)


def test_late_forgets_more_needs_actual_forgetting():
    results = _synthetic_results()
    results["arms"]["early"]["kim"]["forgetting"] = -0.4
    results["arms"]["late"]["kim"]["forgetting"] = -0.2  # larger, but both arms gained held-out accuracy
    verdicts = {f["id"]: f["holds"] for f in assess(results)}
    assert verdicts["late_forgets_more"] is None
    results["arms"]["early"]["kim"]["forgetting"] = 0.05
    assert {f["id"]: f["holds"] for f in assess(results)}["late_forgets_more"] is False  # only early forgot
    results["arms"]["late"]["kim"]["forgetting"] = 0.1
    assert {f["id"]: f["holds"] for f in assess(results)}["late_forgets_more"] is True


def test_row_injection_needs_a_row_per_first_round_passage():
    DemoConfig().validate()  # the default: 6 passages into 8 rows
    with pytest.raises(DemoConfigError, match="continue_batch_size"):
        DemoConfig(facts_per_scenario=3, continue_batch_size=8).validate()
    DemoConfig(facts_per_scenario=3, continue_batch_size=9).validate()
    with pytest.raises(DemoConfigError, match="'row'"):
        DemoConfig(injection="rows").validate()


def test_continued_training_warms_up_linearly():
    from kacq_study.demo import _warmup

    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-2)
    schedule = _warmup(optimizer, 4)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])
    no_warmup = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-2)
    _warmup(no_warmup, 0)
    assert no_warmup.param_groups[0]["lr"] == 1e-2


def test_run_time_is_stated_in_one_place(capsys):
    """RUN_TIME is the one statement of the demo's run time: --help prints it, the README quotes it."""
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    readme = " ".join((ROOT / "README.md").read_text().split())
    for stated in RUN_TIME.values():
        assert stated in help_text and stated in readme


def test_the_library_never_imports_the_study():
    for path in sorted((ROOT / "src" / "kacq_hooks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "kacq_study" for n in names), path
    code = "import sys, kacq_hooks, kacq_hooks.cli, kacq_hooks.corpus; print('kacq_study' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_cli_finds_commands_by_entry_point(tmp_path, monkeypatch, capsys, caplog):
    """kacq_hooks.cli builds its commands from the kacq.commands group of any installed distribution
    (as `kacq demo` comes from kacq_study's); one that fails to import costs only its own command."""
    (tmp_path / "kacq_probe_command.py").write_text(
        "def register(subparsers):\n"
        "    parser = subparsers.add_parser('probe')\n"
        "    parser.set_defaults(func=lambda args: print('probe ran') or 0)\n")
    dist = tmp_path / "kacq_probe_command-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kacq_probe_command\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[kacq.commands]\nprobe = kacq_probe_command:register\n"
                                           "broken = kacq_no_such_package:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["probe"]) == 0
    assert capsys.readouterr().out == "probe ran\n"
    assert "kacq broken is unavailable" in caplog.text and "kacq_no_such_package" in caplog.text
