"""The Triton kernels against the torch reference, run on the CPU by Triton's interpreter.

Not collected by the main suite (the name has no ``test_`` prefix): ``TRITON_INTERPRET=1`` must be set
before triton is first imported, so ``test_kernels.py`` runs this module in a subprocess with it set.
Shapes stay small: the interpreter executes every program in numpy.
"""
from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through test_kernels.py, which sets TRITON_INTERPRET=1", allow_module_level=True)

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kacq_hooks as kh
from kacq_hooks import kernels
from kacq_hooks.kernels import reference
from kacq_hooks.kernels import triton as tk
from kacq_hooks.stats import LayerStats
from tiny_models import random_batch, tiny_model

# the interpreter evaluates masked-off lanes too (0 * inf there); the kernels never keep those values
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def coefficients(n: int, d: int, dtype=torch.float32, layout: str = "contiguous", nonfinite: bool = False,
                 seed: int = 0) -> torch.Tensor:
    """A [n, d] tensor with exact zeros (inactive neurons), optionally NaN/±Inf, in the given memory layout."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, d, generator=g) * 3
    values[torch.rand(n, d, generator=g) < 0.2] = 0.0
    if nonfinite and n * d >= 3:
        spots = torch.randperm(n * d, generator=g)[:max(3, n * d // 20)]
        values.view(-1)[spots[0::3]] = float("nan")
        values.view(-1)[spots[1::3]] = float("inf")
        values.view(-1)[spots[2::3]] = -float("inf")
    values = values.to(dtype)
    if layout == "contiguous":
        return values
    if layout == "transposed":  # column-major storage: stride (1, n)
        return values.t().contiguous().t()
    if layout == "strided":  # every other row, every third column of a larger buffer
        big = torch.zeros(2 * n, 3 * d, dtype=dtype)
        big[::2, 1::3] = values
        return big[::2, 1::3]
    raise ValueError(layout)


def row_mask(n: int, kind: str, seed: int = 0) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(n, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(n, dtype=torch.bool)
    return torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)) < 0.6


def doc_weights(n: int, rows: torch.Tensor | None, seed: int = 0) -> torch.Tensor:
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed + 2))
    return w if rows is None else w * rows


def assert_same_stats(got: LayerStats, want: LayerStats) -> None:
    for (name, mine), (_, theirs) in zip(got.buffers(), want.buffers()):
        if mine.dtype.is_floating_point:
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-4, equal_nan=False, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(mine, theirs), f"{name}: kernel {mine.tolist()} != reference {theirs.tolist()}"


def forward_both(c, rows=None, weight=None, calls: int = 1) -> tuple[LayerStats, LayerStats]:
    got, want = LayerStats(c.shape[1]), LayerStats(c.shape[1])
    for _ in range(calls):  # a second call checks that sums add up and maxima keep the larger value
        tk.accumulate_forward(c, rows, weight, got)
        reference.accumulate_forward(c, rows, weight, want)
    return got, want


CASES = [  # (n, d, dtype, layout, mask, doc, nonfinite)
    (1, 1, "fp32", "contiguous", "none", False, False),
    (1, 130, "fp32", "contiguous", "all", True, False),
    (33, 1, "fp32", "transposed", "random", False, False),
    (70, 130, "fp32", "contiguous", "random", True, True),
    (70, 130, "bf16", "contiguous", "random", False, True),
    (70, 130, "fp16", "strided", "none", True, True),
    (45, 257, "bf16", "transposed", "all", True, False),
    (45, 257, "fp32", "strided", "random", False, True),
    (64, 128, "fp32", "contiguous", "empty", True, True),
    (17, 3, "bf16", "strided", "empty", False, False),
]


@pytest.mark.parametrize("n, d, dtype, layout, mask, doc, nonfinite", CASES)
def test_forward_matches_reference(n, d, dtype, layout, mask, doc, nonfinite):
    c = coefficients(n, d, DTYPES[dtype], layout, nonfinite)
    rows = row_mask(n, mask)
    got, want = forward_both(c, rows, doc_weights(n, rows) if doc else None, calls=2)
    assert_same_stats(got, want)
    if nonfinite and mask != "empty":
        assert int(got.nonfinite.sum()) > 0  # the case really exercised the non-finite path
    if mask == "empty":
        assert int(got.tokens) == 0 and float(got.sum_abs.sum()) == 0.0


@pytest.mark.parametrize("n, d, dtype, layout, mask, doc, nonfinite", CASES)
def test_backward_matches_reference(n, d, dtype, layout, mask, doc, nonfinite):
    c = coefficients(n, d, DTYPES[dtype], layout, nonfinite)
    g = coefficients(n, d, DTYPES[dtype], "contiguous", nonfinite, seed=7)  # strides differ from c's
    rows = row_mask(n, mask)
    got, want = LayerStats(d), LayerStats(d)
    for _ in range(2):
        tk.accumulate_backward(c, g, rows, got)
        reference.accumulate_backward(c, g, rows, want)
    assert_same_stats(got, want)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(0, 80), d=st.integers(1, 200), dtype=st.sampled_from(sorted(DTYPES)),
       layout=st.sampled_from(["contiguous", "transposed", "strided"]),
       mask=st.sampled_from(["none", "all", "empty", "random"]), doc=st.booleans(), nonfinite=st.booleans(),
       seed=st.integers(0, 1000))
def test_random_shapes_match_reference(n, d, dtype, layout, mask, doc, nonfinite, seed):
    c = coefficients(n, d, DTYPES[dtype], layout, nonfinite, seed)
    rows = row_mask(n, mask, seed)
    assert_same_stats(*forward_both(c, rows, doc_weights(n, rows, seed) if doc else None))
    g = coefficients(n, d, DTYPES[dtype], "contiguous", nonfinite, seed + 1)
    got, want = LayerStats(d), LayerStats(d)
    tk.accumulate_backward(c, g, rows, got)
    reference.accumulate_backward(c, g, rows, want)
    assert_same_stats(got, want)


def test_tall_input_is_split_over_rows():
    n, d = 300, 40
    grid, rows_per_program = tk._grid(n, d, torch.device("cpu"))
    assert grid[0] == 1 and grid[1] > 1 and rows_per_program % tk.BLOCK_N == 0
    rows = row_mask(n, "random")
    assert_same_stats(*forward_both(coefficients(n, d, nonfinite=True), rows, doc_weights(n, rows)))


def test_nonfinite_values_are_counted_on_valid_rows_only():
    c = torch.ones(4, 3)
    c[0, 0], c[1, 1], c[3, 2] = float("nan"), float("inf"), -float("inf")
    rows = torch.tensor([True, True, True, False])
    got, _ = forward_both(c, rows)
    assert got.nonfinite.tolist() == [1, 1, 0]
    assert got.sum_abs.tolist() == [2.0, 2.0, 3.0] and got.active.tolist() == [2, 2, 3]
    assert got.max_abs.tolist() == [1.0, 1.0, 1.0] and int(got.tokens) == 3


def test_ops_pass_torch_library_opcheck():
    """Schema, fake tensor and mutation declarations agree with what the kernels do."""
    c, rows = coefficients(20, 9, nonfinite=True), row_mask(20, "random")
    s = LayerStats(9)
    forward_args = (c, rows, doc_weights(20, rows), s.sum_abs, s.sum_sq, s.active, s.max_abs, s.nonfinite,
                    s.tokens, s.doc_sum_abs)
    torch.library.opcheck(torch.ops.kacq.accumulate_forward.default, forward_args)
    g = coefficients(20, 9, seed=3)
    torch.library.opcheck(torch.ops.kacq.accumulate_backward.default,
                          (c, g, rows, s.grad_sum_abs, s.grad_sum_cg, s.grad_tokens))


def test_compiled_function_runs_the_op():
    """Inside a torch.compile'd function the op is kept (it mutates the buffers) and adds the same statistics."""
    got, want = LayerStats(50), LayerStats(50)

    def step(c, g, rows):
        scaled = c * 2
        tk.accumulate_forward(scaled, rows, None, got)
        tk.accumulate_backward(scaled, g, rows, got)
        return scaled.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    c, g, rows = coefficients(40, 50, nonfinite=True), coefficients(40, 50, seed=5), row_mask(40, "random")
    for _ in range(2):
        compiled(c, g, rows)
        reference.accumulate_forward(c * 2, rows, None, want)
        reference.accumulate_backward(c * 2, g, rows, want)
    assert_same_stats(got, want)


