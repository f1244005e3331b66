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
# Each stack measured under its own mask, sequence-first layouts, a multimodal language tower.
PER_STACK = ("t5", "bart", "xlnet", "gemma3", "encoder-decoder")


@pytest.mark.parametrize("model_type", PER_STACK)
def test_encoder_decoder_seq_first_and_multimodal_statistics_are_right(model_type):
    row = coverage.check(model_type)
    assert row["status"] == "ok", row


@pytest.mark.slow
def test_every_registered_type_is_never_silently_wrong(tmp_path):
    families = ("causal_lm", "seq2seq_lm", "masked_lm")  # the table in docs/coverage.md; base models: not yet
    rows = [coverage._timed(t, f) for t, f in sorted(coverage.model_zoo.mapping_types().items()) if f in families]
    coverage.write_table(rows, tmp_path / "coverage.md")
    wrong = [r for r in rows if r["status"] in ("WRONG", "locate-crash", "stats-mismatch")]
    assert not wrong, wrong  # a site in the wrong place, or statistics that differ from float64
    causal = [r for r in rows if r["family"] == "causal_lm" and r["status"] not in ("build-failed", "forward-failed")]
    working = [r for r in causal if r["status"] in ("ok", "no-ffn")]  # measured exactly, or refused: no FFN
    assert len(working) >= 0.95 * len(causal)


def test_the_setups_section_of_the_coverage_doc_is_current_and_names_real_tests():
    doc = (Path(__file__).parents[1] / "docs" / "coverage.md").read_text()
    assert "\n".join(coverage.setups_section()) in doc  # regenerate with scripts/coverage.py --setups-only
    for row in coverage.SETUPS:
        assert (Path(__file__).parents[1] / row[-1]).is_file(), row
