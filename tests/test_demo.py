"""`kacq demo` (the kacq_study package): the quick study over two seeds end to end (every output, the same
bytes whichever process ran a task), its parts (seeds combined, fits gated, regime checks), and how it hangs
off the library (the library never imports it)."""
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
from kacq_hooks.errors import KacqError, MissingExtraError
from kacq_hooks.facts import FactRecord, FactSet
from kacq_study.cli import parse_seeds
from kacq_study.demo import (
    ARMS,
    RUN_TIME,
    DemoConfig,
    DemoConfigError,
    inject_spanning,
    write_results,
)
from kacq_study.findings import (
    LEARNED_MARGIN,
    POWER_LAW_MIN_R2,
    assess,
    combine_findings,
    facts_are_learned,
    loss_flattened,
    spread,
    summarize,
)
from kacq_study.report import BEYOND, FIGURES, fit_text, horizon_text, render_markdown
from kacq_study.study import _call, run_study

ROOT = Path(__file__).resolve().parents[1]

OUTPUTS = ("results.json", "report.md", "timings.json", *FIGURES)


SEEDS = (0, 1)


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """`kacq demo --quick` over two seeds in two worker processes (the only full study run in the suite)."""
    root = tmp_path_factory.mktemp("demo")
    cache = root / "cache"
    assert main(["demo", "--quick", "--seeds", ",".join(map(str, SEEDS)), "--workers", "2", "--out", str(root / "a"),
                 "--cache-dir", str(cache)]) == 0
    return root / "a", cache


@pytest.mark.slow
def test_quick_demo_writes_every_output(quick_study):
    out, _ = quick_study
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    study = json.loads((out / "results.json").read_text())
    assert study["format"] == "kacq_hooks.demo" and study["version"] == 2 and study["seeds"] == list(SEEDS)
    assert [r["config"]["seed"] for r in study["per_seed"]] == list(SEEDS)
    config = DemoConfig.quick()
    for results in study["per_seed"]:
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
            assert {"injected", "control"} <= set(arm["learning"])
            assert arm["entropy"]["steps"][-1] == config.continue_steps
            for group in arm["groups"].values():
                assert len(group["effectivity_per_round"]) == len(group["injection_steps"])
        assert results["arms"]["late"]["groups"]["once/mem"]["injection_steps"] == [config.lead_steps]
        edit = results["arms"]["late+resuscitation"]["edit"]
        assert edit["kind"] == "resuscitation" and edit["selected"] > 0
        assert "attribution" not in results["arms"]["early"]
        for name in ("late", "late+resuscitation"):
            landing = results["arms"][name]["attribution"]
            assert landing["steps"] == [0, config.lead_steps + 1, config.continue_steps]
            assert landing["slots"] == config.n_layers * config.d_ff and landing["low_activity_slots"] == edit["selected"]
    # the seeds differ (else the intervals say nothing), and the summary is their spread
    first, second = (r["pretraining"]["entropy"]["total"][-1] for r in study["per_seed"])
    assert first != second
    last = study["summary"]["pretraining"]["entropy_last"]
    assert last["values"] == [first, second] and last["min"] == min(first, second)
    assert last["mean"] == pytest.approx((first + second) / 2, rel=1e-6)
    ids = [f["id"] for f in study["findings"]]
    assert ids == [f["id"] for f in study["per_seed"][0]["findings"]]
    for finding in study["findings"]:
        verdicts = [next(f["holds"] for f in r["findings"] if f["id"] == finding["id"]) for r in study["per_seed"]]
        assert finding["per_seed"] == verdicts and finding["reproduces"] == all(v is True for v in verdicts)
    assert {f["id"] for f in study["regime"]} == {"loss_flattened", *(f"facts_are_learned[{a}]" for a in config.arms)}
    timings = json.loads((out / "timings.json").read_text())
    assert timings["workers"] == 2 and timings["wall_s"] > 0
    assert timings["per_seed"]["1"]["arm:late_attribution_s"] > 0 and "arm:early_attribution_s" not in timings["per_seed"]["1"]
    assert set(timings["tasks_s"]) == {f"seed {s} {t}" for s in SEEDS for t in ("pretrain", *(f"arm:{a}" for a in config.arms))}
    report = (out / "report.md").read_text()
    assert "## Which findings reproduce" in report and "## Why this regime" in report and "## Regime checks" in report
    assert f"of {len(SEEDS)} seeds" in report and "| pretraining |" in report  # verdict counts and per-step costs
    for figure in FIGURES:
        assert f"({figure})" in report


