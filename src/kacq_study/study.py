"""The study over several seeds: the per-seed pipeline of :mod:`kacq_study.pipeline`, split into tasks that
run in parallel processes, and the seeds' numbers and findings combined.

Tasks: one pretraining task per seed (it writes the seed's early and late checkpoints to a temporary folder),
then one task per (seed, arm) that loads its seed's checkpoint from there. Each task rebuilds the seed's
prepared data from the config (the tokenizer comes from the disk cache, the rest takes well under a second)
and runs at ``config.threads`` torch threads under :func:`kacq_study.pipeline.deterministic`, so a task's numbers do
not depend on which process ran it or when: ``results.json`` is the same bytes for any ``workers``.

>>> results = run_study(DemoConfig.quick(), seeds=(0, 1), workers=2)   # doctest: +SKIP
>>> results["findings"][0]["held"], results["findings"][0]["seeds"]      # doctest: +SKIP
(2, 2)
"""
from __future__ import annotations

import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
import dataclasses
import math
import multiprocessing
import os
import pickle
import queue as queue_module
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from kacq_hooks.errors import KacqError

from .arms import ARMS
from .config import DemoConfig, DemoConfigError, Progress
from .findings import KINDS, assess, combine, combine_findings, fit_ok, regime
from .output import json_ready
from .pipeline import build_model, deterministic, prepare, pretrain, run_arm

FORMAT, VERSION = "kacq_hooks.demo", 2
DEFAULT_SEEDS = (0, 1, 2)

# the progress queue of a worker process (set by _init_worker); None in-process
_QUEUE = None


def _phase(seed: int, phase: str) -> str:
    return f"seed {seed} {phase}"


def _reporter(seed: int, local: Progress | None) -> Progress:
    """The progress callback a task uses: to the parent's queue in a worker, to ``local`` in-process."""
    def report(phase: str, info: dict) -> None:
        event = (_phase(seed, phase), dict(info))
        if _QUEUE is not None:
            _QUEUE.put(event)
        elif local is not None:
            local(*event)
    return report


def _checkpoint_path(workdir: str, seed: int) -> Path:
    return Path(workdir) / f"seed{seed}.pt"


def pretrain_task(config: DemoConfig, workdir: str, progress: Progress | None = None) -> dict:
    """One seed's pretraining; writes its early and late checkpoints (CPU state dicts) into ``workdir``."""
    report = _reporter(config.seed, progress)
    task_started = time.perf_counter()
    with deterministic(config.threads, config.device):
        started = time.perf_counter()
        data = prepare(config, report)
        prepare_s = time.perf_counter() - started
        started = time.perf_counter()
        pretraining, checkpoints = pretrain(config, data, report)
        pretrain_s = time.perf_counter() - started
    path = _checkpoint_path(workdir, config.seed)
    torch.save({name: checkpoints[name] for name in ("early", "late")}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)  # an arm task never sees half a file
    return {"seed": config.seed, "data": data.summary, "pretraining": pretraining,
            "task_s": time.perf_counter() - task_started,
            "timings": {"prepare_s": prepare_s, "pretrain_s": pretrain_s,
                        "pretrain_step_s": pretrain_s / config.pretrain_steps}}