def _run_instrumented(monkeypatch, backend: str, model, ids, mask, compiled=None, **options):
    monkeypatch.setenv("KACQ_KERNELS", backend)
    assert kernels.backend_for(torch.device("cpu")) == backend
    inst = kh.instrument(model, **options)
    with inst:
        out = (model if compiled is None else compiled)(ids, attention_mask=mask, labels=ids if options.get("grads") else None)
        if options.get("grads"):
            out.loss.backward()
            model.zero_grad(set_to_none=True)
    return inst


@pytest.mark.parametrize("dtype, weighting, grads", [
    (torch.float32, "token", True),
    (torch.float32, "document", False),
    (torch.bfloat16, "token", False),
])
def test_instrumented_model_gives_the_reference_entropy(monkeypatch, dtype, weighting, grads):
    model = tiny_model("llama", dtype=dtype)
    ids, mask = random_batch(batch=3, seq=12, padding="right")
    assert (mask == 0).any()  # padding must be left out by both paths
    triton_run = _run_instrumented(monkeypatch, "triton", model, ids, mask, weighting=weighting, grads=grads)
    torch_run = _run_instrumented(monkeypatch, "torch", model, ids, mask, weighting=weighting, grads=grads)
    got, want = triton_run.knowledge_entropy(), torch_run.knowledge_entropy()
    assert got.total == pytest.approx(want.total, abs=1e-5)
    assert got.per_layer == pytest.approx(want.per_layer, abs=1e-5)
    for mine, theirs in zip(triton_run.stats, torch_run.stats):
        assert_same_stats(mine, theirs)
        assert int(mine.tokens) == int(mask.sum())
        if grads:
            assert int(mine.grad_tokens) == int(mask.sum()) and float(mine.grad_sum_abs.sum()) > 0


