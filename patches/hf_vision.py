"""Adapter for Hugging Face transformers vision encoders: ViT, DeiT, CLIP, SigLIP, DINOv2 (registers too).

How the patch works (transformers 5.x; docs/design.md has the reasoning):

* The model keeps its attention implementation. Its attention modules are pointed at
  ``"tokenprune"``, an attention function registered with transformers' ``AttentionInterface``
  that calls the model's own implementation (SDPA by default, or eager) and, only in blocks
  that reduce and only when the method asks, keeps q and k (and the probabilities, computed
  explicitly there, when the method needs them).
* The module that runs the layer loop gets a forward pre-hook that puts a fresh
  ``ForwardState`` into the forward's keyword arguments; transformers hands those keyword
  arguments to every layer, so the state travels with the forward, never in a global.
* Each encoder layer's class becomes a generated subclass whose ``forward`` runs the stock layer
  when it reduces nothing (with the log-size bias as its attention mask once tokens merged), and
  otherwise the same parts in the same order with the reduction between the attention residual
  and the MLP (or, for ``block_input`` methods, before the attention). A reducing layer still calls
  its attention module (whose class gets a mixin too), so forward hooks, and with them transformers'
  ``output_attentions``, see every layer's attention at its reduced size.
* Heads are left as they are. Heads that read the class token (ViT, DeiT, CLIP, DINOv2 pooler)
  are exact; heads that average the patch tokens (``*ForImageClassification`` of CLIP, SigLIP and
  DINOv2) and SigLIP's attention-pooling head weigh a merged token once, as ToMe's own patches do.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from tokenprune import ops
from tokenprune.registry import TokenReducer
from tokenprune.state import AttentionTaps, ForwardState

from ._hooks import remove_hooks
from ._swap import Swapped, refuse_jit_tracing, restore, swap

FAMILY = ("transformers ViT, DeiT (distilled too), CLIP and SigLIP vision towers, DINOv2 (registers too): "
          "their *Model, *ForImageClassification, CLIPModel/SiglipModel and pipelines built on them")
DEFAULT_METHOD = "tome"
ATTENTION_NAME = "tokenprune"
_BASE_ATTENTIONS = ("sdpa", "eager")


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


def transformers_class(module: str, name: str) -> type | None:
    """``transformers.models.<module>.modeling_<module>.<name>``, or None where this transformers lacks it."""
    try:
        return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name, None)
    except ImportError:
        return None


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


# ---------------------------------------------------------------- the attention function

@dataclass
class AttentionCall:
    """A reducing layer's request to its attention call, and what comes back (``taps``)."""

    keep_probabilities: bool
    taps: AttentionTaps | None = None


@dataclass
class ScoreRequest:
    """Asks the attention function, through a forward's keyword arguments, for the attention each token
    receives (mean over heads and queries) in the attention modules numbered ``layers``."""

    layers: frozenset[int]
    received: dict[int, list[Tensor]] = field(default_factory=dict)  # layer -> one (B, N) per call

    def collect(self, layer: int) -> Tensor:
        """The scores of ``layer``, its calls concatenated along the tokens (Qwen attends per window)."""
        if layer not in self.received:
            raise RuntimeError(f"tokenprune: no attention scores came from layer {layer + 1}; was the "
                               "encoder's attention implementation changed after patching?")
        return torch.cat(self.received[layer], dim=-1)


