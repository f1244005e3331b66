"""Loading Fictional Knowledge records (Chang et al. 2024) with a schema check that names the bad record and field."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kacq_hooks.errors import FactDataError, MissingExtraError
from kacq_hooks.facts.records import PROBE_KINDS, SCENARIOS, FactRecord, FactSet

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("train_context",) + tuple(f"{kind}_{part}" for kind in PROBE_KINDS for part in ("input", "target"))


def load_fictional_knowledge(
    source: str | os.PathLike,
    scenarios: Sequence[str] | Mapping[str, Iterable[int]] | None = None,
    *,
    split: str = "train",
) -> FactSet:
    """Load and validate Fictional Knowledge records from a JSON list, JSON lines, or a hub dataset name.

    ``source`` is a local file (a JSON list of objects, or one object per line). When no such path
    exists and the name looks like ``owner/name``, ``datasets.load_dataset(source, split=split)`` is tried
    (needs network access and the ``datasets`` package).

    ``scenarios`` assigns each record its injection scenario: ``None`` for the paper's split by index
    (130 records: 0-39 paraphrase, 40-79 duplication, 80-119 once, 120-129 unused; any other count:
    all "once"), a list with one scenario per record, or a mapping ``{scenario: indices}`` (records not
    named are "unused").

    Every record needs ``train_context`` (a non-empty string) and, for each kind in ``mem``, ``gen``
    and ``hard_gen``, lists ``{kind}_input`` and ``{kind}_target`` of equal, non-zero length holding
    non-empty strings. ``paraphrases`` (a list of strings, possibly empty) is optional. A violation
    raises :class:`FactDataError` naming the record index and the field.

    >>> import json, tempfile
    >>> rec = {"train_context": "Zorgon rules Mars.", "paraphrases": []}
    >>> rec.update({f"{k}_{p}": ["Zorgon rules", ] if p == "input" else ["Mars"] for k in ("mem", "gen", "hard_gen")
    ...             for p in ("input", "target")})
    >>> path = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False).name
    >>> _ = open(path, "w").write(json.dumps([rec]))
    >>> facts = load_fictional_knowledge(path)
    >>> len(facts), facts.scenarios, facts[0].probes("mem")
    (1, ['once'], [('Zorgon rules', 'Mars')])
    """
    raw = _read_raw_records(source, split)
    records = [parse_record(item, index) for index, item in enumerate(raw)]
    logger.info("loaded %d fact records from %s", len(records), source)
    return FactSet(records, _resolve_scenarios(scenarios, len(records)))


def parse_record(item: Any, index: int) -> FactRecord:
    """Validate one raw record (a mapping) and build a :class:`FactRecord`; errors name ``index`` and the field."""
    if not isinstance(item, Mapping):
        raise FactDataError(
            f"record {index}: expected a JSON object with fields {', '.join(REQUIRED_FIELDS)}, "
            f"found {type(item).__name__}",
            index,
        )
    missing = [name for name in REQUIRED_FIELDS if name not in item]
    if missing:
        raise FactDataError(
            f"record {index}: missing field {missing[0]!r}"
            + (f" (and {len(missing) - 1} more: {missing[1:]})" if len(missing) > 1 else "")
            + f"; every record needs {', '.join(REQUIRED_FIELDS)}",
            index,
            missing[0],
        )
    context = item["train_context"]
    if not isinstance(context, str) or not context.strip():
        raise FactDataError(
            f"record {index}, field 'train_context': expected a non-empty string, found {_describe(context)}",
            index,
            "train_context",
        )
    fields: dict[str, list[str]] = {}
    for kind in PROBE_KINDS:
        for part in ("input", "target"):
            name = f"{kind}_{part}"
            fields[name] = _string_list(item[name], index, name, allow_empty_list=False)
        n_inputs, n_targets = len(fields[f"{kind}_input"]), len(fields[f"{kind}_target"])
        if n_inputs != n_targets:
            raise FactDataError(
                f"record {index}, field '{kind}_target': {n_targets} targets for {n_inputs} inputs in "
                f"'{kind}_input'; probes pair them one to one",
                index,
                f"{kind}_target",
            )
    paraphrases = _string_list(item.get("paraphrases", []), index, "paraphrases", allow_empty_list=True)
    return FactRecord(train_context=context, paraphrases=paraphrases, **fields)


def _string_list(value: Any, index: int, name: str, allow_empty_list: bool) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise FactDataError(
            f"record {index}, field {name!r}: expected a list of strings, found {_describe(value)}", index, name
        )
    if not value and not allow_empty_list:
        raise FactDataError(f"record {index}, field {name!r}: the list is empty; give at least one probe", index, name)
    for position, element in enumerate(value):
        if not isinstance(element, str) or not element.strip():
            raise FactDataError(
                f"record {index}, field {name!r}[{position}]: expected a non-empty string, found {_describe(element)}",
                index,
                name,
            )
    return list(value)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _read_raw_records(source: str | os.PathLike, split: str) -> list[Any]:
    path = Path(source)
    if path.is_file():
        return _read_json_file(path)
    if path.exists():
        raise FactDataError(f"{path} is not a file; give a JSON or JSON-lines file of fact records")
    name = str(source)
    looks_like_hub_name = name.count("/") == 1 and not path.suffix and not name.startswith((".", "/"))
    if not looks_like_hub_name:
        raise FactDataError(f"no file at {path}; give the path of a JSON or JSON-lines file of fact records")
    return _read_hub_dataset(name, split)


def _read_json_file(path: Path) -> list[Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise FactDataError(f"{path} is not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}; a "
                            "binary or compressed file?); give a JSON or JSON-lines file of fact records") from error
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise FactDataError(f"{path} is not valid JSON: {error}") from error
        if isinstance(data, list) and not data:
            raise FactDataError(f"{path} holds no records (an empty JSON list); give at least one fact record")
        return data
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise FactDataError(
                f"{path}, line {line_number} (record {len(records)}): not valid JSON ({error}); expected a JSON list "
                "or one JSON object per line",
                len(records),
            ) from error
    if not records:
        raise FactDataError(f"{path} holds no records")
    return records


def _read_hub_dataset(name: str, split: str) -> list[Any]:
    try:
        import datasets  # an optional extra ('data')
    except ImportError as error:
        raise MissingExtraError("datasets", "data", f"loading fact records by dataset name ({name!r})") from error
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # offline, unknown name or split: all surface as one clear error
        raise FactDataError(
            f"could not load the dataset {name!r} (split {split!r}) with datasets.load_dataset: {error}. "
            "Offline? Download the JSON file and pass its path instead."
        ) from error
    return [dict(row) for row in dataset]


def _resolve_scenarios(
    scenarios: Sequence[str] | Mapping[str, Iterable[int]] | None, n_records: int
) -> list[str] | None:
    if scenarios is None:
        return None
    if isinstance(scenarios, str):
        raise FactDataError(
            f"scenarios={scenarios!r}: give one scenario per record, or a mapping {{scenario: indices}}"
        )
    if isinstance(scenarios, Mapping):
        resolved = ["unused"] * n_records
        for scenario, indices in scenarios.items():
            if scenario not in SCENARIOS:
                raise FactDataError(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")
            for index in indices:
                if not 0 <= index < n_records:
                    raise FactDataError(
                        f"scenario {scenario!r} names record {index}, but there are {n_records} records"
                    )
                if resolved[index] != "unused":
                    raise FactDataError(f"record {index} is given two scenarios ({resolved[index]!r}, {scenario!r})")
                resolved[index] = scenario
        return resolved
    return list(scenarios)
