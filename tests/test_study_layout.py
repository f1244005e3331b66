"""The study package's seams: one registered experiment per module of kacq_study.experiments, findings as one
function each, and no module reaching into another's private names."""
from __future__ import annotations

import ast
import dataclasses
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import kacq_study
from kacq_study import experiments as ex
from kacq_study import findings
from kacq_study.experiments.registry import Experiment, register

PACKAGE = Path(kacq_study.__file__).parent
HELPERS = {"common", "registry", "__main__"}


def test_every_experiment_module_registers_one_experiment():
    modules = {m.name for m in pkgutil.iter_modules(ex.__path__)} - HELPERS
    registered = {}
    for name, experiment in ex.EXPERIMENTS.items():
        assert experiment.name == name
        registered.setdefault(experiment.run.__module__.rsplit(".", 1)[1], []).append(name)
    assert set(registered) == modules
    assert all(len(names) == 1 for names in registered.values()), registered


def test_a_second_experiment_under_a_taken_name_is_refused(monkeypatch):
    monkeypatch.setattr(ex.registry, "EXPERIMENTS", dict(ex.EXPERIMENTS))
    taken = ex.registry.EXPERIMENTS["landing"]
    assert register(taken) is taken  # registering the same one again (a re-import) is harmless
    with pytest.raises(ValueError, match="two experiments named 'landing'"):
        register(dataclasses.replace(taken, run=lambda **kw: {}))


def test_a_new_module_is_found_without_touching_the_rest(tmp_path):
    """Adding an experiment is one module: a module dropped into (a copy of) the package is registered and runs."""
    copy = tmp_path / "kacq_study"
    subprocess.run(["cp", "-r", str(PACKAGE), str(copy)], check=True)
    (copy / "experiments" / "toy.py").write_text(
        "from pathlib import Path\n"
        "from .registry import Experiment, register\n\n\n"
        "def toy(seed: int = 0) -> dict:\n    return {'experiment': 'toy', 'seed': seed}\n\n\n"
        "def plot_toy(result: dict, path: Path) -> Path:\n    path.write_text('figure')\n    return path\n\n\n"
        "register(Experiment('toy', toy, plot_toy, multi_seed=False, summary=lambda r: [f\"toy seed {r['seed']}\"]))\n")
    out = subprocess.run([sys.executable, "-m", "kacq_study.experiments", "toy", "--seed", "3", "--out",
                          str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "toy seed 3" in out.stdout
    assert (tmp_path / "out" / "toy.json").read_text().strip().startswith("{")


def test_assess_is_the_list_of_finding_functions():
    assert all(callable(f) for f in findings.FINDINGS)
    ids = [f(_results_without_arms()) for f in findings.FINDINGS]
    # without arms the Zhu findings do not apply; every other finding is listed (unchecked)
    assert [f["id"] for f in findings.assess(_results_without_arms())] == [f["id"] for f in ids if f is not None]


def _results_without_arms() -> dict:
    return {"pretraining": {"entropy": {"steps": [0, 1, 2], "total": [3.0, 2.9, 2.8],
                                        "per_layer": [[1.5, 1.5], [1.5, 1.4], [1.5, 1.3]]}}, "arms": {}}


def _private_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.name}: from {node.module} import {alias.name}" for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) for alias in node.names
            if alias.name.startswith("_") and not alias.name.startswith("__")]


def test_no_study_module_imports_a_private_name():
    found = [line for path in sorted(PACKAGE.rglob("*.py")) for line in _private_imports(path)]
    assert found == []


def test_demo_module_stays_small():
    assert len((PACKAGE / "demo.py").read_text(encoding="utf-8").splitlines()) <= 400


def test_experiment_entries_are_experiments():
    assert all(isinstance(e, Experiment) for e in ex.EXPERIMENTS.values())