@pytest.mark.slow
def test_worker_count_does_not_change_results(quick_study, tmp_path):
    """A seed's pretraining and arm run in this process give the same bytes as in the study's two workers."""
    out, cache = quick_study
    study = json.loads((out / "results.json").read_text())
    alone = run_study(DemoConfig.quick(arms=("late",), cache_dir=str(cache)), seeds=(1,), workers=1)
    pooled = study["per_seed"][1]
    assert alone["per_seed"][0]["config"]["arms"] == ["late"]

    def dumped(value) -> str:
        return json.dumps(value, sort_keys=True)

    assert dumped(alone["per_seed"][0]["pretraining"]) == dumped(pooled["pretraining"])
    assert dumped(alone["per_seed"][0]["arms"]["late"]) == dumped(pooled["arms"]["late"])
    write_results(alone, tmp_path / "x")
    write_results(alone, tmp_path / "y")
    assert (tmp_path / "x" / "results.json").read_bytes() == (tmp_path / "y" / "results.json").read_bytes()
    assert b"wall_s" not in (tmp_path / "x" / "results.json").read_bytes()


@pytest.mark.slow
def test_a_worker_error_surfaces_with_its_message(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("\n\n".join(f"a short document number {i} about cats" for i in range(30)))
    config = DemoConfig.quick(corpus=str(corpus), cache_dir=str(tmp_path / "cache"), arms=("late",))
    with pytest.raises(DemoConfigError, match="the corpus packs into"):  # raised in the worker process
        run_study(config, seeds=(0, 1), workers=2)


def _raise_missing_extra():
    raise MissingExtraError("matplotlib", "demo", "writing figures")


def test_an_unpicklable_worker_error_keeps_its_message_and_kind():
    with pytest.raises(KacqError, match="MissingExtraError: writing figures needs the 'matplotlib'"):
        _call(_raise_missing_extra)


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


def _reportable(results: dict) -> dict:
    """_synthetic_results with what render_markdown reads besides the findings' numbers."""
    results["findings"] = assess(results)
    base = {"config": DemoConfig.quick().to_dict(),
            "data": {"vocab_size": 768, "corpus": "c", "documents": 1, "tokens": 2, "calibration_sequences": 1,
                     "records": 6, "facts": "generated", "injection_steps": [3]}}
    results.update(base)
    results["pretraining"].update(checkpoints={"early": 15, "late": 60}, loss=[6.0, 5.0, 4.0], steps=[1, 2, 3])
    results["pretraining"]["entropy"]["max_total"] = 3.5
    for arm in results["arms"].values():
        arm.update(entropy_start={"total": 2.8}, edit=None)
        arm["kim"].update(K_before=-5.0, K_after=-4.0)
    return results


def test_report_states_verdicts_from_findings():
    results = _reportable(_synthetic_results())
    text = render_markdown(results)
    assert ("**knowledge entropy decays during pretraining** (Kim et al. 2025): held for 1 of 1 seed: reproduced"
            in text)
    assert ("**resuscitation improves retention at the late checkpoint** (Kim et al. 2025): held for 0 of 1 seed: "
            "not reproduced" in text)
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
    DemoConfig().validate()  # the default: 3 first-round passages into 4 rows
    with pytest.raises(DemoConfigError, match="continue_batch_size"):
        DemoConfig(continue_batch_size=2).validate()
    with pytest.raises(DemoConfigError, match="continue_batch_size"):
        DemoConfig(facts_per_scenario=3, continue_batch_size=8).validate()
    DemoConfig(facts_per_scenario=3, continue_batch_size=9).validate()
    with pytest.raises(DemoConfigError, match="'row'"):
        DemoConfig(injection="rows").validate()


def test_continued_training_warms_up_linearly():
    from kacq_study.arms import warmup

    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-2)
    schedule = warmup(optimizer, 4)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])
    no_warmup = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-2)
    warmup(no_warmup, 0)
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


