"""Measure a model on fixed batches: the one loop behind the callbacks, ``kacq entropy`` and the study.

``measure(model, batches)`` runs every batch through ``model`` under a fresh instrumentation in
evaluation mode (no grad, dropout off, RNG state and every module's training flag restored, every
other instrumentation of the model paused) and returns that instrumentation, detached, so any
result (knowledge entropy, c̄, activity) can be read from it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from .errors import ArgumentTypeError, ConfigError
from .instrumentation import Instrumentation, instrument, instrumentations_of

_MODEL_INPUTS = ("input_ids", "attention_mask", "inputs_embeds", "decoder_input_ids", "decoder_attention_mask",
                 "token_type_ids", "position_ids")


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside; RNG state, training flags and other instrumentations restored after."""
    training_flags = [(module, module.training) for module in model.modules()]
    cuda_devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
        for other in instrumentations_of(model):
            stack.enter_context(other.pause())
        stack.enter_context(torch.no_grad())
        model.eval()
        try:
            yield
        finally:
            for module, flag in training_flags:
                module.training = flag


def as_model_inputs(batch, keep: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A batch as keyword arguments of ``model(...)``: token ids [N, T], or a mapping with ``input_ids``.

    ``keep`` names further keys passed on (``labels`` when the instrumentation counts by them)."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or not any(k in batch for k in ("input_ids", "inputs_embeds")):
        raise ArgumentTypeError(f"a batch must be token ids [N, T] or a mapping with 'input_ids' (and 'attention_mask'), "
                        f"not {type(batch).__name__}")
    return {key: value for key, value in batch.items() if (key in _MODEL_INPUTS or key in keep) and value is not None}


def measure(model: nn.Module, batches: Iterable, *, progress=None, **instrument_options) -> Instrumentation:
    """Instrument ``model``, run ``batches`` through it in evaluation mode, and return the detached instrumentation.

    ``batches`` holds token ids [N, T] or mappings with ``input_ids`` (and ``attention_mask``, and for
    encoder-decoders ``decoder_input_ids`` / ``decoder_attention_mask``); tensors are moved to the
    model's device. ``instrument_options`` go to :func:`kacq_hooks.instrument` (``mlp_out``,
    ``mask_padding``, ``weighting``, ``count``); with ``count`` each batch's ``labels`` go to the model
    too (it then computes its loss), and a batch without them is refused. ``progress(batches_done)`` is called after each batch.

    >>> import kacq_hooks as kh
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))
    >>> inst = kh.measure(model, [torch.randint(64, (2, 8))])
    >>> int(inst.stats[0].tokens), inst.attached
    (16, False)
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    done = 0
    keep = ("labels", "shift_labels") if instrument_options.get("count") is not None else ()
    with evaluation_mode(model), instrument(model, **instrument_options) as inst:
        for batch in batches:
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in as_model_inputs(batch, keep).items()}
            model(**inputs)
            done += 1
            if progress is not None:
                progress(done)
    if done == 0:
        raise ConfigError("measure() got no batches: pass at least one batch of token ids")
    return inst
