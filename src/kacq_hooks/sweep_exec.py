"""One task per checkpoint on an engine researchers already run: subprocesses, Ray, or SLURM via submitit.

Every engine runs the sweep's task (:func:`kacq_hooks.sweep.run_task`, handed in by the sweep, which is the
floor above this one) on a task spec (plain JSON). The task writes its
result atomically to ``OUT/results/``; the driver merges each outcome as it arrives, so one failing or
killed task becomes an error row and never takes the others with it. A task of ``task_ranks`` > 1 is
itself a data-parallel job: a ``torchrun`` group (local, Ray) or ``ntasks_per_node`` SLURM tasks.

Run one task by hand: ``python -m kacq_hooks.sweep_worker SPEC.json OUTCOME.json``.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .errors import ConfigError, MissingExtraError, SweepError

OnDone = Callable[[dict, dict], None]
Task = Callable[..., dict]  # task(spec, fetch=None) -> outcome


def check_engine(executor: str, ray_address: str | None = None) -> None:
    """The engine's package is installed (and for SLURM, ``sbatch`` is on PATH); a one-line KacqError if not."""
    if executor == "ray":
        try:
            import ray  # noqa: F401  an optional extra
        except ImportError as error:
            raise MissingExtraError("ray", "ray", "--executor ray") from error
        if ray_address and ray_address != "auto" and "://" not in ray_address:
            _reachable(ray_address)
    elif executor in ("slurm", "submitit-local"):
        try:
            import submitit  # noqa: F401  an optional extra
        except ImportError as error:
            raise MissingExtraError("submitit", "slurm", f"--executor {executor}") from error
        if executor == "slurm" and shutil.which("sbatch") is None:
            raise ConfigError("--executor slurm needs SLURM's sbatch on PATH, and this machine has none: run the "
                              "sweep on a SLURM login node, or use --executor local or ray")


def _reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or address, int(port or 6379)), timeout=5):
            pass
    except (OSError, ValueError) as error:
        raise SweepError(f"cannot reach the Ray cluster at {address} ({error}); start it (ray start --head) or "
                        "give its address with --ray-address host:port") from error


def _key(spec: dict) -> str:
    name = spec["checkpoint"]["name"] + (f"@{spec['checkpoint']['revision']}" if spec["checkpoint"]["revision"] else "")
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[-80:]


