"""ToMe: Token Merging (Bolya et al., ICLR 2023).

At every block, between attention and MLP: bipartite soft matching on the
head-mean keys, size-weighted merging, and proportional attention (log-size key
bias) in the blocks that follow. The matching follows the official code's conventions
(``tokenprune.ops``), so outputs are the official implementation's: A/B alternate over the
whole sequence from position 0 (the class token is A's first token), prefix tokens are
protected (never a source, never a destination), and the output is the prefix in its
original order, then the unmerged A tokens, then the B tokens, each in position order.
For a class token (+ distillation token) this is exactly the official code; for no prefix
(SigLIP) and for registers (DINOv2) it is the same rule applied (docs/methods.md).
"""
from __future__ import annotations

from ..registry import Needs, Reduction, flag, register
from ._scheduled import EveryBlockReducer


@register
class ToMe(EveryBlockReducer):
    name = "tome"
    summary = ("Token Merging (ICLR'23): bipartite matching on head-mean keys, size-weighted merge, "
               "proportional attention")
    native_options = {**EveryBlockReducer.native_options, "prop_attn": flag(True)}
    needs = Needs.QUERIES_KEYS

    @property
    def proportional_attention(self) -> bool:
        return self.options["prop_attn"]

    def after_attention(self, x, remove, taps, state):
        return Reduction(state.merge_similar(x, taps.k, remove))