def test_compiled_instrumented_model_gives_the_reference_entropy(monkeypatch):
    model = tiny_model("llama")
    ids, mask = random_batch(batch=3, seq=12, padding="left")
    compiled = torch.compile(model, backend="aot_eager")
    triton_run = _run_instrumented(monkeypatch, "triton", model, ids, mask, compiled=compiled)
    torch_run = _run_instrumented(monkeypatch, "torch", model, ids, mask)
    assert triton_run.knowledge_entropy().total == pytest.approx(torch_run.knowledge_entropy().total, abs=1e-5)
    for mine, theirs in zip(triton_run.stats, torch_run.stats):
        assert_same_stats(mine, theirs)


@pytest.mark.parametrize("make_args, message", [
    (lambda s: (torch.ones(2, 4), None, None, s), "d_ff=4"),
    (lambda s: (torch.ones(2, 3, 1), None, None, s), r"\[N, d_ff\]"),
    (lambda s: (torch.ones(2, 3), torch.ones(3, dtype=torch.bool), None, s), r"bool \[2\]"),
    (lambda s: (torch.ones(2, 3), torch.ones(2), None, s), r"bool \[2\]"),
    (lambda s: (torch.ones(2, 3), None, torch.ones(5), s), r"doc_weight must have shape \[2\]"),
])
def test_bad_inputs_say_what_was_wrong(make_args, message):
    stats = LayerStats(3)
    with pytest.raises(kh.ShapeError, match=message):
        tk.accumulate_forward(*make_args(stats))
    with pytest.raises(kh.ShapeError, match="does not match"):
        tk.accumulate_backward(torch.ones(2, 3), torch.ones(3, 3), None, stats)
    assert int(stats.tokens) == 0
