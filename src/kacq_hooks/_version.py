"""The version of kacq_hooks, on the floor every module may import (the saved statistics record it)."""
__version__ = "0.2.0"
