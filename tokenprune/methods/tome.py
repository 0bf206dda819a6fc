"""ToMe: Token Merging (Bolya et al., ICLR 2023).

At every block, between attention and MLP: bipartite soft matching on the
head-mean keys, size-weighted merging, and proportional attention (log-size key
bias) in the blocks that follow. Differences from the official code: prefix tokens
(class, distillation, registers) sit out of the matching altogether and stay first,
so the A/B alternation starts at the first patch token (docs/methods.md).
"""
from __future__ import annotations

from .. import ops
from ..registry import flag, register
from ._scheduled import EveryBlockReducer


@register
class ToMe(EveryBlockReducer):
    name = "tome"
    summary = ("Token Merging (ICLR'23): bipartite matching on head-mean keys, size-weighted merge, "
               "proportional attention")
    native_options = {**EveryBlockReducer.native_options, "prop_attn": flag(True)}
    needs_attention = True

    @property
    def proportional_attention(self) -> bool:
        return self.options["prop_attn"]

    def reduce(self, x, remove, taps, state):
        plan = ops.bipartite_soft_matching(taps.head_mean_keys(), remove, state.num_prefix)
        return state.merge(x, plan)
