"""The Fictional Knowledge record schema (Chang et al. 2024) and a set of records with its scenario split."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

from kacq_hooks.errors import ConfigError

PROBE_KINDS = ("mem", "gen", "hard_gen")
SCENARIOS = ("paraphrase", "duplication", "once", "unused")
# The paper's split of its 130 records by index: [0, 40) paraphrase, [40, 80) duplication, [80, 120) once.
PAPER_SPLIT = {"paraphrase": range(0, 40), "duplication": range(40, 80), "once": range(80, 120), "unused": range(120, 130)}


@dataclass
class FactRecord:
    """One fictional passage with its probes: five (input, target) pairs for each kind in PROBE_KINDS."""

    train_context: str
    mem_input: list[str]
    mem_target: list[str]
    gen_input: list[str]
    gen_target: list[str]
    hard_gen_input: list[str]
    hard_gen_target: list[str]
    paraphrases: list[str] = field(default_factory=list)

    def probes(self, kind: str) -> list[tuple[str, str]]:
        """The (input, target) pairs of one probe kind: "mem", "gen" or "hard_gen"."""
        if kind not in PROBE_KINDS:
            raise ConfigError(f"unknown probe kind {kind!r}; expected one of {PROBE_KINDS}")
        return list(zip(getattr(self, f"{kind}_input"), getattr(self, f"{kind}_target")))

    def to_dict(self) -> dict:
        return {
            "train_context": self.train_context,
            **{f"{k}_{part}": list(getattr(self, f"{k}_{part}")) for k in PROBE_KINDS for part in ("input", "target")},
            "paraphrases": list(self.paraphrases),
        }


class FactSet(Sequence[FactRecord]):
    """An ordered list of records and the injection scenario of each.

    ``scenarios`` gives one of SCENARIOS per record; by default the paper's split by index is used
    when there are 130 records, and every record is "once" otherwise.
    """

    def __init__(self, records: Sequence[FactRecord], scenarios: Sequence[str] | None = None):
        self.records = list(records)
        if scenarios is None:
            scenarios = default_scenarios(len(self.records))
        scenarios = list(scenarios)
        if len(scenarios) != len(self.records):
            raise ConfigError(f"{len(scenarios)} scenarios given for {len(self.records)} records; give one per record")
        bad = sorted({s for s in scenarios if s not in SCENARIOS})
        if bad:
            raise ConfigError(f"unknown scenario(s) {bad}; expected any of {SCENARIOS}")
        self.scenarios = scenarios

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]

    def __iter__(self) -> Iterator[FactRecord]:
        return iter(self.records)

    def indices(self, scenario: str) -> list[int]:
        """Indices of the records in one scenario."""
        if scenario not in SCENARIOS:
            raise ConfigError(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")
        return [i for i, s in enumerate(self.scenarios) if s == scenario]


def default_scenarios(n: int) -> list[str]:
    if n == 130:
        return [next(s for s, r in PAPER_SPLIT.items() if i in r) for i in range(n)]
    return ["once"] * n