def base_attention(module: nn.Module) -> Callable:
    """The attention implementation the model had before patching."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = module._tokenprune_base_attention
    if name == "eager":  # every transformers modeling file defines its own eager function
        cls = getattr(module, "_tokenprune_base", type(module))  # the module's own class, if swapped
        return sys.modules[cls.__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def tokenprune_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None, tokenprune_call: AttentionCall | None = None,
                         tokenprune_scores: ScoreRequest | None = None, **kwargs):
    """The model's own attention; with a ``tokenprune_call`` it also hands back q and k, and
    with ``keep_probabilities`` runs explicit attention to keep the probabilities. With
    ``tokenprune_scores`` it records the attention received in the requested layers (in query chunks)."""
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    if tokenprune_scores is not None and getattr(module, "_tokenprune_layer", None) in tokenprune_scores.layers:
        tokenprune_scores.received.setdefault(module._tokenprune_layer, []).append(
            ops.received_attention(query, key, scaling, attention_mask))
    if tokenprune_call is None:
        return base_attention(module)(module, query, key, value, attention_mask, **kwargs)
    if tokenprune_call.keep_probabilities:
        logits = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            logits = logits + attention_mask
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
        dropped = nn.functional.dropout(probs, p=kwargs.get("dropout", 0.0), training=module.training)
        out = torch.matmul(dropped, value).transpose(1, 2).contiguous()
        # returned as the layer's attention map where the model's own implementation returns one (eager, as
        # transformers' eager function: after dropout); SDPA returns none, as the stock model does
        weights = dropped if module._tokenprune_base_attention == "eager" else None
    else:
        out, weights = base_attention(module)(module, query, key, value, attention_mask, **kwargs)
        probs = None
    tokenprune_call.taps = AttentionTaps(q=query, k=key, scale=scaling, bias=attention_mask, probs=probs)
    return out, weights


def route_attention(attention_modules: list[nn.Module], config) -> None:
    """Point these attention modules (numbered in order, for ``ScoreRequest``) at the tokenprune
    attention function, which calls the implementation ``config`` named before."""
    _register_attention()
    for i, attn in enumerate(attention_modules):
        attn._tokenprune_base_attention = config._attn_implementation
        attn._tokenprune_layer = i
    config._attn_implementation = ATTENTION_NAME


def unroute_attention(attention_modules: list[nn.Module], config) -> None:
    base = attention_modules[0]._tokenprune_base_attention
    for attn in attention_modules:
        del attn._tokenprune_base_attention, attn._tokenprune_layer
    config._attn_implementation = base


def check_attention(config, where: str) -> None:
    impl = config._attn_implementation
    if impl not in _BASE_ATTENTIONS + (ATTENTION_NAME,):
        raise TypeError(f"tokenprune keeps the {where}'s attention, which must be one of {_BASE_ATTENTIONS} "
                        f"(it adds a log-size bias to the mask or reads attention scores); it uses {impl!r}: "
                        "call model.set_attn_implementation('sdpa') first")


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, tokenprune_attention)
    # Without a mask function for the new name transformers would drop a user's attention mask
    # silently; with it the mask reaches the layers, which refuse it while reducing.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


# ---------------------------------------------------------------- the layer

def _heads(proj: nn.Linear, x: Tensor, head_dim: int) -> Tensor:
    batch, n, _ = x.shape
    return proj(x).view(batch, n, -1, head_dim).transpose(1, 2)


def _scaling(attn: nn.Module) -> float:
    return getattr(attn, "scaling", None) or attn.scale


def attention_from_parts(attn: nn.Module, h: Tensor, bias: Tensor | None, call: AttentionCall | None = None,
                         core: Callable[[Tensor], Tensor] | None = None, **kwargs) -> tuple[Tensor, Tensor | None]:
    """What the family's attention module computes (q/k/v projections, the attention function, the output
    projection), run here so that a reducing layer can pass its ``call`` (not every family forwards keyword
    arguments to the attention function) or replace softmax(qk)v by a method's ``core(v)``. Returns the
    output and the attention map (None where the model's attention implementation returns none)."""
    batch, n, _ = h.shape
    v = _heads(attn.v_proj, h, attn.head_dim)
    if core is not None:
        out, weights = core(v).transpose(1, 2), None
        if attn._tokenprune_base_attention == "eager":
            # eager returns a map whether or not it is asked for (config.output_attentions never reaches the
            # layers): the map the method's core applies to the values; the core is linear in v, so it is core(I)
            eye = torch.eye(n, dtype=v.dtype, device=v.device).expand(batch, v.shape[1], n, n)
            weights = core(eye)
    else:
        q, k = _heads(attn.q_proj, h, attn.head_dim), _heads(attn.k_proj, h, attn.head_dim)
        dropout = getattr(attn, "attention_dropout", getattr(attn, "dropout", 0.0)) if attn.training else 0.0
        kwargs = {key: value for key, value in kwargs.items() if key not in ("scaling", "dropout", "is_causal")}
        out, weights = tokenprune_attention(attn, q, k, v, bias, tokenprune_call=call, scaling=_scaling(attn),
                                            dropout=dropout, **kwargs)
    out_proj = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
    return out_proj(out.reshape(batch, n, -1)), weights


@dataclass
class AttentionParts:
    """A reducing layer's attention: its ``call`` to the attention function and/or a method's ``core``."""

    call: AttentionCall | None = None
    core: Callable[[Tensor], Tensor] | None = None


class ReducingAttention(Swapped):
    """Mixed in front of an attention module's class, so that a reducing layer's attention, computed from
    the module's parts, still goes through the module's call: transformers records ``output_attentions``
    (and user hooks see the attention) with forward hooks on this module."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                tokenprune_parts: AttentionParts | None = None, **kwargs):
        if tokenprune_parts is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        return attention_from_parts(self, hidden_states, attention_mask, tokenprune_parts.call,
                                    tokenprune_parts.core, **kwargs)


class ReducingLayer(Swapped):
    """Mixed in front of an encoder layer's class; reduces tokens when the forward carries a state."""

    _tokenprune_family_name: str  # set on the instance by ``patch`` (a plain string pickles)

    @property
    def _tokenprune_family(self) -> Family:
        return _FAMILY_BY_NAME[self._tokenprune_family_name]

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                tokenprune_state: ForwardState | None = None, **kwargs):
        state = tokenprune_state
        if state is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        refuse_jit_tracing()
        if attention_mask is not None and torch.compiler.is_exporting():
            raise RuntimeError("tokenprune: torch.export is not supported on a patched transformers model (under "
                               "export transformers builds an attention mask even without one, which cannot be "
                               "combined with token reduction); use torch.compile(model), or export a timm model")
        if attention_mask is not None:
            raise ValueError("tokenprune: an attention_mask cannot be combined with token reduction (the token "
                             "count changes inside the encoder); call tokenprune.remove(model) first")
        x = hidden_states
        if state.reducer.trace_source and not state.token_counts:  # the first layer sees the input tokens
            state.start_source_tracking(x)
        remove = state.enter_block(x)
        if not remove:
            x = super().forward(x, state.attention_bias(), **kwargs)
        else:
            x = self._reducing_forward(x, remove, state, kwargs)
        state.output_tokens = x.shape[1]
        return x

    def _reducing_forward(self, x: Tensor, remove: int, state: ForwardState, kwargs: dict) -> Tensor:
        parts, reducer = self._tokenprune_family, state.reducer
        attn, norm1 = getattr(self, parts.attention), getattr(self, parts.norm1)
        taps, core = None, None
        if reducer.placement == "block_input":
            h = norm1(x)
            taps = AttentionTaps(q=_heads(attn.q_proj, h, attn.head_dim), k=_heads(attn.k_proj, h, attn.head_dim),
                                 scale=_scaling(attn), bias=state.attention_bias())
            x, core = reducer.reduce(x, remove, taps, state)
            remove = 0
        call = AttentionCall(keep_probabilities=reducer.needs_probabilities) if remove and reducer.needs_attention \
            else None
        h, _ = attn(norm1(x), state.attention_bias(), tokenprune_parts=AttentionParts(call, core), **kwargs)
        if call is not None:
            taps = call.taps
        for name in parts.after_attention:
            h = getattr(self, name)(h)
        x = x + h
        if remove:
            x = reducer.reduce(x, remove, taps, state)
        h = getattr(self, parts.mlp)(getattr(self, parts.norm2)(x))
        for name in parts.after_mlp:
            h = getattr(self, name)(h)
        return x + h


