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
* Each ``Block`` becomes a ``ReducingBlock``, which overrides ``forward`` and supplies its parts
  (norms, attention, residual branches) to ``tokenprune.block.run_block``, the reducing step every
  framework shares. Called without a state (``forward_intermediates``, user code) it is the stock
  block; blocks that reduce nothing run the stock block with the log-size bias as their attention
  mask, so SDPA stays SDPA. ``TimmAttention`` is timm's ``Attention.forward`` in the pieces
  ``tokenprune.block.attend`` runs (q/k taps, explicit probabilities, a method's attention core); a reducing
  block runs it through its attention module (``ReducingAttention``) and the blocks through ``model.blocks``
  (``ReducingBlocks``), so forward hooks on either run as in the stock model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionPoolLatent
from timm.layers.attention import maybe_add_mask
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn
from torch.nn.modules import module as torch_module  # the global module hooks (private), read per merging block
from torch.utils.module_tracker import ModuleTracker

from tokenprune import ops
from tokenprune.adapters import EncoderAdapter, register_adapter
from tokenprune.block import AttentionRequest, attend, run_block
from tokenprune.registry import EncoderReducer
from tokenprune.state import ForwardState
from tokenprune.warn import warn_at_caller

from ._swap import Swapped, check_swappable, refuse_jit_tracing, restore, swap

FAMILY = ("timm VisionTransformer with standard Block/Attention: vit_*, deit_* (distilled too), deit3_*, "
          "*_dinov2 (reg too), CLIP and SigLIP ViTs")
_POOLS = ("token", "avg", "avgmax", "max", "")
_SIZE_POOLS = ("avg", "avgmax")  # with 'map': the pools a merged token must enter with its size


@dataclass(frozen=True)
class TimmAttention:
    """timm's ``Attention`` (timm 1.0.x) as ``tokenprune.block.AttentionParts``: its ``forward`` step by
    step (a test pins ``attend`` through it bit-exact to timm's own forward)."""

    attn: Attention
    returns_maps = False

    @property
    def softmax_scale(self) -> float:
        return self.attn.scale

    def project_qkv(self, h):
        attn, (B, N, _) = self.attn, h.shape
        q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    @property
    def splits_projection(self) -> bool:
        """Whether q and k, or v alone, may be computed from slices of ``qkv``'s weight: only where calling the
        module would run nothing but ``nn.Linear.forward``. A wrapped projection (peft's LoRA, a quantized or
        parametrized linear, accelerate's hook on the instance's ``forward``) computes more than its ``weight``
        says, and hooks on it (its own, forward or backward, or global module hooks) must run; otherwise the
        module itself runs and its output is split (v, or q and k, computed and dropped)."""
        qkv = self.attn.qkv
        return (type(qkv) is nn.Linear and "forward" not in vars(qkv)
                and not (qkv._forward_hooks or qkv._forward_pre_hooks or qkv._backward_hooks
                         or qkv._backward_pre_hooks or _global_module_hooks()))

    def project_qk(self, h):
        if not self.splits_projection:
            return self.project_qkv(h)[:2]
        attn, dim = self.attn, self.attn.attn_dim
        bias = None if attn.qkv.bias is None else attn.qkv.bias[: 2 * dim]
        B, N, _ = h.shape
        q, k = F.linear(h, attn.qkv.weight[: 2 * dim], bias).reshape(B, N, 2, attn.num_heads, attn.head_dim) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k)

    def project_v(self, h):
        if not self.splits_projection:
            return self.project_qkv(h)[2]
        attn, dim = self.attn, self.attn.attn_dim
        bias = None if attn.qkv.bias is None else attn.qkv.bias[2 * dim:]
        B, N, _ = h.shape
        return F.linear(h, attn.qkv.weight[2 * dim:], bias).reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)

    def kernel(self, q, k, v, bias):
        attn = self.attn
        if attn.fused_attn:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                  dropout_p=attn.attn_drop.p if attn.training else 0.0), None
        weights = maybe_add_mask((q * attn.scale) @ k.transpose(-2, -1), bias).softmax(dim=-1)
        return attn.attn_drop(weights) @ v, None

    def drop_attention(self, probs):
        return self.attn.attn_drop(probs)

    def project_out(self, h, heads):
        attn, (B, N, _) = self.attn, h.shape
        out = attn.norm(heads.transpose(1, 2).reshape(B, N, attn.attn_dim))
        if attn.gate is not None:
            out = out * attn.gate(h).sigmoid()
        return attn.proj_drop(attn.proj(out))


