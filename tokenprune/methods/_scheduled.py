"""Shared ``keep`` / ``r`` handling for methods that remove tokens at every block."""
from __future__ import annotations

from .. import ops
from ..registry import EncoderReducer, Option, flag, is_int, is_real


def _is_tome_r(r) -> bool:
    return (r is None or is_int(r)
            or (isinstance(r, tuple) and len(r) == 2 and is_int(r[0]) and is_real(r[1], -1.0, 1.0))
            or (isinstance(r, list) and all(is_int(v) for v in r)))


#: seeds of ``torch.Generator.manual_seed`` (plus the block index): a 32-bit range leaves room for it
SEED = Option(0, "an int in [0, 2**32)", lambda v: is_int(v, 0, 2**32 - 1), TypeError)
TRACE_SOURCE = flag(False)


def keep_schedule(reducer: EncoderReducer, num_patches: int, blocks: int) -> tuple[int, ...]:
    """``keep`` as an even removal over ``blocks`` reducing blocks, at most half of a block's patch
    tokens each (``ops.plan_removals``); an unreachable ``keep`` is an error naming it."""
    target = ops.final_patch_count(num_patches, reducer.keep)
    try:
        return ops.plan_removals(num_patches, blocks, target)
    except ValueError as e:
        raise ValueError(f"{reducer.name}: keep={reducer.keep}: {e}") from None


def capped(reducer: EncoderReducer, requested: tuple[int | float, ...], num_patches: int, floor: int = 0,
           what: str = "r") -> tuple[int, ...]:
    """A native per-block removal (ints, or fractions of the patch tokens left) clamped, block by block,
    to half the patch tokens the block sees (the bipartite matching's limit, as ToMe clamps) and to
    leave at least ``floor`` patch tokens. A clamp is reported by ``reducer.note`` (a warning at apply)."""
    steps, left, clamped = [], num_patches, []
    for block, step in enumerate(requested):
        if isinstance(step, float):
            step = int(step * left)
        allowed = min(left // 2, max(0, left - floor))
        if step > allowed:
            clamped.append(f"block {block} {allowed} instead of {step}")
        step = min(step, allowed)
        steps.append(step)
        left -= step
    if clamped:
        limit = "half the patch tokens a block sees" + (f", leaving at least {floor}" if floor else "")
        reducer.note(f"{reducer.name}: {what} exceeds the per-block cap ({limit}) on {num_patches} patch "
                     f"tokens; removing {'; '.join(clamped)}")
    return tuple(steps)


class EveryBlockReducer(EncoderReducer):
    """Removes tokens inside every block (ToMe's placement: after attention, before the MLP).

    ``keep`` becomes an even per-block removal that ends at ``max(1, round(keep * N))``
    patch tokens. The native ``r`` (int, ``(r, inflection)`` or per-block list, as in
    ToMe) overrides ``keep``. No block removes more than half its patch tokens: a larger
    ``r`` is clamped there, as ToMe does, with a warning when ``apply`` plans the schedule.
    """

    native_options = {
        "r": Option(None, "a non-negative int, a tuple (r, inflection) with inflection in [-1, 1], "
                          "a list of non-negative ints, or None (keep decides)", _is_tome_r),
        "trace_source": TRACE_SOURCE,
    }

    def schedule(self, num_patches: int, depth: int, num_prefix: int = 0) -> tuple[int, ...]:
        r = self.options["r"]
        if r is None:
            return keep_schedule(self, num_patches, depth)
        return capped(self, ops.tome_r_schedule(r, depth), num_patches, what=f"r={r!r}")

