"""``python -m kacq_study ARGS`` is ``kacq demo ARGS``."""
import sys

from kacq_study.cli import main

sys.exit(main(sys.argv[1:]))
