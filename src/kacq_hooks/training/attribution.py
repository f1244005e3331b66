"""Attribution through training: every N steps, each tracked probe's top-k memory slots, stored and compared.

:class:`AttributionTracker` is the plain-loop helper (call ``record(step)``); :class:`AttributionCallback`
calls it from a Hugging Face Trainer. Each record holds, per probe, its ``k`` best slots (layer, neuron)
and their scores, and, when calibration data is given, c̄ (mean |C| per slot) measured on it at that
step. The metrics read the store:

- :func:`stability`: Jaccard similarity of a probe's top-k set between consecutive records;
- :func:`overlap`: Jaccard similarity between the top-k sets of every pair of probes at one record;
- :func:`low_activity_share`: the share of a probe's top-k slots that were low-activity (c̄ at or below
  the per-layer ``quantile``, the neurons resuscitation selects) at the last record at or before the
  fact's first injection, against the share of all slots that were (what random slots would give).

Store format (JSON lines, one file), appended and flushed a record at a time. Creating the store on
the file resumes it (a torn last line is cut, a resume with other settings refused); opening it to read
leaves the file as it is, so a run in progress can be read::

    {"format": "kacq_hooks.attribution", "version": 1, "probes": [[record, kind, index], ...],
     "labels": [...], "d_ff": [...], "k": 10, "method": "grad_x_act", "by": "score", "baseline": "zero",
     "reduction": "mean", "positions": "predicting"}
    {"step": 0, "slots": [[[layer, neuron], ...], ...], "scores": [[...], ...], "cbar": [[...], ...] or null}

``baseline`` is "zero" or, for per-slot baseline tensors, ``"tensors:"`` and a digest of their values;
the settings are null in a store written without a tracker that knew them.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kacq_hooks.attribution import as_tracker, attributable_sites, attribute
from kacq_hooks.errors import AttributionError, ConfigError
from kacq_hooks.facts.trajectory import ProbeRef, StepFile, TrajectoryError
from kacq_hooks.facts.records import PROBE_KINDS
from kacq_hooks.facts.tracker import FactTracker
from kacq_hooks.interventions.resuscitation import resuscitation_plan
from kacq_hooks.measuring import measure
from kacq_hooks.training.callbacks import _LoggingCallback

logger = logging.getLogger(__name__)

FORMAT_NAME = "kacq_hooks.attribution"
FORMAT_VERSION = 1

_ATTRIBUTE_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(attribute).parameters.items()}


@dataclass
class AttributionRecord:
    """One recorded step: per probe its top-k slots ``[(layer, neuron), ...]`` and scores; c̄ per layer or None."""

    step: int
    slots: list[list[tuple[int, int]]]
    scores: list[list[float]]
    cbar: list[torch.Tensor] | None = None


class AttributionStore:
    """Per-step top-k slots of a fixed list of probes, in memory and (with ``path``) appended to a JSONL file.

    Creating it on an existing file resumes it: every setting given must match the header's, and later
    ``append`` calls continue it. :meth:`open` reads a store of any settings without changing the file
    (it may be the store of a run in progress).

    >>> store = AttributionStore(None, [ProbeRef(0, "mem", 0)], labels=["decoder.layer_0"], d_ff=[4], k=2)
    >>> store.append(0, [[(0, 1), (0, 3)]], [[0.5, 0.25]])
    >>> store.append(5, [[(0, 1), (0, 2)]], [[0.5, 0.125]])
    >>> store.steps, stability(store)[:, 0].tolist()
    ([0, 5], [0.3333333432674408])
    """

    def __init__(self, path: str | os.PathLike | None, probes: Sequence[ProbeRef] | None = None, *,
                 labels: Sequence[str] | None = None, d_ff: Sequence[int] | None = None, k: int | None = None,
                 method: str | None = None, by: str | None = None, baseline: str | None = None,
                 reduction: str | None = None, positions: str | None = None, fsync: bool = False,
                 read_only: bool = False):
        self.path = Path(path) if path is not None else None
        self.read_only = read_only
        self._file = StepFile(self.path, FORMAT_NAME, FORMAT_VERSION, fsync=fsync) if self.path is not None else None
        self.records: list[AttributionRecord] = []
        given = dict(probes=[[p.record, p.kind, p.index] for p in probes] if probes is not None else None,
                     labels=list(labels) if labels is not None else None,
                     d_ff=[int(w) for w in d_ff] if d_ff is not None else None, k=k, method=method, by=by,
                     baseline=baseline, reduction=reduction, positions=positions)
        header = None
        if self._file is not None and self._file.exists():
            header, records = self._file.load(_parse_record, writing=not read_only)
            self.records = [record for _, record in records]
        if header is not None:
            for key, value in given.items():
                if value is not None and header.get(key) != value:
                    raise TrajectoryError(f"{self.path} was written with another {key} ({str(header.get(key))[:60]}) "
                                          f"than given ({str(value)[:60]}); use a new path or the same settings")
            given = {key: header.get(key) for key in given}
            if not read_only:
                logger.info("resumed attribution store %s at %d records", self.path, len(self.records))
        elif read_only or given["probes"] is None or given["labels"] is None or given["d_ff"] is None or not k:
            raise TrajectoryError(f"no attribution store at {self.path}; give probes, labels, d_ff and k to start one")
        else:
            given["method"] = given["method"] or "grad_x_act"
            if self._file is not None:
                self._file.start({"format": FORMAT_NAME, "version": FORMAT_VERSION, **given})
        self.probes = [ProbeRef(int(r), str(kind), int(i)) for r, kind, i in given["probes"]]
        self.labels, self.d_ff, self.k, self.method = given["labels"], given["d_ff"], given["k"], given["method"]
        self.by, self.baseline = given["by"], given["baseline"]
        self.reduction, self.positions = given["reduction"], given["positions"]

    @classmethod
    def open(cls, path: str | os.PathLike) -> "AttributionStore":
        """Read an existing store, whatever its settings, leaving the file untouched."""
        if not Path(path).exists():
            raise TrajectoryError(f"no attribution store at {path}")
        return cls(path, read_only=True)

    @property
    def steps(self) -> list[int]:
        return [r.step for r in self.records]

    @property
    def last_step(self) -> int | None:
        return self.records[-1].step if self.records else None

    def __len__(self) -> int:
        return len(self.records)

    def _writable(self) -> None:
        if self.read_only:
            raise TrajectoryError(f"{self.path} was opened to read; create AttributionStore({str(self.path)!r}) "
                                  "to continue it")

    def append(self, step: int, slots, scores, cbar: Sequence[torch.Tensor] | None = None) -> None:
        """Record ``step``: per probe its slots (e.g. ``Attribution.top_slots(k)``) and their scores."""
        self._writable()
        step = int(step)
        if self.records and step <= self.records[-1].step:
            raise TrajectoryError(f"step {step} is not after the last recorded step {self.records[-1].step}; after "
                                  f"resuming from an earlier checkpoint call discard_after({step - 1}) first")
        slots = [[(int(layer), int(neuron)) for layer, neuron in row if layer >= 0]
                 for row in (slots.tolist() if isinstance(slots, torch.Tensor) else slots)]
        scores = [[float(v) for v in row] for row in (scores.tolist() if isinstance(scores, torch.Tensor) else scores)]
        if len(slots) != len(self.probes) or len(scores) != len(self.probes):
            raise TrajectoryError(f"{len(slots)} slot rows and {len(scores)} score rows for {len(self.probes)} probes")
        if cbar is not None:
            cbar = [torch.as_tensor(c, dtype=torch.float32).detach().cpu().flatten() for c in cbar]
            if [c.numel() for c in cbar] != self.d_ff:
                raise TrajectoryError(f"c̄ widths {[c.numel() for c in cbar]} do not match the store's {self.d_ff}")
        record = AttributionRecord(step, slots, [row[:len(s)] for row, s in zip(scores, slots)], cbar)
        if self._file is not None:
            entry = {"step": step, "slots": [[list(s) for s in row] for row in record.slots],
                     "scores": [[_finite(v) for v in row] for row in record.scores],
                     "cbar": [[float(f"{v:.7g}") for v in c.tolist()] for c in cbar] if cbar is not None else None}
            self._file.append(json.dumps(entry))
        self.records.append(record)

    def discard_after(self, step: int) -> int:
        """Forget (and cut from the file) every record after ``step``; returns how many were dropped."""
        self._writable()
        keep = sum(1 for r in self.records if r.step <= step)
        dropped = len(self.records) - keep
        if dropped:
            self.records = self.records[:keep]
            if self._file is not None:
                self._file.keep(keep)
        return dropped


def _parse_record(header: dict, entry: dict) -> AttributionRecord:
    return AttributionRecord(
        int(entry["step"]), [[(int(a), int(b)) for a, b in row] for row in entry["slots"]],
        [[math.nan if v is None else float(v) for v in row] for row in entry["scores"]],
        [torch.tensor(c, dtype=torch.float32) for c in entry["cbar"]] if entry.get("cbar") else None)


def _baseline_key(baseline) -> str:
    """How a store header names an attribution baseline: "zero", or a digest of the per-site tensors' values."""
    if isinstance(baseline, str):
        return baseline
    digest = hashlib.sha256()
    for tensor in baseline:
        digest.update(torch.as_tensor(tensor, dtype=torch.float32).detach().cpu().contiguous().numpy().tobytes())
        digest.update(b"|")  # the site boundaries are part of the value
    return f"tensors:{digest.hexdigest()[:16]}"


