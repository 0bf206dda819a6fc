"""The reducing block step, written once for every framework.

A framework adapter makes its transformer block satisfy ``BlockParts`` and its attention module (or a
thin wrapper around it) satisfy ``AttentionParts``; ``run_block`` then runs one block of a reducing
forward and ``attend`` one attention call. Neither knows any model: timm and transformers encoders
both run exactly this code, so a method behaves the same whichever framework built the model (a test
copies one HF ViT's weights into a timm ViT and requires equal outputs).

The step, for a block that must remove ``remove`` tokens (``state.enter_block``):

* nothing to remove: the framework's own block, with the log-size key bias of proportional attention
  as its attention mask (so keep=1.0 runs the stock code, bit for bit);
* a ``before_attention`` method (MCTF) reduces the block's input from the q and k of the un-reduced
  tokens, and may hand back an attention core that reuses those scores on the reduced tokens;
* otherwise attention runs, handing the ``after_attention`` hook what the method ``needs`` (q and k,
  or explicit probabilities), and the hook reduces between the attention residual and the MLP, as
  ToMe does: the MLP (about 60% of a block on CPU) then runs on the reduced tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from . import ops
from .registry import Needs, Stage
from .state import AttentionTaps, ForwardState


class AttentionParts(Protocol):
    """One framework's attention module, in the pieces ``attend`` runs. Heads are ``(B, H, N, D)``."""

    #: the softmax scale (1/sqrt(head_dim) unless the model says otherwise)
    softmax_scale: float
    #: whether the framework's attention returns its probabilities (transformers' eager attention
    #: does, whether asked or not); ``attend`` then returns the map it applied, else None
    returns_maps: bool

    def project_qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k (after any q/k normalisation) and v of the normalised tokens ``h`` (B, N, C)."""

    def project_qk(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """q and k only (methods that score before attending do not need v)."""

    def project_v(self, h: Tensor) -> Tensor:
        """v only (an attention core replaces q and k)."""

    def kernel(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The framework's own attention (SDPA, or its explicit path) with an additive key ``bias``:
        the per-head output ``(B, H, N, D)`` and the probabilities where it returns them."""

    def drop_attention(self, probs: Tensor) -> Tensor:
        """Attention dropout on explicit probabilities (the identity in eval mode)."""

    def project_out(self, h: Tensor, heads: Tensor) -> Tensor:
        """The per-head output ``(B, H, N, D)`` to the attention's output ``(B, N, C)`` (output norm, gate
        from the input ``h``, projection, dropout: whatever the framework's attention does after softmax)."""


class BlockParts(Protocol):
    """One framework's pre-norm transformer block, in the pieces ``run_block`` runs."""

    def stock_block(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """The framework's own block, unchanged, with ``bias`` (or None) as an additive attention mask."""

    def attention_input(self, x: Tensor) -> Tensor:
        """The norm before attention."""

    def attention_parts(self) -> AttentionParts:
        """The block's attention, for q/k taps before it runs."""

    def run_attention(self, h: Tensor, bias: Tensor | None, request: "AttentionRequest") -> Tensor:
        """``attend(self.attention_parts(), h, bias, request)[0]``, however the framework must route the call
        (transformers: through the attention module, so its hooks and ``output_attentions`` see it)."""

    def attention_residual(self, h: Tensor) -> Tensor:
        """What the attention output goes through before the residual add (layer scale, drop path, dropout)."""

    def mlp_residual(self, x: Tensor) -> Tensor:
        """The whole MLP branch: norm, MLP, layer scale, drop path (added to ``x`` by ``run_block``)."""


@dataclass
class AttentionRequest:
    """What a reducing block asks of its attention call, and what comes back (``taps``)."""

    needs: Needs = Needs.NOTHING
    #: replaces softmax(q k^T) v by ``core(v)`` (a ``before_attention`` method's reuse of its scores)
    core: Callable[[Tensor], Tensor] | None = None
    taps: AttentionTaps | None = None  # filled in by ``attend`` when ``needs`` asks for them


@ops.without_autocast
def explicit_probabilities(q: Tensor, k: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """softmax(scale * q k^T + bias), logits and softmax in float32 for half-precision q and k (and under autocast),
    as the README promises of the scores that choose tokens (transformers' eager attention rounds the logits to
    half precision first: a ranking then turns on that rounding). Returned in float32 for half-precision q (else in
    q's dtype): callers cast it to q's dtype to apply it, as eager attention does, and score tokens on the
    unrounded map."""
    acc = ops.accumulation_dtype(q.dtype)  # the logits too: half-precision logits would round the ranking
    return ops.attention_probabilities(q.to(acc), k.to(acc), scale, bias)


def attend(parts: AttentionParts, h: Tensor, bias: Tensor | None,
           request: AttentionRequest) -> tuple[Tensor, Tensor | None]:
    """One attention call of a reducing block: the attention's output ``(B, N, C)`` and, where the
    framework returns them (``returns_maps``), the probabilities it applied. ``request.taps`` receives
    q, k (and the probabilities) when ``request.needs`` asks for them."""
    maps = None
    if request.core is not None:
        v = parts.project_v(h)
        heads = request.core(v)
        if parts.returns_maps:  # the map the core applies to the values: it is linear in v, so core(I)
            batch, num_heads, n, _ = v.shape
            maps = request.core(torch.eye(n, dtype=v.dtype, device=v.device).expand(batch, num_heads, n, n))
        return parts.project_out(h, heads), maps
    q, k, v = parts.project_qkv(h)
    probs = None
    if request.needs is Needs.PROBABILITIES:
        probs = explicit_probabilities(q, k, parts.softmax_scale, bias)
        dropped = parts.drop_attention(probs.to(q.dtype))
        heads, maps = dropped @ v, dropped if parts.returns_maps else None
    else:
        heads, maps = parts.kernel(q, k, v, bias)
    if request.needs is not Needs.NOTHING:
        request.taps = AttentionTaps(q=q, k=k, scale=parts.softmax_scale, bias=bias, probs=probs)
    return parts.project_out(h, heads), maps


def run_block(block: BlockParts, x: Tensor, state: ForwardState) -> Tensor:
    """One block of a reducing forward: ``x`` (B, N, C) in, the block's output (maybe fewer tokens) out."""
    remove = state.enter_block(x)
    if not remove:
        return block.stock_block(x, state.attention_bias(x.dtype))
    reducer = state.reducer
    request = AttentionRequest()
    if reducer.stage is Stage.BEFORE_ATTENTION:
        attention = block.attention_parts()
        q, k = attention.project_qk(block.attention_input(x))
        # the float32 bias: these taps only score tokens (the attention core applies what they give)
        taps = AttentionTaps(q=q, k=k, scale=attention.softmax_scale, bias=state.attention_bias())
        reduced = reducer.before_attention(x, remove, taps, state)
        x, request.core, remove = reduced.tokens, reduced.attention_core, 0
    else:
        request.needs = reducer.needs
    # the bias is read again: a before_attention reduction changed the sizes
    bias = state.attention_bias(x.dtype)
    x = x + block.attention_residual(block.run_attention(block.attention_input(x), bias, request))
    if remove:
        x = reducer.after_attention(x, remove, request.taps, state).tokens
    return x + block.mlp_residual(x)
