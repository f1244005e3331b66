"""Stacks: the outermost numbered block lists of a model (decoder, encoder, vision tower), and what lies
inside attention or a sequence mixer in one block."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .families import _ATTENTION, _AUDIO, _FFN_CLASS, _MIXER_CLASS, _MIXER_PART, _MLP_CLASS, _VISION
from .paths import _hidden_size, clean_name, find_config, projection_shape

LANGUAGE_STACKS = ("decoder", "encoder")


@dataclass(frozen=True)
class Stack:
    """One numbered block list of a model: its stack name, path, blocks and width."""

    name: str
    path: str
    blocks: nn.ModuleList
    d_model: int | None


def _base_stack_name(path: str, encoder_only: bool) -> str:
    parts = path.split(".")
    if any(_VISION.search(p) for p in parts):
        return "vision"
    if any(_AUDIO.search(p) for p in parts):
        return "audio"
    for part in parts:  # the outermost name decides: EncoderDecoderModel's decoder is a BERT *encoder* inside
        if "encoder" in part.lower():
            return "encoder"
        if "decoder" in part.lower():
            return "decoder"
    return "encoder" if encoder_only else "decoder"


def _is_encoder_only(model: nn.Module, config) -> bool:
    name = type(model).__name__
    if "MaskedLM" in name:
        return True
    from transformers.models.auto import modeling_auto  # transformers is only needed for HF models

    model_type = getattr(config, "model_type", None)
    masked = model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    causal = model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if re.search(r"ForSequenceClassification|ForTokenClassification|ForQuestionAnswering|ForPreTraining", name):
        # a head on a decoder-only type (LlamaForSequenceClassification) keeps its causal decoder; a type with a
        # masked-LM head (BERT) is an encoder; otherwise its attention says whether it is causal
        if masked or causal:
            return masked
        return not any(getattr(m, "is_causal", None) is True for m in model.modules())
    if name.endswith(("ForCausalLM", "LMHeadModel")) or getattr(config, "is_decoder", False):
        return False
    # A base model of a type with a masked-LM head and no causal-LM head is an encoder (BERT-like).
    return masked and not causal


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    return all(projection_shape(b) is None and not isinstance(b, (nn.Embedding, nn.LayerNorm)) for b in module)


def find_stacks(model: nn.Module) -> list[Stack]:
    """Every outermost numbered block list of ``model``, named by stack ("decoder", "encoder", "vision", ...).

    Two lists that get the same name are told apart by a suffix: "decoder", "decoder_2", ...
    """
    config = find_config(model)
    encoder_only = _is_encoder_only(model, config)
    lists: list[tuple[str, nn.ModuleList]] = []
    for raw, module in model.named_modules():
        name = clean_name(raw, model)
        if _is_block_list(module) and not any(name.startswith(p + ".") for p, _ in lists):
            lists.append((name, module))
    stacks, seen = [], {}
    for path, blocks in lists:
        base = _base_stack_name(path, encoder_only)
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}_{seen[base]}"
        stacks.append(Stack(name, path, blocks, _stack_width(blocks, config, base)))
    return stacks


def _stack_width(blocks: nn.ModuleList, config, base: str) -> int | None:
    """The width of a stack's residual stream: the size its blocks' own norms normalise."""
    sizes: dict[int, int] = {}
    inner: dict[int, int] = {}  # norms inside an FFN (BitNet's ffn_sub_norm normalises C, d_ff wide)
    for name, module in blocks[0].named_modules():
        weight = getattr(module, "weight", None)
        if ("norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1
                and not _ATTENTION.search(name) and not _under_mixer(name, blocks[0])):
            counts = inner if _under_ffn(name, blocks[0]) else sizes
            counts[weight.numel()] = counts.get(weight.numel(), 0) + 1
    if sizes or inner:
        return max(sizes or inner, key=(sizes or inner).get)
    sub = getattr(config, f"{base}_config", None) or (getattr(config, "text_config", None)
                                                       if base in LANGUAGE_STACKS else None)
    return _hidden_size(sub or config, [])


def _wanted(stack: Stack, stacks) -> bool:
    base = stack.name.split("_")[0] if re.fullmatch(r"[a-z]+_\d+", stack.name) else stack.name
    wanted = set(LANGUAGE_STACKS) if stacks is None else set(stacks)
    if "language" in wanted:
        wanted |= set(LANGUAGE_STACKS)
    return stack.name in wanted or base in wanted


# -- one block -----------------------------------------------------------------------------------------
def _ancestors(rel: str, block: nn.Module) -> list[nn.Module]:
    out, module = [], block
    for part in rel.split(".")[:-1]:
        module = getattr(module, part)
        out.append(module)
    return out


def _under_ffn(rel: str, block: nn.Module) -> bool:
    """Whether the block-relative path ``rel`` lies inside an FFN module (by its class name)."""
    return bool(rel) and any(_FFN_CLASS.search(type(m).__name__) for m in _ancestors(rel, block))


def _under_mixer(rel: str, block: nn.Module) -> bool:
    """Whether the block-relative path ``rel`` lies inside attention or a sequence mixer."""
    if not rel:
        return False
    parts = rel.split(".")
    for part, module in zip(parts[:-1], _ancestors(rel, block)):
        cls = type(module).__name__
        if _MLP_CLASS.search(cls):
            continue  # Nemotron-H names its MLPs "mixer" too: the class says what it is
        if _MIXER_PART.match(part) or _MIXER_CLASS.search(cls) or _ATTENTION.search(part):
            return True
    return False



def _has_mixers(stack: Stack) -> bool:
    return any(_MIXER_CLASS.search(type(m).__name__) or _MIXER_PART.match(rel.split(".")[-1])
               for block in stack.blocks for rel, m in block.named_modules() if rel)
