"""Sharpness-aware minimization: hand-computed updates, accumulation, clipping, AMP, Trainer, instrumentation."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import TrainingArguments

import kacq_hooks as kh
from kacq_hooks.errors import KacqError
from kacq_hooks.training.sam import SAM, SAMError, SAMTrainer
from tiny_models import VOCAB, tiny_model

# A strictly convex quadratic over two parameter tensors (so the norm must run over both):
# L(x) = 1/2 x^T A x - b^T x with x = cat(w1, w2); ∇L(x) = A x - b.
A = torch.tensor([[3.0, 0.5, 0.0, 0.2, 0.0],
                  [0.5, 2.0, 0.3, 0.0, 0.0],
                  [0.0, 0.3, 1.5, 0.0, 0.1],
                  [0.2, 0.0, 0.0, 1.0, 0.4],
                  [0.0, 0.0, 0.1, 0.4, 2.5]], dtype=torch.float64)
B = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
X0 = torch.tensor([0.7, -1.3, 2.0, 0.4, -0.9], dtype=torch.float64)


def quadratic():
    w1 = nn.Parameter(X0[:2].clone())
    w2 = nn.Parameter(X0[2:].clone())

    def loss_fn():
        x = torch.cat([w1, w2])
        return 0.5 * x @ A @ x - B @ x

    return [w1, w2], loss_fn


def grad(x: torch.Tensor) -> torch.Tensor:
    return A @ x - B


def backward(loss_fn):
    loss = loss_fn()
    loss.backward()
    return loss


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_sam_step_equals_hand_computed_update(weight_decay):
    rho, lr = 0.2, 0.1
    params, loss_fn = quadratic()
    sam = SAM(params, torch.optim.SGD, rho=rho, lr=lr, weight_decay=weight_decay)
    backward(loss_fn)
    sam.first_step(zero_grad=True)
    backward(loss_fn)
    sam.second_step(zero_grad=True)

    g = grad(X0)
    e = rho * g / torch.linalg.vector_norm(g)
    g_perturbed = grad(X0 + e)
    expected = X0 - lr * (g_perturbed + weight_decay * X0)  # decay from the original weights, by the base optimizer
    assert torch.allclose(torch.cat([p.detach() for p in params]), expected, atol=1e-12)
    assert not torch.allclose(expected, X0 - lr * (g + weight_decay * X0)), "SAM must differ from plain SGD here"


def test_adaptive_sam_step_equals_hand_computed_update():
    rho, lr = 0.5, 0.05
    params, loss_fn = quadratic()
    sam = SAM(params, torch.optim.SGD, rho=rho, adaptive=True, lr=lr)
    backward(loss_fn)
    sam.first_step(zero_grad=True)
    backward(loss_fn)
    sam.second_step(zero_grad=True)

    g = grad(X0)
    e = rho * X0 ** 2 * g / torch.linalg.vector_norm(X0.abs() * g)  # ASAM with T_w = |w|
    expected = X0 - lr * grad(X0 + e)
    assert torch.allclose(torch.cat([p.detach() for p in params]), expected, atol=1e-12)


def test_three_ways_to_drive_it_agree():
    results = []
    for way in ("closure", "two_steps", "restore_then_step"):
        params, loss_fn = quadratic()
        sam = SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
        for _ in range(3):
            if way == "closure":
                def closure():
                    sam.zero_grad()
                    return backward(loss_fn)
                loss_at_w = loss_fn().item()
                assert sam.step(closure).item() == loss_at_w, "step(closure) returns the loss at w"
                assert not sam.perturbed
            else:
                sam.zero_grad()
                backward(loss_fn)
                sam.first_step(zero_grad=True)
                assert sam.perturbed
                backward(loss_fn)
                if way == "two_steps":
                    sam.second_step()
                else:
                    sam.restore()
                    sam.step()
        results.append(torch.cat([p.detach() for p in params]))
    assert torch.equal(results[0], results[1]) and torch.equal(results[1], results[2])


def linear_regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features, targets = torch.randn(8, 5, generator=g), torch.randn(8, 1, generator=g)
    model = nn.Linear(5, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 5, generator=g))
        model.bias.fill_(0.3)
    return model, features, targets


def sam_update(model, features, targets, micro_batches: int = 1, clip: float | None = None, rho: float = 0.3):
    """One SAM update; with micro_batches > 1 both passes accumulate mean-loss gradients over the chunks."""
    sam = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1)

    def accumulate():
        for x, y in zip(features.chunk(micro_batches), targets.chunk(micro_batches)):
            (nn.functional.mse_loss(model(x), y) / micro_batches).backward()

    accumulate()
    sam.first_step(zero_grad=True)
    accumulate()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    sam.second_step(zero_grad=True)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_gradient_accumulation_equals_one_big_batch():
    full = sam_update(*linear_regression())
    accumulated = sam_update(*linear_regression(), micro_batches=4)
    assert torch.allclose(full, accumulated, atol=1e-6)
    assert not torch.allclose(full, sam_update(*linear_regression(), rho=0.0), atol=1e-4), "rho matters"


def test_clipping_clips_the_perturbed_pass_gradient():
    model, features, targets = linear_regression()
    w0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    clip, rho, lr = 0.05, 0.3, 0.1

    def flat_grad(weights: torch.Tensor) -> torch.Tensor:
        probe = copy.deepcopy(model)
        torch.nn.utils.vector_to_parameters(weights, probe.parameters())
        probe.zero_grad()
        nn.functional.mse_loss(probe(features), targets).backward()
        return torch.cat([p.grad.flatten() for p in probe.parameters()])

    g = flat_grad(w0)
    g_perturbed = flat_grad(w0 + rho * g / g.norm())
    assert g_perturbed.norm() > clip, "the test needs clipping to bite"
    expected = w0 - lr * g_perturbed * (clip / (g_perturbed.norm() + 1e-6))
    assert torch.allclose(sam_update(model, features, targets, clip=clip), expected, atol=1e-6)


def test_grad_scaler_path_matches_unscaled_and_skips_cleanly():
    reference = sam_update(*linear_regression())
    model, features, targets = linear_regression()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)

    def scaled_backward(poison: bool = False):
        loss = nn.functional.mse_loss(model(features), targets)
        scaler.scale(loss * (float("inf") if poison else 1.0)).backward()

    scaled_backward()
    sam.first_step(zero_grad=True)  # g / ||g|| does not depend on the scale
    scaled_backward()
    sam.restore()
    scaler.step(sam)  # unscales, checks for inf, calls sam.step() = the base step
    scaler.update()
    assert torch.allclose(torch.cat([p.detach().flatten() for p in model.parameters()]), reference, atol=1e-6)

    # an overflow in the perturbed pass: the scaler skips the step and the original weights remain
    before = [p.detach().clone() for p in model.parameters()]
    sam.zero_grad()
    scaled_backward()
    sam.first_step(zero_grad=True)
    scaled_backward(poison=True)
    sam.restore()
    scaler.step(sam)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert scaler.get_scale() < 2.0 ** 10


def test_bf16_autocast_keeps_fp32_weights_and_learns():
    torch.manual_seed(0)
    model = tiny_model("llama").train()
    ids = torch.randint(2, VOCAB, (2, 8))
    sam = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, model=model)

    def closure():
        sam.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        return loss

    losses = [sam.step(closure).item() for _ in range(4)]
    assert losses[-1] < losses[0] - 0.05
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_state_dict_round_trip_and_schedulers_share_groups():
    params, loss_fn = quadratic()
    sam = SAM(params, torch.optim.AdamW, rho=0.1, lr=0.1, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)

    def run(opt, steps):
        for _ in range(steps):
            def closure():
                opt.zero_grad()
                return backward(loss_fn)
            opt.step(closure)

    run(sam, 2)
    scheduler.step()
    assert sam.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05), "the schedule reaches the base optimizer"
    state = copy.deepcopy(sam.state_dict())
    assert "exp_avg" in state["state"][0] and state["param_groups"][0]["rho"] == 0.1
    snapshot = [p.detach().clone() for p in params]
    run(sam, 2)
    after_continuing = [p.detach().clone() for p in params]

    with torch.no_grad():
        for p, s in zip(params, snapshot):
            p.copy_(s)
    fresh = SAM(params, torch.optim.AdamW, rho=0.7, lr=1.0)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["rho"] == 0.1 and fresh.param_groups is fresh.base_optimizer.param_groups
    run(fresh, 2)
    assert all(torch.equal(a, p) for a, p in zip(after_continuing, params))


def test_closure_step_with_model_counts_one_pass_per_step():
    model = tiny_model("llama").train()
    ids = torch.randint(2, VOCAB, (2, 8))
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=model)

    def closure():
        sam.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss

    with kh.instrument(model) as inst:
        for _ in range(3):
            sam.step(closure)
    assert [int(layer.tokens) for layer in inst.stats] == [3 * 2 * 8] * len(inst.stats)


def test_a_step_without_gradients_is_a_no_op_not_a_crash():
    params, _ = quadratic()
    sam = SAM(params, torch.optim.SGD, lr=0.1)
    sam.first_step()  # no backward ran: nothing to perturb, logged
    assert sam.perturbed
    sam.second_step()
    assert torch.equal(torch.cat([p.detach() for p in params]), X0)


def test_misuse_gives_clear_errors():
    params, loss_fn = quadratic()
    sam = SAM(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(SAMError, match="two gradient evaluations"):
        sam.step()
    with pytest.raises(SAMError, match="not perturbed"):
        sam.restore()
    backward(loss_fn)
    sam.first_step()
    with pytest.raises(SAMError, match="already perturbed"):
        sam.first_step()
    with pytest.raises(SAMError, match="still perturbed"):
        sam.step()
    with pytest.raises(ValueError, match="rho"):
        SAM(params, torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(TypeError, match="Optimizer subclass"):
        SAM(params, torch.optim.SGD(params, lr=0.1), lr=0.1)
    assert issubclass(SAMError, KacqError)


# ------------------------------------------------------------------------------------------------
# The Trainer.

SEQ = 16


def token_rows(n: int = 8, seed: int = 0) -> list[dict]:
    ids = torch.randint(2, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": row} for row in ids]


def trainer_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                    optim="adamw_torch", report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                    disable_tqdm=True, seed=0, data_seed=0, lr_scheduler_type="constant", dataloader_num_workers=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def mean_loss(model, rows) -> float:
    ids = torch.stack([r["input_ids"] for r in rows])
    with torch.no_grad():
        return model.eval()(ids, labels=ids).loss.item()


def test_sam_trainer_decreases_loss_and_counts_each_step_once(tmp_path):
    model = tiny_model("llama")
    rows = token_rows(2)
    before = mean_loss(model, rows)
    inst = kh.instrument(model, grads=True)
    try:
        args = trainer_args(tmp_path, max_steps=4, bf16=True, per_device_train_batch_size=2)
        trainer = SAMTrainer(model=model, args=args, train_dataset=rows, sam_rho=0.05)
        trainer.train()
        assert isinstance(trainer._sam(), SAM) and not trainer._sam().perturbed
        one_pass = 4 * 2 * SEQ  # steps x rows x tokens: the perturbed pass is not counted
        for layer in inst.stats:
            assert int(layer.tokens) == one_pass
            assert int(layer.grad_tokens) == one_pass
    finally:
        inst.remove()
    assert mean_loss(model, rows) < before - 0.1


def test_sam_trainer_accumulation_equals_one_big_batch(tmp_path):
    """Exact SAM over the effective batch: 2 x 2 accumulated rows give the update of 4 rows at once."""
    rows = token_rows(4)
    results = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model = tiny_model("llama")
        args = trainer_args(tmp_path / f"b{batch}", per_device_train_batch_size=batch,
                            gradient_accumulation_steps=accumulation, max_steps=2, optim="sgd", learning_rate=0.5,
                            max_grad_norm=0.0)
        SAMTrainer(model=model, args=args, train_dataset=rows, sam_rho=0.5).train()
        results.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach())
    untrained = torch.nn.utils.parameters_to_vector(tiny_model("llama").parameters()).detach()
    assert (results[0] - untrained).abs().max() > 1e-3
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_sam_trainer_refuses_a_plain_optimizer(tmp_path):
    model = tiny_model("llama")
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SAMTrainer(model=model, args=trainer_args(tmp_path, max_steps=1), train_dataset=token_rows(4),
                         optimizers=(plain, None))
    with pytest.raises(SAMError, match="needs a SAM optimizer"):
        trainer.train()
