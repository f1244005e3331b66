"""Where dL/dC statistics go: straight into the statistics, or staged per optimizer step under a loss scaler.

Without a loss scaler the capture's gradient hooks add each backward's statistics into
``inst.stats`` as the backward runs. Under mixed precision with a ``torch.amp.GradScaler`` the
backward is of the *scaled* loss (``scaler.scale(loss)``, a factor that changes from step to step),
and the scaler skips the optimizer step whose gradients hold an inf or NaN. After
``inst.loss_scale(scaler)`` the gradient statistics of each step are staged and committed at that
scaler's ``update()``, which every GradScaler loop (torch's recipe, accelerate, the Trainer) calls
once per optimizer step: divided by the scale the step's backward passes were run with, and only
when the scaler found no inf (a skipped step adds nothing). The commit is a few tensor operations
on the scaler's own ``found_inf`` flags, with no host synchronisation.

Gradient accumulation: every backward between two ``update()`` calls runs with the same scale (the
scaler changes it only in ``update()``), so the whole accumulation window is staged together and
committed, or dropped with its skipped step, as the optimizer's gradients are. Only a backward that
starts from a loss ``scaler.scale()`` returned is staged (a hook on that loss marks it); any other
backward in the window (a plain ``loss.backward()`` or ``autograd.grad`` probe) is of an unscaled loss
and is added at once, as without a scaler.
"""
from __future__ import annotations

import logging

import torch

from .errors import ArgumentTypeError, ConfigError, NoTokensError, StateError
from .stats import CoefficientStats

log = logging.getLogger("kacq_hooks.instrumentation")


