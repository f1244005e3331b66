#!/usr/bin/env bash
# Install kacq_hooks with its test dependencies (torch pinned to the CPU wheel) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -c constraints.txt -e ".[dev]"
exec python -m pytest "$@"
