"""Sharpness-aware minimization (Foret et al. 2021), adaptive SAM (Kwon et al. 2021), and a Trainer for it.

One SAM update from weights ``w`` with gradient ``g = ∇L(w)``:

    e  = rho * g / ||g||                       SAM       (||.|| over all parameters together)
    e  = rho * w² ⊙ g / || |w| ⊙ g ||          adaptive  (ASAM: T_w = |w|, elementwise)
    g' = ∇L(w + e)                              second forward/backward, at the perturbed weights
    w  <- base_optimizer_step(w, g')            from the *original* weights

Weight decay, momentum and learning-rate schedules belong to the base optimizer; the perturbation
ignores them. Both the perturbation and the update direction are invariant to a global rescaling of
the gradient, so gradient clipping (a global rescale) may come before either step, and a GradScaler's
scale does not change the perturbation.

Instrumentation: the second pass runs at weights the model never holds after the step, so its FFN
coefficients would describe a model that does not exist, and counting it would double every token.
:class:`SAMTrainer`, ``SAM.step(closure)`` with ``model=`` given, and :func:`kacq_hooks.paused` in a
hand-written loop pause every instrumentation of the model for that pass: each step is counted once,
at the actual weights (coefficients and, with ``grads=True``, dL/dC of the first pass).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterable

import torch
from torch import nn
from transformers import Trainer

from kacq_hooks.errors import ArgumentTypeError, ConfigError, SAMError
from kacq_hooks.instrumentation import paused

logger = logging.getLogger(__name__)

__all__ = ["SAM", "SAMError", "SAMTrainer"]


class SAM(torch.optim.Optimizer):
    """Wrap ``base_optimizer_cls`` so that each update uses the gradient at the worst nearby weights.

    ``params`` and ``**base_kwargs`` are those of the base optimizer (``lr``, ``weight_decay``, ...);
    param groups may set their own ``rho`` and ``adaptive``. ``model``, if given, has its kacq_hooks
    instrumentations paused during the perturbed pass of :meth:`step`.

    Three ways to drive it:

    * ``step(closure)``: the closure zeroes grads, computes the loss, calls ``backward`` and returns the
      loss; it is called at ``w`` and again at ``w + e``. The loss at ``w`` is returned.
    * ``first_step()`` after your backward at ``w`` (accumulate micro-batches first if you like),
      backward at ``w + e``, then ``second_step()``. Wrap the second pass in ``kacq_hooks.paused(model)``.
    * with a GradScaler or a Trainer that clips in between: ``first_step()``, second backward,
      ``restore()``, then ``scaler.step(sam)`` / ``sam.step()`` (a plain ``step()`` is only allowed
      right after ``restore()``: then it is the base step). A step the scaler skips leaves the
      original weights in place, because ``restore()`` already put them back.

    >>> w = nn.Parameter(torch.tensor([1.0, -2.0]))
    >>> sam = SAM([w], torch.optim.SGD, rho=0.1, lr=0.5)
    >>> def closure():
    ...     sam.zero_grad()
    ...     loss = (w ** 2).sum()
    ...     loss.backward()
    ...     return loss
    >>> sam.step(closure).item()
    5.0
    >>> w.detach()   # w - lr * 2 (w + 0.1 * w / |w|)
    tensor([-0.0447,  0.0894])
    """

    def __init__(self, params: Iterable, base_optimizer_cls: type[torch.optim.Optimizer], rho: float = 0.05,
                 adaptive: bool = False, *, eps: float = 1e-12, model: nn.Module | None = None, **base_kwargs: Any):
        if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, torch.optim.Optimizer)):
            raise ArgumentTypeError(f"base_optimizer_cls must be a torch.optim.Optimizer subclass such as torch.optim.AdamW, "
                                    f"got {base_optimizer_cls!r} (pass the class, not an instance)")
        if isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, SAM):
            raise ArgumentTypeError("base_optimizer_cls is SAM itself; pass the optimizer SAM should wrap, "
                                    "e.g. torch.optim.SGD")
        _check_rho(rho)
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        for group in self.param_groups:
            _check_rho(group["rho"])
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        # One set of groups and one state, shared: lr schedules, state_dict and checkpoints see the base optimizer.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self.eps = eps
        self.model = model
        self._origin: dict[torch.Tensor, torch.Tensor] = {}  # original weights while perturbed
        self._perturbed = False
        self._restored = False  # restore() ran: the next plain step() is the base step

    # -- the two passes --------------------------------------------------------------------------
    @property
    def perturbed(self) -> bool:
        """True between :meth:`first_step` and :meth:`restore` (the weights are ``w + e``)."""
        return self._perturbed

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``w + e`` along the current gradients (those at ``w``), remembering ``w``."""
        if self.perturbed:
            raise SAMError("first_step() called while the weights are already perturbed; call second_step() "
                           "(or restore()) after the backward pass at the perturbed weights first")
        self._restored = False
        self._perturbed = True
        norm = self._grad_norm()
        if norm is None:
            logger.warning("SAM.first_step found no gradients; no perturbation made (did backward run?)")
        for group in self.param_groups:
            if norm is None:
                break
            scale = group["rho"] / (norm + self.eps)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._origin[p] = p.detach().clone()
                step = p.grad.float() * scale.to(p.device)
                if group["adaptive"]:
                    step = step * p.detach().float().square()
                p.add_(step.to(p.dtype))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original weights back (the gradients, from the perturbed pass, stay)."""
        if not self.perturbed:
            raise SAMError("restore() called but the weights are not perturbed; call first_step() first")
        for p, original in self._origin.items():
            p.copy_(original)
        self._origin.clear()
        self._perturbed = False
        self._restored = True

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the original weights and take the base optimizer's step with the current gradients."""
        self.restore()
        self.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None):  # type: ignore[override]
        """A whole SAM update with ``closure``, or the base step right after :meth:`restore`."""
        if closure is not None:
            if self.perturbed:
                raise SAMError("step(closure) called while the weights are perturbed; call second_step() first")
            with torch.enable_grad():
                loss = closure()
            self.first_step(zero_grad=True)
            pause = paused(self.model) if self.model is not None else contextlib.nullcontext()
            with torch.enable_grad(), pause:
                closure()
            self.second_step()
            return loss
        if self.perturbed:
            raise SAMError("step() called while the weights are still perturbed: call restore() (or second_step()) "
                           "after the backward pass at the perturbed weights")
        if not self._restored:
            raise SAMError("SAM needs two gradient evaluations per update: use step(closure), or first_step() / "
                           "second backward / second_step(); with a transformers.Trainer use SAMTrainer")
        self._restored = False
        return self.base_optimizer.step()

    # -- plumbing --------------------------------------------------------------------------------
    def _grad_norm(self) -> torch.Tensor | None:
        """||g|| (or || |w| ⊙ g || for adaptive groups) over all parameters, in fp32, on one device."""
        norms = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                if group["adaptive"]:
                    g = g * p.detach().float().abs()
                norms.append(torch.linalg.vector_norm(g))
        if not norms:
            return None
        device = norms[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "base_optimizer"):  # during __init__
            super().add_param_group(param_group)
            return
        param_group.setdefault("rho", self.defaults["rho"])
        param_group.setdefault("adaptive", self.defaults["adaptive"])
        _check_rho(param_group["rho"])
        self.base_optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"SAM({self.base_optimizer!r}, rho={self.defaults['rho']}, adaptive={self.defaults['adaptive']})"


