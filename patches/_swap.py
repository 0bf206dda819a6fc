"""Class swaps that survive pickling: ``module.__class__`` becomes a subclass generated
from a mixin and the module's own class, and goes back on ``restore``.

A generated class cannot be pickled by name, so instances pickle (and deep-copy) as
"the base class, swapped again"; the generated class is cached per (mixin, base).

TorchScript cannot follow a patched forward (per-forward Python state, token counts that depend on
the input), so ``torch.jit.script`` and ``torch.jit.trace`` are refused with one message pointing at
``torch.compile`` / ``torch.export``, which do work, instead of failing deep inside the compiler; so is
``torch.fx.symbolic_trace`` (it failed on a Proxy in the schedule).
"""
from __future__ import annotations

import torch

JIT_UNSUPPORTED = ("tokenprune: {} is not supported on a patched model (its forward carries Python state "
                   "from block to block and the token count depends on the input); use torch.compile(model) "
                   "(or, for timm models, torch.export.export(model, ...)), or tokenprune.remove(model) first")


def refuse_jit_tracing() -> None:
    """Called at the start of a patched forward: a clear error under ``torch.jit.trace`` and ``torch.fx`` symbolic
    tracing (timm's graph feature extraction too), where the schedule would meet a Proxy for the token count."""
    if torch.jit.is_tracing():
        raise RuntimeError(JIT_UNSUPPORTED.format("torch.jit.trace"))
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing():  # False under torch.compile and torch.export
        raise RuntimeError(JIT_UNSUPPORTED.format("torch.fx symbolic tracing"))

_GENERATED: dict[tuple[type, type], type] = {}


class Swapped:
    """Base of every mixin used with ``swap``; never instantiated directly."""

    _tokenprune_base: type
    _tokenprune_mixin: type

    def __reduce_ex__(self, protocol):
        return _new_instance, (self._tokenprune_mixin, self._tokenprune_base), self.__getstate__()

    def __prepare_scriptable__(self):  # torch.jit.script calls it on every sub-module first
        raise RuntimeError(JIT_UNSUPPORTED.format("torch.jit.script"))


def swapped_class(mixin: type, base: type) -> type:
    cls = _GENERATED.get((mixin, base))
    if cls is None:
        cls = type(f"TokenPruned{base.__name__}", (mixin, base), {"_tokenprune_base": base, "_tokenprune_mixin": mixin})
        _GENERATED[(mixin, base)] = cls
    return cls


def _new_instance(mixin: type, base: type):
    cls = swapped_class(mixin, base)
    return cls.__new__(cls)


def swap(module, mixin: type) -> None:
    """Give ``module`` the class ``mixin + type(module)`` (no-op when it already has it)."""
    if not isinstance(module, mixin):
        module.__class__ = swapped_class(mixin, type(module))


def check_swappable(named: list[tuple[str, torch.nn.Module]]) -> None:
    """Raise TypeError where one of the ``(name, module)`` a patch would give another class has a ``forward`` of its
    own on the instance: that attribute wins over any class's ``forward``, so the patched forward would not run
    (the stock one would, silently reducing nothing there, or failing on the patch's arguments). accelerate's
    hooks (``device_map``, offloading) set one, bound to the class the module had then."""
    for name, module in named:
        if "forward" in vars(module):
            cause = ("accelerate's hook (device_map, offloading): load the model on one device without device_map, or "
                     "call accelerate.hooks.remove_hook_from_submodules(model) first") if hasattr(module, "_hf_hook") \
                else "delete the instance attribute, or override forward in a subclass"
            raise TypeError(f"tokenprune cannot patch {name} ({type(module).__name__}): its forward is set on the "
                            f"instance, so the patched forward would not run ({cause})")


def restore(module) -> None:
    if isinstance(module, Swapped):
        module.__class__ = module._tokenprune_base
