"""Callers that caught a builtin exception before 0.3.0 keep catching the refusal that replaced it.

0.3.0 narrowed many refusals to KacqError subclasses. Where the old refusal was a builtin (a RuntimeError,
a ValueError), code written against 0.2 with ``except RuntimeError`` must still catch it, unless the change
is on purpose and listed in CHANGELOG.md.
"""
from __future__ import annotations

import pytest

from kacq_hooks import bench
from kacq_hooks.errors import KacqError


def test_a_failing_measuring_child_is_still_caught_as_a_runtime_error(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import sys\nsys.exit('the child could not build its model')\n")
    with pytest.raises(RuntimeError) as caught:  # what a 0.2 caller wrote: except RuntimeError
        bench.peak_in_subprocess(script, [])
    assert isinstance(caught.value, KacqError)