def _finite(value: float):
    return value if math.isfinite(value) else None


# -- metrics ---------------------------------------------------------------------------------------------------

def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if (a or b) else math.nan


def stability(store: AttributionStore) -> torch.Tensor:
    """``[n_records - 1, n_probes]``: Jaccard of each probe's top-k set between consecutive records (NaN if both empty)."""
    records = store.records
    return torch.tensor([[_jaccard(set(a), set(b)) for a, b in zip(prev.slots, cur.slots)]
                         for prev, cur in zip(records, records[1:])], dtype=torch.float32).reshape(-1, len(store.probes))


def overlap(store: AttributionStore, record: int = -1) -> torch.Tensor:
    """``[n_probes, n_probes]``: Jaccard of the top-k sets of every pair of probes at one record (default the last)."""
    if not store.records:
        raise AttributionError("the attribution store holds no records yet")
    sets = [set(s) for s in store.records[record].slots]
    return torch.tensor([[_jaccard(a, b) for b in sets] for a in sets], dtype=torch.float32)


@dataclass
class LowActivityShare:
    """``share[i, p]``: fraction of probe p's top-k slots at record ``steps[i]`` that were low-activity before its
    fact's first injection (NaN for records at or before it, or without a c̄ before it); ``chance[p]`` the
    fraction of all slots that were low-activity then. ``mean()`` averages the last record's shares."""

    steps: list[int]
    share: torch.Tensor
    chance: torch.Tensor

    def last(self) -> torch.Tensor:
        return self.share[-1] if len(self.steps) else torch.empty(0)

    def mean(self) -> tuple[float, float]:
        """(mean share at the last record, mean chance) over the probes that have both."""
        last = self.last()
        ok = ~torch.isnan(last) & ~torch.isnan(self.chance)
        return (float(last[ok].mean()) if ok.any() else math.nan, float(self.chance[ok].mean()) if ok.any() else math.nan)


