"""Writing the study's outputs: numbers made JSON-ready (:func:`json_ready`), and files written whole or not at all."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

def json_ready(value):
    """Floats rounded to 7 significant digits (stable text), NaN and inf to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_ready(value.tolist())
    if isinstance(value, float):
        return float(f"{value:.7g}") if math.isfinite(value) else None
    return value


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all: into a temporary file beside it, then ``os.replace``. An
    interrupted write leaves the previous file as it was (and no partial file)."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.partial")  # beside it (one file system), with the umask's permissions
    try:
        Path(staging).write_text(text, encoding="utf-8")
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


def write_results(results: dict, out: str | os.PathLike) -> Path:
    """Write ``results.json`` (without wall-clock timings, so equal runs give equal bytes) and ``timings.json``,
    each whole or not at all (:func:`write_text_atomic`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stable = {k: v for k, v in results.items() if k != "timings"}
    text = json.dumps(stable, indent=1, sort_keys=True, allow_nan=False) + "\n"
    timings = json.dumps(results["timings"], indent=1, sort_keys=True) + "\n" if "timings" in results else None
    path = write_text_atomic(out / "results.json", text)
    if timings is not None:
        write_text_atomic(out / "timings.json", timings)
    return path
