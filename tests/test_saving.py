"""Saved statistics: safetensors with a JSON header, merging across processes, refusal of another model's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kacq_hooks as kh
from kacq_hooks.errors import KacqError, MissingExtraError, SavedStatsError
from kacq_hooks.saving import SavedStats, load_stats, read_header, save_stats, to_dataframe
from kacq_hooks.stats import FIELDS
from tiny_models import tiny_model

TESTS = Path(__file__).parent


def _batch(seed, rows=3, steps=10):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (rows, steps), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return ids, mask


def _measured(model, seeds, **options):
    inst = kh.instrument(model, **options)
    with torch.no_grad():
        for seed in seeds:
            ids, mask = _batch(seed)
            model(ids, attention_mask=mask)
    inst.remove()
    return inst


def _assert_same_stats(a, b):
    for la, lb in zip(a.stats, b.stats):
        for name in FIELDS:
            torch.testing.assert_close(getattr(la, name), getattr(lb, name), rtol=1e-6, atol=1e-6, msg=name)


def test_saved_statistics_round_trip_exactly_with_a_json_header(tmp_path):
    model = tiny_model("llama")
    inst = _measured(model, [0, 1], weighting="document")
    path = save_stats(inst, tmp_path / "stats.safetensors")
    header = read_header(path)
    assert header["model_type"] == "llama" and header["kacq_version"] == kh.__version__
    assert [s["path"] for s in header["sites"]] == [s.path for s in inst.sites]
    assert [s["label"] for s in header["sites"]] == [s.label for s in inst.sites]
    assert header["tokens"] == [int(s.tokens) for s in inst.stats] and header["tokens"][0] == 2 * (30 - 3)
    assert header["weighting"] == "document"
    assert b"pickle" not in path.read_bytes()[:8] and path.read_bytes()[8:9] == b"{"  # safetensors: JSON after size
    fresh = load_stats(path, kh.instrument(model))
    _assert_same_stats(fresh, inst)
    saved = load_stats(path)
    assert isinstance(saved, SavedStats)
    assert saved.knowledge_entropy().total == pytest.approx(inst.knowledge_entropy("document").total)


def test_statistics_of_another_model_are_refused(tmp_path):
    path = save_stats(_measured(tiny_model("llama"), [0]), tmp_path / "llama.safetensors")
    with pytest.raises(SavedStatsError, match="'llama' model, not 'gpt2'"):
        load_stats(path, kh.instrument(tiny_model("gpt2")))
    with pytest.raises(SavedStatsError, match="other sites"):
        load_stats(path, kh.instrument(tiny_model("llama", num_hidden_layers=3)))
    with pytest.raises(SavedStatsError, match="other sites"):
        load_stats(path, kh.instrument(tiny_model("llama", intermediate_size=48)))
    assert issubclass(SavedStatsError, KacqError)


def test_files_that_are_not_saved_statistics_are_refused(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(SavedStatsError, match="does not exist"):
        load_stats(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(SavedStatsError, match="not a safetensors file"):
        load_stats(tmp_path / "junk.safetensors")
    save_file({"w": torch.ones(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(SavedStatsError, match="model checkpoint"):
        load_stats(tmp_path / "weights.safetensors")


def test_a_file_saved_by_another_process_merges_into_one_pass(tmp_path):
    """Shard 0 measured here, shard 1 in a fresh interpreter; merged they equal one pass over both."""
    script = (
        "import sys, torch, kacq_hooks as kh\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from tiny_models import tiny_model\n"
        "from test_saving import _measured\n"
        "kh.saving.save_stats(_measured(tiny_model('llama'), [1]), sys.argv[1])\n"
    )
    other = tmp_path / "shard1.safetensors"
    result = subprocess.run([sys.executable, "-c", script, str(other), str(TESTS)], capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": f"{TESTS.parent / 'src'}:{TESTS}"})
    assert result.returncode == 0, result.stderr[-3000:]
    model = tiny_model("llama")
    here = _measured(model, [0])
    both = _measured(model, [0, 1])
    here.merge(load_stats(other))
    _assert_same_stats(here, both)
    saved = load_stats(save_stats(_measured(model, [0]), tmp_path / "shard0.safetensors")).merge(load_stats(other))
    _assert_same_stats(saved, both)
    with pytest.raises(SavedStatsError):
        saved.merge(_measured(tiny_model("gpt2"), [0]))


def test_dataframe_has_one_row_per_layer_and_neuron_with_every_statistic():
    pd = pytest.importorskip("pandas")
    inst = _measured(tiny_model("llama"), [0], grads=False)
    frame = to_dataframe(inst)
    assert len(frame) == sum(s.d_ff for s in inst.sites)
    assert set(FIELDS) | {"layer", "path", "neuron", "mean_abs"} <= set(frame.columns)
    first = frame[frame.layer == inst.sites[0].label]
    assert first.neuron.tolist() == list(range(inst.sites[0].d_ff))
    assert first.sum_abs.to_numpy() == pytest.approx(inst.stats[0].sum_abs.numpy())
    assert first.mean_abs.to_numpy() == pytest.approx(inst.mean_abs_coefficients()[0].numpy(), rel=1e-6)
    assert (first.tokens == int(inst.stats[0].tokens)).all()
    assert isinstance(frame, pd.DataFrame)


def test_dataframe_without_pandas_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # an import of pandas now raises ImportError
    with pytest.raises(MissingExtraError, match=r"kacq_hooks\[data\]"):
        to_dataframe(_measured(tiny_model("llama"), [0]))


def _hook_count(model) -> int:
    return sum(len(getattr(m, name)) for m in model.modules()
               for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def test_a_failed_load_removes_the_hooks_it_attached(tmp_path):
    path = save_stats(_measured(tiny_model("llama"), [0]), tmp_path / "llama.safetensors")
    model = tiny_model("llama", intermediate_size=48)  # other widths: the file does not fit
    before = _hook_count(model)
    with pytest.raises(SavedStatsError, match="other sites"):
        kh.Instrumentation.load(path, model)
    assert _hook_count(model) == before
    assert kh.instrumentations_of(model) == []
    fits = tiny_model("llama")  # a load that succeeds keeps its hooks
    assert kh.Instrumentation.load(path, fits).attached and _hook_count(fits) > 0


def _rewritten(path, out, header=None, tensors=None):
    """``path`` written again to ``out`` with header entries and tensors replaced."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["kacq_hooks"])
    state = {**load_file(str(path)), **(tensors or {})}
    save_file(state, str(out), metadata={"kacq_hooks": json.dumps({**meta, **(header or {})})})
    return out


