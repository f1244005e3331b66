"""run_variants and the multi-seed experiments (kacq_study.study, kacq_study.experiments) refuse bad input (seeds,
workers, factors, tail factors, settings) before any work, and name the task an error came from; probe-wording's
"other fact" prompts are never the fact's own. Each test names the promise it checks."""
from __future__ import annotations

import json

import pytest

from kacq_hooks.errors import KacqError
from kacq_study import experiments as ex
from kacq_study import pipeline, study
from kacq_study.experiments import horizon as forgetting, resuscitation, wording as probe_wording
from kacq_study.output import json_ready
from test_experiments import tiny


class TaskRan(BaseException):
    """Raised by a task that ran: a BaseException, so that no task runner turns it into a KacqError."""


def fail(*args, **kwargs):
    raise TaskRan("a task ran before the bad input was refused")


@pytest.fixture
def no_work(monkeypatch):
    """Any pretraining, arm or probe-wording task fails the test: bad input must be refused before them."""
    for name in ("pretrain_task", "arm_task"):
        monkeypatch.setattr(study, name, fail)
    monkeypatch.setattr(probe_wording, "_wording_seed", fail)
    monkeypatch.setattr(pipeline, "prepare", fail)
    monkeypatch.setattr(pipeline, "pretrain", fail)


# Promise: bad input (empty seeds, duplicate seeds, workers 0) is refused before slow work, by every multi-seed
# experiment alike (probe-wording runs its own pool, not run_variants)
@pytest.mark.parametrize("seeds, workers", [((), 1), ((0, 0), 1), ((0,), 0)])
def test_probe_wording_refuses_bad_seeds_and_workers_before_work(tmp_path, no_work, seeds, workers):
    with pytest.raises(KacqError):
        probe_wording.probe_wording(seeds=seeds, config=tiny(tmp_path), workers=workers)


# Promise: the CLI refuses bad --seeds / --workers text cleanly (argparse's exit 2 with a message), before any work,
# not with a traceback after it
@pytest.mark.parametrize("experiment", ["forgetting-horizon", "resuscitation-dose", "probe-wording"])
@pytest.mark.parametrize("extra", [["--seeds", "0,0"], ["--seeds", ","], ["--workers", "0"]])
def test_cli_refuses_bad_seeds_and_workers_cleanly(tmp_path, no_work, capsys, experiment, extra):
    with pytest.raises(SystemExit) as exit_info:
        ex.main([experiment, "--out", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


# Promise: a variant that fails validation (a setting its arm cannot run with) is refused before any work,
# not after pretraining in its arm task
@pytest.mark.parametrize("settings", [{"resuscitation_factor": 0.0}, {"resuscitation_factor": -2.0},
                                      {"resuscitation_ratio": 1.5}, {"resuscitation_cap": 0.0}])
def test_run_variants_refuses_an_unrunnable_resuscitation_setting_before_work(tmp_path, no_work, settings):
    with pytest.raises(KacqError):
        study.run_variants(tiny(tmp_path), {"v": ("late+resuscitation", settings)}, seeds=(0,), workers=1)


# Promise: resuscitation-dose's factors label its arms one to one ("q=2" twice would run one arm and report two
# factors), and a factor the edit refuses is refused before any work
@pytest.mark.parametrize("factors", [(2.0, 2.0), (1.0000001, 1.0000002), (0.0,)])
def test_resuscitation_dose_refuses_bad_factors_before_work(tmp_path, no_work, factors):
    with pytest.raises(KacqError):
        resuscitation.resuscitation_dose(seeds=(0,), factors=factors, config=tiny(tmp_path), workers=1)


# Promise: forgetting-horizon's long tail is longer than the study's (the short refit cuts it); a tail_factor
# below 1 would make the "short" horizon longer than the curve, and is refused before any work
@pytest.mark.parametrize("factor", [0, -1])
def test_forgetting_horizon_refuses_a_tail_factor_below_one(tmp_path, no_work, factor):
    with pytest.raises(KacqError):
        forgetting.forgetting_horizon(seeds=(0,), tail_factor=factor, config=tiny(tmp_path), workers=1)


# Promise (probe-wording): "other fact" scores each target after *another* record's prompt. A group of one record
# (control_facts=1, the quick config's) has no other record: its "other fact" numbers must not be the own-prompt
# numbers under another label
def test_probe_wording_other_fact_is_never_the_own_prompt(tmp_path):
    config = tiny(tmp_path, control_facts=1)
    result = json_ready(probe_wording.probe_wording(seeds=(0,), config=config, workers=1))
    json.dumps(result, allow_nan=False)
    rise = result["per_seed"]["0"]["rise"]
    for reduction in ("mean", "first"):
        assert all(v is None for v in rise["other fact"]["control"][reduction].values()), rise["other fact"]["control"]
        assert all(v is not None for v in rise["own"]["control"][reduction].values())
        assert all(v is not None for v in rise["other fact"]["injected"][reduction].values())


# Promise: an error in a task names the task (which seed, which variant). A KacqError from an arm task was raised
# as it was: three variants of one arm would all say "injected passages need 3 rows", none which of them failed
def test_a_kacq_error_in_a_variant_task_names_the_task(tmp_path):
    from kacq_study.demo import DemoConfigError

    config = tiny(tmp_path)
    variants = {"roomy": ("late", {}), "cramped": ("late", {"injection": "span", "continue_batch_size": 1})}
    with pytest.raises(DemoConfigError, match="seed 0 arm:cramped.*passages injected at continued-training step .* need"):
        study.run_variants(config, variants, seeds=(0,), workers=1)
