"""``python -m kacq_study ARGS`` is ``kacq demo ARGS``."""
import sys

from kacq_study.cli import main

if __name__ == "__main__":  # the study's spawned workers import this module again: they must not rerun it
    sys.exit(main(sys.argv[1:]))
