"""The one registry of token-reduction methods, and the two kinds of method.

A method is a subclass of one of two types, decorated with ``@register``:

* ``EncoderReducer``: reduces tokens inside a vision encoder's blocks. It maps ``keep`` (or its native
  options) to a per-block schedule and implements one hook, ``after_attention`` (between the attention
  residual and the MLP: ToMe, Zero-TPrune, random) or ``before_attention`` (at the block input, from
  the q and k of the un-reduced tokens: MCTF). Both return a ``Reduction``. ``needs`` says what the
  block's attention must hand the ``after_attention`` hook. Runs on ViTs and on a VLM's vision tower.
* ``VisualTokenSelector``: chooses, per image, the visual tokens a VLM's language model receives, from
  the attention each token receives at encoder layers it names and the image's patch grid (HiPrune).
  It owns its budget. VLMs only.

Both declare their native options once (``native_options``: each an ``Option``, a default and the
values it accepts); validation, ``tokenprune.methods()``, the CLI's ``-o KEY=VALUE`` and the docs read
that declaration. Adding a method means adding one file in ``tokenprune/methods/`` and importing it in
``tokenprune/methods/__init__.py`` (docs/design.md has a worked example of each kind).
"""
from __future__ import annotations

import enum
import math
import numbers
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor

from .state import AttentionTaps, ForwardState

_METHODS: dict[str, type["TokenReducer"]] = {}


def register(cls: type["TokenReducer"]) -> type["TokenReducer"]:
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} is already registered")
    _METHODS[cls.name] = cls
    return cls


#: native options that, when set, decide the token counts instead of ``keep``: ToMe's and MCTF's ``r``, MCTF's
#: ``fast`` preset, Zero-TPrune's ``keep_rates``, a selector's ``tokens``
KEEP_OVERRIDES = ("r", "fast", "keep_rates", "tokens")


def config_label(keep: float, options: dict) -> str:
    """``keep=K`` and the options. keep is left out only when an option overrides it (``-o r=13``): any other
    option (``prop_attn=False``, ``layers=[3,6,9]``, ``seed=1``) leaves the token counts to keep, so two runs
    that differ in keep alone must not read the same."""
    return ", ".join([f"keep={keep}"] * (not keep_overridden(options)) + [f"{k}={v}" for k, v in options.items()])


