"""Every script in examples/ runs end to end with --tiny, in a fresh interpreter, and is listed in the README."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.py") if not p.name.startswith("_"))
NEEDS = {"frontends.py": ["transformer_lens", "nnsight"], "trainer_callbacks.py": ["tensorboard"],
         "checkpoint_sweep.py": ["matplotlib", "tqdm"]}
EXPECT = {  # what each example's output must show
    "entropy_of_text.py": "knowledge entropy",
    "trainer_callbacks.py": "TensorBoard event files",
    "resuscitation.py": "after resuscitation",
    "frontends.py": "nnsight trace",
    "checkpoint_sweep.py": "entropy.png",
    "sam_plain_loop.py": "tokens counted",
    "moe_entropy.py": "which expert",
}


def test_every_example_is_tested_and_listed_in_the_readme():
    assert {p.name for p in EXAMPLES} == set(EXPECT)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in EXAMPLES if f"examples/{p.name}" not in readme]
    assert not missing, f"examples not listed in README.md: {missing}"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_with_tiny(script, tmp_path):
    for module in NEEDS.get(script.name, []):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    args = [sys.executable, str(script), "--tiny"]
    if "--out" in script.read_text(encoding="utf-8"):
        args += ["--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert EXPECT[script.name] in result.stdout, result.stdout[-3000:]
