"""One sweep task in this process: ``python -m kacq_hooks.sweep_worker SPEC.json OUTCOME.json``.

The local executor starts one of these per checkpoint (under ``torchrun`` for a task of several ranks);
it runs :func:`kacq_hooks.sweep.run_task` on the spec and, on rank 0, writes the outcome atomically.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .sweep import joined_ranks, run_task, write_json_atomically


def main(argv: list[str] | None = None) -> int:
    spec_path, outcome_path = (argv if argv is not None else sys.argv[1:])[:2]
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    with joined_ranks(spec["device"]) as ranks:  # left before this process exits (see joined_ranks)
        outcome = run_task(spec, ranks=ranks)
    if ranks.rank == 0:
        write_json_atomically(Path(outcome_path), outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
