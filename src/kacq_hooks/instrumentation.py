"""``instrument(model)``: hooks that stream FFN memory-coefficient statistics while the model runs.

One forward pre-hook on the model remembers the call's attention mask; one forward pre-hook per
layer sees C (the input of the MLP output projection) and adds its statistics into fp32 buffers in a
single reduction. With ``grads=True`` that hook also puts a tensor hook on C, so the backward pass
streams dL/dC statistics into the same layer. This module is the public face; the call transaction
lives in :mod:`kacq_hooks.calls`, the site hooks in :mod:`kacq_hooks.capture`, the gradient side in
:mod:`kacq_hooks.gradients`, where the hooked modules sit in :mod:`kacq_hooks.placement`, and what each
stack received is read by :mod:`kacq_hooks.frontends.stacks`. Hooks return nothing (the model's outputs are not
changed by a single bit), never call ``.item()`` on a GPU, and are gone after ``remove()`` or the
end of a ``with`` block, also on error.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch
from torch import nn

from . import saving
from ._hooks import HookSet
from .calls import Calls
from .capture import Capture
from .distributed import neuron_shard, reduce as reduce_across_ranks
from .entropy import KnowledgeEntropy, Measurement, knowledge_entropy
from .errors import ConfigError, NoTokensError, StateError
from .frontends import Binding, bind
from .gradients import Gradients
from .locate import Site
from .placement import Placement
from .stats import CoefficientStats

_WEIGHTINGS = ("token", "document")
_COUNTS = (None, "labels", "shifted_labels")
_attached: "weakref.WeakSet[Instrumentation]" = weakref.WeakSet()


def instrument(model: nn.Module, *, mlp_out: str | None = None, grads: bool = False, mask_padding: bool = True,
               weighting: str = "token", stacks=None, count: str | None = None) -> "Instrumentation":
    """Attach coefficient capture to ``model`` and return the :class:`Instrumentation` that owns it.

    Args:
        model: a Hugging Face causal LM (or any torch model the locator understands, wrapped by DDP,
            FSDP, ``torch.compile`` or activation checkpointing or not), a TransformerLens
            ``HookedTransformer``/``TransformerBridge``, or an nnsight model.
        mlp_out: path template of the MLP output projection, e.g. ``"model.layers.{i}.mlp.down_proj"``,
            overriding the automatic search.
        grads: also stream dL/dC in backward passes (per neuron: sum |g| and sum C*g).
        mask_padding: leave padded positions out (default). ``False`` counts them, as the released
            knowledge-entropy code does, which never passes the mask.
        weighting: the default for :meth:`Instrumentation.knowledge_entropy`: "token" (every token
            counts once; the released code) or "document" (mean over each batch row first; the paper's
            equation). Document sums are only kept when "document" is chosen here.
        stacks: which stacks to instrument: None for the language model's (its decoder, and the encoder of
            an encoder or encoder-decoder), or names such as ``("vision",)`` or ``("decoder", "vision")``.
        count: which tokens count beyond padding, read from the ``labels=`` each call of the model gets
            (a causal LM's decoder only). None: every token that is not padding. ``"labels"``: position t
            counts when ``labels[t] != -100``, the positions that hold the loss's target tokens (the answer
            tokens themselves). ``"shifted_labels"``: position t counts when ``labels[t + 1] != -100``, the
            positions whose next-token predictions a causal-LM loss scores (Hugging Face shifts labels by
            one inside the loss; a ``shift_labels=`` the call passes is used as given); the last position
            never counts. A call without labels is refused.

    >>> import kacq_hooks as kh
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))
    >>> with kh.instrument(model) as inst:
    ...     _ = model(torch.randint(64, (2, 8)))
    >>> len(inst.knowledge_entropy().per_layer), inst.sites[0].path
    (2, 'transformer.h.0.mlp.c_proj')
    """
    if weighting not in _WEIGHTINGS:
        raise ConfigError(f"weighting must be one of {_WEIGHTINGS}, not {weighting!r}")
    if count not in _COUNTS:
        raise ConfigError(f"count must be one of {_COUNTS}, not {count!r}")
    binding = bind(model, mlp_out, stacks)
    if count is not None and [stack.name for stack in binding.stacks] != ["decoder"]:
        raise ConfigError(f"count={count!r} selects positions of a causal LM's decoder by its labels, but the sites "
                          f"lie in the stacks {[stack.name for stack in binding.stacks]}; instrument the decoder only "
                          "(stacks=('decoder',)) or leave count out")
    inst = Instrumentation(binding, model=model, grads=grads, mask_padding=mask_padding, weighting=weighting,
                           count=count)
    inst.attach()
    return inst


def instrumentations_of(model: nn.Module) -> list["Instrumentation"]:
    """The instrumentations attached to ``model`` or to any module inside it."""
    inside = {id(m) for m in model.modules()} if isinstance(model, nn.Module) else set()
    return [inst for inst in list(_attached)
            if inst.model is model or any(id(site.module) in inside for site in inst.sites)]


@contextlib.contextmanager
def paused(model: nn.Module) -> Iterator[None]:
    """Pause every instrumentation of ``model`` (e.g. while scoring probes)."""
    with contextlib.ExitStack() as stack:
        for inst in instrumentations_of(model):
            stack.enter_context(inst.pause())
        yield


class Instrumentation(Measurement):
    """Owns the hooks on one model and the :class:`CoefficientStats` they feed.

    Each model call is a transaction: statistics of a call are staged and added to :attr:`stats` only
    when the call ends normally with every site of every stack that ran seen exactly once, so a call
    that raises (an out-of-memory retry, a keyboard interrupt) adds nothing and every layer always holds
    the same token count. ``discarded_calls`` counts the calls left out that way.

    Order of hooks: kacq reads each stack's mask in a forward pre-hook on that stack's module (for a
    causal LM the base model inside it), so input-rewriting pre-hooks on the outer model run first
    whatever their registration order. On the stack's module itself, register such hooks before
    ``instrument()`` or with ``prepend=True``.
    """

    def __init__(self, binding: Binding, *, model=None, grads: bool = False, mask_padding: bool = True,
                 weighting: str = "token", count: str | None = None):
        self.binding = binding
        self.count = count
        self.model = model if model is not None else binding.root
        self.grads = grads
        self.mask_padding = mask_padding
        self.weighting = weighting
        root_device = _device_of(binding.root)
        devices = [_device_of(s.module, root_device) for s in binding.sites]
        # tensor parallelism: a rank's row-parallel projection sees only its d_ff slice of C
        self.shards = [neuron_shard(s) if s.kind == "dense" else None for s in binding.sites]
        self._widths = [shard.width if shard else s.d_ff for s, shard in zip(binding.sites, self.shards)]
        self.stats = CoefficientStats(self._widths, devices)
        self.reduced = False
        self.discarded_calls = 0
        self._pause_depth = 0
        self._hooks = HookSet()
        self._calls = Calls(self, self._widths, devices)      # the call transaction (kacq_hooks.calls)
        self._capture = Capture(self, self._calls)            # the site hooks (kacq_hooks.capture)
        self._gradients = Gradients(self)                     # loss scaling and staged steps (kacq_hooks.gradients)
        self._placement = Placement(binding)                  # where each site sits, recorded at attach

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def sites(self) -> list[Site]:
        return self.binding.sites

    @property
    def labels(self) -> list[str]:
        """Per site, the label results use: the stack and the model's own layer number."""
        return [site.label for site in self.sites]

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def attach(self) -> "Instrumentation":
        """Register the hooks (``instrument`` does this already; use it to re-attach after ``remove``)."""
        if not self._hooks:
            self._placement.record()
            self._calls.attach(self._hooks)
            self._capture.attach(self._hooks)
            self._gradients.follow()
            _attached.add(self)
        return self

    def remove(self) -> None:
        """Remove every hook; the statistics stay readable (a forward still running adds nothing)."""
        self._hooks.remove()
        self._calls.close()
        self._gradients.unfollow()
        _attached.discard(self)

    def __enter__(self) -> "Instrumentation":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextlib.contextmanager
    def pause(self) -> Iterator["Instrumentation"]:
        """Inside this context forward (and backward) passes are not counted."""
        self._pause_depth += 1
        try:
            yield self
        finally:
            self._pause_depth -= 1

    @property
    def is_paused(self) -> bool:
        return self._pause_depth > 0

    def check_sites_in_place(self) -> None:
        """Refuse a model whose instrumented modules were taken out of it after ``instrument()`` (peft's
        ``merge_and_unload()``, a module swap); see :mod:`kacq_hooks.placement`."""
        self._placement.check()

    def sites_rewrapped(self) -> bool:
        """Whether a hooked module's own attribute in its parent now holds another module (one lookup per site)."""
        return self._placement.rewrapped()

    # -- gradients -------------------------------------------------------------------------------
    def loss_scale(self, scaler) -> "Instrumentation":
        """Declare the ``torch.amp.GradScaler`` that scales the loss (or ``None``: the loss is not scaled).

        ``scaler`` may also be an accelerate ``Accelerator`` (or its wrapped optimizer): its ``scaler``,
        which is None when it does not scale the loss.

        With a scaler, the gradient statistics are of the unscaled loss: each optimizer step's dL/dC
        statistics are staged during backward and committed at ``scaler.update()``, divided by the scale
        its backward passes ran with; a step the scaler skips (inf/NaN gradients) adds nothing, and with
        gradient accumulation the whole window goes with its step. A backward of a loss that did not come
        from ``scaler.scale()`` is of an unscaled loss and is added at once. Until ``update()`` a step's gradients
        are not in :attr:`stats`. The scaler's ``update`` is followed while the hooks are attached (after
        :meth:`remove` the scaler is the user's again; :meth:`attach` follows it again). With the Trainer, :class:`~kacq_hooks.training.LossScaleCallback` does this.

        >>> scaler = torch.amp.GradScaler("cpu")  # doctest: +SKIP
        >>> inst = kh.instrument(model, grads=True).loss_scale(scaler)  # doctest: +SKIP
        >>> scaler.scale(loss).backward(); scaler.step(opt); scaler.update()  # doctest: +SKIP
        """
        self._gradients.use(scaler)
        return self

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps the declared loss scaler skipped (their gradient statistics were left out)."""
        return self._gradients.skipped_steps

    def mean_abs_gradients(self, *, allow_missing: bool = False) -> list[torch.Tensor]:
        """Per layer, fp32 [d_ff]: the mean |dL/dC| per neuron over the tokens whose gradient was recorded.

        dL/dC is of the loss the backward ran on (unscaled under :meth:`loss_scale`); its size follows
        that loss's normalisation (a mean over a batch's tokens makes it scale with 1/tokens). A layer
        whose C never needed a gradient (e.g. LoRA on the output projection only leaves the first layer
        without one) is refused, or NaN with ``allow_missing=True``.
        """
        return [s.grad_sum_abs / s.grad_tokens.clamp(min=1) if ok else torch.full_like(s.grad_sum_abs, float("nan"))
                for s, ok in zip(self.stats, self._gradients.layers(allow_missing, "grad_sum_abs"))]

    def mean_coefficient_gradients(self, *, allow_missing: bool = False) -> list[torch.Tensor]:
        """Per layer, fp32 [d_ff]: the mean of C_i * dL/dC_i per neuron over the recorded tokens.

        Per token, C_i * dL/dC_i is the first-order change of the loss when neuron i's coefficient is
        scaled by (1 + eps), divided by eps: negative where the neuron lowers the loss. Refusals as
        :meth:`mean_abs_gradients`.
        """
        return [s.grad_sum_cg / s.grad_tokens.clamp(min=1) if ok else torch.full_like(s.grad_sum_cg, float("nan"))
                for s, ok in zip(self.stats, self._gradients.layers(allow_missing, "grad_sum_cg"))]

    # -- results ---------------------------------------------------------------------------------
    def knowledge_entropy(self, weighting: str | None = None) -> KnowledgeEntropy:
        """Per-layer and total knowledge entropy of everything recorded so far, labelled by layer."""
        self._require_whole_layers()
        unselected = self.no_tokens_reason()
        if unselected:
            raise NoTokensError(unselected)
        return knowledge_entropy(self.stats, self._weighting(weighting), labels=self.labels)

    def mean_abs_coefficients(self, weighting: str | None = None) -> list[torch.Tensor]:
        """c̄ per layer: fp32 [d_ff] tensors of the mean |C| over recorded tokens (or documents)."""
        self._require_tokens()
        return [s.mean_abs(self._weighting(weighting)) for s in self.stats]

    def activity_frequency(self) -> list[torch.Tensor]:
        """Per layer, the fraction of recorded tokens on which each neuron's |C| > 0."""
        self._require_tokens()
        return [s.active.double().div(s.tokens.clamp(min=1)).float() for s in self.stats]

    def entropy_weighting(self, weighting: str | None) -> str:
        return self._weighting(weighting)

    def check_whole_layers(self) -> None:
        self._require_whole_layers()

    def _weighting(self, weighting: str | None) -> str:
        weighting = weighting or self.weighting
        if weighting == "document" and self.weighting != "document":
            raise ConfigError("document-weighted sums were not kept: create the instrumentation with "
                              "instrument(model, weighting='document')")
        return weighting

    def _require_whole_layers(self) -> None:
        sliced = [site.label for site, layer, shard in zip(self.sites, self.stats, self.shards)
                  if shard is not None and layer.d_ff != site.d_ff]
        if sliced:
            raise StateError(f"{sliced[:3]} hold this rank's slice of tensor-parallel layers, whose entropy is not the "
                             "layer's: gather the slices with inst.all_reduce() (every rank) first")

    def no_tokens_reason(self) -> str | None:
        """Why no token was recorded when calls did run but ``count`` selected none of their positions."""
        return self._calls.unselected(self.count, self.stats)

    def _require_tokens(self) -> None:
        self._require_whole_layers()
        unselected = self.no_tokens_reason()
        if unselected:
            raise NoTokensError(unselected)
        if not any(int(s.tokens) for s in self.stats):
            raise NoTokensError("no tokens have been recorded: run forward passes on the instrumented model "
                                "(outside inst.pause()) first")

    def reset(self) -> None:
        """Forget everything recorded (after a gather, layers go back to this rank's slices)."""
        if [layer.d_ff for layer in self.stats] != self._widths:
            self.stats = CoefficientStats(self._widths, [layer.device for layer in self.stats])
        self.stats.reset()
        self._calls.committed = 0
        self.reduced = False
        self._gradients.reset()

    def state_dict(self) -> dict:
        return saving.state_of(self)

    def load_state_dict(self, state: dict) -> None:
        saving.load_state(self, state)

    def _settings(self) -> dict:
        return saving.settings_of(self)

    def save(self, path) -> None:
        """Write these statistics to ``path``: safetensors with a JSON header (see :mod:`kacq_hooks.saving`)."""
        saving.save_stats(self, path)

    @classmethod
    def load(cls, path, model: nn.Module, **instrument_options) -> "Instrumentation":
        """An instrumentation of ``model`` (hooks attached) holding the statistics saved at ``path``."""
        inst = instrument(model, **instrument_options)
        try:
            return saving.load_stats(path, inst)
        except BaseException:
            inst.remove()  # a failed load leaves the model as it found it
            raise

    def to_pandas(self):
        """One row per (layer label, neuron) with every statistic (needs pandas)."""
        return saving.to_dataframe(self)

    def merge(self, other: "Instrumentation") -> "Instrumentation":
        """Add another instrumentation's statistics (another shard of the data) into these."""
        saving.check_same_measurement(self._settings(), other._settings(), "the other statistics were measured with")
        self.stats.merge(other.stats)
        return self

    def all_reduce(self, group=None) -> "Instrumentation":
        """Combine every rank's statistics in place, so each rank holds the one-process answer.

        Token shards (data parallel, FSDP) add; tensor-parallel d_ff slices are gathered, their token
        counts taken once. ``group`` is the data-parallel group (default: see
        :func:`kacq_hooks.distributed.reduce`). Once reduced, the statistics refuse further forwards
        until :meth:`reset`, so no rank's tokens are ever counted twice.
        """
        if self.reduced:
            raise StateError("these statistics were already combined across ranks; inst.reset() before the next window")
        reduce_across_ranks(self.stats, self.shards, group, paths=[site.path for site in self.sites],
                            settings=self._settings())
        self.reduced = True
        return self

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"Instrumentation({len(self.sites)} sites via {self.binding.name}, {state}, grads={self.grads})"


def _device_of(module: nn.Module, default: torch.device | None = None) -> torch.device:
    for tensor in module.parameters():
        return tensor.device if tensor.device.type != "meta" else torch.device("cpu")
    return default or torch.device("cpu")
