"""Adapter for timm's ``VisionTransformer`` family (vit_*, deit*, deit3_*, *_dinov2, CLIP/SigLIP ViTs).

How the patch works (docs/design.md has the reasoning and the measurements):

* The model's class is swapped for a subclass whose ``forward`` and
  ``forward_features`` create a ``ForwardState`` and hand it to each block as an
  argument; ``forward`` then runs the model's own ``forward_head`` (class, distillation,
  'max' and no pooling read the reduced tokens as they are) except for the pools that
  average over tokens once tokens merged: 'avg' / 'avgmax' take a size-weighted mean and
  'map' gets the log-size bias, so a merged token counts as the patches it absorbed.
  No parameters or buffers change, so ``state_dict`` is untouched, and ``remove``
  swaps the classes back.
* Each ``Block`` becomes a ``ReducingBlock`` (a subclass that only overrides
  ``forward``). Called without a state (``forward_intermediates``, user code) it is
  the stock block. With one, it adds the log-size bias to the attention mask, so
  SDPA stays SDPA, and reduces tokens between the attention residual and the MLP.
* Where a method needs q/k, the block runs ``attention_with_taps``: timm's
  ``Attention.forward`` step by step, keeping q and k. Blocks that reduce nothing
  call the stock attention.
"""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from timm.layers import Attention, AttentionPoolLatent
from timm.layers.attention import maybe_add_mask
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from tokenprune import ops
from tokenprune.registry import TokenReducer
from tokenprune.state import AttentionTaps, ForwardState

from ._swap import Swapped, refuse_jit_tracing, restore, swap

FAMILY = ("timm VisionTransformer with standard Block/Attention: vit_*, deit_* (distilled too), deit3_*, "
          "*_dinov2 (reg too), CLIP and SigLIP ViTs")
DEFAULT_METHOD = "tome"
_POOLS = ("token", "avg", "avgmax", "max", "")
_SIZE_POOLS = ("avg", "avgmax")  # with 'map': the pools a merged token must enter with its size


