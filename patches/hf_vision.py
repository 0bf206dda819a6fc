"""Adapter for Hugging Face transformers vision encoders: ViT, DeiT, CLIP, SigLIP, DINOv2 (registers too).

How the patch works (transformers 5.x; docs/design.md has the reasoning):

* The model keeps its attention implementation (SDPA by default, eager, flex or flash attention). The
  log-size bias of proportional attention reaches it as the attention mask under SDPA and eager, as a
  score modification under flex attention; flash attention takes no float mask, so the layers that
  have a bias (after tokens merged) run SDPA there (``hf_attention.key_bias_attention``).
* The module that runs the layer loop gets a forward pre-hook that puts a fresh
  ``ForwardState`` into the forward's keyword arguments; transformers hands those keyword
  arguments to every layer, so the state travels with the forward, never in a global.
* Each encoder layer's class becomes a generated subclass whose ``forward`` runs
  ``tokenprune.block.run_block`` (the reducing step every framework shares) on the layer's parts,
  named per family by a ``Family`` row: the stock layer when it reduces nothing (with the log-size
  bias as its attention mask once tokens merged), otherwise the same parts in the same order with the
  method's hook. A reducing layer still calls its attention module (whose class gets a mixin that
  makes it ``AttentionParts``), so forward hooks, and with them transformers' ``output_attentions``,
  see every layer's attention at its reduced size.
* Heads are left as they are. Heads that read the class token (ViT, DeiT, CLIP, DINOv2 pooler)
  are exact; heads that average the patch tokens (``*ForImageClassification`` of CLIP, SigLIP and
  DINOv2) and SigLIP's attention-pooling head weigh a merged token once, as ToMe's own patches do.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokenprune.adapters import Adapter, EncoderAdapter, register_adapter
from tokenprune.block import AttentionRequest, attend, run_block
from tokenprune.registry import EncoderReducer
from tokenprune.state import ForwardState

from ._hooks import remove_hooks
from ._swap import Swapped, check_swappable, refuse_jit_tracing, restore, swap
from .hf_attention import (
    check_attention,
    implementation,
    implementation_name,
    key_bias_attention,
    masks_nothing,
    takes_key_bias,
    transformers_class,
)

FAMILY = ("transformers ViT, DeiT (distilled too), CLIP and SigLIP vision towers, DINOv2 (registers too): "
          "their *Model, *ForImageClassification, CLIPModel/SiglipModel and pipelines built on them")


@dataclass(frozen=True)
class Family:
    """Where one transformers family keeps what the patch needs (attribute names)."""

    name: str
    module: str  # transformers.models.<module>
    backbone: str  # class holding the embeddings and the layer stack
    stack: str  # attribute of the backbone running the layer loop ("" = the backbone itself)
    layers: str  # attribute of the stack: the ModuleList of layers
    norm1: str
    attention: str
    after_attention: tuple[str, ...]  # applied to the attention output before the residual add
    norm2: str
    mlp: str
    after_mlp: tuple[str, ...]
    class_tokens: int  # class (and distillation) tokens before the patch tokens
    registers: bool = False  # register tokens follow them (``config.num_register_tokens``)

    def num_prefix(self, config) -> int:
        return self.class_tokens + (config.num_register_tokens if self.registers else 0)

    def backbone_class(self) -> type | None:
        return transformers_class(self.module, self.backbone)


_VIT_PARTS = dict(norm1="layernorm_before", attention="attention", after_attention=("dropout",),
                  norm2="layernorm_after", mlp="mlp", after_mlp=("dropout",))
_CLIP_PARTS = dict(norm1="layer_norm1", attention="self_attn", after_attention=(),
                   norm2="layer_norm2", mlp="mlp", after_mlp=())
_DINO_PARTS = dict(norm1="norm1", attention="attention", after_attention=("layer_scale1", "drop_path"),
                   norm2="norm2", mlp="mlp", after_mlp=("layer_scale2", "drop_path"))

FAMILIES = (
    Family("ViT", "vit", "ViTModel", "", "layers", **_VIT_PARTS, class_tokens=1),
    Family("DeiT", "deit", "DeiTModel", "", "layers", **_VIT_PARTS, class_tokens=2),
    Family("CLIP", "clip", "CLIPVisionModel", "encoder", "layers", **_CLIP_PARTS, class_tokens=1),
    Family("SigLIP", "siglip", "SiglipVisionModel", "encoder", "layers", **_CLIP_PARTS, class_tokens=0),
    Family("DINOv2", "dinov2", "Dinov2Model", "encoder", "layer", **_DINO_PARTS, class_tokens=1),
    Family("DINOv2 with registers", "dinov2_with_registers", "Dinov2WithRegistersModel", "encoder", "layer",
           **_DINO_PARTS, class_tokens=1, registers=True),
)
_FAMILY_BY_NAME = {family.name: family for family in FAMILIES}


@functools.cache
def _backbone_classes() -> dict[type, Family]:
    """Each family's backbone class (resolved once: ``apply``, ``is_patched``, ... look up per call)."""
    return {cls: family for family in FAMILIES if (cls := family.backbone_class()) is not None}