def run_specs(specs: list[dict], executor: str, *, jobs: int, folder: Path, on_done: OnDone, task: Task,
              task_ranks: int = 1, ray_address: str | None = None, slurm: dict | None = None, fetch=None,
              progress=None) -> None:
    """Run every spec on ``executor`` with at most ``jobs`` at once; ``on_done(spec, outcome)`` as each ends.

    ``task(spec, fetch=)`` runs one spec where the engine places it (Ray and submitit pickle it by reference,
    so it is a module-level function); local subprocesses start ``kacq_hooks.sweep_worker``, which runs the
    sweep's own task."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fetch is not None and executor == "local":
        raise ConfigError("a custom fetch function cannot travel to --executor local subprocesses; use the serial, "
                          "ray or slurm executor")
    check_engine(executor, ray_address)
    bar = _Bar(len(specs), progress)
    done = lambda spec, outcome: (on_done(spec, outcome), bar.step(spec, outcome))  # noqa: E731
    if executor == "local":
        _run_local(specs, jobs, folder, task_ranks, done)
    elif executor == "ray":
        _run_ray(specs, jobs, folder, task_ranks, ray_address, task, fetch, done)
    else:
        _run_submitit(specs, jobs, folder, task_ranks, executor, slurm or {}, task, fetch, done)


class _Bar:
    def __init__(self, total: int, progress):
        self.total, self.count, self.progress = total, 0, progress

    def step(self, spec: dict, outcome: dict) -> None:
        self.count += 1
        if self.progress:
            self.progress("task", {"name": spec["checkpoint"]["name"], "done": self.count, "count": self.total,
                                   "status": outcome.get("status")})


# ------------------------------------------------------------------------------------------------
# Subprocesses (and torchrun jobs)


def task_command(spec_path: Path, outcome_path: Path, task_ranks: int = 1) -> list[str]:
    """The command line of one task: this Python, or a torchrun group of ``task_ranks`` ranks."""
    module = ["-m", "kacq_hooks.sweep_worker", str(spec_path), str(outcome_path)]
    if task_ranks == 1:
        return [sys.executable, *module]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(task_ranks), "--master-port",
            str(_free_port()), *module]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(spec: dict, folder: Path, task_ranks: int):
    key = _key(spec)
    spec_path, outcome_path, log_path = folder / f"{key}.spec.json", folder / f"{key}.outcome.json", folder / f"{key}.log"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    outcome_path.unlink(missing_ok=True)
    log = log_path.open("wb")
    process = subprocess.Popen(task_command(spec_path, outcome_path, task_ranks), stdout=log, stderr=subprocess.STDOUT)
    return process, outcome_path, log_path, log


def _outcome(process, outcome_path: Path, log_path: Path) -> dict:
    if outcome_path.is_file():
        try:
            return json.loads(outcome_path.read_text(encoding="utf-8"))
        except ValueError:
            pass
    code = process.returncode
    if code is not None and code < 0:
        why = f"the task was killed by {signal.Signals(-code).name} before it finished"
    else:
        why = f"the task exited with code {code} before it finished"
    tail = [line for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return {"status": "error", "error": why + (f" (last output: {tail[-1][:300]})" if tail else "") +
            f"; its log: {log_path}"}


def _run_one_subprocess(spec: dict, folder: Path, task_ranks: int) -> dict:
    process, outcome_path, log_path, log = _start(spec, folder, task_ranks)
    with log:
        process.wait()
    return _outcome(process, outcome_path, log_path)


def _run_local(specs: list[dict], jobs: int, folder: Path, task_ranks: int, done: OnDone) -> None:
    waiting, running = list(specs), []
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                spec = waiting.pop(0)
                running.append((spec, *_start(spec, folder, task_ranks)))
            for entry in list(running):
                spec, process, outcome_path, log_path, log = entry
                if process.poll() is not None:
                    log.close()
                    running.remove(entry)
                    done(spec, _outcome(process, outcome_path, log_path))
            time.sleep(0.2)
    finally:
        for _, process, _, _, log in running:  # the driver stopped: leave no orphan measuring
            process.kill()
            log.close()


# ------------------------------------------------------------------------------------------------
# Ray


def _ray_task(spec: dict, folder: str, task_ranks: int, task: Task, fetch) -> dict:
    if task_ranks > 1:
        return _run_one_subprocess(spec, Path(folder), task_ranks)
    return task(spec, fetch=fetch)


def _run_ray(specs, jobs, folder, task_ranks, address, task, fetch, done) -> None:
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as error:  # ConnectionError, RuntimeError, ValueError by version
            raise SweepError(f"could not connect to Ray at {address or 'a new local cluster'} "
                            f"({type(error).__name__}: {error})") from error
    remote = ray.remote(max_retries=0, num_cpus=1)(_ray_task)
    waiting, running = list(specs), {}
    while waiting or running:
        while waiting and len(running) < jobs:
            spec = waiting.pop(0)
            running[remote.remote(spec, str(folder), task_ranks, task, fetch)] = spec
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            spec = running.pop(ref)
            try:
                outcome = ray.get(ref)
            except Exception as error:  # a crashed worker or a task's exception: this checkpoint's error row
                outcome = {"status": "error", "error": _first_line(error)}
            done(spec, outcome)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:500]


# ------------------------------------------------------------------------------------------------
# SLURM through submitit


def _submitit_task(spec: dict, task_ranks: int, task: Task, fetch) -> dict:
    if task_ranks > 1:  # srun started one process per rank: join them as a torch.distributed group
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export()
    return task(spec, fetch=fetch)


def slurm_parameters(slurm: dict, jobs: int, task_ranks: int) -> dict:
    """submitit's ``slurm_*`` parameters for a sweep: one node, ``task_ranks`` tasks (ranks) per job."""
    params = {"timeout_min": 60, "nodes": 1, "tasks_per_node": task_ranks, "slurm_array_parallelism": jobs,
              "name": "kacq-entropy"}
    for key, value in slurm.items():
        params[key if key in ("timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb", "nodes",
                              "tasks_per_node") or key.startswith("slurm_") else f"slurm_{key}"] = value
    return params


def sbatch_script(folder: str | os.PathLike, slurm: dict | None = None, jobs: int = 1, task_ranks: int = 1) -> str:
    """The batch script ``--executor slurm`` submits for each checkpoint (for review; needs no SLURM)."""
    try:
        from submitit.slurm import slurm as submitit_slurm
    except ImportError as error:
        raise MissingExtraError("submitit", "slurm", "--executor slurm") from error
    params = slurm_parameters(slurm or {}, jobs, task_ranks)
    names = {"timeout_min": "time", "tasks_per_node": "ntasks_per_node", "name": "job_name", "mem_gb": "mem",
             "slurm_array_parallelism": "array_parallelism"}
    converted = {names.get(k, k.removeprefix("slurm_")): v for k, v in params.items()}
    if "mem" in converted:
        converted["mem"] = f"{converted['mem']}GB"
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return submitit_slurm._make_sbatch_string(command=command, folder=str(folder), **converted)


def _run_submitit(specs, jobs, folder, task_ranks, executor, slurm, task, fetch, done) -> None:
    import submitit

    cluster = "slurm" if executor == "slurm" else "local"
    engine = submitit.AutoExecutor(folder=folder / "submitit", cluster=cluster)
    params = slurm_parameters(slurm, jobs, task_ranks)
    if cluster == "local":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_") and k != "nodes"}
    try:
        engine.update_parameters(**params)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"SLURM parameters {slurm}: {_first_line(error)}") from error
    waiting, running = list(specs), []
    while waiting or running:
        while waiting and len(running) < jobs:
            spec = waiting.pop(0)
            running.append((spec, engine.submit(_submitit_task, spec, task_ranks, task, fetch)))
        for entry in list(running):
            spec, job = entry
            if job.done():
                running.remove(entry)
                try:
                    outcome = job.results()[0]
                except Exception as error:  # a failed or killed job: this checkpoint's error row
                    outcome = {"status": "error", "error": _first_line(error) + f"; its logs: {job.paths.folder}"}
                done(spec, outcome)
        time.sleep(0.5)