def arm_task(config: DemoConfig, arm: str, workdir: str, progress: Progress | None = None) -> dict:
    """One (seed, arm): continued training from the seed's checkpoint in ``workdir``."""
    report = _reporter(config.seed, progress)
    task_started = time.perf_counter()
    with deterministic(config.threads, config.device):
        data = prepare(config, lambda phase, info: None)
        saved = torch.load(_checkpoint_path(workdir, config.seed), map_location="cpu", weights_only=True)
        tokenizer = data.tokenizer
        model = build_model(config, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        started = time.perf_counter()
        result = run_arm(ARMS[arm], config, data, {"model": model, **saved}, report)
        arm_s = time.perf_counter() - started
    timings = {f"arm:{arm}_s": arm_s, f"arm:{arm}_step_s": arm_s / config.continue_steps}
    attribution_s = result.pop("_attribution_s", None)
    if attribution_s is not None:
        timings[f"arm:{arm}_attribution_s"] = attribution_s
    return {"seed": config.seed, "arm": arm, "result": result, "timings": timings,
            "task_s": time.perf_counter() - task_started}


def _init_worker(events) -> None:
    global _QUEUE
    _QUEUE = events
    # Ctrl-C reaches the whole process group: the parent alone decides, and ends the workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TaskError(KacqError):
    """A study task failed in its worker: the worker ended abruptly, or the task raised an error that is not a
    KacqError (whose message, with the task named, this one carries)."""


def _call(fn, *args):
    """Run a task in a worker; an exception that would not survive pickling (custom __init__ arguments) is
    replaced by one that does, with the same message, a KacqError staying a KacqError."""
    try:
        return fn(*args)
    except Exception as error:
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:
            kind = KacqError if isinstance(error, KacqError) else RuntimeError
            raise kind(f"{type(error).__name__}: {error}") from None
        raise


def _result(future: cf.Future, name: str) -> dict:
    """A task's value, or its error as a KacqError naming the task: the CLI then exits 2 with the message,
    not a traceback. A KacqError from the task keeps its kind (it already says what to change), with the task
    named in front of its message."""
    try:
        return future.result()
    except KacqError as error:
        if error.args and isinstance(error.args[0], str) and not error.args[0].startswith("task '"):
            error.args = (f"task '{name}': {error.args[0]}", *error.args[1:])
        raise
    except BrokenProcessPool as error:
        raise TaskError(f"task '{name}' failed: its worker process ended abruptly ({error}); out of memory, or "
                        "killed; try fewer --workers") from error
    except Exception as error:
        raise TaskError(f"task '{name}' failed: {type(error).__name__}: {error}") from error


class _Runner:
    """Runs tasks in-process (``workers=1``) or in a spawn-context process pool, forwarding progress events."""

    def __init__(self, workers: int, progress: Progress | None):
        self.progress = progress
        self.pool = None
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")  # torch is not fork-safe once its thread pools started
            self.events = ctx.Queue()
            self.pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                               initargs=(self.events,))
            self.drain = threading.Thread(target=self._forward, daemon=True)
            self.drain.start()

    def _forward(self) -> None:
        while True:
            try:
                event = self.events.get(timeout=0.2)
            except queue_module.Empty:
                continue
            except (EOFError, OSError):
                return
            if event is None:
                return
            if self.progress is not None:
                try:
                    self.progress(*event)
                except Exception:  # a broken progress display must not stop the study
                    pass

    def submit(self, fn, *args) -> cf.Future:
        if self.pool is not None:
            return self.pool.submit(_call, fn, *args)
        future: cf.Future = cf.Future()
        try:
            future.set_result(fn(*args, self.progress))
        except Exception as error:
            future.set_exception(error)
        return future

    def close(self, kill: bool = False) -> None:
        if self.pool is None:
            return
        if kill:
            # shutdown() alone would wait for the running tasks; end the processes so none outlives us
            for process in list(getattr(self.pool, "_processes", {}).values()):
                process.terminate()
            self.pool.shutdown(wait=True, cancel_futures=True)
        else:
            self.pool.shutdown(wait=True)
        self.events.put(None)
        self.drain.join(timeout=5)
        self.events.close()


def run_study(config: DemoConfig | None = None, seeds: Sequence[int] = DEFAULT_SEEDS, workers: int | None = None,
              progress: Progress | None = None) -> dict:
    """The study for every seed in ``seeds`` (``config.seed`` replaced by each), combined.

    ``workers`` processes run the tasks (default: the CPU count or the number of tasks, whichever is
    smaller); ``workers=1`` runs them in this process. ``progress(phase, info)`` receives every task's
    events, with phases like "seed 0 pretrain" and "seed 1 arm:late" and ``info`` holding step, total, loss
    and entropy. Returns the v2 results dict (see :func:`assemble`) with wall-clock ``timings``, which
    :func:`kacq_study.output.write_results` writes apart from ``results.json``.
    """
    config = config or DemoConfig()
    seeds = checked_seeds(seeds, workers)
    configs = {s: dataclasses.replace(config, seed=s) for s in seeds}
    for c in configs.values():
        c.validate()
    started = time.perf_counter()
    pretrained, arms, task_s, workers = _pretrain_then_arms(configs, {arm: (arm, {}) for arm in config.arms},
                                                            workers, progress)
    per_seed = [_seed_results(configs[s], pretrained[s], arms[s]) for s in seeds]
    results = assemble(config, seeds, [r for r, _ in per_seed])
    results["timings"] = {"wall_s": time.perf_counter() - started, "workers": workers, "tasks_s": task_s,
                          "per_seed": {str(s): t for s, (_, t) in zip(seeds, per_seed)}}
    return results