# Heads that read the encoder's patch tokens as the patch grid (a decoder reshapes them to an image): reduced
# tokens are no grid, and a square count (16 of 64) is read as a smaller image without an error.
_GRID_HEADS = (("vit", "ViTForMaskedImageModeling"), ("deit", "DeiTForMaskedImageModeling"))


@functools.cache
def _grid_head_classes() -> tuple[type, ...]:
    return tuple(cls for module, name in _GRID_HEADS if (cls := transformers_class(module, name)) is not None)


def check_heads(model: nn.Module) -> None:
    """Raise TypeError if ``model`` holds a head that reads the encoder's tokens as the patch grid, or is a
    vision-language model tokenprune does not prune as one (PaliGemma, Gemma 3, ...): its language model takes
    one image feature per placeholder token, a fixed count that reducing the tower's tokens breaks (an error
    deep in transformers at the first forward). The VLMs tokenprune prunes are claimed by patches/vlm.py first."""
    for module in model.modules():
        if isinstance(module, _grid_head_classes()):
            raise TypeError(f"tokenprune cannot patch {type(module).__name__}: its decoder reads the encoder's "
                            f"tokens as the patch grid, which token reduction removes; supported: {FAMILY}")
        if getattr(getattr(module, "config", None), "image_token_id", None) is not None:
            raise TypeError(f"tokenprune cannot patch the vision tower of {type(module).__name__}: its language "
                            "model takes one image feature per image placeholder token, a count token reduction "
                            "changes; VLMs tokenprune prunes: transformers LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, "
                            "Qwen2.5-VL")


# ---------------------------------------------------------------- the attention and the layer

class ReducingAttention(Swapped):
    """Mixed in front of an attention module's class; it is the module's ``AttentionParts``. A reducing
    layer's attention runs ``tokenprune.block.attend`` through the module's call, so transformers'
    ``output_attentions`` (recorded by forward hooks on this module) and user hooks see it."""

    @property
    def softmax_scale(self) -> float:
        return getattr(self, "scaling", None) or self.scale

    @property
    def returns_maps(self) -> bool:  # transformers' eager attention returns its map, asked or not
        return implementation_name(self) == "eager"

    def _split_heads(self, proj: nn.Linear, h: Tensor) -> Tensor:
        batch, n, _ = h.shape
        return proj(h).view(batch, n, -1, self.head_dim).transpose(1, 2)

    def project_qkv(self, h):
        return *self.project_qk(h), self.project_v(h)

    def project_qk(self, h):
        return self._split_heads(self.q_proj, h), self._split_heads(self.k_proj, h)

    def project_v(self, h):
        return self._split_heads(self.v_proj, h)

    def _dropout(self) -> float:
        return getattr(self, "attention_dropout", getattr(self, "dropout", 0.0)) if self.training else 0.0

    def kernel(self, q, k, v, bias):
        attention = implementation(self) if bias is None else key_bias_attention(self)
        out, maps = attention(self, q, k, v, bias, scaling=self.softmax_scale, dropout=self._dropout())
        return out.transpose(1, 2), maps  # transformers' functions return (B, N, H, D)

    def drop_attention(self, probs):
        return nn.functional.dropout(probs, p=self._dropout(), training=self.training)

    def project_out(self, h, heads):
        out_proj = self.o_proj if hasattr(self, "o_proj") else self.out_proj
        return out_proj(heads.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1))

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                tokenprune_request: AttentionRequest | None = None, **kwargs):
        if tokenprune_request is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        return attend(self, hidden_states, attention_mask, tokenprune_request)


