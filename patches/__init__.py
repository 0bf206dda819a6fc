"""Framework adapters: each teaches tokenprune to patch one model family.

An adapter is a module with ``FAMILY`` (a description for error messages),
``DEFAULT_METHOD``, and the functions ``handles(model)``, ``check(model)``,
``patch(model, reducer)``, ``unpatch(model)`` and ``is_patched(model)``. Adding a
model family means writing one such module and listing it in ``ADAPTERS``.
"""
from __future__ import annotations

from types import ModuleType

from torch import nn

from . import hf_vision, hf_vlm, timm_vit

ADAPTERS: tuple[ModuleType, ...] = (timm_vit, hf_vlm, hf_vision)  # VLMs before encoders: a VLM holds one


def find_adapter(model: nn.Module) -> ModuleType:
    """The adapter for ``model``; TypeError naming the class and the supported families if none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"tokenprune patches torch.nn.Module models, got {type(model).__name__}")
    for adapter in ADAPTERS:
        if adapter.handles(model):
            adapter.check(model)
            return adapter
    families = "; ".join(a.FAMILY for a in ADAPTERS)
    raise TypeError(f"tokenprune does not support {type(model).__module__}.{type(model).__name__}; "
                    f"supported: {families}")
