"""What a framework adapter is, and the one list of them.

An adapter teaches tokenprune to patch one kind of model (timm ViTs, transformers vision encoders,
transformers VLMs). It subclasses ``Adapter`` and is registered with ``@register_adapter``; the
package imports ``tokenprune.patches`` once, which registers every adapter, so the core
(``api.py``, this module) never imports one. Adding a model family means one adapter file (or, for a
transformers family shaped like the ones supported, one row in an existing adapter).

An adapter keeps its configuration on one module of the model, its ``anchor`` (the timm model, the
transformers module running the layer loop, the multimodal ``*Model``): the reducer as
``tokenprune_reducer`` and the last forward's report as ``_tokenprune_last``. ``is_patched``,
``reducer_of`` and ``last_forward`` read them there.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar

from torch import nn

from .registry import EncoderReducer, TokenReducer

_ADAPTERS: list["Adapter"] = []


class Adapter(abc.ABC):
    """One model family's patch."""

    #: what it patches, in words (error messages list every adapter's)
    family: ClassVar[str]
    #: the method ``apply(model)`` uses when none is named
    default_method: ClassVar[str]
    #: the kinds of method it runs (``EncoderReducer``, ``VisualTokenSelector``)
    method_types: ClassVar[tuple[type[TokenReducer], ...]]
    #: keyword settings of ``apply`` beyond the method's options (VLMs: ``positions``)
    settings: ClassVar[tuple[str, ...]] = ()
    #: adapters are tried in increasing order: those that look at the model's class only first (timm: 0),
    #: then those whose models contain others' (a VLM holds a vision encoder: 10) before those (20)
    lookup_order: ClassVar[int] = 20

    @abc.abstractmethod
    def handles(self, model: nn.Module) -> bool:
        """Whether ``model`` is (or holds) one of this adapter's models. Called on every ``apply`` and
        ``is_patched``: cheap, and False rather than an error."""

    @abc.abstractmethod
    def anchor(self, model: nn.Module) -> nn.Module:
        """The module that carries the configuration."""

    @abc.abstractmethod
    def check(self, model: nn.Module) -> None:
        """Raise TypeError naming the first part of ``model`` this adapter cannot patch."""

    @abc.abstractmethod
    def plan(self, model: nn.Module, reducer: TokenReducer, **settings: Any) -> None:
        """Check everything ``patch`` needs for this configuration (plan the schedule for the model's
        configured input size, ...), raising before anything changes."""

    @abc.abstractmethod
    def patch(self, model: nn.Module, reducer: TokenReducer, **settings: Any) -> None:
        """Patch ``model`` in place (re-configure it if patched)."""

    @abc.abstractmethod
    def unpatch(self, model: nn.Module) -> None:
        """Undo ``patch``: classes, hooks and attributes as before."""

    def is_patched(self, model: nn.Module) -> bool:
        return hasattr(self.anchor(model), "tokenprune_reducer")

    def reducer_of(self, model: nn.Module) -> TokenReducer:
        return self.anchor(model).tokenprune_reducer

    def last_forward(self, model: nn.Module) -> Any:
        return self.anchor(model)._tokenprune_last

    @staticmethod
    def configure(anchor: nn.Module, reducer: TokenReducer) -> None:
        anchor.tokenprune_reducer = reducer
        anchor._tokenprune_last = None

    @staticmethod
    def unconfigure(anchor: nn.Module) -> None:
        for name in ("tokenprune_reducer", "_tokenprune_last"):
            anchor.__dict__.pop(name, None)


class EncoderAdapter(Adapter):
    """An adapter for vision encoders (ViTs): runs encoder methods, ToMe by default."""

    default_method = "tome"
    method_types = (EncoderReducer,)


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: add an instance of ``cls`` to the adapters ``find_adapter`` tries."""
    _ADAPTERS.append(cls())
    _ADAPTERS.sort(key=lambda adapter: adapter.lookup_order)  # stable: registration order otherwise
    return cls


def adapters() -> tuple[Adapter, ...]:
    return tuple(_ADAPTERS)


def check_module(model) -> None:
    if not isinstance(model, nn.Module):
        inner = isinstance(getattr(model, "model", None), nn.Module)  # a transformers Pipeline holds its model
        raise TypeError(f"tokenprune patches torch.nn.Module models, got {type(model).__name__}"
                        + (": pass its .model" if inner else ""))


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``, its parts checked; TypeError naming the class and the supported families."""
    check_module(model)
    for adapter in _ADAPTERS:
        if adapter.handles(model):
            adapter.check(model)
            return adapter
    families = "; ".join(a.family for a in _ADAPTERS)
    raise TypeError(f"tokenprune does not support {type(model).__module__}.{type(model).__name__}"
                    f"{wrapper_hint(model)}; supported: {families}")


def wrapper_hint(model: nn.Module) -> str:
    """For a wrapper around a model tokenprune may support, where to apply instead (else '')."""
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
        return (" (a torch.compile wrapper: apply to the module it compiled, ._orig_mod, before compiling, then "
                "compile that; tokenprune.compiled(model) compiles as the benchmarks do)")
    if callable(getattr(model, "get_base_model", None)):  # peft's PeftModel
        return " (a peft model: apply to the model it wraps, .get_base_model())"
    return ""
