"""Random dropping: the floor every method must beat.

Drops uniformly random patch tokens on the same per-block schedule as ToMe, so the
two cost the same FLOPs. Seeded: one ``seed`` gives the same choice for the same
input shape every call (each block draws from ``seed + block index``); samples of a
batch get different choices.
"""
from __future__ import annotations

import functools

import torch

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
    """Drop ``remove`` random patch tokens, drawn from ``seed + block index``."""
    n = x.shape[1] - state.num_prefix
    draw = kept_at_random.__wrapped__ if torch.compiler.is_compiling() else kept_at_random
    return state.keep(x, draw(x.shape[0], n, n - remove, seed + state.layer, x.device))


@functools.lru_cache(maxsize=256)
def kept_at_random(batch: int, n: int, keep: int, seed: int, device: torch.device) -> torch.Tensor:
    """The ``keep`` patch indices ``(batch, keep)`` that seed ``seed`` draws, ascending. A function of its
    arguments alone, so drawn once per shape and block and then reused: a generator, a draw and a top-k at every
    block cost about as much as the gather itself at batch 1. Made outside inference mode (a training forward may
    save it for backward); never written to by its users."""
    with torch.inference_mode(False):
        generator = torch.Generator(device=device).manual_seed(seed)
        return ops.random_keep_indices(batch, n, keep, generator, device)
