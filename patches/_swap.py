"""Class swaps that survive pickling: ``module.__class__`` becomes a subclass generated
from a mixin and the module's own class, and goes back on ``restore``.

A generated class cannot be pickled by name, so instances pickle (and deep-copy) as
"the base class, swapped again"; the generated class is cached per (mixin, base).
"""
from __future__ import annotations

_GENERATED: dict[tuple[type, type], type] = {}


class Swapped:
    """Base of every mixin used with ``swap``; never instantiated directly."""

    _tokenprune_base: type
    _tokenprune_mixin: type

    def __reduce_ex__(self, protocol):
        return _new_instance, (self._tokenprune_mixin, self._tokenprune_base), self.__getstate__()


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


def restore(module) -> None:
    if isinstance(module, Swapped):
        module.__class__ = module._tokenprune_base