def _finding(key: str, holds) -> dict:
    return {"id": key, "paper": "p", "claim": key, "criterion": "c", "values": {"x": 1.0 if holds else 0.0},
            "holds": holds}


def test_a_finding_reproduces_only_if_it_held_for_every_seed():
    per_seed = [[_finding("a", True), _finding("b", True), _finding("c", None)],
                [_finding("a", True), _finding("b", False), _finding("c", None)],
                [_finding("a", True), _finding("b", True), _finding("c", True)]]
    combined = {f["id"]: f for f in combine_findings(per_seed)}
    assert combined["a"]["reproduces"] and (combined["a"]["held"], combined["a"]["seeds"]) == (3, 3)
    assert not combined["b"]["reproduces"] and combined["b"]["held"] == 2
    assert combined["b"]["per_seed"] == [True, False, True]
    assert not combined["c"]["reproduces"] and (combined["c"]["held"], combined["c"]["checked"]) == (1, 1)  # None: not held
    assert combined["b"]["values"]["x"] == spread([1.0, 0.0, 1.0])
    assert summarize(list(combined.values())) == {"reproduced": 1, "not_reproduced": 2, "not_checked": 0}
    per_seed[2][2]["holds"] = None
    assert summarize(combine_findings(per_seed))["not_checked"] == 1
    assert spread([2.0, None, 4.0]) == {"mean": 3.0, "min": 2.0, "max": 4.0, "values": [2.0, None, 4.0]}


def test_a_fit_below_the_r2_threshold_is_no_power_law():
    results = _synthetic_results()
    for kind in ("mem", "gen", "hard_gen"):
        results["arms"]["late"]["groups"][f"paraphrase/{kind}"]["retainability"]["fit"]["decay"] = 0.1
    verdicts = {f["id"]: f for f in assess(results)}
    assert verdicts["duplication_forgets_faster"]["holds"] is True  # 0.3 > 0.1, both fits good
    results["arms"]["late"]["groups"] = copy.deepcopy(results["arms"]["late"]["groups"])
    fit = results["arms"]["late"]["groups"]["duplication/gen"]["retainability"]["fit"]
    fit["r_squared"] = POWER_LAW_MIN_R2 - 0.29  # 0.21: no power law, so its decay is not compared
    finding = {f["id"]: f for f in assess(results)}["duplication_forgets_faster"]
    assert finding["holds"] is None and finding["values"]["duplication"] is None
    text = render_markdown(_reportable(results))
    assert "| duplication/gen | 0.5 | no power law (R^2 = 0.21) |" in text
    assert "duplication/gen: no power law (R^2 = 0.21)" in text  # in the findings' values too, not a decay
    assert fit_text(spread([0.8, 0.3]), spread([0.2, 0.4])) == "no power law in 1 of 2 seeds (R^2 = 0.55 (0.3 to 0.8))"
    assert fit_text(spread([0.8, 0.6]), spread([0.2, 0.4])) == "0.3 (0.2 to 0.4)"


def test_no_extrapolation_beyond_100x_is_printed_as_a_number():
    assert horizon_text(2001.0, 20) == BEYOND == "beyond 100x the observed range"
    assert horizon_text(1999.0, 20) == "1999"
    assert horizon_text(spread([50.0, 5000.0]), spread([20, 20])) == BEYOND + " (1 of 2 seeds)"
    assert horizon_text(spread([50.0, 70.0]), spread([20, 20])) == "60 (50 to 70)"
    assert horizon_text(50.0, 20, r_squared=0.2, decay=0.3) == "n/a"  # no power law: no horizon either
    results = _synthetic_results()  # x-intercept 1000 steps for t up to 2: far beyond the observed range
    text = render_markdown(_reportable(results))
    assert "| once/mem | 0.9 | 0.3 | 0.8 | beyond 100x the observed range |" in text and "| 1000 |" not in text


