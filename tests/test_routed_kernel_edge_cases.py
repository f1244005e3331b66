"""Hostile checks of the routed-experts C kernel (kacq_routed), each against a float64 reference written here:
C of every expert recomputed from the experts' own 3-D weights on the rows plain pre-hooks saw, the
routing weights and ids taken from the experts module's own inputs, and per-slot sums of |w C|, (w C)^2,
max, active counts, document-weighted sums and the routed |C| and loads formed in float64."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import kacq_hooks as kh
import model_zoo
from kacq_hooks.errors import ShapeError, StatisticsOverflowError
from kacq_hooks.kernels import experts_cpu, native, reference
from kacq_hooks.stats import LayerStats

torch.set_num_threads(1)

FLOATS = ("sum_abs", "sum_sq", "max_abs", "doc_sum_abs", "routed_sum_abs")
COUNTS = ("active", "routed_tokens", "nonfinite")
EXPERT_KEY = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "olmoe": "num_experts",
              "deepseek_v3": "n_routed_experts", "gpt_oss": "num_local_experts"}
MODEL_OVERRIDES = {"deepseek_v3": {"num_key_value_heads": 4}}  # the zoo's 2 kv heads break its sdpa mask


def _native_or_skip():
    if native.library() is None:
        pytest.skip("no C compiler here: " + str(native.unavailable_reason()))


# -- the float64 reference -----------------------------------------------------------------------------------

def reference64(c, ids, weight, keep, doc, experts):
    """Per slot of ``experts`` x m, in float64, from the routed rows as the contract states them."""
    n, m = c.shape
    a = c.double().abs()
    finite = torch.isfinite(a)
    raw = torch.where(finite & keep[:, None], a, 0.0)
    eff = raw * weight.double().abs()[:, None]
    routed = keep & (weight != 0)
    out = {name: torch.zeros(experts, m, dtype=torch.float64) for name in FLOATS}
    out.update({name: torch.zeros(experts, m, dtype=torch.long) for name in COUNTS})
    for r in range(n):
        e = int(ids[r])
        out["sum_abs"][e] += eff[r]
        out["sum_sq"][e] += eff[r] ** 2
        out["max_abs"][e] = torch.maximum(out["max_abs"][e], eff[r])
        out["active"][e] += (eff[r] > 0).long()
        out["nonfinite"][e] += (~finite[r] & keep[r]).long()
        if doc is not None:
            out["doc_sum_abs"][e] += eff[r] * float(doc[r])
        if routed[r]:
            out["routed_sum_abs"][e] += raw[r]
            out["routed_tokens"][e] += 1
    return {name: value.reshape(-1) for name, value in out.items()}


def assert_matches(out, want, rtol=1e-5, atol=1e-30, docs=True):
    for name, value in want.items():
        if name == "doc_sum_abs" and not docs:
            continue
        got = getattr(out, name)[: value.numel()]
        if value.dtype.is_floating_point:
            torch.testing.assert_close(got.double(), value, rtol=rtol, atol=atol, msg=name)
        else:
            assert torch.equal(got, value), (name, got.tolist()[:8], value.tolist()[:8])


def rows(n, m, experts, order="tokens", dtype=torch.float32, seed=0, keep_p=0.8):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, m, generator=g).to(dtype)
    c[c.abs() < 0.05] = 0
    ids = torch.randint(0, experts, (n,), generator=g)
    if order == "sorted":
        ids = ids.sort().values
    weight = torch.rand(n, generator=g)
    weight[::9] = 0
    keep = torch.rand(n, generator=g) < keep_p
    doc = torch.rand(n, generator=g)
    return c, ids, weight, keep, doc


def kernel(c, ids, weight, keep, doc, experts, slots=None):
    out = LayerStats(slots or experts * c.shape[1])
    experts_cpu.accumulate_experts(c, ids, weight, keep, doc, out, experts)
    return out


# -- the kernel itself against float64 -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("order", ["tokens", "sorted"])
@pytest.mark.parametrize("docs", [False, True])
def test_kernel_equals_float64(dtype, order, docs):
    _native_or_skip()
    c, ids, weight, keep, doc = rows(600, 24, 6, order, dtype)  # several CHUNKs of rows per expert
    doc = doc if docs else None
    assert_matches(kernel(c, ids, weight, keep, doc, 6), reference64(c, ids, weight, keep, doc, 6), docs=docs)


@pytest.mark.parametrize("layout", ["column_slice", "every_other_row", "broadcast_row", "transposed",
                                    "one_column_strided", "strided_extras", "negative_weights",
                                    "bf16_weights_int32_ids", "fp16_c"])
def test_kernel_reads_odd_layouts_as_float64(layout):
    g = torch.Generator().manual_seed(5)
    n, m, e = 80, 8, 4
    c, ids, weight, keep, doc = rows(n, m, e, seed=5)
    if layout == "column_slice":
        c = torch.randn(n, m + 7, generator=g)[:, 3:3 + m]
    elif layout == "every_other_row":
        c = torch.randn(2 * n, m, generator=g)[::2]
    elif layout == "broadcast_row":
        c = torch.randn(1, m, generator=g).expand(n, m)
    elif layout == "transposed":
        c = torch.randn(m, n, generator=g).t()
    elif layout == "one_column_strided":
        c = torch.randn(1, n, generator=g).t()
    elif layout == "strided_extras":
        ids = torch.randint(0, e, (2 * n,), generator=g)[::2]
        weight = torch.rand(2 * n, generator=g)[::2]
        keep = (torch.rand(2 * n, generator=g) > 0.3)[::2]
        doc = torch.rand(2 * n, generator=g)[::2]
    elif layout == "negative_weights":
        weight = -weight
    elif layout == "bf16_weights_int32_ids":
        weight, ids = weight.bfloat16(), ids.int()
    elif layout == "fp16_c":
        c = c.half()
    assert_matches(kernel(c, ids, weight, keep, doc, e), reference64(c, ids, weight, keep, doc, e))


@pytest.mark.parametrize("shape", ["one_row_many_experts", "one_expert_gets_all", "last_expert_only",
                                   "wider_than_a_tile", "all_padded"])
def test_kernel_routing_shapes_as_float64(shape):
    n, m, e = {"one_row_many_experts": (1, 8, 64), "wider_than_a_tile": (20, 4100, 3)}.get(shape, (300, 8, 4))
    c, ids, weight, keep, doc = rows(n, m, e, seed=2)
    if shape == "one_row_many_experts":
        keep[:] = True
        weight[:] = 0.5
    elif shape == "one_expert_gets_all":
        ids[:] = 1
    elif shape == "last_expert_only":
        ids[:] = e - 1
    elif shape == "all_padded":
        keep[:] = False
    out = kernel(c, ids, weight, keep, doc, e)
    assert_matches(out, reference64(c, ids, weight, keep, doc, e))
    if shape == "all_padded":
        assert all(not bool(b.any()) for _, b in out.buffers())


def test_many_calls_accumulate_as_one_float64_sum():
    _native_or_skip()
    c, ids, weight, keep, doc = rows(900, 16, 5, seed=7)
    out = LayerStats(5 * 16)
    for start in range(0, 900, 37):
        part = slice(start, start + 37)
        experts_cpu.accumulate_experts(c[part], ids[part], weight[part], keep[part], doc[part], out, 5)
    assert_matches(out, reference64(c, ids, weight, keep, doc, 5))


def test_thread_count_does_not_change_a_bit_and_both_equal_float64():
    """n x m past the kernel's OpenMP threshold (65536), so two threads really split the columns."""
    _native_or_skip()
    c, ids, weight, keep, doc = rows(3000, 64, 8, seed=3)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(kernel(c, ids, weight, keep, doc, 8))
    finally:
        torch.set_num_threads(threads)
    for (name, a), (_, b) in zip(results[0].buffers(), results[1].buffers()):
        assert torch.equal(a, b), name
    assert_matches(results[1], reference64(c, ids, weight, keep, doc, 8))


