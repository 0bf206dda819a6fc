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

from . import extension, ops

if TYPE_CHECKING:
    from .registry import EncoderReducer


@dataclass
class ForwardState:
    """What one forward pass knows about its tokens while it runs."""

    reducer: "EncoderReducer"
    num_prefix: int
    #: whether the first prefix token is a class token (a timm model without one may have register tokens)
    class_token: bool = True
    #: tokens each block removes (see EncoderReducer.schedule); None: planned by the first block
    #: from the tokens it receives and ``depth`` (for adapters that only see tokens inside the encoder)
    schedule: tuple[int, ...] | None = None
    depth: int | None = None
    size: Tensor | None = None  # (B, N, 1) patches per token, float32 (or wider); None while all are 1
    source: Tensor | None = None  # (B, N, N0) 0/1 map from original tokens, when tracing
    token_counts: list[int] = field(default_factory=list)
    output_tokens: int | None = None  # tokens leaving the last block
    _scratch: Tensor | None = field(default=None, init=False, repr=False)

    @property
    def layer(self) -> int:
        """Index of the block now running (blocks call ``enter_block`` first)."""
        return len(self.token_counts) - 1

    def removes_tokens(self, x: Tensor) -> bool:
        """Whether this forward removes any token (the schedule planned from ``x``, the first block's input, when it
        is not yet): an attention mask the caller gives can only be honoured where none is removed."""
        if self.schedule is None:
            self.schedule = self.reducer.schedule(x.shape[1] - self.num_prefix, self.depth, self.num_prefix)
        return any(self.schedule)

    def enter_block(self, x: Tensor) -> int:
        """Record the tokens entering a block; return how many it must remove."""
        self.removes_tokens(x)  # plans the schedule on the first block
        self.token_counts.append(x.shape[1])
        return self.schedule[self.layer] if self.layer < len(self.schedule) else 0

    def attention_bias(self, dtype: torch.dtype | None = None) -> Tensor | None:
        """The additive log-size key bias of proportional attention, or None; in ``dtype`` (attention
        kernels take it in the query's dtype), else in the sizes' float32."""
        if self.size is None or not self.reducer.proportional_attention:
            return None
        bias = ops.log_size_bias(self.size)
        return bias if dtype is None else bias.to(dtype)

    def scratch(self, numel: int, like: Tensor) -> Tensor | None:
        """A flat buffer of at least ``numel`` elements (``like``'s dtype and device) that every block of
        this forward reuses, for per-block maps such as attention probabilities. On CPU a fresh map of
        tens of MB in every block is served by fresh pages from the OS, and those page faults made MCTF
        5-10% slower at batch 32 (docs/design.md). None while a transform follows ``like`` (autograd,
        forward-mode AD, ``torch.func``: ``out=`` buffers cannot take part in them), and under ``torch.compile``:
        functionalised, every write into a view of the buffer became a copy of the whole buffer, block after
        block (MCTF compiled ran 3.4x slower than eager at batch 32 and 16x at batch 256 on the testbed);
        inductor plans the memory of fresh tensors itself."""
        if torch.compiler.is_compiling() or like.requires_grad or extension.differentiated(like):
            return None
        buf = self._scratch
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._scratch = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel]

    def start_source_tracking(self, x: Tensor) -> None:
        batch, n = x.shape[:2]
        self.source = torch.eye(n, device=x.device, dtype=x.dtype).expand(batch, n, n)

    def merge(self, x: Tensor, plan: ops.MergePlan) -> Tensor:
        """Merge tokens by ``plan`` (size-weighted), keeping sizes and sources in step."""
        x, self.size = ops.merge_mean(x, self.size, plan, self.num_prefix)
        if self.source is not None:
            self.source = ops.merge_sum(self.source, plan, self.num_prefix)
        return x

    def merge_similar(self, x: Tensor, keys: Tensor, r: int) -> Tensor:
        """ToMe's step: merge the ``r`` tokens most similar by their head-mean ``keys`` (B, H, N, D), size-weighted
        (``ops.bipartite_merge``: one call on CPU), keeping sizes and sources in step."""
        if self.source is None:
            x, self.size = ops.bipartite_merge(keys, x, self.size, r, self.num_prefix)
            return x
        return self.merge(x, ops.bipartite_soft_matching(ops.head_mean(keys), r, self.num_prefix))

    def fuse(self, x: Tensor, weight: Tensor, dest: Tensor, n_out: int) -> Tensor:
        """Merge tokens sharing a slot of ``dest`` (B, N; prefix tokens in their own slots) by the
        ``weight``-ed (B, N, 1) mean; sizes and sources add up."""
        size = self.size
        if size is None:  # sizes are counts: float32 even for half-precision tokens (bf16 is exact only to 256)
            size = x.new_ones(x.shape[0], x.shape[1], 1, dtype=ops.accumulation_dtype(x.dtype))
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

    @ops.without_autocast
    def probabilities(self, state: ForwardState | None = None) -> Tensor:
        """Post-softmax attention ``(B, heads, N, N)``; rows sum to 1.

        Given the forward's ``state``, the map is computed in place in its scratch buffer: valid
        until the next block asks for the buffer, so callers use it within their own block.
        Half-precision q and k give a float32 map (scores that choose tokens are computed in float32).
        """
        if self.probs is not None:
            return self.probs
        acc = ops.accumulation_dtype(self.q.dtype)
        q, k, bias = self.q.to(acc), self.k.to(acc), None if self.bias is None else self.bias.to(acc)
        batch, heads, n = q.shape[:3]
        n_k = k.shape[-2]
        key_bias = bias is None or (bias.dim() == 4 and bias.shape[-2] == 1)
        buffer = state.scratch(batch * heads * n * n_k, q) if state is not None and key_bias else None
        if buffer is None:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            return (logits if bias is None else logits + bias).softmax(dim=-1)
        return ops.attention_probabilities(q, k, self.scale, bias, out=buffer.view(batch, heads, n, n_k))

    def head_mean_keys(self) -> Tensor:
        """ToMe's similarity metric (``ops.head_mean``): keys averaged over heads, ``(B, N, head_dim)``."""
        return ops.head_mean(self.k)