def _check_rho(rho: float) -> None:
    if not rho >= 0:
        raise ConfigError(f"rho (the radius of the SAM perturbation) must be >= 0, got {rho!r}; "
                          "typical values are 0.05 for SAM and 0.5 to 2 for adaptive SAM")


# ------------------------------------------------------------------------------------------------
# transformers.Trainer integration.

class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` whose updates are SAM updates over the whole effective batch.

    Its own optimizer is ``SAM`` around the optimizer ``args.optim`` names, with the Trainer's usual
    weight-decay groups; pass ``optimizers=(SAM(...), scheduler)`` to use your own. Extra arguments:
    ``sam_rho`` (0.05) and ``sam_adaptive`` (False).

    Each micro-batch runs its ordinary forward/backward at ``w``. On the last micro-batch of an
    optimizer step (``accelerator.sync_gradients``) the accumulated gradient gives the perturbation,
    every micro-batch of the step is run again at ``w + e``, and the original weights are restored;
    the Trainer then clips the perturbed-pass gradient and ``optimizer.step()`` takes the base step.
    So gradient accumulation gives the same update as one big batch, and mixed precision (autocast)
    applies to both passes. The second pass runs with every kacq_hooks instrumentation of the model
    paused, so statistics count each token once per step, at the actual weights. Logged losses are
    those of the first pass. Tested on one process (no DDP/FSDP/DeepSpeed).
    """

    def __init__(self, *args: Any, sam_rho: float = 0.05, sam_adaptive: bool = False, **kwargs: Any):
        _check_rho(sam_rho)
        self.sam_rho = sam_rho
        self.sam_adaptive = sam_adaptive
        self._sam_replay: list[tuple[dict, Any]] = []
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            if self.optimizer_cls_and_kwargs is not None:
                base_cls, base_kwargs = self.optimizer_cls_and_kwargs
            else:
                base_cls, base_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            if not (isinstance(base_cls, type) and issubclass(base_cls, torch.optim.Optimizer)) or {
                    "params", "model", "optimizer_dict"} & set(base_kwargs):
                raise SAMError(f"SAMTrainer cannot wrap optim={self.args.optim!r} ({base_cls!r}); use a plain "
                               "torch optimizer such as 'adamw_torch' or 'sgd', or pass optimizers=(SAM(...), None)")
            self.optimizer = SAM([g for g in groups if g["params"]], base_cls, rho=self.sam_rho,
                                 adaptive=self.sam_adaptive, **base_kwargs)
        return self.optimizer

    def _sam(self) -> SAM:
        optimizer = self.optimizer
        while not isinstance(optimizer, SAM) and hasattr(optimizer, "optimizer"):  # accelerate's wrapper
            optimizer = optimizer.optimizer
        if not isinstance(optimizer, SAM):
            raise SAMError(f"SAMTrainer needs a SAM optimizer, found {type(optimizer).__name__}; leave optimizers= "
                           "unset or pass optimizers=(SAM(params, torch.optim.AdamW, ...), scheduler)")
        return optimizer

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        sam = self._sam()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._sam_replay.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:
            return loss
        replay, self._sam_replay = self._sam_replay, []
        sam.first_step(zero_grad=True)
        try:
            with paused(model):
                for replay_inputs, replay_items in replay:
                    super().training_step(model, replay_inputs, replay_items)
        finally:
            sam.restore()
        return loss
