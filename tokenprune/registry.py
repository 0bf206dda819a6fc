"""The one registry of token-reduction methods.

A method is a subclass of ``TokenReducer`` decorated with ``@register``. It says
which native options it takes (``defaults``), maps ``keep`` or its native options to
a per-block schedule, and reduces tokens given the block's tokens and, when it asks
for them, the attention's q and k. Adding a method means adding one file in
``tokenprune/methods/`` and importing it in ``tokenprune/methods/__init__.py``.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar

from torch import Tensor

from .state import AttentionTaps, ForwardState

_METHODS: dict[str, type["TokenReducer"]] = {}


def register(cls: type["TokenReducer"]) -> type["TokenReducer"]:
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} is already registered")
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type["TokenReducer"]:
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, one of {method_names()}; got {type(name).__name__}")
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(method_names())}") from None


def check_keep(keep: Any) -> float:
    """``keep`` must be a real number in (0, 1]."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep must be a number in (0, 1], got {keep!r} ({type(keep).__name__})")
    keep = float(keep)
    if math.isnan(keep) or not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1] (the fraction of patch tokens that leave the encoder), got {keep}")
    return keep


class TokenReducer:
    """Base class of every method. One instance holds one configuration.

    Subclasses set ``name``, ``summary``, ``defaults`` (native options and their
    default values) and override ``schedule`` and ``reduce``. Construction
    validates everything, so a bad option fails before any model is touched.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    #: ask the adapter for q/k (``AttentionTaps``) at blocks that reduce
    needs_attention: ClassVar[bool] = False
    #: and for the attention probabilities: the adapter then runs explicit attention at those
    #: blocks only (cheaper than SDPA plus a second q @ k^T and softmax)
    needs_probabilities: ClassVar[bool] = False
    #: where a block reduces: "after_attention" (between the attention residual and the MLP), or
    #: "block_input" (before attention, from q/k of the un-reduced tokens; ``reduce`` then returns
    #: ``(x, core)``: ``core(v)`` computes the block's attention output from the merged tokens'
    #: values (B, H, N', D), reusing the scores; None recomputes attention as usual)
    placement: ClassVar[str] = "after_attention"
    #: "encoder": reduces tokens inside a vision encoder's blocks (``schedule`` + ``reduce``), usable on
    #: ViTs and on a VLM's vision tower; "vlm": selects the visual tokens a VLM's language model
    #: receives from encoder attention scores (``select``), VLMs only
    scope: ClassVar[str] = "encoder"

    def __init__(self, keep: float = 0.33, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            accepted = ", ".join(sorted(self.defaults)) or "none"
            raise TypeError(f"method {self.name!r} got unknown option(s) {', '.join(unknown)}; "
                            f"its options are: keep, {accepted}")
        self.keep = check_keep(keep)
        self.options = {**self.defaults, **options}
        self.validate()

    def validate(self) -> None:
        """Check ``self.options``; raise TypeError or ValueError naming the bad one."""

    @property
    def proportional_attention(self) -> bool:
        """Whether merged tokens bias attention by ``log(size)``."""
        return False

    @property
    def trace_source(self) -> bool:
        return bool(self.options.get("trace_source", False))

    def schedule(self, num_patches: int, depth: int) -> tuple[int, ...]:
        """Tokens to remove at each of ``depth`` blocks for an input of ``num_patches``."""
        raise NotImplementedError

    def reduce(self, x: Tensor, remove: int, taps: AttentionTaps | None, state: ForwardState) -> Tensor:
        """Remove ``remove`` patch tokens from ``x`` (B, N, C) inside one block."""
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v != self.defaults[k])
        return f"{type(self).__name__}(keep={self.keep}{', ' + opts if opts else ''})"
