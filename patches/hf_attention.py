"""What the transformers adapters share about attention: the implementation a module runs, how a
reducing encoder hands it the log-size bias, and the registered attention function that records
attention scores for VLM selectors.

* ``implementation(module)``: the attention function a module's config names (``sdpa``, the family's
  own ``eager``, ``flex_attention``, a flash attention, ...), also when the module is routed.
* ``key_bias_attention(module)``: the function that runs the module's attention with tokenprune's
  ``(B, 1, 1, N)`` log-size key bias (proportional attention). SDPA and eager take it as their mask;
  flex attention takes it as a score modification; flash attention takes no float mask, so those
  calls (only in the layers that have a bias: after tokens merged) go to SDPA. Other implementations
  are refused at ``apply`` for methods that need the bias (``check_attention``).
* ``route_attention``: points a vision tower's attention modules at a registered attention function
  (``"tokenprune:<the implementation>"``). It calls the module's own implementation and, when a
  forward's keyword arguments carry a ``ScoreRequest`` (a pre-hook keeps it on each attention module for the
  call, since some modules, SigLIP's, do not hand their keyword arguments on to the function), records the
  attention each token receives in the layers asked for, from q and k in query chunks (never from the
  implementation's outputs, so it works under flash and flex attention too), per window where the tower
  packs several (``cu_seqlens``).
"""
from __future__ import annotations

import functools
import importlib
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from tokenprune import ops

from ._hooks import remove_hooks

ATTENTION_NAME = "tokenprune"  # routed names are "tokenprune:<the implementation the model had>"
BASE_ATTENTIONS = ("sdpa", "eager")  # implementations that take the log-size bias as their attention mask
FLEX = "flex_attention"
TO_SDPA = "model.set_attn_implementation('sdpa')"


def transformers_class(module: str, name: str) -> type | None:
    """``transformers.models.<module>.modeling_<module>.<name>``, or None where this transformers lacks it."""
    try:
        return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name, None)
    except ImportError:
        return None


def is_flash(name: str) -> bool:
    """transformers' own test (``is_flash_attention_requested``): any implementation named "flash"."""
    return "flash" in name


def configured_name(config) -> str:
    """The implementation ``config`` names, as the user configured it (a routed name gives its base)."""
    name = config._attn_implementation
    prefix = ATTENTION_NAME + ":"
    return name[len(prefix):] if name.startswith(prefix) else name


def implementation_name(module: nn.Module) -> str:
    """The name of the attention implementation ``module`` runs (the one it had before routing, if routed)."""
    return getattr(module, "_tokenprune_base_attention", None) or module.config._attn_implementation


def implementation(module: nn.Module) -> Callable:
    """The attention function ``module`` runs."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = implementation_name(module)
    if name == "eager":  # every transformers modeling file defines its own eager function, which an "eager"
        # registered with AttentionInterface replaces (the modeling files' own lookup, get_interface)
        cls = getattr(module, "_tokenprune_base", type(module))  # the module's own class, if swapped
        return ALL_ATTENTION_FUNCTIONS.get(name, sys.modules[cls.__module__].eager_attention_forward)
    return ALL_ATTENTION_FUNCTIONS[name]


# ---------------------------------------------------------------- the log-size bias

def takes_key_bias(name: str) -> bool:
    """Whether implementation ``name`` takes tokenprune's log-size key bias as its attention mask, as is."""
    return name in BASE_ATTENTIONS