def low_activity_mask(cbar: Sequence[torch.Tensor], quantile: float = 0.5) -> list[torch.Tensor]:
    """Per layer, bool ``[d_ff]``: slots whose c̄ is at or below the layer's ``quantile`` (resuscitation's selection)."""
    plan = resuscitation_plan(list(cbar), ratio=quantile, max_multiplier=1e30)  # the cap plays no part here
    masks = [torch.zeros(c.numel(), dtype=torch.bool) for c in cbar]
    for mask, edit in zip(masks, plan.edits):
        mask[edit.indices] = True
    return masks


def low_activity_share(store: AttributionStore, first_injection: Mapping[int, int] | Sequence[int],
                       quantile: float = 0.5) -> LowActivityShare:
    """The share of each probe's top-k slots that were low-activity before its fact's first injection.

    ``first_injection`` maps a record (fact) index to the step of its first injection, e.g.
    ``{r: schedule.steps_of(r)[0] for r in ...}`` from an :class:`~kacq_hooks.facts.InjectionSchedule`; probes
    of other records are NaN. c̄ is taken from the last record at or before that step that holds one
    (record with ``calibration=`` in the tracker).
    """
    if isinstance(first_injection, Sequence):
        first_injection = dict(enumerate(first_injection))
    with_cbar = [r for r in store.records if r.cbar is not None]
    n = len(store.probes)
    share = torch.full((len(store.records), n), math.nan)
    chance = torch.full((n,), math.nan)
    masks_by_step: dict[int, list[torch.Tensor]] = {}
    for column, probe in enumerate(store.probes):
        injected = first_injection.get(probe.record)
        if injected is None:
            continue
        before = [r for r in with_cbar if r.step <= injected]
        if not before:
            continue
        source = before[-1]
        if source.step not in masks_by_step:
            masks_by_step[source.step] = low_activity_mask(source.cbar, quantile)
        masks = masks_by_step[source.step]
        chance[column] = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
        for row, record in enumerate(store.records):
            slots = record.slots[column]
            if record.step > injected and slots:
                share[row, column] = sum(bool(masks[layer][neuron]) for layer, neuron in slots) / len(slots)
    return LowActivityShare(store.steps, share, chance)


# -- recording during training --------------------------------------------------------------------------------

