"""The study refuses with the narrowest error class: DemoConfigError for settings and arguments that cannot work,
ConfigError for an --out that cannot be written, TaskError for a task that failed in a worker, UnknownKeyError
for a published block or finding that does not exist. Each refusal is raised before any slow work."""
from __future__ import annotations

import concurrent.futures as cf

import pytest

from kacq_hooks.errors import ConfigError, KacqError, UnknownKeyError
from kacq_study import cli, published, study
from kacq_study.config import DemoConfigError
from kacq_study.experiments import horizon, registry, resuscitation, sam, sparse_memory
from test_experiments import tiny


def _raises_exactly(kind, fn, match: str):
    with pytest.raises(KacqError, match=match) as caught:
        fn()
    assert type(caught.value) is kind, f"{type(caught.value).__name__}: {caught.value}"


@pytest.mark.parametrize("arms, match", [("nope", "unknown arm"), ("late,late", "more than once")])
def test_bad_arms_are_demo_config_errors(arms, match):
    _raises_exactly(DemoConfigError, lambda: cli._parse_arms(arms), match)


def test_an_out_folder_that_cannot_be_written_is_a_config_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _raises_exactly(ConfigError, lambda: cli._check_out(str(blocker / "out")), "cannot be written")


@pytest.mark.parametrize("seeds, workers, match", [((), 1, "at least one seed"), ((0, 0), 1, "once"),
                                                   ((0,), 0, "at least 1")])
def test_bad_seeds_and_workers_are_demo_config_errors(seeds, workers, match):
    _raises_exactly(DemoConfigError, lambda: study.checked_seeds(seeds, workers), match)


@pytest.mark.parametrize("variants, match", [({}, "at least one variant"), ({"x": ("nope", {})}, "unknown arm"),
                                             ({"x": ("late", {"pretrain_steps": 3})}, "pretraining reads")])
def test_bad_variants_are_demo_config_errors(tmp_path, variants, match):
    _raises_exactly(DemoConfigError, lambda: study.run_variants(tiny(tmp_path), variants, seeds=(0,)), match)


def test_bad_experiment_arguments_are_demo_config_errors(tmp_path):
    config = tiny(tmp_path)
    _raises_exactly(DemoConfigError, lambda: sam.sam_dose(seeds=(0,), rhos=(-1.0,), config=config), "rho")
    _raises_exactly(DemoConfigError, lambda: sam.sam_dose(seeds=(0,), rhos=(0.05, 0.05), config=config), "once")
    _raises_exactly(DemoConfigError, lambda: horizon.forgetting_horizon(seeds=(0,), tail_factor=0, config=config),
                    "tail_factor")
    _raises_exactly(DemoConfigError, lambda: resuscitation.resuscitation_dose(seeds=(0,), factors=(2.0, 2.0),
                                                                               config=config), "once")
    _raises_exactly(DemoConfigError, lambda: sparse_memory.sparse_memory_study(seeds=(0,), tops=(0,), config=config),
                    "distinct slot counts")


def test_a_second_experiment_under_a_taken_name_is_a_demo_config_error():
    taken = next(iter(registry.EXPERIMENTS.values()))
    other = registry.Experiment(**{**vars(taken), "about": taken.about + " (a copy)"})
    _raises_exactly(DemoConfigError, lambda: registry.register(other), "two experiments named")
    assert issubclass(DemoConfigError, ValueError)  # still a ValueError for callers that caught one
    assert registry.EXPERIMENTS[taken.name] is taken


def test_a_task_that_raised_a_non_kacq_error_is_a_task_error():
    future = cf.Future()
    future.set_exception(ZeroDivisionError("division by zero"))
    _raises_exactly(study.TaskError, lambda: study._result(future, "seed 0 pretrain"),
                    r"task 'seed 0 pretrain' failed: ZeroDivisionError")


def test_a_kacq_error_from_a_task_keeps_its_class():
    future = cf.Future()
    future.set_exception(DemoConfigError("bad setting"))
    _raises_exactly(DemoConfigError, lambda: study._result(future, "seed 0 pretrain"), "task 'seed 0 pretrain'")


def test_unknown_published_blocks_and_findings_are_unknown_key_errors():
    results = {"findings": [{"id": "a"}]}
    _raises_exactly(UnknownKeyError, lambda: published.render("no-such-block", results), "no-such-block")
    assert issubclass(UnknownKeyError, KeyError)  # still a KeyError for callers that caught one
    _raises_exactly(UnknownKeyError, lambda: published.render("findings:b", results), "no finding")