class Gradients:
    """The gradient side of one instrumentation: its loss scaler and the staged statistics of an unfinished step."""

    def __init__(self, inst):
        self.inst = inst
        self.scaler = None          # the torch.amp.GradScaler whose update() commits a step, or None
        self.declared = False       # loss_scale() was called (with a scaler or None): the scaling is known
        self.staged: CoefficientStats | None = None
        self.steps = 0              # update() calls seen, committed or skipped
        self._skipped: torch.Tensor | None = None  # steps the scaler skipped, counted on the scaler's device
        self.gradless: dict[int, str] = {}          # sites whose C needed no gradient in a training forward
        self.fp16_seen = False      # a training forward in fp16 (a scaled loss is likely) before any loss_scale()
        self._wrapper = None
        self._scale_wrapper = None
        self._scaled_backward = False  # the running backward started from a loss that scaler.scale() returned

    # -- the target of the capture's gradient hooks
    def target(self, index: int):
        """The layer statistics a backward's dL/dC statistics of site ``index`` are added into."""
        # only a backward of a loss the scaler scaled waits for update(); any other one is of an unscaled loss
        if self.staged is not None and self._scaled_backward:
            return self.staged[index]
        return self.inst.stats[index]

    # -- the scaler
    def use(self, scaler) -> None:
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler) and hasattr(scaler, "scaler"):
            scaler = scaler.scaler  # an accelerate Accelerator or AcceleratedOptimizer: its scaler, or None
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise ArgumentTypeError(
                "loss_scale() takes the torch.amp.GradScaler that scales the loss, an accelerate Accelerator (its "
                f"scaler), or None when the loss is not scaled; not {type(scaler).__name__}")
        self.declared = True
        if scaler is self.scaler and (self._wrapper is not None or not self.inst.attached):
            return
        self.unfollow()
        self.scaler = scaler
        if scaler is not None and self.inst.attached:
            self.follow()

    def follow(self) -> None:
        """Stage gradients and commit them at the declared scaler's ``update()`` (while the hooks are attached)."""
        scaler = self.scaler
        if scaler is None or self._wrapper is not None:
            return
        stats = self.inst.stats
        self.staged = CoefficientStats(stats.d_ffs, [layer.device for layer in stats])
        original = scaler.update

        def update(new_scale=None):
            if self._wrapper is not update:  # no longer followed (inst.remove(), another scaler): pass through
                return original(new_scale)
            scale, found = self._before_update(scaler)
            result = original(new_scale)
            self._commit(scale, found)
            return result

        self._wrapper = update
        scaler.update = update  # an instance attribute: the scaler's class is untouched
        original_scale = scaler.scale

        def scale(outputs):
            scaled = original_scale(outputs)
            if self._scale_wrapper is scale and scaler.is_enabled():
                self._mark_scaled(scaled)
            return scaled

        self._scale_wrapper = scale
        scaler.scale = scale

    def _mark_scaled(self, scaled) -> None:
        """Hook the scaled loss(es): a backward that starts from one runs with the scaler's scale."""
        if isinstance(scaled, torch.Tensor):
            if scaled.requires_grad:
                scaled.register_hook(self._scaled_backward_begins)
        elif isinstance(scaled, (list, tuple)):
            for item in scaled:
                self._mark_scaled(item)

    def _scaled_backward_begins(self, grad):
        self._scaled_backward = True
        torch.autograd.Variable._execution_engine.queue_callback(self._scaled_backward_ends)

    def _scaled_backward_ends(self) -> None:
        self._scaled_backward = False

    def unfollow(self) -> None:
        """Give the scaler its own ``update`` back (the scaler stays declared; an unfinished step is dropped)."""
        scaler, wrapper = self.scaler, self._wrapper
        # only our own wrapper: with none (already unfollowed) the scaler has no instance update to give back
        if scaler is not None and wrapper is not None and scaler.__dict__.get("update") is wrapper:
            del scaler.update
        if scaler is not None and self._scale_wrapper is not None and scaler.__dict__.get("scale") is self._scale_wrapper:
            del scaler.scale
        self._scale_wrapper = None
        if self.staged is not None and any(int(layer.grad_tokens) for layer in self.staged):
            log.warning("kacq_hooks: gradient statistics of a step whose scaler.update() never ran were dropped")
        self._wrapper, self.staged = None, None

    def _before_update(self, scaler):
        """The scale the step's backward passes used and the scaler's inf flags, read before update() changes them."""
        if not scaler.is_enabled() or scaler._scale is None:  # a disabled scaler (or no scale() yet) scales by 1
            return None, []
        found = [flag for state in scaler._per_optimizer_states.values()
                 for flag in state["found_inf_per_device"].values()]
        return scaler._scale.detach().clone(), found

    def _commit(self, scale, found) -> None:
        self.steps += 1
        staged = self.staged
        if staged is None:
            return
        for layer, pending in zip(self.inst.stats, staged):
            device = layer.device
            factor = torch.ones((), dtype=torch.float32, device=device)
            keep = torch.ones((), dtype=torch.int64, device=device)
            if found:
                ok = torch.stack([f.to(device).float() for f in found]).sum() == 0
                keep = ok.to(torch.int64)
                factor = ok.float()
            if scale is not None:
                factor = factor / scale.to(device=device, dtype=torch.float32)
            layer.grad_sum_abs.add_(pending.grad_sum_abs.to(device) * factor)
            layer.grad_sum_cg.add_(pending.grad_sum_cg.to(device) * factor)
            layer.grad_tokens.add_(pending.grad_tokens.to(device) * keep)
        if found:
            skipped = (torch.stack([f.float() for f in found]).sum() > 0).to(torch.int64)
            self._skipped = skipped if self._skipped is None else self._skipped + skipped.to(self._skipped.device)
        staged.reset()

    @property
    def skipped_steps(self) -> int:
        return 0 if self._skipped is None else int(self._skipped)

    # -- what the capture reports from a training forward
    def note_gradless(self, index: int, path: str) -> None:
        if index in self.gradless:
            return
        self.gradless[index] = (f"{path}'s coefficients C did not require a gradient in a training forward (nothing "
                                "trainable before it, e.g. LoRA on the output projection only, or frozen early "
                                "layers), so dL/dC was never computed there")
        log.warning("kacq_hooks: %s; its gradient statistics stay empty and inst.mean_abs_gradients() refuses "
                    "this layer. Train a module before it (e.g. LoRA target_modules including up_proj/gate_proj "
                    "or attention), or read the other layers with allow_missing=True", self.gradless[index])

    def note_fp16(self) -> None:
        if self.declared or self.fp16_seen:
            return
        self.fp16_seen = True
        log.warning("kacq_hooks: a training forward ran in float16 with grads=True and no loss scale was declared: "
                    "if a GradScaler scales the loss (Trainer(fp16=True), accelerate fp16), the gradient statistics "
                    "are those of the scaled loss. Call inst.loss_scale(scaler) (the Trainer: add "
                    "LossScaleCallback(inst)), or inst.loss_scale(None) if the loss is not scaled")

    def require_known_scale(self) -> None:
        if self.fp16_seen:
            raise StateError("gradients were recorded from float16 training forwards without a declared loss scale, so "
                             "they may be those of a GradScaler's scaled loss: call inst.loss_scale(scaler) before "
                             "training (the Trainer: LossScaleCallback(inst)), or inst.loss_scale(None) if the loss "
                             "was not scaled, then inst.reset() and measure again")

    def reset(self) -> None:
        """Forget the staged step and the fp16 warning (with :meth:`kacq_hooks.Instrumentation.reset`)."""
        if self.staged is not None:
            self.staged.reset()
        self.fp16_seen = False

    def layers(self, allow_missing: bool, field: str) -> list[bool]:
        """Which layers hold gradients; refuses what cannot give a right mean gradient."""
        inst = self.inst
        inst._require_whole_layers()
        if not inst.grads:
            raise ConfigError("gradients are only recorded with instrument(model, grads=True)")
        self.require_known_scale()
        have = [int(s.grad_tokens) > 0 for s in inst.stats]
        if not any(have):
            staged = self.staged is not None and any(int(s.grad_tokens) for s in self.staged)
            raise NoTokensError("no gradients have been recorded" + (
                ": the staged step waits for scaler.update() (inst.loss_scale(scaler))" if staged else
                ": run a backward pass of a loss computed by the instrumented model (outside inst.pause())"))
        missing = [i for i, ok in enumerate(have) if not ok]
        if missing and not allow_missing:
            why = "; ".join(self.gradless.get(i, f"{inst.labels[i]} saw no gradient") for i in missing[:3])
            raise NoTokensError(f"layers {[inst.labels[i] for i in missing]} hold no gradients: {why}. Read the other "
                                "layers with allow_missing=True (NaN for these)")
        for layer, ok in zip(inst.stats, have):
            if ok:
                layer.check_finite([field])
        return have