def _global_module_hooks() -> bool:
    """Whether hooks are registered for every module's call (``nn.modules.module.register_module_forward_hook``
    and the like; torch keeps them in private globals), other than a ``ModuleTracker``'s: those only record which
    module runs (``torch.utils.flop_counter`` attributes FLOPs with one), and ``count_flops`` must count the forward
    that runs without it."""
    registered = (torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks,
                  torch_module._global_backward_hooks, torch_module._global_backward_pre_hooks)
    return any(not isinstance(getattr(hook, "__self__", None), ModuleTracker)
               for hooks in registered for hook in hooks.values())


class ReducingAttention(Attention):
    """timm's ``Attention`` that, called by a reducing block with its ``AttentionRequest``, runs
    ``tokenprune.block.attend``; otherwise the stock forward. A reducing block calls its attention module,
    so what is hooked on it runs in every block, at the size the block attends over."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                tokenprune_request: AttentionRequest | None = None) -> Tensor:
        if tokenprune_request is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return attend(TimmAttention(self), x, attn_mask, tokenprune_request)[0]


class ReducingBlocks(nn.Sequential):
    """timm's block sequence that hands a reducing forward's state to each block: the patched forward calls
    ``model.blocks`` as the stock one does, so what is hooked on it runs as in the stock model."""

    def forward(self, x: Tensor, state: ForwardState | None = None) -> Tensor:
        if state is None:
            return super().forward(x)
        for block in self:
            x = block(x, state=state)
        return x


class ReducingBlock(Block):
    """A timm ``Block`` that reduces tokens when it is given a ``ForwardState`` (``tokenprune.block.run_block``);
    without one it is the stock block. It is the block's ``BlockParts``."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                state: ForwardState | None = None) -> Tensor:
        if state is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return run_block(self, x, state)

    def stock_block(self, x, bias):
        return super().forward(x, attn_mask=bias)

    def attention_input(self, x):
        return self.norm1(x)

    def attention_parts(self):
        return TimmAttention(self.attn)

    def run_attention(self, h, bias, request):
        return self.attn(h, bias, tokenprune_request=request)

    def attention_residual(self, h):
        return self.drop_path1(self.ls1(h))

    def mlp_residual(self, x):
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ReducingViT(Swapped, VisionTransformer):
    """Mixed in front of the model's own class (``_swap.swap``); never built directly."""

    tokenprune_reducer: EncoderReducer

    def _reduced_features(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> tuple[Tensor, ForwardState]:
        refuse_jit_tracing()
        masked = attn_mask is not None or is_causal
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        reducer = self.tokenprune_reducer
        num_patches = x.shape[1] - self.num_prefix_tokens
        state = ForwardState(reducer=reducer, num_prefix=self.num_prefix_tokens, class_token=self.cls_token is not None,
                             schedule=reducer.schedule(num_patches, len(self.blocks), self.num_prefix_tokens))
        reduces = state.removes_tokens(x)
        if masked and reduces:
            raise ValueError("tokenprune: attn_mask / is_causal cannot be combined with token reduction (the token "
                             "count changes inside the encoder; the mask fits the input's); call "
                             "tokenprune.remove(model) first")
        # timm's own condition for checkpointing (training mode aside: it checkpoints in eval mode too)
        checkpointing = self.grad_checkpointing and not torch.jit.is_scripting()
        if checkpointing and reduces and self.training and torch.is_grad_enabled():
            warn_at_caller("tokenprune: timm's gradient checkpointing is not applied while reducing tokens (the "
                           "blocks run as they are: the same gradients, the memory of a forward without it)",
                           RuntimeWarning)
        if reducer.trace_source:
            state.start_source_tracking(x)
        if masked:  # nothing is removed (keep=1.0, r=0): the stock blocks one by one, with the caller's mask
            for block in self.blocks:
                state.enter_block(x)
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        elif not reduces:  # nothing is removed: timm's own call of the block sequence (checkpointed where timm
            # checkpoints), so that what is hooked on it runs as in the stock model
            for _ in self.blocks:
                state.enter_block(x)
            x = checkpoint_seq(self.blocks, x) if checkpointing else self.blocks(x)
        elif isinstance(self.blocks, ReducingBlocks):  # timm's call of the sequence: its hooks run as in stock
            x = self.blocks(x, state=state)
        else:  # a sequence set after apply
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
            return self.attn_pool(x, attn_mask=ops.log_size_bias(size).to(x.dtype))  # SDPA: the query's dtype
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


#: what ``ReducingViT`` replaces: a subclass's own version would be skipped, even at keep=1.0
_REPLACED = ("forward", "forward_features")


def overridden_forward(model: VisionTransformer) -> str | None:
    """Why the model's class cannot be swapped for ``ReducingViT``, or None: the patch replaces ``forward`` and
    ``forward_features`` with timm's own steps, so a subclass that overrides either would silently lose what
    its version adds (DeiT's distilled class overrides only ``_pos_embed`` and the head, which the patch calls)."""
    base = getattr(model, "_tokenprune_base", type(model))
    for name in _REPLACED:
        if getattr(base, name) is not getattr(VisionTransformer, name):
            owner = next(c for c in base.__mro__ if name in vars(c))
            return (f"cannot patch {base.__name__}: {owner.__module__}.{owner.__name__} overrides "
                    f"VisionTransformer.{name}, which the patch replaces (its changes would be skipped)")
    return None


# ---------------------------------------------------------------- the adapter

@register_adapter
class TimmViTAdapter(EncoderAdapter):
    family = FAMILY
    lookup_order = 0  # an isinstance check on the model itself

    def handles(self, model):
        return isinstance(model, VisionTransformer)

    def anchor(self, model):
        return model

    def check(self, model):
        for i, block in enumerate(model.blocks):
            if type(block) not in (Block, ReducingBlock):
                raise TypeError(f"tokenprune cannot patch block {i} of {type(model).__name__}: it is "
                                f"{type(block).__module__}.{type(block).__name__}; supported: {FAMILY}")
            if type(block.attn) not in (Attention, ReducingAttention):
                raise TypeError(f"tokenprune cannot patch block {i}: its attention is "
                                f"{type(block.attn).__module__}.{type(block.attn).__name__}; supported: {FAMILY}")
        if type(model.blocks) not in (nn.Sequential, ReducingBlocks):
            raise TypeError(f"tokenprune cannot patch {type(model).__name__}: its blocks are "
                            f"{type(model.blocks).__module__}.{type(model.blocks).__name__}, not timm's nn.Sequential")
        problem = overridden_forward(model) or unsupported_head(model)
        if problem:
            raise TypeError(f"tokenprune {problem}")
        check_swappable([("the model", model), ("its blocks", model.blocks)]
                        + [(f"block {i}{part}", module) for i, block in enumerate(model.blocks)
                           for part, module in (("", block), (" attention", block.attn))])

    def plan(self, model, reducer):
        """Plan the schedule for the model's native input size now, so an unreachable ``keep`` fails
        before patching (other sizes, with ``dynamic_img_size``, plan per forward)."""
        reducer.schedule(model.patch_embed.num_patches, len(model.blocks), model.num_prefix_tokens)

    def patch(self, model, reducer):
        if not self.is_patched(model):
            for block in model.blocks:
                block.__class__ = ReducingBlock
                block.attn.__class__ = ReducingAttention
            model.blocks.__class__ = ReducingBlocks
            swap(model, ReducingViT)
        self.configure(model, reducer)

    def unpatch(self, model):
        for block in model.blocks:
            block.__class__ = Block
            block.attn.__class__ = Attention
        if type(model.blocks) is ReducingBlocks:
            model.blocks.__class__ = nn.Sequential
        restore(model)
        self.unconfigure(model)
