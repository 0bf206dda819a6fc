"""Shared ``keep`` / ``r`` handling for methods that remove tokens at every block."""
from __future__ import annotations

import numbers

from .. import ops
from ..registry import TokenReducer


def _is_count(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0


class EveryBlockReducer(TokenReducer):
    """Removes tokens inside every block (ToMe's placement: after attention, before the MLP).

    ``keep`` becomes an even per-block removal that ends at ``max(1, round(keep * N))``
    patch tokens. The native ``r`` (int, ``(r, inflection)`` or per-block list, as in
    ToMe) overrides ``keep``. No block removes more than half its patch tokens.
    """

    defaults = {"r": None, "trace_source": False}

    def validate(self) -> None:
        r = self.options["r"]
        if r is None:
            return
        ok = (_is_count(r)
              or (isinstance(r, tuple) and len(r) == 2 and _is_count(r[0])
                  and isinstance(r[1], numbers.Real) and -1.0 <= r[1] <= 1.0)
              or (isinstance(r, list) and all(_is_count(v) for v in r)))
        if not ok:
            raise ValueError(f"{self.name}: r must be a non-negative int, a tuple (r, inflection) with "
                             f"inflection in [-1, 1], or a list of non-negative ints; got {r!r}")

    def schedule(self, num_patches: int, depth: int) -> tuple[int, ...]:
        r = self.options["r"]
        if r is None:
            return ops.plan_removals(num_patches, depth, ops.final_patch_count(num_patches, self.keep))
        steps, left = [], num_patches
        for step in ops.tome_r_schedule(r, depth):  # clamp to the 50% cap as the matching does
            step = min(step, left // 2)
            steps.append(step)
            left -= step
        return tuple(steps)