def attention_with_taps(attn: Attention, x: Tensor, attn_mask: Tensor | None,
                        keep_probabilities: bool = False) -> tuple[Tensor, AttentionTaps]:
    """timm ``Attention.forward`` (timm 1.0.x), also returning the q and k it used, and with
    ``keep_probabilities`` the attention probabilities (explicit attention instead of SDPA)."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = None
    if attn.fused_attn and not keep_probabilities:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        weights = maybe_add_mask((q * attn.scale) @ k.transpose(-2, -1), attn_mask).softmax(dim=-1)
        out = attn.attn_drop(weights) @ v
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, AttentionTaps(q=q, k=k, scale=attn.scale, bias=attn_mask,
                              probs=weights if keep_probabilities else None)


def query_key_taps(attn: Attention, x: Tensor, bias: Tensor | None) -> AttentionTaps:
    """q and k only (the first two thirds of the qkv projection), for methods that score before attending."""
    B, N, _ = x.shape
    dim = attn.attn_dim
    bias_qk = None if attn.qkv.bias is None else attn.qkv.bias[: 2 * dim]
    q, k = F.linear(x, attn.qkv.weight[: 2 * dim], bias_qk).reshape(B, N, 2, attn.num_heads, attn.head_dim) \
        .permute(2, 0, 3, 1, 4).unbind(0)
    return AttentionTaps(q=attn.q_norm(q), k=attn.k_norm(k), scale=attn.scale, bias=bias)


def attention_with_core(attn: Attention, x: Tensor, core: Callable[[Tensor], Tensor]) -> Tensor:
    """The rest of timm's ``Attention.forward`` around a method's own attention core: values from
    the last third of the qkv projection, ``core(v)`` (B, H, N, D) in place of softmax(qk)v, then
    norm, gate and output projection."""
    B, N, _ = x.shape
    dim = attn.attn_dim
    bias_v = None if attn.qkv.bias is None else attn.qkv.bias[2 * dim:]
    v = F.linear(x, attn.qkv.weight[2 * dim:], bias_v).reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    out = attn.norm(core(v).transpose(1, 2).reshape(B, N, dim))
    if attn.gate is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


class ReducingBlock(Block):
    """A timm ``Block`` that reduces tokens when it is given a ``ForwardState``.

    Methods reduce either between the attention residual and the MLP (``after_attention``: ToMe,
    Zero-TPrune, random) or at the block input using this block's own attention
    (``block_input``: MCTF, which may hand back an attention core that reuses its scores).
    """

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                state: ForwardState | None = None) -> Tensor:
        if state is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        reducer = state.reducer
        remove = state.enter_block(x)
        taps, core = None, None
        if remove and reducer.placement == "block_input":
            taps = query_key_taps(self.attn, self.norm1(x), state.attention_bias())
            x, core = reducer.reduce(x, remove, taps, state)
            remove = 0
        h = self.norm1(x)
        if core is not None:
            h = attention_with_core(self.attn, h, core)
        elif remove and reducer.needs_attention:
            h, taps = attention_with_taps(self.attn, h, state.attention_bias(), reducer.needs_probabilities)
        else:
            h = self.attn(h, attn_mask=state.attention_bias())
        x = x + self.drop_path1(self.ls1(h))
        if remove:
            x = reducer.reduce(x, remove, taps, state)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ReducingViT(Swapped, VisionTransformer):
    """Mixed in front of the model's own class (``_swap.swap``); never built directly."""

    tokenprune_reducer: TokenReducer

    def _reduced_features(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> tuple[Tensor, ForwardState]:
        refuse_jit_tracing()
        if attn_mask is not None or is_causal:
            raise ValueError("tokenprune: attn_mask / is_causal cannot be combined with token reduction "
                             "(the token count changes inside the encoder); call tokenprune.remove(model) first")
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        reducer = self.tokenprune_reducer
        num_patches = x.shape[1] - self.num_prefix_tokens
        state = ForwardState(reducer=reducer, num_prefix=self.num_prefix_tokens,
                             schedule=reducer.schedule(num_patches, len(self.blocks), self.num_prefix_tokens))
        if reducer.trace_source:
            state.start_source_tracking(x)
        for block in self.blocks:
            x = block(x, state=state)
        state.output_tokens = x.shape[1]
        self._tokenprune_last = state.report()
        return self.norm(x), state

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return self._reduced_features(x, attn_mask, is_causal)[0]

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        x, state = self._reduced_features(x, attn_mask, is_causal)
        if state.size is None or not _pools_by_size(self):
            # nothing merged, or a head that reads tokens as they are: the model's own head
            # (this is also what keeps a subclass's head, e.g. DeiT's class + distillation mean)
            return self.forward_head(x)
        return self._head_from_pooled(self._size_aware_pool(x, state.size))

    def _size_aware_pool(self, x: Tensor, size: Tensor) -> Tensor:
        """timm's ``pool`` for the pools that average over tokens, where a merged token counts as the
        patches it absorbed: exactly the stock pool over the tokens repeated ``size`` times."""
        if not self.pool_include_prefix:
            prefix = self.num_prefix_tokens
            x, size = x[:, prefix:], size[:, prefix:]
        if self.attn_pool is not None:
            return self.attn_pool(x, attn_mask=ops.log_size_bias(size))
        mean = ops.size_weighted_mean(x, size)
        if self.global_pool == "avg":
            return mean
        return 0.5 * (x.amax(dim=1) + mean)  # avgmax; a merged token is an average, max over tokens is unchanged

    def _head_from_pooled(self, x: Tensor) -> Tensor:
        return self.head(self.head_drop(self.fc_norm(x)))


def _pools_by_size(model: VisionTransformer) -> bool:
    """Whether the head averages over tokens, so that merged tokens must be weighted by size."""
    return model.attn_pool is not None or model.global_pool in _SIZE_POOLS


def unsupported_head(model: VisionTransformer) -> str | None:
    """Why the model's head cannot be given what it computes on the patches a merged token stands
    for, or None. Heads that read tokens as they are (class / distillation token, 'max', no pooling)
    always can: ``forward`` runs them unchanged."""
    if model.attn_pool is not None:
        if type(model.attn_pool) is not AttentionPoolLatent:
            return (f"cannot patch global_pool={model.global_pool!r} ({type(model.attn_pool).__name__}): "
                    f"its attention pool cannot weigh merged tokens; supported: {_POOLS + ('map',)}")
        if model.attn_pool.pos_embed is not None:
            return ("cannot patch an attention-pool head with its own position embedding "
                    "(it assumes the full token count)")
    elif model.global_pool not in _POOLS:
        return f"cannot patch global_pool={model.global_pool!r}; supported: {_POOLS + ('map',)}"
    base = getattr(model, "_tokenprune_base", type(model))
    if _pools_by_size(model) and (base.forward_head is not VisionTransformer.forward_head
                                  or base.pool is not VisionTransformer.pool):
        return (f"cannot patch {base.__name__} with global_pool={model.global_pool!r}: it overrides timm's "
                "head, so tokenprune cannot weigh merged tokens in it; use global_pool='token'")
    return None


# ---------------------------------------------------------------- the adapter API

def handles(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def is_patched(model: nn.Module) -> bool:
    return isinstance(model, ReducingViT)


def reducer_of(model: nn.Module) -> TokenReducer:
    return model.tokenprune_reducer


def last_forward(model: nn.Module):
    return model._tokenprune_last


def check(model: nn.Module) -> None:
    """Raise TypeError naming the first part of ``model`` this adapter cannot patch."""
    for i, block in enumerate(model.blocks):
        if type(block) not in (Block, ReducingBlock):
            raise TypeError(f"tokenprune cannot patch block {i} of {type(model).__name__}: it is "
                            f"{type(block).__module__}.{type(block).__name__}; supported: {FAMILY}")
        if type(block.attn) is not Attention:
            raise TypeError(f"tokenprune cannot patch block {i}: its attention is "
                            f"{type(block.attn).__module__}.{type(block.attn).__name__}; supported: {FAMILY}")
    problem = unsupported_head(model)
    if problem:
        raise TypeError(f"tokenprune {problem}")


def check_schedule(model: VisionTransformer, reducer: TokenReducer) -> None:
    """Plan the schedule for the model's native input size now, so an unreachable
    ``keep`` fails before patching (other sizes, with ``dynamic_img_size``, plan per forward)."""
    reducer.schedule(model.patch_embed.num_patches, len(model.blocks), model.num_prefix_tokens)


def patch(model: VisionTransformer, reducer: TokenReducer) -> None:
    if not is_patched(model):
        for block in model.blocks:
            block.__class__ = ReducingBlock
        swap(model, ReducingViT)
    model.tokenprune_reducer = reducer
    model._tokenprune_last = None


def unpatch(model: VisionTransformer) -> None:
    for block in model.blocks:
        block.__class__ = Block
    restore(model)
    del model.tokenprune_reducer
    del model._tokenprune_last
