"""Routed experts' dL/dC statistics on the CPU (kernels.experts_cpu.accumulate_experts_backward): each expert's rows
in one pass of the dense backward kernel into its slots. Checked against sums formed here in float64 from the
contract (sum |g| and sum C*g over the kept, finite elements of each expert's rows), for the three row orders the
experts implementations hand (eager: one expert; grouped_mm: sorted; batched_mm: token order), and end to end on a
Mixtral training step against the reference arithmetic (KACQ_KERNELS=torch)."""
from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import kacq_hooks as kh
from kacq_hooks.errors import ExpertIdError, ShapeError
from kacq_hooks.kernels import experts_cpu, native, reference
from kacq_hooks.stats import LayerStats

E, M, N = 5, 24, 90


def _native_or_skip():
    if native.library() is None:
        pytest.skip("no C compiler here: " + str(native.unavailable_reason()))


def _rows(order: str, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(N, M, generator=g)
    c[c.abs() < 0.3] = 0
    grad = torch.randn(N, M, generator=g) * 1e-3
    if order == "one expert":
        ids = torch.full((N,), 3)
    else:
        ids = torch.randint(0, E, (N,), generator=g)
        ids[ids == 1] = 2  # an expert with no row
        if order == "sorted":
            ids = ids.sort().values
    keep = torch.rand(N, generator=g) > 0.25
    return c.to(dtype), grad.to(dtype), ids, keep


def _float64(c, grad, ids, keep):
    c, grad = c.double(), grad.double()
    ok = torch.isfinite(c) & torch.isfinite(grad) & keep[:, None]
    sum_abs = torch.zeros(E, M, dtype=torch.float64).index_add_(0, ids, torch.where(ok, grad.abs(), 0.0))
    sum_cg = torch.zeros(E, M, dtype=torch.float64).index_add_(0, ids, torch.where(ok, c * grad, 0.0))
    return sum_abs.reshape(-1), sum_cg.reshape(-1)


def _stats(shared: int = 7) -> LayerStats:
    return LayerStats(E * M + shared)  # a shared expert's slots after the routed ones must stay untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("order", ["one expert", "sorted", "token order"])
def test_routed_gradient_sums_equal_float64(order, dtype):
    _native_or_skip()
    c, grad, ids, keep = _rows(order, dtype)
    out = _stats()
    experts_cpu.accumulate_experts_backward(c, grad, ids, keep, out, E)
    experts_cpu.accumulate_experts_backward(c, grad, ids, keep, out, E)  # a second call adds
    want_abs, want_cg = _float64(c, grad, ids, keep)
    torch.testing.assert_close(out.grad_sum_abs[:E * M].double(), 2 * want_abs, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out.grad_sum_cg[:E * M].double(), 2 * want_cg, rtol=1e-5, atol=1e-9)
    assert not out.grad_sum_abs[E * M:].any() and not out.grad_sum_cg[E * M:].any()
    assert int(out.grad_tokens) == 0  # a layer's gradient tokens are the caller's to count, once per call


@pytest.mark.parametrize("order", ["one expert", "sorted", "token order"])
def test_a_nan_in_one_experts_rows_is_kept_out_as_the_reference_keeps_it(order):
    _native_or_skip()
    c, grad, ids, keep = _rows(order)
    row = int(torch.nonzero(keep)[3])
    grad[row, 5] = float("nan")
    c[row + 1, 2] = float("inf")
    got, want = _stats(), _stats()
    experts_cpu.accumulate_experts_backward(c, grad, ids, keep, got, E)
    reference.accumulate_experts_backward(c, grad, ids, keep, want, E)
    assert torch.isfinite(got.grad_sum_abs).all()
    torch.testing.assert_close(got.grad_sum_abs, want.grad_sum_abs, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got.grad_sum_cg, want.grad_sum_cg, rtol=1e-5, atol=1e-9)


def test_strided_and_half_blocks_go_to_the_reference_with_the_same_numbers():
    c, grad, ids, keep = _rows("sorted")
    wide = torch.randn(N, 2 * M)
    wide[:, ::2] = grad
    for args in ((c, wide[:, ::2]), (c.half(), grad.half())):
        got, want = _stats(), _stats()
        experts_cpu.accumulate_experts_backward(*args, ids, keep, got, E)
        reference.accumulate_experts_backward(*args, ids, keep, want, E)
        torch.testing.assert_close(got.grad_sum_abs, want.grad_sum_abs, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("bad_id", [-1, E])
def test_an_expert_id_outside_the_layer_is_refused_not_written_into_the_shared_slots(bad_id):
    c, grad, ids, keep = _rows("token order")
    ids[7] = bad_id
    out = _stats()
    with pytest.raises(ExpertIdError, match=f"expert {bad_id}"):
        experts_cpu.accumulate_experts_backward(c, grad, ids, keep, out, E)
    assert not out.grad_sum_abs.any()


@pytest.mark.parametrize("what", ["grad", "ids", "keep"])
def test_rows_of_another_length_are_refused(what):
    c, grad, ids, keep = _rows("sorted")
    args = {"grad": grad[:-1], "ids": ids[:-1], "keep": keep[:-1]}
    call = [c, args.get("grad", grad) if what == "grad" else grad, args["ids"] if what == "ids" else ids,
            args["keep"] if what == "keep" else keep]
    with pytest.raises(ShapeError):
        experts_cpu.accumulate_experts_backward(*call, _stats(), E)


def _mixtral(impl):
    config = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           experts_implementation=impl)
    torch.manual_seed(0)
    return MixtralForCausalLM(config)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_a_training_step_gives_the_reference_gradient_statistics(impl, monkeypatch):
    """The whole path: the experts' tensor hooks hand dL/dC to the kernel; the reference arithmetic
    (KACQ_KERNELS=torch) must give the same sums, and the gradient tokens are counted once per layer."""
    _native_or_skip()
    ids = torch.randint(0, 96, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    got = {}
    for kernels in ("auto", "torch"):
        monkeypatch.setenv("KACQ_KERNELS", kernels)
        model = _mixtral(impl).train()
        inst = kh.instrument(model, grads=True)
        with inst:
            model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        got[kernels] = [(layer.grad_sum_abs.clone(), layer.grad_sum_cg.clone(), int(layer.grad_tokens))
                        for layer in inst.stats.layers]
        inst.remove()
    for (abs_a, cg_a, tokens_a), (abs_b, cg_b, tokens_b) in zip(got["auto"], got["torch"]):
        assert tokens_a == tokens_b == int(mask.sum())
        assert abs_a.abs().sum() > 0
        torch.testing.assert_close(abs_a, abs_b, rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(cg_a, cg_b, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_the_training_step_uses_the_kernel_not_the_reference(family, monkeypatch):
    _native_or_skip()
    import model_zoo
    calls = []
    for name in ("accumulate_experts_backward", "accumulate_slice_backward"):
        real = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    model = _mixtral("grouped_mm").train() if family == "mixtral" else model_zoo.build(family).train()
    ids = torch.randint(0, 64, (2, 9))
    with kh.instrument(model, grads=True):
        model(ids, labels=ids).loss.backward()
    assert calls == []


@pytest.mark.parametrize("rows", ["all", "masked"])
def test_a_shared_experts_gradient_slice_equals_float64_and_leaves_the_other_slots(rows):
    _native_or_skip()
    c, grad, _, keep = _rows("sorted")
    valid = None if rows == "all" else keep
    out = _stats(shared=M)
    experts_cpu.accumulate_slice_backward(c, grad, valid, out, E * M)
    ok = torch.ones(N, dtype=torch.bool) if valid is None else valid
    want_abs = torch.where(ok[:, None], grad.double().abs(), 0.0).sum(0)
    want_cg = torch.where(ok[:, None], c.double() * grad.double(), 0.0).sum(0)
    torch.testing.assert_close(out.grad_sum_abs[E * M:].double(), want_abs, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out.grad_sum_cg[E * M:].double(), want_cg, rtol=1e-5, atol=1e-9)
    assert not out.grad_sum_abs[:E * M].any() and int(out.grad_tokens) == 0
    with pytest.raises(ShapeError, match="outside"):  # the kernel would write past the buffers
        experts_cpu.accumulate_slice_backward(c, grad, valid, out, E * M + 1)


def test_a_qwen2_moe_training_step_gives_the_reference_shared_gradient_statistics(monkeypatch):
    _native_or_skip()
    import model_zoo
    ids = torch.randint(0, 64, (2, 9))
    got = {}
    for kernels in ("auto", "torch"):
        monkeypatch.setenv("KACQ_KERNELS", kernels)
        model = model_zoo.build("qwen2_moe").train()
        inst = kh.instrument(model, grads=True)
        with inst:
            model(ids, labels=ids).loss.backward()
        got[kernels] = [layer.grad_sum_cg.clone() for layer in inst.stats.layers]
        inst.remove()
    for a, b in zip(got["auto"], got["torch"]):
        assert a[-8:].abs().sum() > 0  # the shared expert's slots saw gradients
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("mask", ["one short", "one entry", "twice as long", "a column"])
def test_a_shared_experts_row_mask_of_another_length_is_refused_not_read_past(mask):
    """The kernel reads n bytes of the row mask: a shorter one would be read past its end (one entry: the
    reference broadcasts it, the kernel read garbage after it), a longer one silently cut; both are refused."""
    c, grad, _, keep = _rows("sorted")
    rows = {"one short": keep[:-1], "one entry": keep[:1], "twice as long": torch.cat([keep, keep]),
            "a column": keep[:, None]}[mask]
    out = _stats(shared=M)
    with pytest.raises(ShapeError, match="row mask"):
        experts_cpu.accumulate_slice_backward(c, grad, rows, out, E * M)
    assert not out.grad_sum_abs.any() and not out.grad_sum_cg.any()


def test_routed_rows_without_a_row_mask_are_all_kept_as_the_reference_keeps_them():
    c, grad, ids, _ = _rows("token order")
    got, want = _stats(), _stats()
    experts_cpu.accumulate_experts_backward(c, grad, ids, None, got, E)
    reference.accumulate_experts_backward(c, grad, ids, None, want, E)
    assert got.grad_sum_abs.any()
    torch.testing.assert_close(got.grad_sum_abs, want.grad_sum_abs, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got.grad_sum_cg, want.grad_sum_cg, rtol=1e-4, atol=1e-9)
