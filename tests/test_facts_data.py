"""Loading Fictional Knowledge: the real files, and corrupted copies that must name the record and field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kacq_hooks import facts
from kacq_hooks.errors import KacqError

DATA = Path(__file__).parents[1].parent / "shared/data/fictional_knowledge"
PLAIN = DATA / "fictional_knowledge.json"
PARAPHRASED = DATA / "fictional_knowledge_paraphrased.json"

needs_data = pytest.mark.skipif(not PLAIN.exists(), reason="shared Fictional Knowledge data not present")


@needs_data
@pytest.mark.parametrize("path", [PLAIN, PARAPHRASED], ids=["plain", "paraphrased"])
def test_real_file_loads_with_the_paper_split(path):
    fs = facts.load_fictional_knowledge(path)
    assert len(fs) == 130
    assert fs.indices("paraphrase") == list(range(40))
    assert fs.indices("duplication") == list(range(40, 80))
    assert fs.indices("once") == list(range(80, 120))
    assert fs.indices("unused") == list(range(120, 130))
    for record in fs:
        for kind in facts.PROBE_KINDS:
            assert len(record.probes(kind)) == 5
    n_paraphrases = [len(r.paraphrases) for r in fs]
    if path == PARAPHRASED:
        assert n_paraphrases == [9] * 40 + [0] * 90
    else:
        assert set(n_paraphrases) == {0}
    assert fs[0].mem_target[0] == "Martian cycle"


@needs_data
def test_json_lines_and_explicit_scenarios(tmp_path):
    rows = json.loads(PLAIN.read_text())[:6]
    path = tmp_path / "few.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    fs = facts.load_fictional_knowledge(path, {"duplication": [0, 1], "once": [5]})
    assert fs.scenarios == ["duplication", "duplication", "unused", "unused", "unused", "once"]
    assert facts.load_fictional_knowledge(path).scenarios == ["once"] * 6  # not 130 records: all "once"
    listed = facts.load_fictional_knowledge(path, ["paraphrase"] * 6)
    assert listed[3].train_context == rows[3]["train_context"]


def _write(tmp_path, records) -> Path:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(records))
    return path


@needs_data
@pytest.mark.parametrize(
    "corrupt, field, fragment",
    [
        (lambda r: r.pop("gen_target"), "gen_target", "missing field 'gen_target'"),
        (lambda r: r.__setitem__("mem_input", "one string"), "mem_input", "expected a list of strings"),
        (lambda r: r["hard_gen_target"].__setitem__(2, 7), "hard_gen_target", "'hard_gen_target'[2]"),
        (lambda r: r["gen_input"].pop(), "gen_target", "5 targets for 4 inputs"),
        (lambda r: r.__setitem__("train_context", ""), "train_context", "non-empty string"),
        (lambda r: r.__setitem__("paraphrases", [None]), "paraphrases", "'paraphrases'[0]"),
        (lambda r: r.__setitem__("mem_target", []), "mem_target", "the list is empty"),
    ],
)
def test_corrupted_copy_names_record_and_field(tmp_path, corrupt, field, fragment):
    records = json.loads(PARAPHRASED.read_text())
    corrupt(records[57])
    with pytest.raises(facts.FactDataError) as caught:
        facts.load_fictional_knowledge(_write(tmp_path, records))
    assert caught.value.index == 57 and caught.value.field == field
    assert "record 57" in str(caught.value) and fragment in str(caught.value)
    assert isinstance(caught.value, KacqError)


def test_not_an_object_and_broken_json_lines(tmp_path):
    with pytest.raises(facts.FactDataError, match=r"record 1: expected a JSON object"):
        facts.load_fictional_knowledge(_write(tmp_path, [_minimal(), [1]]))
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(_minimal()) + "\n{not json\n")
    with pytest.raises(facts.FactDataError, match=r"line 2 \(record 1\)"):
        facts.load_fictional_knowledge(path)


def test_missing_paths_and_bad_scenarios(tmp_path):
    with pytest.raises(facts.FactDataError, match="no file at"):
        facts.load_fictional_knowledge(tmp_path / "absent.json")
    with pytest.raises(facts.FactDataError, match="is not a file"):
        facts.load_fictional_knowledge(tmp_path)
    path = _write(tmp_path, [_minimal(), _minimal()])
    with pytest.raises(facts.FactDataError, match="names record 5"):
        facts.load_fictional_knowledge(path, {"once": [5]})
    with pytest.raises(ValueError, match="unknown scenario"):
        facts.load_fictional_knowledge(path, ["once", "sometimes"])
    with pytest.raises(facts.FactDataError, match="two scenarios"):
        facts.load_fictional_knowledge(path, {"once": [0], "duplication": [0]})


def test_hub_name_fails_clearly_when_offline(monkeypatch):
    datasets_config = pytest.importorskip("datasets.config")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(KacqError, match="kacq-test-owner/no-such-dataset"):
        facts.load_fictional_knowledge("kacq-test-owner/no-such-dataset")


def _minimal() -> dict:
    record = {"train_context": "Zorgon rules Mars.", "paraphrases": []}
    for kind in facts.PROBE_KINDS:
        record[f"{kind}_input"] = ["Zorgon rules"]
        record[f"{kind}_target"] = ["Mars"]
    return record


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00", "not UTF-8 text"),
    (b"[]", "holds no records"),
    (b"  [ ]\n", "holds no records"),
])
def test_binary_and_empty_fact_files_are_refused(tmp_path, content, message):
    path = tmp_path / "facts.json"
    path.write_bytes(content)
    with pytest.raises(facts.FactDataError, match=message):
        facts.load_fictional_knowledge(path)