class AttributionTracker:
    """Attribute a fixed set of probes and record each probe's top-k slots: the plain-training-loop helper.

    ``probes`` is what :func:`kacq_hooks.attribution.attribute` takes (a FactTracker, facts or pairs);
    it is encoded once. ``calibration`` (batches as :func:`kacq_hooks.measure` takes them) adds c̄ to each
    record, which :func:`low_activity_share` needs. Other keywords go to ``attribute``.

    >>> tracker = AttributionTracker(model, tokenizer, facts, store="run/attribution.jsonl",  # doctest: +SKIP
    ...                              k=10, calibration=batches)
    >>> for step, batch in enumerate(loader):  # doctest: +SKIP
    ...     if step % 50 == 0:
    ...         tracker.record(step)
    ...     train_step(batch)
    """

    def __init__(self, model, tokenizer, probes, *, store: AttributionStore | str | os.PathLike | None = None,
                 k: int = 10, method: str = "grad_x_act", by: str = "score", calibration=None, **attribute_kwargs):
        self.model = model
        self.method = method
        self.k = k
        self.by = by
        self.calibration = list(calibration) if calibration is not None else None
        self.attribute_kwargs = attribute_kwargs
        kinds = attribute_kwargs.pop("kinds", None)
        if isinstance(probes, FactTracker):
            self.probes = probes
        else:  # encode once: attribute() takes the tracker's encoding and batches
            self.probes = as_tracker(model, tokenizer, probes, kinds or PROBE_KINDS,
                                      attribute_kwargs.pop("batch_size", 32),
                                      attribute_kwargs.pop("padding_side", "left"),
                                      attribute_kwargs.pop("unclean_targets", "extend"))
        self.tokenizer = tokenizer
        self.last = None
        sites = attributable_sites(model, attribute_kwargs.get("mlp_out"))
        settings = dict(method=method, by=by, baseline=_baseline_key(self._setting("baseline")),
                        reduction=self._setting("reduction"), positions=self._setting("positions"))
        if isinstance(store, AttributionStore):
            for key, value in settings.items():
                if getattr(store, key) not in (None, value):
                    raise TrajectoryError(f"the store was written with another {key} ({getattr(store, key)}) than "
                                          f"this tracker's ({value}); use a new store or the same settings")
            self.store = store
        elif store is not None:
            self.store = AttributionStore(store, self.probes.probes, labels=[s.label for s in sites],
                                          d_ff=[s.d_ff for s in sites], k=k, **settings)
        else:
            self.store = None

    def _setting(self, name: str):
        """An attribute() keyword as this tracker passes it: given, or attribute()'s default."""
        return self.attribute_kwargs.get(name, _ATTRIBUTE_DEFAULTS[name])

    def attribute(self):
        return attribute(self.model, self.tokenizer, self.probes, self.method, **self.attribute_kwargs)

    def record(self, step: int):
        """Attribute every probe now and append its top-k slots (and c̄ if calibrated) as ``step``."""
        result = self.attribute()
        best = result.top_k(self.k, self.by)
        slots = [[(s.layer, s.neuron) for s in row] for row in best]
        scores = [[s.score for s in row] for row in best]
        cbar = None
        if self.calibration:
            cbar = measure(self.model, self.calibration,
                           mlp_out=self.attribute_kwargs.get("mlp_out")).mean_abs_coefficients()
        if self.store is not None:
            self.store.append(step, slots, scores, cbar)
        self.last = result
        return result


class AttributionCallback(_LoggingCallback):
    """Record the tracker's top-k slots every ``every`` steps of a Trainer (and at the start), and log stability.

    After resuming from a checkpoint, records later than it are dropped first. Logged: ``{prefix}/stability``
    (mean Jaccard of each probe's top-k with its previous record). Add it with ``.attach(trainer)``.

    >>> tracker = AttributionTracker(model, tokenizer, facts, store="run/attribution.jsonl")  # doctest: +SKIP
    >>> AttributionCallback(tracker, every=50).attach(trainer)  # doctest: +SKIP
    """

    def __init__(self, tracker: AttributionTracker, every: int = 100, *, prefix: str = "attribution"):
        super().__init__()
        if not isinstance(every, int) or every < 1:
            raise ConfigError(f"every must be an integer >= 1, got {every!r}")
        if tracker.store is None:
            raise AttributionError("the AttributionTracker has no store; create it with store=PATH")
        self.tracker = tracker
        self.every = every
        self.prefix = prefix

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:  # one writer per store: the main process
            return
        if model is not None and model is not self.tracker.model:
            logger.warning("AttributionCallback: the Trainer trains another model object than the tracker attributes")
        store = self.tracker.store
        store.discard_after(state.global_step)
        if store.last_step != state.global_step:
            self.tracker.record(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every:
            return
        # every process asks for the log line at the same steps (the Trainer gathers the loss across them)
        control.should_log = True
        if not state.is_world_process_zero:
            return
        self.tracker.record(state.global_step)
        stable = stability(self.tracker.store)
        if len(stable):
            last = stable[-1][~torch.isnan(stable[-1])]
            if last.numel():
                self._queue({f"{self.prefix}/stability": float(last.mean())}, control)


__all__ = ["AttributionCallback", "AttributionRecord", "AttributionStore", "AttributionTracker", "LowActivityShare",
           "low_activity_mask", "low_activity_share", "overlap", "stability"]
