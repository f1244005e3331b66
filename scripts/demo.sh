#!/usr/bin/env bash
# Install kacq_hooks and the study package kacq_study (one pyproject) with the demo extra (torch pinned to the
# CPU wheel) and run the main job, `kacq demo` (kacq_study's command, found by the `kacq.commands` entry point).
# Arguments go to `kacq demo` (e.g. --quick, --out DIR, --seed N).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -c constraints.txt -e ".[demo]"
exec kacq demo "$@"