@pytest.mark.parametrize("scale", [1e-30, 1e18])
def test_tiny_and_large_magnitudes_as_float64(scale):
    """|w C| down to ~1e-40 (fp32 subnormals: still active) and up to 1e18 (squares near fp32's top)."""
    c, ids, weight, keep, doc = rows(300, 8, 4, seed=4)
    c = c * scale
    weight = weight * (1e-10 if scale < 1 else 1.0)
    out = kernel(c, ids, weight, keep, doc, 4)
    assert_matches(out, reference64(c, ids, weight, keep, doc, 4), rtol=1e-4)
    out.check_finite()


def test_a_sum_past_fp32_is_refused_not_reported():
    c, ids, weight, keep, doc = rows(600, 8, 4, seed=6)
    c = c.abs() * 1e36 + 1e36  # each square overflows fp32: sum_sq cannot be held
    weight[:] = 1.0
    keep[:] = True
    out = kernel(c, ids, weight, keep, doc, 4)
    with pytest.raises(StatisticsOverflowError, match="overflowed"):
        out.check_finite()


def test_nan_and_inf_in_one_row_are_counted_and_kept_out_of_the_sums():
    c, ids, weight, keep, doc = rows(200, 8, 4, seed=8)
    c[5, 3], c[9, 0] = float("nan"), float("inf")
    keep[5] = keep[9] = True
    weight[9] = 0.0  # an unrouted pair with Inf: Inf * 0 must not leak a NaN into the sums
    out = kernel(c, ids, weight, keep, doc, 4)
    assert int(out.nonfinite.sum()) == 2
    assert_matches(out, reference64(c, ids, weight, keep, doc, 4))


