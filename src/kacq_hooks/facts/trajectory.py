"""The trajectory store: per step, per probe log probabilities, appended to disk as training goes.

File format (JSON lines, one file): a header line, then one line per recorded step::

    {"format": "kacq_hooks.trajectory", "version": 1, "probes": [[record, kind, index], ...], "scenarios": [...]}
    {"step": 0, "mean": [...], "first": [...], "sum": [...]}

Each step line is written whole and flushed, so a crash loses at most the step being written; a torn
last line is dropped (and cut from the file) when the store is reopened.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kacq_hooks.errors import ConfigError, KacqError, MissingExtraError, TrajectoryError
from kacq_hooks.facts.scoring import REDUCTIONS

logger = logging.getLogger(__name__)

FORMAT_NAME = "kacq_hooks.trajectory"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ProbeRef:
    """Which probe a column is: record index, probe kind and the probe's index within that kind."""

    record: int
    kind: str
    index: int


class TrajectoryStore:
    """Per-step scores of a fixed list of probes, in memory and (with ``path``) appended to a file.

    Opening an existing file resumes it: its probes must match, and later ``append`` calls continue it.

    >>> store = TrajectoryStore(None, [ProbeRef(0, "mem", 0), ProbeRef(0, "mem", 1)])
    >>> store.append(0, {"mean": [-3.0, -2.5], "first": [-4.0, -2.0], "sum": [-6.0, -5.0]})
    >>> store.append(1, {"mean": [-1.0, -2.0], "first": [-1.5, -2.0], "sum": [-2.0, -4.0]})
    >>> store.steps, store.values("mean")[:, 0].tolist()
    ([0, 1], [-3.0, -1.0])
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        probes: Sequence[ProbeRef] | None = None,
        scenarios: Sequence[str] | None = None,
        *,
        fsync: bool = False,
    ):
        self.path = Path(path) if path is not None else None
        self.fsync = fsync
        self._steps: list[int] = []
        self._rows: dict[str, list[torch.Tensor]] = {name: [] for name in REDUCTIONS}
        if self.path is not None and self.path.exists() and self.path.stat().st_size > 0:
            file_probes, file_scenarios = self._load()
            if probes is not None and list(probes) != file_probes:
                raise TrajectoryError(
                    f"{self.path} records {len(file_probes)} other probes than the {len(probes)} given; "
                    "use a new path, or the same facts, kinds and tokenizer as the run that wrote it"
                )
            self.probes = file_probes
            self.scenarios = file_scenarios
            logger.info("resumed trajectory %s at %d steps (last step %s)", self.path, len(self._steps), self.last_step)
        else:
            if probes is None:
                raise TrajectoryError(f"no trajectory file at {self.path}; give the probes to start a new one")
            self.probes = list(probes)
            self.scenarios = list(scenarios) if scenarios is not None else None
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                header = {
                    "format": FORMAT_NAME,
                    "version": FORMAT_VERSION,
                    "probes": [[p.record, p.kind, p.index] for p in self.probes],
                    "scenarios": self.scenarios,
                }
                self._write_line(json.dumps(header), mode="w")

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TrajectoryStore":
        """Open an existing trajectory file (to analyse or to continue it)."""
        if not Path(path).exists():
            raise TrajectoryError(f"no trajectory file at {path}")
        return cls(path)

    # writing

    def append(self, step: int, scores: Any) -> None:
        """Record the scores of every probe at ``step`` (a mapping or object with ``mean``/``first``/``sum``)."""
        step = int(step)
        if self._steps and step <= self._steps[-1]:
            raise TrajectoryError(
                f"step {step} is not after the last recorded step {self._steps[-1]}; after resuming from an "
                f"earlier checkpoint call discard_after({step - 1}) first"
            )
        row = {}
        for name in REDUCTIONS:
            values = scores[name] if isinstance(scores, dict) else getattr(scores, name)
            values = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1)
            if values.numel() != len(self.probes):
                raise TrajectoryError(
                    f"{name!r} scores have {values.numel()} values for {len(self.probes)} probes at step {step}"
                )
            row[name] = values
        if self.path is not None:
            body = ", ".join(f'"{name}": [{_format_floats(row[name])}]' for name in REDUCTIONS)
            self._write_line(f'{{"step": {step}, {body}}}', mode="a")
        self._steps.append(step)
        for name in REDUCTIONS:
            self._rows[name].append(row[name])

    def discard_after(self, step: int) -> int:
        """Forget (and cut from the file) every step after ``step``; returns how many were dropped."""
        keep = sum(1 for s in self._steps if s <= step)
        dropped = len(self._steps) - keep
        if not dropped:
            return 0
        self._steps = self._steps[:keep]
        for name in REDUCTIONS:
            self._rows[name] = self._rows[name][:keep]
        if self.path is not None:
            with open(self.path, "rb+") as handle:
                lines = handle.read().split(b"\n")
                kept = b"\n".join(lines[: keep + 1]) + b"\n"
                handle.seek(0)
                handle.write(kept)
                handle.truncate()
        logger.info("dropped %d recorded steps after step %d from the trajectory", dropped, step)
        return dropped

    # reading

    @property
    def steps(self) -> list[int]:
        return list(self._steps)

    @property
    def last_step(self) -> int | None:
        return self._steps[-1] if self._steps else None

    def __len__(self) -> int:
        return len(self._steps)

    def values(self, reduction: str = "mean") -> torch.Tensor:
        """All recorded scores as an fp32 tensor [n_steps, n_probes]."""
        if reduction not in REDUCTIONS:
            raise ConfigError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
        if not self._steps:
            return torch.empty(0, len(self.probes))
        return torch.stack(self._rows[reduction])

    def columns(self, record: int | None = None, kind: str | None = None, scenario: str | None = None) -> list[int]:
        """Column indices of the probes that match every filter given."""
        if scenario is not None and self.scenarios is None:
            raise TrajectoryError("this trajectory was written without scenarios; filter by record instead")
        return [
            column
            for column, probe in enumerate(self.probes)
            if (record is None or probe.record == record)
            and (kind is None or probe.kind == kind)
            and (scenario is None or self.scenarios[probe.record] == scenario)
        ]

    def to_dataframe(self):
        """A long table: one row per (step, probe) with columns step, record, scenario, kind, probe and the scores."""
        try:
            import pandas as pd  # an optional extra ('data')
        except ImportError as error:
            raise MissingExtraError("pandas", "data", "TrajectoryStore.to_dataframe") from error
        n_steps, n_probes = len(self._steps), len(self.probes)
        records = [p.record for p in self.probes]
        frame = pd.DataFrame(
            {
                "step": [s for s in self._steps for _ in range(n_probes)],
                "record": records * n_steps,
                "scenario": [self.scenarios[r] for r in records] * n_steps if self.scenarios else [None] * (n_steps * n_probes),
                "kind": [p.kind for p in self.probes] * n_steps,
                "probe": [p.index for p in self.probes] * n_steps,
                **{f"{name}_logprob": self.values(name).reshape(-1).numpy() for name in REDUCTIONS},
            }
        )
        return frame

    def to_csv(self, path: str | os.PathLike) -> None:
        self.to_dataframe().to_csv(path, index=False)

    # file handling

    def _write_line(self, line: str, mode: str) -> None:
        with open(self.path, mode, encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            if self.fsync:
                os.fsync(handle.fileno())

    def _load(self) -> tuple[list[ProbeRef], list[str] | None]:
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError as error:
            raise TrajectoryError(f"{self.path} does not start with a trajectory header: {error}") from error
        if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
            raise TrajectoryError(
                f"{self.path} is not a version-{FORMAT_VERSION} {FORMAT_NAME} file (header: {str(header)[:80]})"
            )
        probes = [ProbeRef(int(r), str(k), int(i)) for r, k, i in header["probes"]]
        good_bytes = len(lines[0]) + 1
        complete = lines[1:-1]  # what follows the last newline is a torn write or nothing
        for number, line in enumerate(complete, start=2):
            try:
                entry = json.loads(line)
                row = {name: _parse_floats(entry[name], len(probes)) for name in REDUCTIONS}
                step = int(entry["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                if number - 1 == len(complete):  # only the last line may be broken (a crash while writing)
                    break
                raise TrajectoryError(f"{self.path}, line {number}: broken step record ({error})") from error
            self._steps.append(step)
            for name in REDUCTIONS:
                self._rows[name].append(row[name])
            good_bytes += len(line) + 1
        if good_bytes < len(raw):
            logger.warning(
                "%s: dropped %d bytes of an incomplete last step (a crash while writing?)", self.path, len(raw) - good_bytes
            )
            with open(self.path, "rb+") as handle:
                handle.truncate(good_bytes)
        return probes, header.get("scenarios")


def _format_floats(values: torch.Tensor) -> str:
    # 9 significant digits round-trip fp32 exactly; NaN becomes null, infinities Python json's spelling
    return ", ".join(_SPECIAL_FLOATS.get(v, "null") if not math.isfinite(v) else f"{v:.9g}" for v in values.tolist())


_SPECIAL_FLOATS = {math.inf: "Infinity", -math.inf: "-Infinity"}


def _parse_floats(values: list, expected: int) -> torch.Tensor:
    if len(values) != expected:
        raise TrajectoryError(f"{len(values)} values for {expected} probes")
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)
