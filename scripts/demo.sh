#!/usr/bin/env bash
# Install kacq_hooks with the demo extra (torch pinned to the CPU wheel) and run the main job, `kacq demo`.
# Arguments go to `kacq demo` (e.g. --quick, --out DIR, --seed N).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -c constraints.txt -e ".[demo]"
exec kacq demo "$@"
