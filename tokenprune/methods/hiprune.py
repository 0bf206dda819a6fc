"""HiPrune (Liu et al., 2025; ACL 2026): training-free visual-token selection for VLMs.

For each image, from the attention every visual token receives (mean over heads and queries) at two
layers of the vision encoder, the object layer (a middle layer) and the output layer (the one whose
features the VLM takes), HiPrune keeps a budget of K = round(keep * N) tokens:

1. anchors: the round(alpha * K / 5) tokens with the highest object-layer score;
2. buffers: the 4-neighbours (left, right, above, below) of each anchor on the patch grid;
3. registers: the rest of the budget, the highest output-layer scores among the tokens left.

Kept tokens stay in raster order. The official code finds left/right neighbours as index -/+ 1,
which wraps to the neighbouring row at the grid's edges; we do not wrap (``wrap=True`` restores the
official behaviour). Which tokens reach the language model, and how, is the VLM adapter's business
(``patches/vlm.py``); this file only selects.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..registry import Option, VisionTower, VisualTokenSelector, flag, is_int, is_real, register


def neighbours(index: Tensor, grid: tuple[int, int], wrap: bool = False) -> Tensor:
    """The 4-neighbours of raster ``index`` on an (rows, cols) grid, each anchor's own index included
    where a neighbour falls off the grid (so the result is always ``(len(index), 4)``)."""
    rows, cols = grid
    n = rows * cols
    if wrap:  # the official code: +-1 in raster order, clamped to the sequence
        offsets = torch.tensor([-1, 1, -cols, cols], device=index.device)
        return (index[:, None] + offsets).clamp(0, n - 1)
    r, c = index // cols, index % cols
    out = torch.stack([torch.where(c > 0, index - 1, index), torch.where(c < cols - 1, index + 1, index),
                       torch.where(r > 0, index - cols, index), torch.where(r < rows - 1, index + cols, index)], -1)
    return out


def hiprune_select(object_scores: Tensor, output_scores: Tensor, grid: tuple[int, int], k: int,
                   alpha: float = 0.1, wrap: bool = False, allowed: Tensor | None = None) -> Tensor:
    """Indices (sorted, ``(k,)``) of the tokens HiPrune keeps for one image of ``rows * cols`` tokens.
    ``allowed`` (bool, ``(rows * cols,)``): only these may be kept (LLaVA-NeXT's unpadded crops)."""
    n = object_scores.shape[0]
    if n != grid[0] * grid[1]:
        raise ValueError(f"hiprune: {n} scores do not fill a {grid[0]}x{grid[1]} grid")
    if allowed is not None:
        object_scores = torch.where(allowed, object_scores.float(), -torch.inf)
        output_scores = torch.where(allowed, output_scores.float(), -torch.inf)
        k = min(k, int(allowed.sum()))
    num_anchors = min(round(alpha * k / 5), k)
    anchors = object_scores.topk(num_anchors).indices
    chosen = torch.zeros(n, dtype=torch.bool, device=object_scores.device)
    chosen[anchors] = True
    chosen[neighbours(anchors, grid, wrap).flatten()] = True
    if allowed is not None:
        chosen &= allowed
    if int(chosen.sum()) > k:  # tiny budgets: anchors first, then their buffers by object-layer score
        extra = torch.where(chosen, object_scores, -torch.inf)
        extra[anchors] = torch.inf
        chosen = torch.zeros_like(chosen)
        chosen[extra.topk(k).indices] = True
    registers = k - int(chosen.sum())
    if registers:
        rest = torch.where(chosen, -torch.inf, output_scores.float())
        chosen[rest.topk(registers).indices] = True
    return chosen.nonzero().squeeze(1)


@register
class HiPrune(VisualTokenSelector):
    name = "hiprune"
    summary = "HiPrune: anchor / buffer / register selection of a VLM's visual tokens (LLaVA, Qwen2.5-VL)"
    native_options = {
        # object proportion: anchors = round(alpha * K / 5)
        "alpha": Option(0.1, "a number in [0, 1]", lambda v: is_real(v, 0.0, 1.0)),
        # 1-based vision-encoder layer; None: the model's default (LLaVA 9, Qwen2.5-VL 16)
        "object_layer": Option(None, "a positive int or None", lambda v: v is None or is_int(v, 1)),
        "wrap": flag(False),  # True: the official code's neighbours, which wrap across grid rows
        # native budget: visual tokens per image (or per crop), overrides keep
        "tokens": Option(None, "a positive int or None", lambda v: v is None or is_int(v, 1)),
    }

    def check(self, tower: VisionTower) -> None:
        layer = self.options["object_layer"] or tower.object_layer
        if not 1 <= layer <= tower.depth:
            raise ValueError(f"hiprune: object_layer={layer} is outside the {tower.depth}-layer vision tower of "
                             f"{tower.family} (1-based)")
        full = tower.full_attention_layers
        if full is not None and layer - 1 not in full:
            raise ValueError(f"hiprune: object_layer={layer} of {tower.family} attends within windows; scores need a "
                             f"full-attention block: one of {[i + 1 for i in full]} (1-based)")

    def score_layers(self, tower: VisionTower) -> tuple[int, int]:
        """The object layer, then the output layer."""
        return (self.options["object_layer"] or tower.object_layer) - 1, tower.output_layer

    def budget(self, num_tokens: int) -> int:
        if self.options["tokens"] is not None:
            return min(self.options["tokens"], num_tokens)
        return super().budget(num_tokens)

    def select(self, scores, grid, allowed=None):
        object_scores, output_scores = scores
        if allowed is None:
            k = self.budget(object_scores.shape[0])
        else:  # a crop's unpadded tokens: a budget that rounds to zero keeps none of them
            count = int(allowed.sum())
            k = min(self.options["tokens"] or round(self.keep * count), count)
            if k == 0:
                return allowed.nonzero().squeeze(1)[:0]
        return hiprune_select(object_scores, output_scores, grid, k, self.options["alpha"], self.options["wrap"],
                              allowed)
