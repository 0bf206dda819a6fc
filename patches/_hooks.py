"""Removing the forward hooks a patch registered, found by function (so it works on copies too)."""
from __future__ import annotations

from torch import nn


def remove_hooks(module: nn.Module, *functions) -> None:
    for hooks, with_kwargs in ((module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs),
                               (module._forward_hooks, module._forward_hooks_with_kwargs)):
        for key in [k for k, fn in hooks.items() if fn in functions]:
            del hooks[key]
            with_kwargs.pop(key, None)
