"""Random dropping: the floor every method must beat.

Drops uniformly random patch tokens on the same per-block schedule as ToMe, so the
two cost the same FLOPs. Seeded: one ``seed`` gives the same choice for the same
input shape every call (each block draws from ``seed + block index``); samples of a
batch get different choices.
"""
from __future__ import annotations

import numbers

import torch

from .. import ops
from ..registry import register
from ._scheduled import EveryBlockReducer


@register
class RandomDrop(EveryBlockReducer):
    name = "random"
    summary = "Seeded random token dropping on ToMe's schedule: the baseline every method must beat"
    defaults = {**EveryBlockReducer.defaults, "seed": 0}

    def validate(self) -> None:
        super().validate()
        seed = self.options["seed"]
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"random: seed must be an int, got {seed!r}")

    def reduce(self, x, remove, taps, state):
        batch, n = x.shape[0], x.shape[1] - state.num_prefix
        remove = min(remove, n // 2)
        generator = torch.Generator(device=x.device).manual_seed(self.options["seed"] + state.layer)
        keep_idx = ops.random_keep_indices(batch, n, n - remove, generator, x.device)
        return state.keep(x, keep_idx)
