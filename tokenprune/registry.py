"""The one registry of token-reduction methods.

A method is a subclass of ``TokenReducer`` decorated with ``@register``. It declares
its native options (``native_options``: each an ``Option``, a default and the values it
accepts), maps ``keep`` or its native options to a per-block schedule, and reduces tokens
given the block's tokens and, when it asks for them, the attention's q and k. Adding a method means adding one file in
``tokenprune/methods/`` and importing it in ``tokenprune/methods/__init__.py``.
"""
from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

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


@dataclass(frozen=True)
class Option:
    """One native option of a method: its default and the values it accepts.

    The one declaration that validation (``TokenReducer.__init__``), ``tokenprune.methods()``
    (and so the CLI's ``-o KEY=VALUE`` and the docs) read. ``check`` is applied to every value
    but the default; a value it refuses raises ``error`` naming the option and ``accepts``.
    """

    default: Any
    accepts: str  # the accepted values, in words: "True or False", "an int >= 0"
    check: Callable[[Any], bool]
    error: type[Exception] = ValueError


def is_int(v: Any, low: int = 0, high: int | None = None) -> bool:
    """An int (bool excluded) in ``[low, high]``."""
    return (isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low
            and (high is None or v <= high))


def is_real(v: Any, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False) -> bool:
    """A real number (bool excluded, NaN excluded) in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    return (isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v)
            and (v > low if low_open else v >= low) and v <= high)


def is_index_list(v: Any) -> bool:
    """A non-empty, strictly increasing list (or tuple) of block indices."""
    return (isinstance(v, (list, tuple)) and len(v) > 0 and all(is_int(i) for i in v)
            and all(a < b for a, b in zip(v, v[1:])))


def flag(default: bool) -> Option:
    """A boolean option: True or False only (a string "False" is truthy, so it is refused)."""
    return Option(default, "True or False", lambda v: isinstance(v, bool), TypeError)


def choice(default: str, *values: str) -> Option:
    return Option(default, " or ".join(repr(v) for v in (default, *values)),
                  lambda v: isinstance(v, str) and v in (default, *values))


class TokenReducer:
    """Base class of every method. One instance holds one configuration.

    Subclasses set ``name``, ``summary``, ``native_options`` (``Option``s by name) and
    override ``schedule`` and ``reduce``. Construction validates everything (each option
    against its declaration, then ``validate`` for constraints between options), so a bad
    option fails before any model is touched.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    native_options: ClassVar[dict[str, Option]] = {}
    #: the default of every native option (derived from ``native_options``)
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.defaults = {key: option.default for key, option in cls.native_options.items()}

    def __init__(self, keep: float = 0.33, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.native_options))
        if unknown:
            accepted = ", ".join(sorted(self.native_options)) or "none"
            raise TypeError(f"method {self.name!r} got unknown option(s) {', '.join(unknown)}; "
                            f"its options are: keep, {accepted}")
        self.keep = check_keep(keep)
        for key, value in options.items():
            option = self.native_options[key]
            if not option.check(value):
                raise option.error(f"{self.name}: {key} must be {option.accepts}, got {value!r}")
        self.options = {**self.defaults, **options}
        self.validate()
        self._notes: list[str] | None = None

    def validate(self) -> None:
        """Constraints between options (each option alone is checked against its declaration);
        raise TypeError or ValueError naming the options."""

    def note(self, message: str) -> None:
        """Record a schedule adjustment the user should know of (e.g. ``r`` clamped to the per-block
        cap). ``apply`` turns the notes made while it plans the schedule into warnings, once; the
        schedules planned at every forward stay silent."""
        if self._notes is not None and message not in self._notes:
            self._notes.append(message)

    @contextmanager
    def collecting_notes(self) -> Iterator[list[str]]:
        self._notes = []
        try:
            yield self._notes
        finally:
            self._notes = None

    @property
    def proportional_attention(self) -> bool:
        """Whether merged tokens bias attention by ``log(size)``."""
        return False

    @property
    def trace_source(self) -> bool:
        return self.options.get("trace_source", False)

    def schedule(self, num_patches: int, depth: int, num_prefix: int = 0) -> tuple[int, ...]:
        """Tokens to remove at each of ``depth`` blocks for an input of ``num_patches`` patch tokens
        behind ``num_prefix`` prefix tokens (only a floor on the total, MCTF's ``min_tokens``, needs it)."""
        raise NotImplementedError

    def reduce(self, x: Tensor, remove: int, taps: AttentionTaps | None, state: ForwardState) -> Tensor:
        """Remove ``remove`` patch tokens from ``x`` (B, N, C) inside one block."""
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v != self.defaults[k])
        return f"{type(self).__name__}(keep={self.keep}{', ' + opts if opts else ''})"