def test_a_deep_copied_statistics_object_is_written_not_the_original():
    _native_or_skip()
    c, ids, weight, keep, doc = rows(200, 8, 4, seed=9)
    first = kernel(c, ids, weight, keep, doc, 4)
    before = {name: b.clone() for name, b in first.buffers()}
    second = copy.deepcopy(first)
    experts_cpu.accumulate_experts(c, ids, weight, keep, doc, second, 4)
    assert all(torch.equal(b, before[name]) for name, b in first.buffers())
    want = reference64(c, ids, weight, keep, doc, 4)
    assert_matches(second, {k: (v if k == "max_abs" else 2 * v) for k, v in want.items()})


# -- defects -------------------------------------------------------------------------------------------------

def test_float64_routing_weights_below_fp32_still_route_their_token():
    """A float64 routing weight too small for fp32 (1e-50) is still a routed pair (weight != 0): the reference
    counts its token and its |C| in routed_tokens / routed_sum_abs. The kernel converted weights to fp32
    first, read 0 and dropped the pair."""
    c, ids, weight, keep, doc = rows(40, 4, 2, seed=1)
    keep[:] = True
    weight = weight.double()
    weight[0] = 1e-50
    out = kernel(c, ids, weight, keep, doc, 2)
    want = reference64(c, ids, weight, keep, doc, 2)
    for name in ("routed_tokens", "routed_sum_abs"):
        torch.testing.assert_close(getattr(out, name).double(), want[name].to(torch.float64), rtol=1e-5, atol=0,
                                   msg=name)
    lib_reference = LayerStats(2 * 4)
    reference.accumulate_experts(c, ids, weight, keep, doc, lib_reference, 2)
    assert torch.equal(out.routed_tokens, lib_reference.routed_tokens)


@pytest.mark.parametrize("bad_id", [4, -1])
def test_an_expert_id_outside_the_layer_is_refused_not_written_into_the_shared_slots(bad_id):
    """Slots after experts x m belong to the shared expert. The kernel saw the bad id (and wrote nothing) but
    handed the rows to the per-expert loop, which put expert 4's sums into the shared slots."""
    c, ids, weight, keep, doc = rows(30, 6, 4, seed=3)
    ids[7] = bad_id
    out = LayerStats(4 * 6 + 6)
    with pytest.raises(ShapeError, match="outside"):
        experts_cpu.accumulate_experts(c, ids, weight, keep, doc, out, 4)
    assert all(not bool(b.any()) for _, b in out.buffers())


@pytest.mark.parametrize("what", ["ids", "weight", "keep", "doc"])
@pytest.mark.parametrize("length", [1, 39, 41])
def test_routing_tensors_of_another_length_than_c_are_refused(what, length):
    """The kernel hands rows whose ids, weights, mask or document weights do not match C's rows to the slower
    paths, which broadcast or index them: one id for 40 rows added nothing, 39 ids dropped a row's expert,
    41 weights were read through the grouped order. All are refused before anything is added."""
    c, ids, weight, keep, doc = rows(40, 4, 2, seed=1)
    args = dict(ids=ids, weight=weight, keep=keep, doc=doc)
    t = args[what]
    args[what] = t[:length] if length <= 40 else torch.cat([t, t[:1]])
    out = LayerStats(2 * 4)
    with pytest.raises(ShapeError, match="rows"):
        experts_cpu.accumulate_experts(c, args["ids"], args["weight"], args["keep"], args["doc"], out, 2)
    assert all(not bool(b.any()) for _, b in out.buffers())


# -- real models -----------------------------------------------------------------------------------------------

def expert_c64(mod, x, e):
    """C of expert ``e`` on rows ``x``, in float64, from the module's 3-D weights."""
    x = x.double()
    gated = hasattr(mod, "gate_up_proj")
    w = (mod.gate_up_proj if gated else mod.up_proj)[e].double()
    h = x @ w if getattr(mod, "is_transposed", False) else x @ w.T
    bias = getattr(mod, "gate_up_proj_bias" if gated else "up_proj_bias", None)
    if bias is not None and getattr(mod, "has_bias", True):
        h = h + bias[e].double()
    if not gated:
        return mod.act_fn(h)
    own_gate = type(mod).__dict__.get("_apply_gate")  # GPT-OSS: clamped, interleaved, with its own alpha
    if own_gate is not None:
        return own_gate(mod, h)
    gate, up = h.chunk(2, -1) if getattr(mod, "is_concatenated", True) else (h[..., 0::2], h[..., 1::2])
    return mod.act_fn(gate) * up