def checked_seeds(seeds: Sequence[int], workers: int | None) -> tuple[int, ...]:
    """The seeds sorted, after refusing none, a repeated seed and ``workers`` < 1 (before any slow work)."""
    given = [int(s) for s in seeds]
    if not given:
        raise DemoConfigError("a study needs at least one seed")
    if len(set(given)) < len(given):  # a repeated seed would count twice as seeds agreeing
        raise DemoConfigError(f"seeds {given}: each seed may be given once")
    if workers is not None and int(workers) < 1:
        raise DemoConfigError(f"workers={workers}: give at least 1 (1 runs every task in this process)")
    return tuple(sorted(given))  # the order given does not change results


def _pretrain_then_arms(configs: dict[int, DemoConfig], jobs: dict[str, tuple[str, dict]], workers: int | None,
                        progress: Progress | None) -> tuple[dict, dict, dict, int]:
    """One pretraining task per seed, then, from its checkpoints, one task per (seed, job); ``jobs`` maps a
    label to (arm name, settings that replace the seed config's for that arm). Returns the pretraining
    values by seed, the arm values by seed and label, each task's own time, and the worker count."""
    seeds = sorted(configs)
    tasks = len(seeds) * (1 + len(jobs))
    workers = max(1, min(os.cpu_count() or 1, tasks) if workers is None else min(int(workers), tasks))
    pretrained: dict[int, dict] = {}
    arms: dict[int, dict[str, dict]] = {s: {} for s in seeds}
    task_s: dict[str, float] = {}
    submitted: dict[cf.Future, tuple[str, str | None]] = {}
    with tempfile.TemporaryDirectory(prefix="kacq-study-") as workdir:
        runner = _Runner(workers, progress)
        kill = True
        try:
            pending = set()

            def submit(name: str, label: str | None, fn, *args) -> None:
                future = runner.submit(fn, *args)
                submitted[future] = (name, label)
                pending.add(future)

            for s in seeds:
                submit(_phase(s, "pretrain"), None, pretrain_task, configs[s], workdir)
            while pending:
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: submitted[f][0]):  # a fixed order for the arms' submission
                    name, label = submitted[future]
                    value = _result(future, name)
                    task_s[name] = value["task_s"]  # measured in the task: no queueing in it
                    if label is not None:
                        arms[value["seed"]][label] = value
                        continue
                    seed = value["seed"]
                    pretrained[seed] = value
                    for job, (arm, settings) in jobs.items():
                        task = _phase(seed, f"arm:{job}")
                        submit(task, job, arm_task, dataclasses.replace(configs[seed], **settings), arm, workdir)
            kill = False
        finally:
            runner.close(kill=kill)
    return pretrained, arms, task_s, workers


# The settings only continued training reads: a variant of an arm may change these and share its seed's
# pretraining and data; any other setting would make the checkpoint it starts from belong to a different
# study (injection_rounds is not one: the generated facts get one paraphrase per round).
ARM_SETTINGS = frozenset({
    "arm_entropy_every", "injection", "injection_every", "lead_steps", "tail_steps",
    "continue_batch_size", "continue_lr", "continue_weight_decay", "continue_beta1", "continue_warmup", "window", "iqr_factor",
    "resuscitation_ratio", "resuscitation_factor", "resuscitation_cap", "augment_variants", "sam_rho"})


