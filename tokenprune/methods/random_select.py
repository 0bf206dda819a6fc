"""Random selection of a VLM's visual tokens: the floor a visual-token selector (HiPrune) must beat.

Each image keeps the same budget HiPrune would (``round(keep * N)``, or ``tokens``), drawn uniformly at
random, kept in raster order. The draws come from a generator seeded with ``seed`` when the method is made
(``tokenprune.apply``): a run over the same data in the same order and batches repeats exactly, and each
image gets its own draw. (``random`` is the encoder baseline: it drops tokens inside the vision tower on
ToMe's schedule.)
"""
from __future__ import annotations

import torch

from ..registry import TOKENS, VisualTokenSelector, register
from ._scheduled import SEED


@register
class RandomSelect(VisualTokenSelector):
    name = "random-select"
    summary = "Seeded random selection of a VLM's visual tokens: the floor a visual-token selector must beat"
    native_options = {
        "seed": SEED,
        "tokens": TOKENS,
    }

    def __init__(self, *args, **options) -> None:
        super().__init__(*args, **options)
        self._generator = torch.Generator().manual_seed(self.options["seed"])

    def score_layers(self, tower):
        return (tower.output_layer,)  # the adapter hands scores over; this selector reads none of them

    def explain(self, scores, grid, allowed=None):
        (layer_scores,) = scores  # one layer's: only their count and device matter here
        n = layer_scores.numel()
        candidates = torch.arange(n) if allowed is None else allowed.cpu().nonzero().flatten()
        k = self.budget_within(n, allowed)
        chosen = candidates[torch.randperm(candidates.numel(), generator=self._generator)[:k]]
        roles = torch.zeros(n, dtype=torch.int8)
        roles[chosen] = 1
        return roles.to(layer_scores.device)

    def select(self, scores, grid, allowed=None):
        return self.explain(scores, grid, allowed).nonzero().flatten()
