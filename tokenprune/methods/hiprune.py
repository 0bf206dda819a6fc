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

from ..registry import TOKENS, Option, VisionTower, VisualTokenSelector, flag, is_int, is_real, register


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


#: what ``hiprune_roles`` numbers mean
ROLES = ("dropped", "anchor", "buffer", "register")


def hiprune_roles(object_scores: Tensor, output_scores: Tensor, grid: tuple[int, int], k: int,
                  alpha: float = 0.1, wrap: bool = False, allowed: Tensor | None = None) -> Tensor:
    """Each token's role for one image of ``rows * cols`` tokens: an index into ``ROLES`` (int8, ``(n,)``;
    0 dropped, 1 anchor, 2 buffer, 3 register), ``k`` tokens kept. ``allowed`` (bool, ``(n,)``): only
    these may be kept (LLaVA-NeXT's unpadded crops)."""
    n = object_scores.shape[0]
    if n != grid[0] * grid[1]:
        raise ValueError(f"hiprune: {n} scores do not fill a {grid[0]}x{grid[1]} grid")
    if allowed is not None:
        object_scores = torch.where(allowed, object_scores.float(), -torch.inf)
        output_scores = torch.where(allowed, output_scores.float(), -torch.inf)
        k = min(k, int(allowed.sum()))
    num_anchors = min(round(alpha * k / 5), k)
    anchors = object_scores.topk(num_anchors).indices
    roles = torch.zeros(n, dtype=torch.int8, device=object_scores.device)
    roles[neighbours(anchors, grid, wrap).flatten()] = 2
    roles[anchors] = 1
    if allowed is not None:
        roles[~allowed] = 0
    if int((roles > 0).sum()) > k:  # tiny budgets: anchors first, then their buffers by object-layer score
        extra = torch.where(roles > 0, object_scores, -torch.inf)
        extra[anchors] = torch.inf
        chosen = extra.topk(k).indices
        roles = torch.zeros_like(roles)
        roles[chosen] = 2
        roles[anchors[torch.isin(anchors, chosen)]] = 1
    registers = k - int((roles > 0).sum())
    if registers:
        rest = torch.where(roles > 0, -torch.inf, output_scores.float())
        roles[rest.topk(registers).indices] = 3
    return roles


def hiprune_select(object_scores: Tensor, output_scores: Tensor, grid: tuple[int, int], k: int,
                   alpha: float = 0.1, wrap: bool = False, allowed: Tensor | None = None) -> Tensor:
    """Indices (sorted, ``(k,)``) of the tokens HiPrune keeps (``hiprune_roles`` not 0)."""
    return hiprune_roles(object_scores, output_scores, grid, k, alpha, wrap, allowed).nonzero().squeeze(1)


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
        "tokens": TOKENS,
    }

    def check(self, tower: VisionTower) -> None:
        layer = self.options["object_layer"] or tower.object_layer
        if not 1 <= layer <= tower.depth:
            unbuilt = (f"; the {tower.unbuilt_layers} layer(s) after the one whose features the language model "
                       "receives are not built here" if tower.unbuilt_layers and layer > tower.depth else "")
            raise ValueError(f"hiprune: object_layer={layer} is outside the {tower.depth}-layer vision tower of "
                             f"{tower.family} (1-based){unbuilt}")
        full = tower.full_attention_layers
        if full is not None and layer - 1 not in full:
            raise ValueError(f"hiprune: object_layer={layer} of {tower.family} attends within windows; scores need a "
                             f"full-attention block: one of {[i + 1 for i in full]} (1-based)")

    def score_layers(self, tower: VisionTower) -> tuple[int, int]:
        """The object layer, then the output layer."""
        return (self.options["object_layer"] or tower.object_layer) - 1, tower.output_layer

    role_names = ROLES

    def explain(self, scores, grid, allowed=None):
        object_scores, output_scores = scores
        k = self.budget_within(object_scores.shape[0], allowed)
        if k == 0:  # a crop's unpadded tokens whose budget rounds to zero, or a crop's share of zero
            return torch.zeros(object_scores.shape[0], dtype=torch.int8, device=object_scores.device)
        return hiprune_roles(object_scores, output_scores, grid, k, self.options["alpha"], self.options["wrap"],
                             allowed)

    def select(self, scores, grid, allowed=None):
        return self.explain(scores, grid, allowed).nonzero().squeeze(1)
