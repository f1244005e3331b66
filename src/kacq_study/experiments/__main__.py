"""``python -m kacq_study.experiments NAME``: run one experiment (see :mod:`kacq_study.experiments`)."""
import sys

from kacq_study.experiments import main

if __name__ == "__main__":  # the multi-seed experiments' spawned workers import this module again
    sys.exit(main())
