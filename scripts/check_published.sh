#!/usr/bin/env bash
# Compare the verdicts README.md and docs/findings.md publish with a results.json of the default run (kacq demo):
# exit 1, naming the blocks, when they differ. `--write` instead rewrites the blocks and docs/demo_results.json.
#   bash scripts/check_published.sh runs/demo/results.json [--write]
set -euo pipefail
cd "$(dirname "$0")/.."
results="${1:-runs/demo/results.json}"
action="${2:---check}"
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" python -m kacq_study.published "$results" "$action"
