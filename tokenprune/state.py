"""Per-forward state and the report of what a forward did.

A ``ForwardState`` is created at the start of every patched forward and handed from
block to block as an argument, so concurrent forwards (threads), deep copies and
``torch.compile`` never share it. Only the finished ``ForwardReport`` is stored on
the model, for ``tokenprune.last_forward``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import ops

if TYPE_CHECKING:
    from .registry import TokenReducer


@dataclass
class ForwardState:
    """What one forward pass knows about its tokens while it runs."""

    reducer: "TokenReducer"
    num_prefix: int
    #: tokens each block removes (see TokenReducer.schedule); None: planned by the first block
    #: from the tokens it receives and ``depth`` (for adapters that only see tokens inside the encoder)
    schedule: tuple[int, ...] | None = None
    depth: int | None = None
    size: Tensor | None = None  # (B, N, 1) patches per token; None while all are 1
    source: Tensor | None = None  # (B, N, N0) 0/1 map from original tokens, when tracing
    token_counts: list[int] = field(default_factory=list)
    output_tokens: int | None = None  # tokens leaving the last block

    @property
    def layer(self) -> int:
        """Index of the block now running (blocks call ``enter_block`` first)."""
        return len(self.token_counts) - 1

    def enter_block(self, x: Tensor) -> int:
        """Record the tokens entering a block; return how many it must remove."""
        if self.schedule is None:
            self.schedule = self.reducer.schedule(x.shape[1] - self.num_prefix, self.depth)
        self.token_counts.append(x.shape[1])
        return self.schedule[self.layer] if self.layer < len(self.schedule) else 0

    def attention_bias(self) -> Tensor | None:
        """The additive log-size key bias of proportional attention, or None."""
        if self.size is None or not self.reducer.proportional_attention:
            return None
        return ops.log_size_bias(self.size)

    def start_source_tracking(self, x: Tensor) -> None:
        batch, n = x.shape[:2]
        self.source = torch.eye(n, device=x.device, dtype=x.dtype).expand(batch, n, n)

    def merge(self, x: Tensor, plan: ops.MergePlan) -> Tensor:
        """Merge tokens by ``plan`` (size-weighted), keeping sizes and sources in step."""
        x, self.size = ops.merge_mean(x, self.size, plan, self.num_prefix)
        if self.source is not None:
            self.source = ops.merge_sum(self.source, plan, self.num_prefix)
        return x

    def fuse(self, x: Tensor, weight: Tensor, dest: Tensor, n_out: int) -> Tensor:
        """Merge tokens sharing a slot of ``dest`` (B, N; prefix tokens in their own slots) by the
        ``weight``-ed (B, N, 1) mean; sizes and sources add up."""
        size = self.size if self.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)
        self.size = ops.assign_sum(size, dest, n_out)
        if self.source is not None:
            self.source = ops.assign_sum(self.source, dest, n_out)
        return ops.assign_mean(x, weight, dest, n_out)

    def keep(self, x: Tensor, keep_idx: Tensor) -> Tensor:
        """Drop every patch token not in ``keep_idx``, keeping sizes and sources in step."""
        if self.size is not None:
            self.size = ops.keep_tokens(self.size, keep_idx, self.num_prefix)
        if self.source is not None:
            self.source = ops.keep_tokens(self.source, keep_idx, self.num_prefix)
        return ops.keep_tokens(x, keep_idx, self.num_prefix)

    def report(self) -> "ForwardReport":
        return ForwardReport(
            method=self.reducer.name,
            num_prefix_tokens=self.num_prefix,
            token_counts=list(self.token_counts),
            output_tokens=self.output_tokens,
            size=self.size,
            source=self.source,
        )


@dataclass(frozen=True)
class ForwardReport:
    """What the last patched forward did (``tokenprune.last_forward(model)``).

    ``token_counts[i]`` is the number of tokens entering block ``i``, prefix tokens
    included; every method here reduces all samples of a batch alike, so one int per
    block. ``output_tokens`` is the count leaving the last block. ``size`` (B, N, 1) is
    how many input patches each output token stands for (None when nothing merged).
    ``source`` (B, N, N0) maps output tokens to the input tokens they absorbed (only with
    ``trace_source=True``; for visualisation).
    """

    method: str
    num_prefix_tokens: int
    token_counts: list[int]
    output_tokens: int | None
    size: Tensor | None = None
    source: Tensor | None = None


@dataclass(frozen=True)
class AttentionTaps:
    """What a block's attention saw, for methods that score tokens from it.

    ``q`` and ``k`` are ``(B, heads, N, head_dim)`` after q/k normalisation, exactly as
    the attention kernel used them; ``bias`` is the additive key bias (or None).
    Adapters fill this in only for blocks whose method asks for it.
    """

    q: Tensor
    k: Tensor
    scale: float
    bias: Tensor | None = None
    probs: Tensor | None = None  # (B, heads, N, N), when the adapter computed them anyway

    def probabilities(self) -> Tensor:
        """Post-softmax attention ``(B, heads, N, N)``; rows sum to 1."""
        if self.probs is not None:
            return self.probs
        q, k, bias = self.q, self.k, self.bias
        if bias is not None and bias.dim() == 4 and bias.shape[-2] == 1:
            # a key bias (proportional attention): one fused bias + scale * q k^T (20% faster on CPU)
            batch, heads, n, d = q.shape
            row_bias = bias.expand(batch, heads, 1, k.shape[-2]).reshape(batch * heads, 1, -1)
            logits = torch.baddbmm(row_bias, q.reshape(batch * heads, n, d),
                                   k.reshape(batch * heads, -1, d).transpose(1, 2), alpha=self.scale)
            return logits.view(batch, heads, n, -1).softmax(dim=-1)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        return (logits if bias is None else logits + bias).softmax(dim=-1)

    def head_mean_keys(self) -> Tensor:
        """ToMe's similarity metric: keys averaged over heads, ``(B, N, head_dim)``."""
        return self.k.mean(dim=1)