def key_bias_attention(module: nn.Module) -> Callable:
    """The attention function for a call of ``module`` with the log-size key bias as ``attention_mask``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = implementation_name(module)
    if takes_key_bias(name):
        return implementation(module)
    if name == FLEX:
        return flex_key_bias_attention
    if is_flash(name):  # flash kernels take a padding mask at most: this call runs SDPA, with the bias
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    raise TypeError(f"tokenprune cannot hand the log-size bias to attention implementation {name!r}")  # see check


def flex_key_bias_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor,
                            scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """Flex attention with the ``(B, 1, 1, N)`` key bias as a score modification. transformers' own flex
    function reads a float mask as ``mask[b][0][q][kv]``: a key bias is out of range there (and with
    torch 2.14 on CPU that indexing aborts the process even on an expanded mask), so the bias goes in as
    this function's own ``score_mod``, indexed by batch and key only."""
    if dropout > 0:
        raise ValueError("flex attention does not support attention dropout; call model.eval() (as transformers' "
                         "flex_attention requires)")
    if attention_mask.shape[1:3] != (1, 1):
        raise ValueError(f"tokenprune hands flex attention a (B, 1, 1, N) key bias, not {tuple(attention_mask.shape)}")
    key_bias = attention_mask[:, 0, 0, :].to(torch.float32)  # (B, N_k); flex's scores are float32

    def score_mod(score, batch, head, q_idx, kv_idx):
        return score + key_bias[batch, kv_idx]

    out = _compiled_flex(query.device.type, module.training)(query, key, value, score_mod=score_mod, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _compiled_flex(device_type: str, training: bool) -> Callable:
    """Flex attention compiled as transformers compiles it; on CPU for static shapes (one compile per token
    count), because torch 2.14's CPU code generation fails on a score_mod that reads a tensor at dynamic
    shapes (``cur_qSplitSize`` undeclared), and a reducing forward changes the token count every layer."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations.flex_attention import compile_friendly_flex_attention

    if torch.compiler.is_compiling():  # inside a compiled model: the model's compile covers it
        return flex_attention
    if device_type == "cpu":
        return _static_flex()
    return functools.partial(compile_friendly_flex_attention, training=training)


@functools.cache
def _static_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def masks_nothing(mask) -> bool:
    """Whether the attention mask a layer received lets every query see every key: None, or the full
    ``BlockMask`` transformers builds under flex attention when no mask was given (evaluated: about a
    millisecond per layer at batch 32 and 197 tokens on CPU). Tensors are masks someone meant."""
    if mask is None:
        return True
    from torch.nn.attention.flex_attention import BlockMask, create_mask

    if not isinstance(mask, BlockMask):
        return False
    return bool(create_mask(mask.mask_mod, *mask.shape, device=mask.kv_num_blocks.device).all())


def check_attention(config, where: str, needs_bias: bool = False) -> None:
    """Refuse, before patching, an implementation the method cannot run on, naming what to change.
    ``needs_bias``: the method adds the log-size bias (proportional attention of ``tome`` / ``mctf``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = configured_name(config)
    if name != "eager" and name not in ALL_ATTENTION_FUNCTIONS:
        raise TypeError(f"the {where}'s attention implementation {name!r} is not registered with transformers' "
                        f"AttentionInterface: call {TO_SDPA} first")
    if needs_bias and not (takes_key_bias(name) or name == FLEX or is_flash(name)):
        raise TypeError(f"the {where} uses attention implementation {name!r}, which tokenprune cannot hand the "
                        "log-size bias of proportional attention (sdpa, eager, flex_attention and flash attention "
                        f"can): call {TO_SDPA} first, or pass prop_attn=False (-o prop_attn=false)")


# ---------------------------------------------------------------- scores for VLM selectors

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


def _received(query: Tensor, key: Tensor, scaling: float, attention_mask, kwargs: dict) -> Tensor:
    """Attention received per key ``(B, N)``; with ``cu_seq_lens_q`` (a tower that packs its windows or
    images into one sequence for flash attention) per packed sequence, as the kernel attends."""
    if attention_mask is not None and not (isinstance(attention_mask, Tensor) and attention_mask.dim() == 4):
        raise TypeError("tokenprune scores a vision tower's attention with no mask or a 4-D additive one; this "
                        f"call has {type(attention_mask).__name__} {getattr(attention_mask, 'shape', '')}")
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return ops.received_attention(query, key, scaling, attention_mask)
    if attention_mask is not None or not torch.equal(bounds, kwargs.get("cu_seq_lens_k", bounds)):
        raise TypeError("tokenprune scores packed sequences (cu_seq_lens) of self-attention without a mask")
    edges = bounds.tolist()
    return torch.cat([ops.received_attention(query[..., start:end, :], key[..., start:end, :], scaling)
                      for start, end in zip(edges[:-1], edges[1:])], dim=-1)


class _AsConfigured:
    """``module`` as its own implementation sees it: every attribute is the module's, except that the config
    names that implementation. Flash attention loads its kernels by ``module.config._attn_implementation``,
    which routing changed; a view (made per call: it holds no state) leaves the shared config alone."""

    def __init__(self, module: nn.Module, config):
        self.__dict__.update(_module=module, config=config)

    def __getattr__(self, name):
        return getattr(self.__dict__["_module"], name)


def _take_request(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a routed attention module: the call's ``ScoreRequest``, kept on the module for the
    attention function. Some modules do not hand their keyword arguments on to it (SigLIP's), so the request
    cannot count on reaching it among them."""
    module._tokenprune_scores = kwargs.get("tokenprune_scores")


def _drop_request(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    module.__dict__.pop("_tokenprune_scores", None)  # the request (and its scores) lives as long as the call


def scoring_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      tokenprune_scores: ScoreRequest | None = None, **kwargs):
    """The module's own attention; with ``tokenprune_scores`` (or the one its module's call carried) it first
    records the attention received in the requested layers."""
    if tokenprune_scores is None:
        tokenprune_scores = getattr(module, "_tokenprune_scores", None)
    if tokenprune_scores is not None and module._tokenprune_layer in tokenprune_scores.layers:
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        tokenprune_scores.received.setdefault(module._tokenprune_layer, []).append(
            _received(query, key, scaling, attention_mask, kwargs))
    base = module._tokenprune_base_config
    seen = module if base is None else _AsConfigured(module, base)
    return implementation(module)(seen, query, key, value, attention_mask, **kwargs)


def routed_name(base: str) -> str:
    """The name a routed tower's config carries. It keeps the base's name inside, because models branch on
    it: Qwen-VL towers pack their windows into one sequence (``cu_seqlens``) when the name says "flash"."""
    return f"{ATTENTION_NAME}:{base}"


def route_attention(root: nn.Module, attention_modules: list[nn.Module], config) -> None:
    """Point these attention modules (numbered in order, for ``ScoreRequest``) at the scoring attention
    function, which calls the implementation ``config`` named before.

    transformers reads the implementation's name from ``module.config`` at every forward, and models built from
    one config object share it: the routed name goes on a copy that only ``root``'s modules see, so another model
    of that config keeps its own attention (it found a routed name and failed, and ``remove`` of either model
    could leave the other's name behind)."""
    import copy

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = config._attn_implementation
    name = routed_name(base)
    AttentionInterface.register(name, scoring_attention)
    # Without a mask function for the new name transformers would drop a user's attention mask silently.
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping.get(base, sdpa_mask))
    base_config = None
    if not takes_key_bias(base):  # sdpa and eager never read the name; flash does (see _AsConfigured)
        base_config = copy.copy(config)
        base_config._attn_implementation_internal = base
    for i, attn in enumerate(attention_modules):
        attn._tokenprune_base_attention = base
        attn._tokenprune_base_config = base_config
        attn._tokenprune_layer = i
        attn.register_forward_pre_hook(_take_request, with_kwargs=True)
        attn.register_forward_hook(_drop_request, with_kwargs=True, always_call=True)
    routed = copy.copy(config)
    routed._attn_implementation = name
    for module in root.modules():
        if module.__dict__.get("config") is config:
            module._tokenprune_shared_config = config
            module.config = routed


def unroute_attention(root: nn.Module, attention_modules: list[nn.Module]) -> None:
    for attn in attention_modules:
        del attn._tokenprune_base_attention, attn._tokenprune_base_config, attn._tokenprune_layer
        remove_hooks(attn, _take_request, _drop_request)
    for module in root.modules():
        if "_tokenprune_shared_config" in module.__dict__:
            module.config = module.__dict__.pop("_tokenprune_shared_config")