class ReducingLayer(Swapped):
    """Mixed in front of an encoder layer's class; reduces tokens (``tokenprune.block.run_block``) when
    the forward carries a state."""

    _tokenprune_family_name: str  # set on the instance by ``patch`` (a plain string pickles)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                tokenprune_state: ForwardState | None = None, **kwargs):
        state = tokenprune_state
        if state is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        refuse_jit_tracing()
        reduces = state.removes_tokens(hidden_states)
        checkpointing = getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled()
        if checkpointing and reduces:
            # transformers' checkpointing replays this forward in the backward pass, with the forward's state
            # already moved on (later blocks' counts, reduced sizes): gradients would fail or be wrong
            raise RuntimeError("tokenprune: gradient checkpointing cannot be combined with token reduction (a layer "
                               "recomputed in the backward pass would replay the token schedule from a later "
                               "state); call model.gradient_checkpointing_disable() or tokenprune.remove(model) first")
        if attention_mask is not None and torch.compiler.is_exporting():
            raise RuntimeError("tokenprune: torch.export is not supported on a patched transformers model (under "
                               "export transformers builds an attention mask even without one, which cannot be "
                               "combined with token reduction); use torch.compile(model), or export a timm model")
        masked = not masks_nothing(attention_mask)
        if masked and reduces:
            raise ValueError("tokenprune: an attention_mask cannot be combined with token reduction (the token "
                             "count changes inside the encoder; the mask fits the input's); call "
                             "tokenprune.remove(model) first")
        if state.reducer.trace_source and not state.token_counts:  # the first layer sees the input tokens
            state.start_source_tracking(hidden_states)
        if masked or checkpointing:  # nothing is removed (keep=1.0, r=0): the stock layer, with the caller's mask or
            # checkpointed (its replay in the backward pass records its count again, after the report was taken)
            state.enter_block(hidden_states)
            state.output_tokens = hidden_states.shape[1]
            return super().forward(hidden_states, attention_mask, **kwargs)
        x = run_block(LayerParts(self, _FAMILY_BY_NAME[self._tokenprune_family_name], kwargs, attention_mask),
                      hidden_states, state)
        state.output_tokens = x.shape[1]
        return x


@dataclass(frozen=True)
class LayerParts:
    """One call of a patched layer as ``tokenprune.block.BlockParts``: the parts ``family`` names, the
    call's keyword arguments for the stock layer, and the mask the model built (one that masks nothing:
    under flex attention transformers builds a full ``BlockMask`` even without a user mask)."""

    layer: nn.Module
    family: Family
    kwargs: dict
    model_mask: object = None

    def _part(self, role: str) -> nn.Module:
        return getattr(self.layer, getattr(self.family, role))

    def _chain(self, names: tuple[str, ...], h: Tensor) -> Tensor:
        for name in names:
            h = getattr(self.layer, name)(h)
        return h

    def stock_block(self, x, bias):
        mask, kwargs = bias, self.kwargs
        if bias is None and self.model_mask is not None and self.model_mask.shape[-1] == x.shape[1]:
            mask = self.model_mask  # nothing removed yet: the stock call, as the stock model makes it
        elif bias is not None and not takes_key_bias(implementation_name(self._part("attention"))):
            # flex / flash attention cannot take the bias as a mask: the layer's attention runs ``attend``,
            # whose kernel hands it to one that can (the rest of the layer is the stock code)
            kwargs = {**kwargs, "tokenprune_request": AttentionRequest()}
        return super(ReducingLayer, self.layer).forward(x, mask, **kwargs)

    def attention_input(self, x):
        return self._part("norm1")(x)

    def attention_parts(self):
        return self._part("attention")

    def run_attention(self, h, bias, request):
        return self._part("attention")(h, bias, tokenprune_request=request)[0]

    def attention_residual(self, h):
        return self._chain(self.family.after_attention, h)

    def mlp_residual(self, x):
        return self._chain(self.family.after_mlp, self._part("mlp")(self._part("norm2")(x)))


# ---------------------------------------------------------------- per-forward state