def _model(model_type, dtype=torch.float32, **overrides):
    cfg = copy.deepcopy(model_zoo.tiny_config(model_type))
    for key, value in {**MODEL_OVERRIDES.get(model_type, {}), **overrides}.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_zoo.auto_class(model_type).from_config(cfg).eval().to(dtype)


def _batch(vocab, batch=3, seq=9, padding="right"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, min(vocab, 300), (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch >= 3:
        if padding == "right":
            mask[1, -4:], mask[2, -1:] = 0, 0
        else:
            mask[1, :4], mask[2, :1] = 0, 0
    return ids, mask


def _model_reference(site_modules, inputs, valid, doc_weight, calls):
    """Per experts module: the float64 slot statistics of ``calls`` identical forwards."""
    wants = []
    for mod, (x, index, weight) in zip(site_modules, inputs):
        x = x.reshape(-1, x.shape[-1])
        index, weight = index.reshape(-1, index.shape[-1]), weight.reshape(-1, weight.shape[-1])
        experts = mod.num_experts
        flat_c, flat_ids, flat_w, flat_keep, flat_doc = [], [], [], [], []
        for e in range(experts):
            for k in range(index.shape[1]):
                picked = index[:, k] == e
                if not picked.any():
                    continue
                flat_c.append(expert_c64(mod, x[picked], e))
                flat_ids.append(torch.full((int(picked.sum()),), e))
                flat_w.append(weight[picked, k].double())
                flat_keep.append(valid[picked])
                flat_doc.append(doc_weight[picked])
        c = torch.cat(flat_c)
        want = reference64(c, torch.cat(flat_ids), torch.cat(flat_w), torch.cat(flat_keep), torch.cat(flat_doc),
                           experts)
        wants.append({k: (v if k == "max_abs" else v * calls) for k, v in want.items()})
    return wants


def _run_and_reference(model, *, batch=3, seq=9, padding="right", calls=1, grads=False):
    ids, mask = _batch(model.config.vocab_size, batch, seq, padding)
    inst = kh.instrument(model, weighting="document", grads=grads)
    sites = [(i, s) for i, s in enumerate(inst.sites) if s.kind == "experts"]
    assert sites
    seen = {}

    def save(k):
        return lambda mod, args, kwargs: seen.__setitem__(
            k, [t.detach() for t in (*args, *kwargs.values()) if torch.is_tensor(t)][:3])

    hooks = [s.experts_layer.module.register_forward_pre_hook(save(k), with_kwargs=True)
             for k, (_, s) in enumerate(sites)]
    try:
        with inst:
            for _ in range(calls):
                if grads:
                    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
                else:
                    with torch.no_grad():
                        model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    valid = mask.reshape(-1).bool()
    doc_weight = (1.0 / mask.sum(1).double()).repeat_interleave(mask.shape[1])
    wants = _model_reference([s.experts_layer.module for _, s in sites], [seen[k] for k in range(len(sites))],
                             valid, doc_weight, calls)
    return [inst.stats.layers[i] for i, _ in sites], wants


def _spy_on_the_routed_kernel(monkeypatch) -> list:
    """A list that grows by one each time the C kernel takes routed rows (eager's arrive per expert, as
    (token, top-k position) pairs: native.routed_rows, or the kernel native.bind_routed_rows binds to a layer
    forward's routing)."""
    ran = []
    for entry in ("routed", "routed_rows"):
        real = getattr(native, entry)
        monkeypatch.setattr(native, entry, lambda *a, real=real, **k: ran.append(1) or real(*a, **k))
    real_bind = native.bind_routed_rows

    def bind(*a, **k):
        kernel = real_bind(*a, **k)
        return lambda *rows: ran.append(1) or kernel(*rows)

    monkeypatch.setattr(native, "bind_routed_rows", bind)
    return ran


VARIANTS = {
    "padded_left_two_calls": dict(padding="left", calls=2),
    "padded_right_with_grads": dict(grads=True),
    "top1_more_experts_than_tokens": dict(batch=1, seq=2, top_k=1, experts=32),
    "batch1_seq1": dict(batch=1, seq=1),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_real_moe_models_equal_float64(model_type, impl, variant, monkeypatch):
    _native_or_skip()
    options = dict(VARIANTS[variant])
    overrides = {}
    if "top_k" in options:
        overrides["num_experts_per_tok"] = options.pop("top_k")
        overrides[EXPERT_KEY[model_type]] = options.pop("experts")
    model = _model(model_type, **overrides)
    model.set_experts_implementation(impl)
    ran = _spy_on_the_routed_kernel(monkeypatch)
    got, wants = _run_and_reference(model, **options)
    assert ran, "the C kernel never ran"
    for stats, want in zip(got, wants):
        assert_matches(stats, want, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "olmoe", "deepseek_v3"])
@pytest.mark.parametrize("norm", [True, False])
def test_norm_topk_on_and_off_equal_float64(model_type, norm):
    model = _model(model_type, norm_topk_prob=norm)
    model.set_experts_implementation("batched_mm")
    got, wants = _run_and_reference(model)
    for stats, want in zip(got, wants):
        assert_matches(stats, want, rtol=2e-5, atol=1e-7)


def _assert_same_buffers(first, second):
    """Two runs' statistics, layer by layer: floating buffers equal to float rounding, counts exactly."""
    for a, b in zip(first, second):
        for (name, x), (_, y) in zip(a.buffers(), b.buffers()):
            if x.dtype.is_floating_point:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=name)
            else:
                assert torch.equal(x, y), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_half_precision_models_equal_the_reference_on_the_same_c(dtype, impl, monkeypatch):
    """bf16 C goes through the kernel, fp16 C falls back; both equal KACQ_KERNELS=torch on the same rows, and
    the float64 recomputation within half-precision error."""
    _native_or_skip()
    results = []
    for mode in ("auto", "torch"):
        monkeypatch.setenv("KACQ_KERNELS", mode)
        ran = _spy_on_the_routed_kernel(monkeypatch)
        model = _model("mixtral", dtype)
        model.set_experts_implementation(impl)
        got, wants = _run_and_reference(model)
        results.append(got)
        if mode == "auto":
            assert bool(ran) == (dtype == torch.bfloat16)
            for stats, want in zip(got, wants):
                for name in ("sum_abs", "routed_sum_abs", "doc_sum_abs"):
                    torch.testing.assert_close(getattr(stats, name).double(), want[name], rtol=3e-2, atol=1e-3)
    _assert_same_buffers(*results)


@pytest.mark.parametrize("mode", ["eager", "torch"])
@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_kernel_switches_off_give_the_same_numbers(mode, impl, monkeypatch):
    results = []
    for setting in (None, mode):
        if setting is None:
            monkeypatch.delenv("KACQ_KERNELS", raising=False)
        else:
            monkeypatch.setenv("KACQ_KERNELS", setting)
        model = _model("qwen2_moe")
        model.set_experts_implementation(impl)
        got, _ = _run_and_reference(model, padding="left", calls=2)
        results.append(got)
    _assert_same_buffers(*results)


def test_a_nan_coefficient_in_one_token_is_counted_once_per_routed_pair():
    """NaN in one token's hidden state reaching the experts: its C rows are NaN, counted as non-finite (top-k
    pairs x m), and every other token's sums still equal float64."""
    model = _model("mixtral")
    model.set_experts_implementation("batched_mm")
    experts = [m for m in model.modules() if type(m).__name__ == "MixtralExperts"][0]

    def poison(mod, args):
        x = args[0].clone()
        x[4, 0] = float("nan")
        return (x, *args[1:])

    handle = experts.register_forward_pre_hook(poison)
    try:
        ids, mask = _batch(model.config.vocab_size)
        inst = kh.instrument(model)
        with inst, torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    index = [i for i, s in enumerate(inst.sites) if s.kind == "experts"][0]
    stats = inst.stats.layers[index]
    m = experts.intermediate_dim
    assert int(stats.nonfinite.sum()) == model.config.num_experts_per_tok * m
    assert torch.isfinite(stats.sum_abs).all()


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "granitemoe", "granitemoeshared", "phimoe", "minimax",
                                        "glm4_moe", "ernie4_5_moe", "flex_olmo", "afmoe", "jamba", "exaone_moe",
                                        "cohere2_moe", "solar_open", "mimo_v2_flash", "hy_v3", "minimax_m2", "zaya"])
def test_more_moe_families_equal_float64(model_type, impl):
    """Every other experts layout the zoo builds whose experts take (hidden, ids, weights): right padding,
    document weighting, one forward."""
    model = _model(model_type)
    model.set_experts_implementation(impl)
    got, wants = _run_and_reference(model)
    for stats, want in zip(got, wants):
        assert_matches(stats, want, rtol=2e-5, atol=1e-7)