# ---------------------------------------------------------------- per-forward state

def _start_forward(stack: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the module running the layer loop: a fresh state for this forward."""
    kwargs["tokenprune_state"] = ForwardState(reducer=stack.tokenprune_reducer, depth=stack.tokenprune_depth,
                                              num_prefix=stack.tokenprune_num_prefix)
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
    classes = [(family, family.backbone_class()) for family in FAMILIES]
    for module in model.modules():
        for family, cls in classes:
            if cls is not None and type(module) is cls:
                stack = module.get_submodule(family.stack) if family.stack else module
                found.append(Encoder(family, module, stack, getattr(stack, family.layers)))
    return found


def _encoder(model: nn.Module) -> Encoder:
    found = _encoders(model)
    if len(found) != 1:
        raise TypeError(f"tokenprune found {len(found)} vision encoders in {type(model).__name__}; "
                        "apply it to a model (or sub-module) holding exactly one")
    return found[0]


# ---------------------------------------------------------------- the adapter API

def handles(model: nn.Module) -> bool:
    return bool(_encoders(model))


def is_patched(model: nn.Module) -> bool:
    return hasattr(_encoder(model).stack, "tokenprune_reducer")


def reducer_of(model: nn.Module) -> TokenReducer:
    return _encoder(model).stack.tokenprune_reducer


def last_forward(model: nn.Module):
    return _encoder(model).stack._tokenprune_last


def check(model: nn.Module) -> None:
    """Raise TypeError naming what this adapter cannot patch."""
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


def check_schedule(model: nn.Module, reducer: TokenReducer) -> None:
    """Plan the schedule for the configured image size now, so an unreachable ``keep`` fails before patching."""
    enc = _encoder(model)
    reducer.schedule(enc.num_patches, len(enc.layers), enc.family.num_prefix(enc.backbone.config))


def patch(model: nn.Module, reducer: TokenReducer, depth: int | None = None) -> None:
    """``depth``: the layers whose output is used (a VLM takes an inner layer's features): the
    schedule reaches its final count there; by default, all layers."""
    enc = _encoder(model)
    if not hasattr(enc.stack, "tokenprune_reducer"):
        route_attention(_attention_modules(enc), enc.config)
        for layer in enc.layers:
            layer._tokenprune_family_name = enc.family.name
            swap(layer, ReducingLayer)
            swap(getattr(layer, enc.family.attention), ReducingAttention)
        enc.stack.register_forward_pre_hook(_start_forward, with_kwargs=True)
        enc.stack.register_forward_hook(_finish_forward, with_kwargs=True)
        enc.stack.tokenprune_num_prefix = enc.family.num_prefix(enc.backbone.config)
    enc.stack.tokenprune_depth = depth or len(enc.layers)
    enc.stack.tokenprune_reducer = reducer
    enc.stack._tokenprune_last = None


def _attention_modules(enc: Encoder) -> list[nn.Module]:
    return [getattr(layer, enc.family.attention) for layer in enc.layers]


def unpatch(model: nn.Module) -> None:
    enc = _encoder(model)
    unroute_attention(_attention_modules(enc), enc.config)
    for layer in enc.layers:
        del layer._tokenprune_family_name
        restore(layer)
        restore(getattr(layer, enc.family.attention))
    remove_hooks(enc.stack, _start_forward, _finish_forward)
    for name in ("tokenprune_reducer", "_tokenprune_last", "tokenprune_num_prefix", "tokenprune_depth"):
        enc.stack.__dict__.pop(name, None)