@pytest.mark.parametrize("field", ["tokens", "grad_tokens", "documents"])
def test_a_file_whose_header_counts_disagree_with_its_tensors_is_refused(tmp_path, field):
    model = tiny_model("llama")
    path = save_stats(_measured(model, [0], weighting="document"), tmp_path / "stats.safetensors")
    header = read_header(path)
    wrong = list(header[field])
    wrong[1] += 5
    edited = _rewritten(path, tmp_path / "header.safetensors", header={field: wrong})
    for attempt in (lambda: load_stats(edited), lambda: load_stats(edited, kh.instrument(model, weighting="document"))):
        with pytest.raises(SavedStatsError, match=rf"header\.safetensors.*{field}.*layer 1.*{wrong[1]}"):
            attempt()
    # the same disagreement made on the tensor side, and a header list of the wrong length
    edited = _rewritten(path, tmp_path / "tensor.safetensors",
                        tensors={f"0.{field}": torch.tensor(header[field][0] + 7, dtype=torch.int64)})
    with pytest.raises(SavedStatsError, match=rf"tensor\.safetensors.*{field}"):
        load_stats(edited)
    edited = _rewritten(path, tmp_path / "short.safetensors", header={field: header[field][:1]})
    with pytest.raises(SavedStatsError, match=rf"short\.safetensors.*{field}"):
        load_stats(edited)


def test_a_file_whose_tensors_do_not_fit_its_sites_names_the_file(tmp_path):
    path = save_stats(_measured(tiny_model("llama"), [0]), tmp_path / "stats.safetensors")
    edited = _rewritten(path, tmp_path / "narrow.safetensors", tensors={"0.sum_abs": torch.zeros(3)})
    with pytest.raises(SavedStatsError, match=r"narrow\.safetensors.*layer 0 sum_abs"):
        load_stats(edited)


def test_knowledge_entropy_reads_measurements_by_their_interface_and_refuses_look_alikes(tmp_path):
    model = tiny_model("llama")
    inst = _measured(model, [0])
    saved = load_stats(save_stats(inst, tmp_path / "stats.safetensors"))
    from_inst, from_saved = kh.knowledge_entropy(inst), kh.knowledge_entropy(saved)
    assert from_inst.per_layer == from_saved.per_layer == inst.knowledge_entropy().per_layer
    assert from_inst.labels == from_saved.labels == inst.labels  # the file's site records hold the labels

    class LookAlike:  # an object that merely has a ``stats`` attribute is not a measurement
        stats = inst.stats

    with pytest.raises(kh.ShapeError, match="knowledge_entropy takes"):
        kh.knowledge_entropy(LookAlike())
