"""Where the hooked modules sit in the model, and the refusal of a model whose hooked modules were taken out.

At attach each site's chain of (parent, attribute, child) from the root down to it is recorded. peft's
``merge_and_unload()`` (and any module swap) later puts new modules where the hooked ones were: their
forwards would run unseen and every call would add nothing. The call transaction asks
:meth:`Placement.rewrapped` (one parent lookup per site) at the end of each call, and :meth:`Placement.check`
only when a call ends with a site that did not run or a hooked module's place holds another module, so a
normal call pays nothing more.
"""
from __future__ import annotations

from torch import nn

from .errors import ConfigError, LocateError


class Placement:
    """The recorded place of each site of ``binding`` below its root (None where a site is not below it: a front
    end whose sites live elsewhere, which is then not checked)."""

    def __init__(self, binding):
        self.binding = binding
        self.chains: list = []

    def record(self) -> None:
        self.chains = [_chain_to(self.binding.root, site.module) for site in self.binding.sites]

    def rewrapped(self) -> bool:
        """Whether a hooked module's own attribute in its parent now holds another module (one lookup per site)."""
        return any(chain is not None and chain[-1][0]._modules.get(chain[-1][1]) is not chain[-1][2]
                   for chain in self.chains)

    def check(self) -> None:
        """Refuse hooked modules taken out of the model; follow one that was wrapped in place (``get_peft_model``
        after ``instrument``), which is still in the model and still measured."""
        sites, gone = self.binding.sites, []
        for index, chain in enumerate(self.chains):
            if chain is None or all(parent._modules.get(name) is child for parent, name, child in chain):
                continue
            found = _chain_to(self.binding.root, sites[index].module)  # moved (wrapped in place)?
            if found is None:
                gone.append(sites[index].path)
                continue
            wrapper = found[-1][0]
            if hasattr(wrapper, "ia3_l") and getattr(wrapper, "is_feedforward", False):
                # peft IA3 on a feed-forward module multiplies its input: the hooked base layer would see l * C,
                # while the same model instrumented after wrapping (or merged) gives C
                raise ConfigError(f"{sites[index].path} was wrapped by a peft IA3 layer that scales its input "
                                  "(feedforward_modules) after instrument(), so its hook would measure the scaled "
                                  "coefficients, not C. Instrument the wrapped model: inst.remove(); "
                                  "inst = kh.instrument(peft_model)")
            self.chains[index] = found
        if gone:
            raise LocateError(f"the instrumented modules {gone[:3]}{' ...' if len(gone) > 3 else ''} are no longer in "
                              "the model: it was changed after instrument() (peft's merge_and_unload() or "
                              "unload(), or modules replaced), so nothing of its forwards would be measured. "
                              "Instrument the model as it is now: inst.remove(); inst = kh.instrument(merged_model)")


def _chain_to(root: nn.Module, module: nn.Module) -> list | None:
    for name, candidate in root.named_modules(remove_duplicate=False):
        if candidate is module and name:
            chain, parent = [], root
            for attribute in name.split("."):
                child = parent._modules[attribute]
                chain.append((parent, attribute, child))
                parent = child
            return chain
    return None
