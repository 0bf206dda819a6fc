"""Random dropping: the floor every method must beat.

Drops uniformly random patch tokens on the same per-block schedule as ToMe, so the
two cost the same FLOPs. Seeded: one ``seed`` gives the same choice for the same
input shape every call (each block draws from the stream ``seed + block index``, by
``ops.random_keys``: a counter hash, so the same choice on every device and under
``torch.compile``); samples of a batch get different choices.
"""
from __future__ import annotations

from .. import ops
from ..registry import Reduction, register
from ._scheduled import SEED, EveryBlockReducer


@register
class RandomDrop(EveryBlockReducer):
    name = "random"
    summary = "Seeded random token dropping on ToMe's schedule: the baseline every method must beat"
    native_options = {**EveryBlockReducer.native_options, "seed": SEED}

    def after_attention(self, x, remove, taps, state):
        remove = min(remove, (x.shape[1] - state.num_prefix) // 2)
        return Reduction(drop_at_random(x, remove, self.options["seed"], state))


def drop_at_random(x, remove, seed, state):
    """Drop ``remove`` random patch tokens, drawn from the stream ``seed + block index``."""
    n = x.shape[1] - state.num_prefix
    return state.keep(x, ops.random_keep_indices(x.shape[0], n, n - remove, seed + state.layer, x.device))
