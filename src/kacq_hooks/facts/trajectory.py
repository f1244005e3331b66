"""The trajectory store: per step, per probe log probabilities, appended to disk as training goes.

File format (JSON lines, one file): a header line, then one line per recorded step::

    {"format": "kacq_hooks.trajectory", "version": 1, "probes": [[record, kind, index], ...], "scenarios": [...]}
    {"step": 0, "mean": [...], "first": [...], "sum": [...]}

Each step line is written whole and flushed, so a crash loses at most the step being written. Reopening
the file to continue it cuts a torn last line; opening it to read (:meth:`TrajectoryStore.open`) never
changes the file and ignores an unterminated last line (a live writer's step in progress). The file
layer is :class:`StepFile`, shared with the attribution store.
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

from kacq_hooks.errors import ConfigError, MissingExtraError, TrajectoryError
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


class StepFile:
    """A JSON-lines file: one header line, then one line per step, the steps strictly increasing.

    Each line is written whole, by one ``write`` with its newline, and flushed. A crash can leave a last
    line without its newline. :meth:`load` with ``writing=True`` (a writer resuming the file) keeps such
    a line if it is a complete record (adding the newline) and cuts it otherwise; a header torn before it
    was complete means the file is started again. With ``writing=False`` (a reader) the file is never
    modified and an unterminated last line is ignored: it may be a live writer's record in progress.

    >>> import tempfile
    >>> log = StepFile(Path(tempfile.mkdtemp()) / "log.jsonl", "example", 1)
    >>> log.start({"format": "example", "version": 1})
    >>> log.append('{"step": 0}'); log.append('{"step": 2}')
    >>> header, records = log.load(lambda header, entry: None, writing=False)
    >>> header["format"], [step for step, _ in records]
    ('example', [0, 2])
    """

    def __init__(self, path: str | os.PathLike, format_name: str, version: int, *, fsync: bool = False):
        self.path = Path(path)
        self.format_name = format_name
        self.version = version
        self.fsync = fsync

    def exists(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0

    def start(self, header: dict) -> None:
        """Create (or overwrite) the file with its header line; ``header`` starts with ``format`` and ``version``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write(json.dumps(header), "w")

    def append(self, line: str) -> None:
        """Append one record line (JSON text without its newline)."""
        self._write(line, "a")

    def keep(self, n: int) -> None:
        """Cut the file after the header and its first ``n`` records (a writer's file: every line terminated)."""
        with open(self.path, "rb+") as handle:
            raw = handle.read()
            end = -1
            for _ in range(n + 1):
                end = raw.index(b"\n", end + 1)
            handle.truncate(end + 1)

    def load(self, parse, *, writing: bool) -> tuple[dict | None, list[tuple[int, Any]]]:
        """``(header, [(step, record), ...])``: ``parse(header, entry)`` turns a line's JSON object into a record.

        Returns ``(None, [])`` for a writer when the file holds only a torn header (nothing was
        recorded: start it again). Raises :class:`TrajectoryError` naming the line for a broken record
        or a step not after the one before it (two writers sharing one file).
        """
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        terminated, tail = lines[:-1], lines[-1]
        if not terminated:  # one line, unterminated: a header torn by a crash, or complete but for its newline
            header = self._torn_header(tail)
            if header is None:
                if not writing:
                    raise TrajectoryError(f"{self.path} holds only a torn header (a crash while it was written, or a "
                                          "writer that is just starting): there are no records to read")
                logger.warning("%s: starting again over a header torn while it was written (no record was lost)",
                               self.path)
                return None, []
            if writing:
                self._write("", "a")  # its newline: records go on the next line
            return header, []
        header = self._header(terminated[0])
        records, last = [], None
        for number, line in enumerate(terminated[1:], start=2):
            try:
                step, record = self._record(line, parse, header)
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as error:
                raise TrajectoryError(f"{self.path}, line {number}: broken record ({error})") from error
            if last is not None and step <= last:
                raise TrajectoryError(
                    f"{self.path}, line {number}: step {step} is not after step {last} of the line before; two writers "
                    "(ranks of a distributed run, or two runs) share this file: keep the lines of one run, or use one "
                    "path per run")
            records.append((step, record))
            last = step
        if tail and writing:
            try:
                step, record = self._record(tail, parse, header)
                complete = last is None or step > last
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
                complete = False
            if complete:  # written whole but for its newline
                self._write("", "a")
                records.append((step, record))
            else:
                logger.warning("%s: cut %d bytes of a last record torn while it was written", self.path, len(tail))
                with open(self.path, "rb+") as handle:
                    handle.truncate(len(raw) - len(tail))
        return header, records

    def _header(self, line: bytes) -> dict:
        try:
            header = json.loads(line)
        except json.JSONDecodeError as error:
            raise TrajectoryError(f"{self.path} does not start with a {self.format_name} header: {error}") from error
        if not isinstance(header, dict) or header.get("format") != self.format_name \
                or header.get("version") != self.version:
            raise TrajectoryError(f"{self.path} is not a version-{self.version} {self.format_name} file "
                                  f"(header: {str(header)[:80]})")
        return header

    def _torn_header(self, line: bytes) -> dict | None:
        """The header of a file that holds one unterminated line, or None when that line is a torn header of ours."""
        try:
            return self._header(line)
        except TrajectoryError:
            ours = json.dumps({"format": self.format_name})[:-1].encode()  # how every header of this format begins
            if line and (ours.startswith(line) or line.startswith(ours)):
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    return None
            raise

    @staticmethod
    def _record(line: bytes, parse, header: dict):
        entry = json.loads(line)
        return int(entry["step"]), parse(header, entry)

    def _write(self, line: str, mode: str) -> None:
        with open(self.path, mode, encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            if self.fsync:
                os.fsync(handle.fileno())


class TrajectoryStore:
    """Per-step scores of a fixed list of probes, in memory and (with ``path``) appended to a file.

    Creating it on an existing file resumes it: its probes must match, and later ``append`` calls
    continue it. :meth:`open` reads a file without changing it (it may be the file of a run in progress).

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
        read_only: bool = False,
    ):
        self.path = Path(path) if path is not None else None
        self.read_only = read_only
        self._file = StepFile(self.path, FORMAT_NAME, FORMAT_VERSION, fsync=fsync) if self.path is not None else None
        self._steps: list[int] = []
        self._rows: dict[str, list[torch.Tensor]] = {name: [] for name in REDUCTIONS}
        header = self._load() if self._file is not None and self._file.exists() else None
        if header is not None:
            file_probes = [ProbeRef(int(r), str(k), int(i)) for r, k, i in header["probes"]]
            if probes is not None and list(probes) != file_probes:
                raise TrajectoryError(
                    f"{self.path} records {len(file_probes)} other probes than the {len(probes)} given; "
                    "use a new path, or the same facts, kinds and tokenizer as the run that wrote it"
                )
            self.probes = file_probes
            self.scenarios = header.get("scenarios")
            if not read_only:
                logger.info("resumed trajectory %s at %d steps (last step %s)", self.path, len(self._steps),
                            self.last_step)
        else:
            if probes is None or read_only:
                raise TrajectoryError(f"no trajectory file at {self.path}; give the probes to start a new one")
            self.probes = list(probes)
            self.scenarios = list(scenarios) if scenarios is not None else None
            if self._file is not None:
                self._file.start({
                    "format": FORMAT_NAME,
                    "version": FORMAT_VERSION,
                    "probes": [[p.record, p.kind, p.index] for p in self.probes],
                    "scenarios": self.scenarios,
                })

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TrajectoryStore":
        """Read an existing trajectory file, leaving it untouched (create the store with the path to continue it)."""
        if not Path(path).exists():
            raise TrajectoryError(f"no trajectory file at {path}")
        return cls(path, read_only=True)

    # writing

    def _writable(self) -> None:
        if self.read_only:
            raise TrajectoryError(f"{self.path} was opened to read; create TrajectoryStore({str(self.path)!r}) "
                                  "to continue it")

    def append(self, step: int, scores: Any) -> None:
        """Record the scores of every probe at ``step`` (a mapping or object with ``mean``/``first``/``sum``)."""
        self._writable()
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
        if self._file is not None:
            body = ", ".join(f'"{name}": [{_format_floats(row[name])}]' for name in REDUCTIONS)
            self._file.append(f'{{"step": {step}, {body}}}')
        self._steps.append(step)
        for name in REDUCTIONS:
            self._rows[name].append(row[name])

    def discard_after(self, step: int) -> int:
        """Forget (and cut from the file) every step after ``step``; returns how many were dropped."""
        self._writable()
        keep = sum(1 for s in self._steps if s <= step)
        dropped = len(self._steps) - keep
        if not dropped:
            return 0
        self._steps = self._steps[:keep]
        for name in REDUCTIONS:
            self._rows[name] = self._rows[name][:keep]
        if self._file is not None:
            self._file.keep(keep)
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

    def _load(self) -> dict | None:
        """Read the file into memory; None when it holds only a torn header (then it is started again)."""
        header, records = self._file.load(
            lambda head, entry: {name: _parse_floats(entry[name], len(head["probes"])) for name in REDUCTIONS},
            writing=not self.read_only)
        for step, row in records:
            self._steps.append(step)
            for name in REDUCTIONS:
                self._rows[name].append(row[name])
        return header


def _format_floats(values: torch.Tensor) -> str:
    # 9 significant digits round-trip fp32 exactly; NaN becomes null, infinities Python json's spelling
    return ", ".join(_SPECIAL_FLOATS.get(v, "null") if not math.isfinite(v) else f"{v:.9g}" for v in values.tolist())


_SPECIAL_FLOATS = {math.inf: "Infinity", -math.inf: "-Infinity"}


def _parse_floats(values: list, expected: int) -> torch.Tensor:
    if len(values) != expected:
        raise TrajectoryError(f"{len(values)} values for {expected} probes")
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)
