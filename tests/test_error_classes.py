"""Each refusal raises the narrowest KacqError subclass, so callers can catch what they can act on.

Every case provokes the refusal on real objects (tiny transformers models, a real one-rank gloo group, a real
child process) and asserts the exact class, not only that it is a KacqError.
"""
from __future__ import annotations

import pytest
import torch

import kacq_hooks as kh
from kacq_hooks import bench, errors
from kacq_hooks.errors import (BenchmarkError, ConfigError, LocateError, NoTokensError, ShapeError, StateError)
from kacq_hooks.interventions import sparse_memory
from kacq_hooks.saving import SavedStats, to_dataframe
from kacq_hooks.stats import CoefficientStats
from tiny_models import random_batch, tiny_model


def _raises_exactly(kind, fn, match: str):
    with pytest.raises(kh.KacqError, match=match) as caught:
        fn()
    assert type(caught.value) is kind, f"{type(caught.value).__name__}: {caught.value}"
    return caught.value


def _measured(weighting="token", **options):
    model = tiny_model("llama")
    inst = kh.instrument(model, weighting=weighting, **options)
    ids, mask = random_batch(batch=2, seq=6)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    return model, inst


def test_document_entropy_of_token_weighted_statistics_is_a_config_error():
    _, inst = _measured()
    _raises_exactly(ConfigError, lambda: inst.mean_abs_coefficients("document"), "document-weighted sums")


def test_results_before_any_forward_are_a_no_tokens_error():
    inst = kh.instrument(tiny_model("llama"))
    _raises_exactly(NoTokensError, inst.mean_abs_coefficients, "no tokens have been recorded")
    _raises_exactly(NoTokensError, inst.activity_frequency, "no tokens have been recorded")


def test_reducing_twice_and_measuring_after_a_reduce_are_state_errors(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model, inst = _measured()
        inst.all_reduce()
        _raises_exactly(StateError, inst.all_reduce, "already combined across ranks")
        ids, mask = random_batch(batch=2, seq=6)
        with torch.no_grad():
            _raises_exactly(StateError, lambda: model(ids, attention_mask=mask), "combined across ranks")
        inst.reset()
        with torch.no_grad():
            model(ids, attention_mask=mask)  # measured again after reset()
        assert int(inst.stats[0].tokens) == int(mask.sum())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_a_layer_called_on_its_own_is_a_state_error(model_type):
    model = tiny_model(model_type)
    inst = kh.instrument(model)
    hidden = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        _raises_exactly(StateError, lambda: model.model.layers[0].mlp(hidden), "ran outside a call")
        with inst.pause():
            model.model.layers[0].mlp(hidden)  # what the message offers instead


def test_experts_coefficients_outside_their_layers_forward_are_a_state_error():
    # the experts tap's callback with no call open: the check behind the layer's own pre-hook
    model = tiny_model("mixtral")
    inst = kh.instrument(model)
    index = next(i for i, site in enumerate(inst.sites) if site.kind == "experts")
    c = torch.randn(3, inst.sites[index].expert_d_ff)
    with torch.no_grad():
        _raises_exactly(StateError, lambda: inst._capture.on_routed(index, torch.zeros(3, dtype=torch.long),
                                                                    torch.arange(3), torch.ones(3), c),
                        "ran outside a forward of their layer")


def test_a_layer_shared_across_depth_is_a_locate_error():
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model("albert", vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                               intermediate_size=64, embedding_size=16)
    model = AutoModel.from_config(cfg).eval()
    kh.instrument(model, mlp_out="encoder.albert_layer_groups.{i}.albert_layers.0.ffn_output")
    with torch.no_grad():
        _raises_exactly(LocateError, lambda: model(torch.randint(3, 128, (2, 6))), "times in one forward")


def test_one_backward_over_two_reentrant_checkpointed_forwards_is_a_config_error():
    model = tiny_model("llama").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    kh.instrument(model, grads=True)
    ids, mask = random_batch(batch=2, seq=6)
    first = model(ids, attention_mask=mask, labels=ids).loss
    second = model(ids, attention_mask=mask, labels=ids).loss
    _raises_exactly(ConfigError, lambda: (first + second).backward(), "recomputes 2 counted forwards")


def test_document_weighting_of_cached_generation_is_a_config_error():
    model = tiny_model("llama").eval()
    kh.instrument(model, weighting="document")
    ids = torch.randint(3, 100, (1, 5))
    with torch.no_grad():
        past = model(ids, use_cache=True).past_key_values
        _raises_exactly(ConfigError, lambda: model(ids[:, -1:], past_key_values=past, use_cache=True),
                        "document weighting needs each document whole")


def test_fp16_gradients_without_a_declared_loss_scale_are_a_state_error():
    model = tiny_model("llama").train()
    inst = kh.instrument(model, grads=True)
    ids, mask = random_batch(batch=2, seq=8)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    _raises_exactly(StateError, inst.mean_abs_gradients, "without a declared loss scale")


def test_sparse_memory_backward_without_a_forward_is_a_state_error():
    model = tiny_model("llama").train()
    ids, mask = random_batch(batch=2, seq=8)
    with kh.instrument(model) as reference, torch.no_grad():
        model(ids, attention_mask=mask)
    loss = model(ids, attention_mask=mask, labels=ids).loss  # computed before sparse_memory() was called
    handle = sparse_memory(model, reference=reference, top=4)
    try:
        _raises_exactly(StateError, loss.backward, "follows no forward with gradients enabled")
    finally:
        handle.remove()


def test_tabulating_statistics_of_no_sites_is_a_locate_error():
    pytest.importorskip("pandas")
    empty = SavedStats(CoefficientStats([], []), [], {"model_type": "llama"})
    _raises_exactly(LocateError, lambda: to_dataframe(empty), "no instrumented sites")


def test_a_triton_kernel_whose_buffers_differ_from_the_statistics_table_is_a_shape_error():
    pytest.importorskip("triton")
    from kacq_hooks import stats as S
    from kacq_hooks.kernels import triton as kt

    def wrong(c, rows, doc_weight, sum_abs, sum_sq) -> None:  # misses the table's later statistics
        pass

    _raises_exactly(ShapeError, lambda: kt._custom_op("kacq_test::wrong_buffers", S.FORWARD)(wrong),
                    "statistics table")


def test_a_failing_measuring_child_is_a_benchmark_error(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import sys\nsys.exit('the child could not build its model')\n")
    error = _raises_exactly(BenchmarkError, lambda: bench.peak_in_subprocess(script, []), "measuring child")
    assert "could not build its model" in str(error)


def test_state_errors_are_kacq_errors_and_not_runtime_errors():
    # raised inside hooks: a caller's `except RuntimeError` (an out-of-memory retry) must not swallow them
    assert issubclass(errors.StateError, errors.KacqError) and not issubclass(errors.StateError, RuntimeError)
