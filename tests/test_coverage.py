"""Coverage over the installed transformers' model types (scripts/coverage.py): never a silently wrong site.

The fast test runs a representative subset; the full sweep over every registered type is ``slow``.
Encoder-decoders and XLNet's sequence-first layout are checked like every other type: each stack's
statistics follow that stack's own mask.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("coverage_script", Path(__file__).parents[1] / "scripts" / "coverage.py")
coverage = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(coverage)

# type -> the status it must have today
REPRESENTATIVE = {
    "llama": "ok", "gpt2": "ok", "opt": "ok", "bert": "ok", "modernbert": "ok", "lfm2": "ok",
    "mamba": "no-ffn", "falcon_mamba": "no-ffn", "mixtral": "ok", "qwen2_moe": "ok", "olmoe": "ok", "cpmant": "refused", "prophetnet": "refused",
}
# Correct sites whose statistics need the per-stack instrumentation.
PENDING_INTEGRATION = {"t5", "bart", "xlnet"}


@pytest.mark.parametrize("model_type", sorted(REPRESENTATIVE))
def test_representative_types(model_type):
    row = coverage.check(model_type)
    assert row["status"] == REPRESENTATIVE[model_type], row


@pytest.mark.parametrize("model_type", sorted(PENDING_INTEGRATION))
def test_encoder_decoder_and_seq_first_sites_are_right(model_type):
    row = coverage.check(model_type)
    assert row["status"] in ("ok", "stats-mismatch"), row  # never WRONG; "ok" once per-stack masks land


@pytest.mark.slow
def test_every_registered_type_is_never_silently_wrong(tmp_path):
    rows = [coverage._timed(t, f) for t, f in sorted(coverage.model_zoo.mapping_types().items())]
    coverage.write_table(rows, tmp_path / "coverage.md")
    wrong = [r for r in rows if r["status"] in ("WRONG", "locate-crash", "stats-mismatch")]
    assert not wrong, wrong  # a site in the wrong place, or statistics that differ from float64
    causal = [r for r in rows if r["family"] == "causal_lm" and r["status"] not in ("build-failed", "forward-failed")]
    working = [r for r in causal if r["status"] in ("ok", "no-ffn")]  # measured exactly, or refused: no FFN
    assert len(working) >= 0.95 * len(causal)