def _start_forward(stack: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the module running the layer loop: a fresh state for this forward."""
    kwargs["tokenprune_state"] = ForwardState(reducer=stack.tokenprune_reducer, depth=stack.tokenprune_depth,
                                              num_prefix=stack.tokenprune_num_prefix,
                                              class_token=stack.tokenprune_class_token)
    return args, kwargs


def _finish_forward(stack: nn.Module, args: tuple, kwargs: dict, output) -> None:
    stack._tokenprune_last = kwargs["tokenprune_state"].report()


# ---------------------------------------------------------------- finding the encoder

@dataclass(frozen=True)
class Encoder:
    family: Family
    backbone: nn.Module
    stack: nn.Module  # runs the layer loop; carries the hooks and the reducer
    layers: nn.ModuleList

    @property
    def config(self):
        return getattr(self.layers[0], self.family.attention).config

    @property
    def num_patches(self) -> int:
        config = self.backbone.config
        size, patch = config.image_size, config.patch_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return (size[0] // patch[0]) * (size[1] // patch[1])


def _encoders(model: nn.Module) -> list[Encoder]:
    if "transformers" not in sys.modules:  # nothing from transformers can be inside
        return []
    found = []
    classes = _backbone_classes()
    for module in model.modules():
        family = classes.get(type(module))
        if family is not None:
            stack = module.get_submodule(family.stack) if family.stack else module
            found.append(Encoder(family, module, stack, getattr(stack, family.layers)))
    return found


def _encoder(model: nn.Module) -> Encoder:
    found = _encoders(model)
    if len(found) != 1:
        raise TypeError(f"tokenprune found {len(found)} vision encoders in {type(model).__name__}; "
                        "apply it to a model (or sub-module) holding exactly one")
    return found[0]


# ---------------------------------------------------------------- patching an encoder (also used for a VLM's tower)

def check_encoder(model: nn.Module) -> None:
    """Raise TypeError naming what cannot be patched in the one encoder ``model`` holds."""
    enc = _encoder(model)
    for i, layer in enumerate(enc.layers):
        for name in ("norm1", "attention", "norm2", "mlp"):
            if not hasattr(layer, getattr(enc.family, name)):
                raise TypeError(f"tokenprune cannot patch layer {i} of {enc.family.name}: no "
                                f"{getattr(enc.family, name)!r} (needs transformers >= 5 module names)")
        attn = getattr(layer, enc.family.attention)
        if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "head_dim")):
            raise TypeError(f"tokenprune cannot patch layer {i} of {enc.family.name}: its attention "
                            f"{type(attn).__name__} has no q_proj/k_proj/v_proj (needs transformers >= 5)")
    check_attention(enc.config, "model")
    check_swappable([(f"layer {i}{part} of {enc.family.name}", module) for i, layer in enumerate(enc.layers)
                     for part, module in (("", layer), (" attention", getattr(layer, enc.family.attention)))])


def plan_encoder(model: nn.Module, reducer: EncoderReducer, depth: int | None = None) -> None:
    """Plan the schedule for the configured image size now, so an unreachable ``keep`` fails before
    patching. ``depth``: as for ``patch_encoder``."""
    enc = _encoder(model)
    check_attention(enc.config, "model", needs_bias=reducer.proportional_attention)
    reducer.schedule(enc.num_patches, depth or len(enc.layers), enc.family.num_prefix(enc.backbone.config))


def patch_encoder(model: nn.Module, reducer: EncoderReducer, depth: int | None = None) -> None:
    """``depth``: the layers whose output is used (a VLM takes an inner layer's features): the
    schedule reaches its final count there; by default, all layers."""
    enc = _encoder(model)
    if not hasattr(enc.stack, "tokenprune_reducer"):
        for layer in enc.layers:
            layer._tokenprune_family_name = enc.family.name
            swap(layer, ReducingLayer)
            swap(getattr(layer, enc.family.attention), ReducingAttention)
        enc.stack.register_forward_pre_hook(_start_forward, with_kwargs=True)
        enc.stack.register_forward_hook(_finish_forward, with_kwargs=True)
        enc.stack.tokenprune_num_prefix = enc.family.num_prefix(enc.backbone.config)
        enc.stack.tokenprune_class_token = enc.family.class_tokens > 0
    enc.stack.tokenprune_depth = depth or len(enc.layers)
    Adapter.configure(enc.stack, reducer)


def unpatch_encoder(model: nn.Module) -> None:
    enc = _encoder(model)
    for layer in enc.layers:
        layer.__dict__.pop("_tokenprune_family_name", None)  # absent where a layer was restored already
        restore(layer)
        restore(getattr(layer, enc.family.attention))
    remove_hooks(enc.stack, _start_forward, _finish_forward)
    for name in ("tokenprune_num_prefix", "tokenprune_class_token", "tokenprune_depth"):
        enc.stack.__dict__.pop(name, None)
    Adapter.unconfigure(enc.stack)


@register_adapter
class HFVisionAdapter(EncoderAdapter):
    family = FAMILY

    def handles(self, model):
        return bool(_encoders(model))

    def anchor(self, model):
        return _encoder(model).stack

    def check(self, model):
        check_encoder(model)
        # set by the VLM adapter (patches/vlm.py, OWNER) on the tower it patched: patching or restoring the tower
        # here would pull its layers or attention from under the VLM's patch, which could then not be removed
        owner = vars(_encoder(model).stack).get("_tokenprune_owner")
        if owner is not None:
            raise TypeError(f"tokenprune: this vision tower belongs to a patched {owner}: call tokenprune.apply or "
                            "tokenprune.remove on that model")
        check_heads(model)

    def plan(self, model, reducer):
        plan_encoder(model, reducer)

    def patch(self, model, reducer):
        patch_encoder(model, reducer)

    def unpatch(self, model):
        unpatch_encoder(model)
