"""The public entry points: ``apply``, ``remove``, ``methods``, ``last_forward``."""
from __future__ import annotations

from typing import Any

from torch import nn

from .adapters import Adapter, adapters, check_module, find_adapter
from .registry import EncoderReducer, check_keep, get_method, method_names
from .state import ForwardReport
from .warn import warn_at_caller

DEFAULT_KEEP = 0.33


def apply(model: nn.Module, method: str | None = None, keep: float | None = None, *, flops: float | None = None,
          gflops: float | None = None, input_size: tuple[int, ...] | None = None, positions: str | None = None,
          **options: Any) -> nn.Module:
    """Patch ``model`` in place to reduce its tokens; returns the same object.

    ``keep`` is the fraction of patch tokens that leave the encoder: the final count
    is ``max(1, round(keep * num_patches))``; prefix tokens (class, distillation,
    registers) are never reduced nor counted. ``method=None`` picks the model
    family's default (``tome`` for ViTs); any other value must name a registered
    method. Native options (``tokenprune.methods()`` lists them) override ``keep``.
    ``keep=1.0`` leaves outputs bit-identical. ``keep`` defaults to 0.33.

    A FLOPs budget instead of ``keep`` (image encoders): ``flops``, a fraction of the unpatched
    model's FLOPs, or ``gflops``, GFLOPs per image, both counted on the real forward at ``input_size``
    (default: the model's own); the largest ``keep`` within it is chosen (``tokenprune.budget``;
    ``reducer_of(model).keep`` tells which). Applying to a patched model
    re-configures it. Every argument is checked before the model is touched; a
    native schedule the method clamps (``r`` above half the patch tokens a block
    sees) is applied as clamped, with a warning.

    Vision-language models (LLaVA, LLaVA-NeXT, Qwen2(.5)-VL; default method ``hiprune``): ``keep``
    is the fraction of each image's visual tokens the language model receives, and ``positions``
    ("reindex" or "original") how the kept tokens are numbered (default: LLaVA "reindex",
    Qwen "original").
    """
    if flops is not None or gflops is not None:
        if keep is not None:
            raise TypeError("give keep or a FLOPs budget (flops= / gflops=), not both")
        from .budget import fit_flops_budget

        keep = fit_flops_budget(model, method, flops=flops, gflops=gflops, input_size=input_size, **options).keep
    elif input_size is not None:
        raise TypeError("input_size applies to a FLOPs budget (flops= / gflops=) only")
    keep = check_keep(DEFAULT_KEEP if keep is None else keep)
    adapter = find_adapter(model)
    reducer = get_method(adapter.default_method if method is None else method)(keep=keep, **options)
    if not isinstance(reducer, adapter.method_types):
        takers = "; ".join(a.family for a in adapters() if isinstance(reducer, a.method_types))
        usable = ", ".join(m for m in method_names() if issubclass(get_method(m), adapter.method_types))
        raise TypeError(f"{reducer.name} is {reducer.kind}: apply it to {takers}. "
                        f"{type(model).__name__} takes: {usable}")
    settings = {}
    if positions is not None:
        if "positions" not in adapter.settings:
            raise TypeError(f"positions applies to vision-language models only, not to {type(model).__name__}")
        settings["positions"] = positions
    with reducer.collecting_notes() as notes:
        adapter.plan(model, reducer, **settings)
    for note in notes:
        warn_at_caller(note, UserWarning)
    adapter.patch(model, reducer, **settings)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo ``apply``: the model's classes, outputs and ``state_dict`` are as before."""
    adapter = find_adapter(model)
    if not adapter.is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched by tokenprune")
    adapter.unpatch(model)
    return model


def _patching_adapter(model: nn.Module) -> Adapter | None:
    """The adapter whose patch ``model`` carries, or None. Not ``find_adapter``: that one also refuses a model its
    adapter will not apply or remove on, such as a VLM's vision tower while the VLM's patch holds it, and a tower an
    encoder method reduces in is patched all the same (``is_patched`` said False, ``last_forward`` "not patched")."""
    check_module(model)
    adapter = next((a for a in adapters() if a.handles(model)), None)
    try:
        return adapter if adapter is not None and adapter.is_patched(model) else None
    except TypeError:  # a model the adapter cannot read (two encoders, ...) carries none of its patches
        return None


def is_patched(model: nn.Module) -> bool:
    """Whether tokenprune patched ``model``: False for a model it does not support; TypeError for an object
    that is not an ``nn.Module`` (a pipeline: ask of ``pipe.model``), as ``apply`` and ``remove`` give."""
    return _patching_adapter(model) is not None


def methods() -> str:
    """Every registered method: its name and what it is, then one line per native option with its
    default and the values it accepts (the declarations validation reads)."""
    lines = []
    for name in method_names():
        cls = get_method(name)
        lines.append(f"{name:<12} {cls.summary}")
        budget = " (or a FLOPs budget: flops= / gflops=)" if issubclass(cls, EncoderReducer) else ""  # encoders only
        lines.append(f"    keep={DEFAULT_KEEP}: a number in (0, 1]{budget}")
        lines += [f"    {key}={option.default!r}: {option.accepts}" for key, option in cls.native_options.items()]
    return "\n".join(lines)


def last_forward(model: nn.Module) -> ForwardReport | None:
    """What the model's most recent patched forward did (token count entering each block, ...).

    None before the first forward. Under concurrent calls it is whichever finished last.
    """
    adapter = _patching_adapter(model)
    if adapter is None:
        raise ValueError(f"{type(model).__name__} is not patched by tokenprune")
    return adapter.last_forward(model)


def reducer_of(model: nn.Module):
    """The method instance configured on a patched model."""
    adapter = _patching_adapter(model)
    if adapter is None:
        raise ValueError(f"{type(model).__name__} is not patched by tokenprune")
    return adapter.reducer_of(model)
