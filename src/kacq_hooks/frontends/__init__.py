"""Front ends: how each kind of model object exposes its coefficient sites, its stacks and their masks.

A front end turns a model into a :class:`Binding`; :class:`kacq_hooks.Instrumentation` does the rest
the same way for all of them, so the statistics agree across front ends by construction.

A model call is read in two places. The **root**'s forward pre-hook opens a call and a post-hook on the
**closer** (the root itself unless a front end says otherwise) ends it; a call is alive while the
forward of the **frame owner** (the root, or the model whose methods a front end calls) is running. Each **stack** (the decoder of
a causal LM; the encoder and decoder of a seq2seq model; a vision tower) is a module whose forward
receives that stack's own tokens and padding mask: a pre-hook there binds the mask that the stack's
sites use for the rest of the call. Reading the mask at the stack, not at the root, is what makes it
the mask that produced C: hooks that rewrite the batch at the root (fact injection) have run by then,
and a seq2seq decoder gets ``decoder_attention_mask``, never the encoder's. Every front end reads its
stacks with the same :class:`~kacq_hooks.frontends.stacks.StackReader`, only the argument names differ.
"""
from __future__ import annotations

from . import hf, nnsight, transformer_lens
from .binding import Binding
from .stacks import Arguments, StackInputs, StackReader  # noqa: F401  (names of this package)


def bind(model, mlp_out: str | None = None, stacks=None) -> Binding:
    """Pick the front end for ``model`` without importing optional packages unless the model is theirs."""
    module = type(model).__module__ or ""
    # the front end modules import their optional packages only when they bind a model of them
    if module.startswith("transformer_lens"):
        return transformer_lens.bind(model, mlp_out)  # one decoder stack
    if module.startswith("nnsight"):
        return nnsight.bind(model, mlp_out, stacks, bind_inner=bind)
    return hf.bind(model, mlp_out, stacks)