def keep_overridden(options: dict) -> bool:
    """Whether an option set here (``r=0`` included) decides the token counts instead of keep."""
    return any(options.get(name) is not None and options.get(name) is not False for name in KEEP_OVERRIDES)


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
    """A finite real number (bool excluded) in ``[low, high]`` (``(low, high]`` with ``low_open``). Infinities are
    refused: no option needs one (a criterion is switched off by its flag), and results files record the
    options as JSON, which has no infinity."""
    return (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
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

    Methods subclass ``EncoderReducer`` or ``VisualTokenSelector`` and set ``name``, ``summary`` and
    ``native_options`` (``Option``s by name). Construction validates everything (each option against
    its declaration, then ``validate`` for constraints between options), so a bad option fails before
    any model is touched.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    kind: ClassVar[str]  # what sort of method, in words (set by EncoderReducer / VisualTokenSelector)
    native_options: ClassVar[dict[str, Option]] = {}
    #: the default of every native option (derived from ``native_options``)
    defaults: ClassVar[dict[str, Any]] = {}
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

    def __repr__(self) -> str:
        # keep is left out where an option decides the counts instead: ToMe(r=3), not ToMe(keep=0.33, r=3)
        shown = [f"keep={self.keep}"] * (not keep_overridden(self.options))
        shown += [f"{k}={v!r}" for k, v in self.options.items() if v != self.defaults[k]]
        return f"{type(self).__name__}({', '.join(shown)})"


class Stage(enum.Enum):
    """Where in a block an ``EncoderReducer`` reduces: the hook it implements."""

    BEFORE_ATTENTION = "before_attention"  # at the block input, from q/k of the un-reduced tokens
    AFTER_ATTENTION = "after_attention"  # between the attention residual and the MLP


class Needs(enum.Enum):
    """What a block's attention hands an ``after_attention`` hook (``AttentionTaps``); asked for only at
    blocks that reduce, since each costs time."""

    NOTHING = "nothing"
    QUERIES_KEYS = "q and k"
    #: q, k and the attention probabilities: the adapter then runs explicit attention at that block
    #: (cheaper than SDPA plus a second q @ k^T and softmax)
    PROBABILITIES = "q, k and probabilities"


@dataclass(frozen=True)
class Reduction:
    """What a hook returns: the block's tokens after reduction and, from ``before_attention`` only, an
    attention core ``core(v)`` that computes the block's attention output ``(B, H, N', D)`` from the
    reduced tokens' values, reusing the scores it already has (None: attention is computed as usual)."""

    tokens: Tensor
    attention_core: Callable[[Tensor], Tensor] | None = None


class EncoderReducer(TokenReducer):
    """A method that reduces tokens inside a vision encoder's blocks.

    Subclasses implement ``schedule`` (tokens to remove per block) and exactly one hook,
    ``before_attention`` or ``after_attention``; ``stage`` records which (set from the subclass).
    Use ``state.merge``, ``state.fuse`` or ``state.keep`` so token sizes and source maps stay in step.
    """

    kind: ClassVar[str] = "a vision-encoder method (it reduces tokens inside the encoder's blocks)"
    stage: ClassVar[Stage] = Stage.AFTER_ATTENTION
    needs: ClassVar[Needs] = Needs.NOTHING

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hooks = {stage for stage in Stage if getattr(cls, stage.value) is not getattr(EncoderReducer, stage.value)}
        if len(hooks) > 1:
            raise TypeError(f"{cls.__name__} implements both before_attention and after_attention; a method "
                            "reduces at one of them")
        if hooks:
            cls.stage = hooks.pop()

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

    def before_attention(self, x: Tensor, remove: int, taps: AttentionTaps, state: ForwardState) -> Reduction:
        """Remove ``remove`` patch tokens from a block's input ``x`` (B, N, C); ``taps`` holds the q and k
        the block's attention would use on ``x`` (and the log-size bias)."""
        raise NotImplementedError

    def after_attention(self, x: Tensor, remove: int, taps: AttentionTaps | None, state: ForwardState) -> Reduction:
        """Remove ``remove`` patch tokens from ``x`` (B, N, C), the tokens after the attention residual;
        ``taps`` is what ``needs`` asked for (None for ``Needs.NOTHING``)."""
        raise NotImplementedError


@dataclass(frozen=True)
class VisionTower:
    """What a visual-token selector may know of the VLM's vision tower (layers 0-based)."""

    family: str  # "LLaVA", "Qwen2.5-VL", ...
    depth: int
    output_layer: int  # the layer whose features the language model receives
    object_layer: int  # the family's middle layer for object-level scores (HiPrune's papers: LLaVA 9, Qwen 16; 1-based)
    full_attention_layers: tuple[int, ...] | None = None  # None: every layer attends over the whole image
    unbuilt_layers: int = 0  # layers past the output layer that the engine does not build (vLLM's LLaVA)


#: a selector's native budget: visual tokens per image (LLaVA-NeXT: split over its crops), overriding keep
TOKENS = Option(None, "a positive int or None", lambda v: v is None or is_int(v, 1))

#: one LLaVA-NeXT crop's share of its image's ``tokens`` while ``VisualTokenSelector.crop_budget`` runs
_CROP_SHARE: ContextVar[int | None] = ContextVar("tokenprune_crop_share", default=None)


class VisualTokenSelector(TokenReducer):
    """A method that chooses which visual tokens of each image a VLM's language model receives.

    The adapter records the attention each visual token receives (mean over heads and queries) at the
    encoder layers ``score_layers`` names, then calls ``select`` per image (per crop for LLaVA-NeXT) with
    those scores and the image's patch grid. The selector owns its budget (``budget``).
    """

    kind: ClassVar[str] = "a visual-token selector (it chooses the visual tokens a VLM's language model receives)"

    def check(self, tower: VisionTower) -> None:
        """Raise ValueError if this configuration cannot run on ``tower`` (before anything is patched)."""

    def score_layers(self, tower: VisionTower) -> tuple[int, ...]:
        """The encoder layers (0-based) whose received-attention scores ``select`` reads, in its order."""
        raise NotImplementedError

    def budget(self, num_tokens: int) -> int:
        """Visual tokens kept of an image's ``num_tokens``: the ``tokens`` option where the selector has one
        and it is set, else ``round(keep * num_tokens)``; a budget under one token is an error, not a
        silent 1."""
        if self.options.get("tokens") is not None:
            return min(self.options["tokens"], num_tokens)
        k = round(self.keep * num_tokens)
        if k < 1:
            raise ValueError(f"keep={self.keep} leaves round({self.keep} * {num_tokens}) = {k} visual tokens for an "
                             f"image of {num_tokens}; the budget must be at least one token")
        return min(k, num_tokens)

    def budget_within(self, num_tokens: int, allowed: Tensor | None = None) -> int:
        """The budget of an image of ``num_tokens``, or, where only the ``allowed`` ones exist (LLaVA-NeXT's
        unpadded crop), of those: a budget that rounds to zero there keeps none of the crop. Inside
        ``crop_budget`` it is the crop's share given there, at most the tokens there are."""
        share = _CROP_SHARE.get()
        if share is not None:
            return min(share, num_tokens if allowed is None else int(allowed.sum()))
        if allowed is None:
            return self.budget(num_tokens)
        count = int(allowed.sum())
        return min(self.options.get("tokens") or round(self.keep * count), count)

    def crop_budgets(self, counts: list[int]) -> list[int]:
        """The budgets of one image's crops (LLaVA-NeXT: the base crop first), ``counts`` the tokens each crop has
        left after unpadding. Without ``tokens``: round(keep * count) per crop. ``tokens`` is the image's budget,
        split evenly over its crops as the official code splits it (each crop int(tokens / crops)); the
        remainder, which the official code drops, goes one token each to the first crops, and a crop with fewer
        tokens than its share passes the rest on to the others in the same way, so the image keeps
        min(tokens, its tokens)."""
        tokens = self.options.get("tokens")
        if tokens is None:
            return [min(round(self.keep * count), count) for count in counts]
        budgets, left = [0] * len(counts), min(tokens, sum(counts))
        while left:  # each round gives out everything left, or fills a crop
            open_crops = [i for i, count in enumerate(counts) if budgets[i] < count]
            share, extra = divmod(left, len(open_crops))
            for rank, i in enumerate(open_crops):
                given = min(share + (rank < extra), counts[i] - budgets[i])
                budgets[i] += given
                left -= given
        return budgets

    @staticmethod
    @contextmanager
    def crop_budget(share: int) -> Iterator[None]:
        """Within the block, ``budget_within`` (so ``explain`` and ``select``, a user's selector's too) gives
        ``share``, at most the tokens there are: one crop's share of its image's budget (``crop_budgets``). A
        context variable, not an attribute: a selector serves every thread that runs the model."""
        token = _CROP_SHARE.set(share)
        try:
            yield
        finally:
            _CROP_SHARE.reset(token)

    def select(self, scores: tuple[Tensor, ...], grid: tuple[int, int], allowed: Tensor | None = None) -> Tensor:
        """Sorted indices of the tokens kept of one image of ``rows * cols`` tokens in raster order, from
        ``scores`` (one ``(rows * cols,)`` tensor per ``score_layers`` entry). ``allowed`` (bool): only
        these tokens exist (LLaVA-NeXT's unpadded crop); the budget then counts them, and a budget that
        rounds to zero keeps none."""
        raise NotImplementedError

    #: the roles ``explain`` numbers, 0 being "dropped" (drawn by ``tokenprune.visualize.show_roles``)
    role_names: ClassVar[tuple[str, ...]] = ("dropped", "kept")

    def explain(self, scores: tuple[Tensor, ...], grid: tuple[int, int], allowed: Tensor | None = None) -> Tensor:
        """Each token's role in the choice ``select`` makes, an index into ``role_names`` (int8, 0 for a dropped
        token); ``last_forward(vlm).roles`` holds it per image. By default kept (1) or dropped (0); a selector
        whose choice has parts (HiPrune: anchors, buffers, registers) says which part each token came from."""
        roles = torch.zeros(grid[0] * grid[1], dtype=torch.int8, device=scores[0].device)
        roles[self.select(scores, grid, allowed)] = 1
        return roles