def run_variants(config: DemoConfig, variants: dict[str, tuple[str, dict]], seeds: Sequence[int] = DEFAULT_SEEDS,
                 workers: int | None = None, progress: Progress | None = None) -> dict:
    """Arms under several settings from each seed's one pretraining: ``variants`` maps a label to (arm name,
    settings replaced for that arm), e.g. ``{"factor 4": ("late+resuscitation", {"resuscitation_factor": 4.0})}``.
    A variant may change only :data:`ARM_SETTINGS`. Returns, per seed (as a string), a results dict of the
    study's per-seed form whose ``arms`` are keyed by label (``pretraining`` shared), with ``timings``."""
    seeds = checked_seeds(seeds, workers)
    if not variants:
        raise DemoConfigError("run_variants needs at least one variant")
    for label, (arm, settings) in variants.items():
        if arm not in ARMS:
            raise DemoConfigError(f"variant {label!r}: unknown arm {arm!r}; choose from {sorted(ARMS)}")
        foreign = sorted(set(settings) - ARM_SETTINGS)
        if foreign:
            raise DemoConfigError(f"variant {label!r} changes {foreign}, which pretraining reads: a variant may "
                                  f"change only continued-training settings ({sorted(ARM_SETTINGS)}); run a "
                                  "separate study for the others")
    configs = {s: dataclasses.replace(config, seed=s) for s in seeds}
    for s, c in configs.items():
        c.validate()
        for label, (arm, settings) in variants.items():
            dataclasses.replace(c, **settings, arms=(arm,)).validate()  # as the arm will run: its own checks too
    started = time.perf_counter()
    pretrained, arms, task_s, workers = _pretrain_then_arms(configs, variants, workers, progress)
    per_seed = {}
    for s in seeds:
        results = {"format": FORMAT, "version": 1, "config": configs[s].to_dict(), "data": pretrained[s]["data"],
                   "pretraining": pretrained[s]["pretraining"],
                   "arms": {label: arms[s][label]["result"] for label in variants},
                   "settings": {label: {"arm": arm, **settings} for label, (arm, settings) in variants.items()}}
        per_seed[str(s)] = json_ready(results)
    return {"seeds": list(seeds), "per_seed": per_seed,
            "timings": {"wall_s": time.perf_counter() - started, "workers": workers, "tasks_s": task_s}}


def _seed_results(config: DemoConfig, pretrained: dict, arms: dict[str, dict]) -> tuple[dict, dict]:
    """One seed's results dict (arms in config order), and its timings."""
    timings = dict(pretrained["timings"])
    for name in config.arms:
        timings.update(arms[name]["timings"])
    results = {"format": FORMAT, "version": 1, "config": config.to_dict(), "data": pretrained["data"],
               "pretraining": pretrained["pretraining"], "arms": {name: arms[name]["result"] for name in config.arms}}
    results["findings"] = assess(results)
    results["regime"] = regime(results)
    return json_ready(results), timings


def assemble(config: DemoConfig | dict, seeds: Sequence[int], per_seed: list[dict]) -> dict:
    """The v2 results dict: ``config`` (without ``seed``: that is each per-seed config's), ``seeds``,
    ``per_seed`` (each seed's results dict), ``summary`` (every number the report prints as a
    :func:`findings.spread` over seeds; retainability fits only over the seeds whose fit passed, counted in
    ``seeds_with_fit``), ``findings`` and ``regime`` (combined over seeds by :func:`findings.combine_findings`)."""
    config = config.to_dict() if isinstance(config, DemoConfig) else dict(config)
    # the study's settings: each seed's config holds its own seed, and ``seeds`` says which ran (a single
    # "seed" here would claim one that maybe never ran); no machine path
    config.pop("seed", None)
    config.pop("cache_dir", None)
    findings = combine_findings([r.get("findings") or assess(r) for r in per_seed])
    checks = combine_findings([r.get("regime") or regime(r) for r in per_seed])
    digests = [digest(r) for r in per_seed]
    summary = combine(digests)
    _count_fits(summary, digests)
    return json_ready({"format": FORMAT, "version": VERSION, "config": config, "seeds": list(seeds),
                        "per_seed": per_seed, "summary": summary, "findings": findings, "regime": checks})


def as_study(results: dict) -> dict:
    """A v2 results dict as it is; a single-seed (version 1) one wrapped as a one-seed study."""
    if "per_seed" in results:
        return results
    study = assemble(results["config"], [results["config"].get("seed", 0)], [results])
    if "timings" in results:
        study["timings"] = {"per_seed": {str(study["seeds"][0]): results["timings"]}}
    return study


