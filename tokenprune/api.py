"""The public entry points: ``apply``, ``remove``, ``methods``, ``last_forward``."""
from __future__ import annotations

from typing import Any

from torch import nn

from . import methods as _methods  # noqa: F401  (registers every method)
from .patches import find_adapter
from .registry import check_keep, get_method, method_names
from .state import ForwardReport


def apply(model: nn.Module, method: str | None = None, keep: float = 0.33, *, positions: str | None = None,
          **options: Any) -> nn.Module:
    """Patch ``model`` in place to reduce its tokens; returns the same object.

    ``keep`` is the fraction of patch tokens that leave the encoder: the final count
    is ``max(1, round(keep * num_patches))``; prefix tokens (class, distillation,
    registers) are never reduced nor counted. ``method=None`` picks the model
    family's default (``tome`` for ViTs). Native options (``tokenprune.methods()``
    lists them) override ``keep``. ``keep=1.0`` leaves outputs bit-identical.
    Applying to a patched model re-configures it. Every argument is checked
    before the model is touched.

    Vision-language models (LLaVA, LLaVA-NeXT, Qwen2(.5)-VL; default method ``hiprune``): ``keep``
    is the fraction of each image's visual tokens the language model receives, and ``positions``
    ("reindex" or "original") how the kept tokens are numbered (default: LLaVA "reindex",
    Qwen "original").
    """
    keep = check_keep(keep)
    adapter = find_adapter(model)
    reducer = get_method(method or adapter.DEFAULT_METHOD)(keep=keep, **options)
    settings = {}
    if positions is not None:
        if not hasattr(adapter, "POSITIONS"):
            raise TypeError(f"positions applies to vision-language models only, not to {type(model).__name__}")
        settings["positions"] = positions
    adapter.check_schedule(model, reducer, **settings)
    adapter.patch(model, reducer, **settings)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo ``apply``: the model's classes, outputs and ``state_dict`` are as before."""
    adapter = find_adapter(model)
    if not adapter.is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched by tokenprune")
    adapter.unpatch(model)
    return model


def is_patched(model: nn.Module) -> bool:
    try:
        return find_adapter(model).is_patched(model)
    except TypeError:
        return False


def methods() -> str:
    """One line per registered method: its name, what it is, and its native options."""
    lines = []
    for name in method_names():
        cls = get_method(name)
        opts = ", ".join(f"{k}={v!r}" for k, v in cls.defaults.items())
        lines.append(f"{name:<12} {cls.summary}. Options: keep, {opts}")
    return "\n".join(lines)


def last_forward(model: nn.Module) -> ForwardReport | None:
    """What the model's most recent patched forward did (token count entering each block, ...).

    None before the first forward. Under concurrent calls it is whichever finished last.
    """
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched by tokenprune")
    return find_adapter(model).last_forward(model)


def reducer_of(model: nn.Module):
    """The method instance configured on a patched model."""
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched by tokenprune")
    return find_adapter(model).reducer_of(model)