def test_regime_checks_follow_the_numbers():
    def arm(injected: float, control: float) -> dict:
        return {"arms": {"late": {"learning": {"injected": {"rise": injected}, "control": {"rise": control}}}}}

    assert facts_are_learned(arm(1.6, 0.2), "late")["holds"] is True
    assert facts_are_learned(arm(0.99, -1.0), "late")["holds"] is False  # below 1 nat
    assert facts_are_learned(arm(1.5, 1.5 - LEARNED_MARGIN + 0.01), "late")["holds"] is False  # not clearly above controls
    assert facts_are_learned(arm(1.5, 1.0), "late")["holds"] is True
    assert facts_are_learned({"arms": {"late": {"learning": {"injected": {"rise": 2.0}}}}}, "late")["holds"] is None
    flat = {"pretraining": {"loss": [9.0] * 80 + [3.05] * 10 + [3.0] * 10}}
    assert loss_flattened(flat)["holds"] is True  # 1.6 % lower
    falling = {"pretraining": {"loss": [9.0] * 80 + [3.1] * 10 + [3.0] * 10}}
    finding = loss_flattened(falling)
    assert finding["holds"] is False and finding["values"]["relative_change"] == pytest.approx(-0.1 / 3.1)
    assert loss_flattened({"pretraining": {"loss": [3.0]}})["holds"] is None
    ids = [f["id"] for f in assess(_synthetic_results())]
    assert not any(i.startswith(("facts_are_learned", "loss_flattened")) for i in ids)  # not among the papers'


def test_seeds_option_and_scaled_config():
    assert parse_seeds("0,1,2") == parse_seeds("3") == (0, 1, 2)
    assert parse_seeds("7,") == (7,)
    with pytest.raises(DemoConfigError, match="--seeds"):
        parse_seeds("zero")
    base = DemoConfig.quick()
    assert base.scaled(1) == base
    big = base.scaled(2)
    assert (big.d_model, big.d_ff, big.pretrain_steps) == (2 * base.d_model, 2 * base.d_ff, 2 * base.pretrain_steps)
    assert big.early_step == 2 * base.early_step and big.max_docs == 2 * base.max_docs
    for k in (2, 1.2, 1.3, 0.5):  # RoPE needs an even head dimension, not only d_model divisible by n_heads
        scaled = base.scaled(k)
        assert scaled.d_model % scaled.n_heads == 0 and (scaled.d_model // scaled.n_heads) % 2 == 0
        scaled.validate()


def test_entropy_findings_look_only_from_the_early_checkpoint_on():
    """The papers measured entropy long after the first transient of training: a curve that collapses at the
    start and climbs from the early checkpoint on does not decay, though its last point is below its first."""
    results = _synthetic_results()
    results["pretraining"]["checkpoints"] = {"early": 10, "late": 30}
    entropy = results["pretraining"]["entropy"]
    entropy.update(steps=[0, 10, 20, 30], total=[3.0, 2.5, 2.6, 2.7],
                   per_layer=[[1.5, 1.5], [1.3, 1.2], [1.3, 1.3], [1.2, 1.5]])
    verdicts = {f["id"]: f for f in assess(results)}
    assert verdicts["entropy_decays"]["holds"] is False
    assert verdicts["entropy_decays"]["values"]["from_step"] == 10
    # from the early checkpoint on, layer 0 fell by 0.1 and layer 1 rose by 0.3: the last layer did not fall most
    assert verdicts["last_layer_falls_most"]["holds"] is False
    entropy.update(total=[3.0, 2.9, 2.8, 2.7], per_layer=[[1.5, 1.5], [1.45, 1.45], [1.45, 1.35], [1.44, 1.26]])
    verdicts = {f["id"]: f["holds"] for f in assess(results)}
    assert verdicts["entropy_decays"] and verdicts["last_layer_falls_most"]


def test_report_names_the_experiment_behind_each_finding_that_does_not_reproduce():
    from kacq_study.experiments import EXPERIMENTS
    from kacq_study.findings import experiment_for

    results = _reportable(_synthetic_results())
    text = render_markdown(results)
    line = next(l for l in text.splitlines() if "**resuscitation improves retention at the late checkpoint**" in l)
    assert "python -m kacq_study.experiments resuscitation-dose" in line and "docs/findings.md" in line
    reproduced = next(l for l in text.splitlines() if "**knowledge entropy decays during pretraining**" in l)
    assert "kacq_study.experiments" not in reproduced  # only where a finding does not reproduce
    # every finding the study checks has an experiment, and each named experiment exists
    for finding in assess(_synthetic_results()):
        assert experiment_for(finding["id"]) in EXPERIMENTS, finding["id"]