def _mean(values) -> float | None:
    """The mean of ``values``, None when one is missing (None or NaN): a mean over the others would not be like
    for like (as findings' per-kind means)."""
    values = list(values)
    finite = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite and len(finite) == len(values) else None


def _change(group: dict) -> float | None:
    start, end = group.get("log_prob_start"), group.get("log_prob_end")
    return end - start if isinstance(start, (int, float)) and isinstance(end, (int, float)) else None


def _group_digest(group: dict) -> dict[str, Any]:
    """One group's numbers for the summary. A fit that fails its R^2 criterion keeps its R^2 (it says why) but
    not its decay, intercept or x-intercept: the summary's means of those are over the seeds whose fit passed,
    never mixed with a failed fit's numbers (``seeds_with_fit`` counts the seeds they cover)."""
    fit = group["retainability"]["fit"]
    ok = fit_ok(fit)
    return {"effectivity": group["effectivity"],
            "horizon": max(group["retainability"]["t"]) if group["retainability"]["t"] else None,
            "r_squared": fit["r_squared"], "fit_ok": ok,
            **{f: fit[f] if ok else None for f in ("decay", "intercept", "x_intercept_steps")}}


def _count_fits(summary: dict, digests: list[dict]) -> None:
    """``seeds_with_fit`` in each group of the combined summary (in place of the per-seed ``fit_ok`` flags)."""
    for name, arm in (summary or {}).get("arms", {}).items():
        for key, group in arm.get("groups", {}).items():
            group.pop("fit_ok", None)
            group["seeds_with_fit"] = sum(bool(d["arms"].get(name, {}).get("groups", {}).get(key, {}).get("fit_ok"))
                                          for d in digests)


def digest(results: dict) -> dict[str, Any]:
    """The numbers of one seed's results that the report prints (the summary combines them over seeds)."""
    pre, entropy = results["pretraining"], results["pretraining"]["entropy"]
    out: dict[str, Any] = {"pretraining": {
        "entropy_first": entropy["total"][0], "entropy_last": entropy["total"][-1],
        "entropy_max_total": entropy.get("max_total"), "entropy_per_layer_last": list(entropy["per_layer"][-1]),
        "loss_first": pre["loss"][0] if pre.get("loss") else None,
        "loss_last": pre["loss"][-1] if pre.get("loss") else None,
        "accuracy_late": (pre.get("accuracy") or {}).get("late")}, "arms": {}}
    for name, arm in results["arms"].items():
        kim, groups = arm["kim"], arm["groups"]
        row: dict[str, Any] = {
            "entropy_start": arm["entropy_start"]["total"],
            "entropy_end": (arm.get("entropy_end") or {}).get("total"),
            **{key: kim.get(key) for key in ("acquisition", "retention", "forgetting", "K_before", "K_after",
                                             "K_peak", "P_before", "P_after")},
            "effectivity": {k: _mean(g["effectivity"] for key, g in groups.items() if key.endswith("/" + k))
                            for k in KINDS},
            "dlogp": {k: _mean(_change(g) for key, g in groups.items() if key.endswith("/" + k)) for k in KINDS},
            "groups": {key: _group_digest(g) for key, g in groups.items()},
        }
        if arm.get("edit"):
            edit = arm["edit"]
            row["edit"] = {"selected": sum(l["selected"] for l in edit["layers"]),
                           "capped": sum(l["capped"] for l in edit["layers"]),
                           "entropy_before": edit["entropy_before"]["total"]}
        if arm.get("learning"):
            row["learning"] = {g: {k: v for k, v in values.items() if k != "probes"}
                               for g, values in arm["learning"].items()}
        if arm.get("attribution"):
            a = arm["attribution"]
            means = a["share"]["mean"]
            row["attribution"] = {"share_start": means[0], "share_after_first": means[1] if len(means) > 2 else None,
                                  "share_end": means[-1], "chance": a["chance"],
                                  "share_end_by_kind": {k: v["mean"][-1] for k, v in a["share_by_kind"].items()}}
        out["arms"][name] = row
    return out
