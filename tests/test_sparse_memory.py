"""Sparse memory finetuning on real tiny models and real optimizer steps: only the chosen slots' entries move.

The expected entries of a slot are written here from each architecture's weight layout (not from the
library's locator): row i of gate/up (or rows i and m + i of a fused gate_up), column i of down, and for
Mixtral's fused experts slot e*m + j in gate_up_proj[e] rows j and m + j and down_proj[e] column j.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments

import kacq_hooks as kh
from kacq_hooks import usage
from kacq_hooks.errors import ArgumentTypeError, ConfigError, NoTokensError, ShapeError
from kacq_hooks.interventions import sparse_memory
from tiny_models import VOCAB, random_batch, tiny_model

MODELS = ["llama", "gpt2", "phi3", "mixtral", "qwen2_moe", "gpt_oss"]


def build(model_type):
    if model_type == "gpt_oss":  # transposed experts with interleaved gate/up columns and biases
        from test_experts import build as build_moe
        return build_moe("gpt_oss").train()
    return tiny_model(model_type).train()


def _mlp_of(name: str) -> tuple[int, str] | None:
    """(layer, the parameter's name inside its MLP) for the FFN parameters of the test models."""
    parts = name.split(".")
    for key in ("layers", "h"):
        if key in parts and ("mlp" in parts):
            layer = int(parts[parts.index(key) + 1])
            return layer, ".".join(parts[parts.index("mlp") + 1:])
    return None


def expected_mask(model_type: str, name: str, p: torch.Tensor, slots: list[set[int]], d_ff: list[int]) -> torch.Tensor:
    """True at the entries of ``p`` that belong to the given slots of their layer (hand-written per layout)."""
    mask = torch.zeros_like(p, dtype=torch.bool)
    where = _mlp_of(name)
    if where is None:
        return mask
    layer, inner = where
    chosen = sorted(slots[layer])
    if not chosen:
        return mask
    idx = torch.tensor(chosen)
    if model_type in ("llama",):
        if inner in ("gate_proj.weight", "up_proj.weight"):
            mask[idx] = True
        elif inner == "down_proj.weight":
            mask[:, idx] = True
    elif model_type == "phi3":
        m = d_ff[layer]
        if inner == "gate_up_proj.weight":
            mask[idx] = True
            mask[idx + m] = True
        elif inner == "down_proj.weight":
            mask[:, idx] = True
    elif model_type == "gpt2":  # Conv1D: c_fc weight [d, m] (slot = column), bias [m]; c_proj weight [m, d]
        if inner == "c_fc.weight":
            mask[:, idx] = True
        elif inner == "c_fc.bias":
            mask[idx] = True
        elif inner == "c_proj.weight":
            mask[idx] = True
    elif model_type == "mixtral":  # gate_up_proj [E, 2m, d], down_proj [E, d, m]
        m = p.shape[-1] if inner == "experts.down_proj" else p.shape[1] // 2
        for s in chosen:
            e, j = divmod(s, m)
            if inner == "experts.gate_up_proj":
                mask[e, j] = True
                mask[e, m + j] = True
            elif inner == "experts.down_proj":
                mask[e, :, j] = True
    elif model_type == "gpt_oss":  # gate_up_proj [E, d, 2m]: gate 2j, up 2j + 1; its bias [E, 2m]; down [E, m, d]
        m = p.shape[1] if inner == "experts.down_proj" else None
        for s in chosen:
            if inner == "experts.gate_up_proj":
                e, j = divmod(s, p.shape[2] // 2)
                mask[e, :, 2 * j] = True
                mask[e, :, 2 * j + 1] = True
            elif inner == "experts.gate_up_proj_bias":
                e, j = divmod(s, p.shape[1] // 2)
                mask[e, 2 * j] = True
                mask[e, 2 * j + 1] = True
            elif inner == "experts.down_proj":
                e, j = divmod(s, m)
                mask[e, j] = True
    elif model_type == "qwen2_moe":  # 4 fused experts of m slots, then the shared expert's m_s neurons
        experts = 4
        m = (d_ff[layer] - 64) // experts
        for s in chosen:
            if s < experts * m:
                e, j = divmod(s, m)
                if inner == "experts.gate_up_proj":
                    mask[e, j] = True
                    mask[e, m + j] = True
                elif inner == "experts.down_proj":
                    mask[e, :, j] = True
            else:
                j = s - experts * m
                if inner in ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight"):
                    mask[j] = True
                elif inner == "shared_expert.down_proj.weight":
                    mask[:, j] = True
    return mask


def reference_stats(model, seed: int = 100):
    ids, mask = random_batch(4, 16, "right", seed=seed)
    with kh.instrument(model) as inst, torch.no_grad():
        model(ids, attention_mask=mask)
    return inst


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_and_check(model_type, model, handle, steps=3, accumulate=2, weight_decay=0.1, optimizer=None):
    """Real AdamW steps with gradient accumulation; after each step every entry outside the slots the
    step's micro-batches chose is bit-identical, and the chosen entries did move."""
    d_ff = [s.d_ff for s in handle.sites]
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    moved = 0
    for step in range(steps):
        before = snapshot(model)
        chosen = [set() for _ in d_ff]
        for micro in range(accumulate):
            ids, mask = random_batch(4, 16, "right", seed=10 * step + micro + 1)
            model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
            for layer, s in enumerate(handle.slots):
                chosen[layer] |= set(s.tolist())
        opt.step()
        opt.zero_grad()
        for name, p in model.named_parameters():
            allowed = expected_mask(model_type, name, p, chosen, d_ff)
            frozen = ~allowed
            assert torch.equal(p[frozen], before[name][frozen]), f"step {step}: {name} changed outside the slots"
            moved += int((p[allowed] != before[name][allowed]).sum())
    assert moved > 0
    return opt


@pytest.mark.parametrize("model_type", MODELS)
def test_per_batch_slots_only_train_with_adamw_decay_and_accumulation(model_type):
    model = build(model_type)
    handle = sparse_memory(model, reference=reference_stats(model), top=4)
    assert handle.slots is None and handle.per_batch
    opt = train_and_check(model_type, model, handle)
    # the moments of frozen entries stay at zero: nothing but the chosen slots ever had a gradient
    for name, p in model.named_parameters():
        if _mlp_of(name) is None:
            assert p not in opt.state or not opt.state[p], f"{name} has optimizer state"
    handle.remove()


def test_fixed_slots_from_new_statistics_are_the_top_tfidf_slots():
    model = tiny_model("llama").train()
    ref = reference_stats(model)
    new = reference_stats(model, seed=7)
    handle = sparse_memory(model, new, ref, top=6)
    p_new = [c / c.sum() for c in [t.double() for t in new.mean_abs_coefficients()]]
    p_ref = [c / c.sum() for c in [t.double() for t in ref.mean_abs_coefficients()]]
    for layer, got in enumerate(handle.slots):
        score = p_new[layer] * torch.log(1 / p_ref[layer])
        assert got.tolist() == sorted(torch.argsort(score, descending=True)[:6].tolist())
    first = handle.slots
    train_and_check("llama", model, handle, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(first, handle.slots))  # fixed: the training batches do not re-rank
    handle.remove()


def test_train_rest_trains_the_rest_and_still_freezes_the_other_slots():
    model = tiny_model("llama").train()
    handle = sparse_memory(model, reference=reference_stats(model), top=4, train_rest=True)
    before = snapshot(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids, mask = random_batch(4, 16, "right", seed=3)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    slots = [set(s.tolist()) for s in handle.slots]
    opt.step()
    d_ff = [s.d_ff for s in handle.sites]
    for name, p in model.named_parameters():
        if _mlp_of(name) is None:
            assert not torch.equal(p, before[name]), f"{name} should train with train_rest=True"
        else:
            frozen = ~expected_mask("llama", name, p, slots, d_ff)
            assert torch.equal(p[frozen], before[name][frozen])
    handle.remove()


def test_remove_restores_normal_training_exactly():
    plain = tiny_model("llama").train()
    sparse = copy.deepcopy(plain)
    handle = sparse_memory(sparse, reference=reference_stats(sparse), top=4)
    handle.remove()
    for model in (plain, sparse):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        for step in range(2):
            ids, mask = random_batch(4, 16, "right", seed=step)
            model(ids, attention_mask=mask, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(plain.named_parameters(), sparse.parameters()):
        assert torch.equal(a, b), name


def test_after_remove_every_parameter_trains_again():
    model = tiny_model("llama").train()
    handle = sparse_memory(model, reference=reference_stats(model), top=4)
    opt = train_and_check("llama", model, handle, steps=1)
    handle.remove()
    before = snapshot(model)
    ids, mask = random_batch(4, 16, "right", seed=5)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        if "norm" not in name:  # RMSNorm weights at 1.0 move too, but keep the check to matrices
            assert not torch.equal(p, before[name]), name


def test_a_deep_copy_of_a_sparsely_trained_model_trains_normally():
    model = tiny_model("llama").train()
    handle = sparse_memory(model, reference=reference_stats(model), top=4)
    twin = copy.deepcopy(model)
    before = snapshot(twin)
    opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    ids, mask = random_batch(4, 16, "right", seed=5)
    twin(ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(twin.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    handle.remove()


def test_resuscitations_choice_given_as_slots():
    model = tiny_model("llama").train()
    ref = reference_stats(model)
    least = usage.least_used_slots(ref, 5)
    cbar = ref.mean_abs_coefficients()
    for layer, got in enumerate(least):
        assert got.tolist() == sorted(torch.argsort(cbar[layer].double())[:5].tolist())
    handle = sparse_memory(model, slots=least, top=5)
    assert [s.tolist() for s in handle.slots] == [s.tolist() for s in least]
    train_and_check("llama", model, handle, steps=1)
    handle.remove()


@pytest.mark.parametrize("per_batch", [True, False])
def test_in_a_real_trainer_with_accumulation_and_weight_decay(tmp_path, per_batch):
    model = tiny_model("llama").train()
    ref = reference_stats(model)
    new = None if per_batch else reference_stats(model, seed=9)
    handle = sparse_memory(model, new, ref, top=4)
    chosen = [set() for _ in handle.sites]

    def record(module, args, output):  # after each training forward: the slots its backward will train
        if torch.is_grad_enabled():
            for layer, s in enumerate(handle.slots):
                chosen[layer] |= set(s.tolist())

    hook = model.register_forward_hook(record)
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in
            (torch.randint(2, VOCAB, (16,), generator=generator).tolist() for _ in range(24))]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-2, weight_decay=0.1, report_to=[],
                             save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                             logging_steps=1000)
    before = snapshot(model)
    Trainer(model=model, args=args, train_dataset=data).train()
    hook.remove()
    d_ff = [s.d_ff for s in handle.sites]
    moved = 0
    for name, p in model.named_parameters():
        allowed = expected_mask("llama", name, p.detach(), chosen, d_ff)
        assert torch.equal(p.detach()[~allowed], before[name][~allowed]), name
        moved += int((p.detach()[allowed] != before[name][allowed]).sum())
    assert moved > 0
    handle.remove()


# -- usage scores


def test_tfidf_by_hand():
    # p_new = [0.5, 0.5, 0], p_ref = [0.25, 0, 0.75]: 0.5 ln 4; a slot only the new data uses ranks first (inf);
    # a slot the new data does not use scores 0
    got = usage.slot_scores([torch.tensor([2.0, 2.0, 0.0])], [torch.tensor([1.0, 0.0, 3.0])])[0]
    assert got[0].item() == pytest.approx(0.5 * torch.log(torch.tensor(4.0)).item())
    assert got[1].item() == float("inf") and got[2].item() == 0.0
    assert usage.top_slots([got], 1)[0].tolist() == [1]


@pytest.mark.parametrize("model_type", ["llama", "mixtral", "qwen2_moe"])
def test_hooked_usage_matches_the_instrumentation(model_type):
    """The per-batch usage (one forward, hooks on it) is the instrumentation's c̄, padding and MoE included."""
    model = tiny_model(model_type)
    ids, mask = random_batch(4, 16, "right", seed=2)
    with kh.instrument(model) as inst, usage.measure_usage(model) as used, torch.no_grad():
        model(ids, attention_mask=mask)
    for mine, theirs in zip(used.means(), inst.mean_abs_coefficients()):
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=1e-5, atol=1e-7)


def test_scores_from_a_saved_statistics_file(tmp_path):
    model = tiny_model("llama")
    ref, new = reference_stats(model), reference_stats(model, seed=4)
    ref.save(tmp_path / "ref.safetensors")
    from_file = usage.slot_scores(new, tmp_path / "ref.safetensors")
    for a, b in zip(from_file, usage.slot_scores(new, ref)):
        assert torch.equal(a, b)


def test_count_usage_by_hand_on_a_real_forward():
    model = tiny_model("llama")
    ids, mask = random_batch(3, 12, "right", seed=1)
    seen = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with usage.measure_usage(model, k=3) as used, torch.no_grad():
        model(ids, attention_mask=mask)
    handle.remove()
    c = seen[0][mask.bool()]  # the real tokens' C of layer 0
    expected = torch.zeros(c.shape[-1])
    for row in c.abs():
        expected[row.topk(3).indices] += 1  # slot accessed when among the token's 3 largest |C|
    assert used.counts()[0].tolist() == expected.tolist()
    assert used.counts()[0].sum() == 3 * int(mask.sum())


def test_count_method_per_batch_trains_only_its_slots():
    model = tiny_model("llama").train()
    ids, mask = random_batch(4, 16, "right", seed=100)
    with usage.measure_usage(model, k=4) as ref, torch.no_grad():
        model(ids, attention_mask=mask)
    handle = sparse_memory(model, reference=ref, top=4, method="count")
    train_and_check("llama", model, handle, steps=2)
    handle.remove()


def test_bad_arguments_are_refused_before_any_hook():
    model = tiny_model("llama")
    ref = reference_stats(model)
    with pytest.raises(ConfigError, match="top"):
        sparse_memory(model, reference=ref, top=10_000)
    with pytest.raises(ConfigError, match="reference"):
        sparse_memory(model, top=4)
    with pytest.raises(ArgumentTypeError, match="count"):
        sparse_memory(model, reference=ref, top=4, method="count")
    with pytest.raises(ShapeError, match="slots"):
        usage.slot_scores(ref, reference_stats(tiny_model("llama", intermediate_size=32)))
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        usage.measure_usage(tiny_model("mixtral"), k=2)
    with pytest.raises(NoTokensError, match="no slot was used"):
        usage.slot_scores([torch.ones(4)], [torch.zeros(4)])


def test_scores_cover_every_expert_slot_from_two_instrumentations():
    model = tiny_model("qwen2_moe")
    ref, new = reference_stats(model), reference_stats(model, seed=11)
    scores = usage.slot_scores(new, ref)
    cbar_new, cbar_ref = new.mean_abs_coefficients(), ref.mean_abs_coefficients()
    for layer, site in enumerate(new.sites):
        assert scores[layer].numel() == site.d_ff == 4 * 64 + 64  # 4 experts x 64 slots, then the shared expert
        p_new = cbar_new[layer].double() / cbar_new[layer].double().sum()
        p_ref = cbar_ref[layer].double() / cbar_ref[layer].double().sum()
        used = p_ref > 0
        torch.testing.assert_close(scores[layer][used], (p_new * torch.log(1 / p_ref))[used])
