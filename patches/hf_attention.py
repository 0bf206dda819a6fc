"""What the transformers adapters share about attention: the implementation a module runs, and the
registered attention function that records attention scores for VLM selectors.

* ``implementation(module)``: the attention function a module's config names (``sdpa``, or the
  family's own ``eager``), also when the module is routed through ``"tokenprune"``.
* ``route_attention``: points a vision tower's attention modules at ``"tokenprune"``, an attention
  function registered with ``AttentionInterface``. It calls the module's own implementation and,
  when a forward's keyword arguments carry a ``ScoreRequest``, records the attention each token
  receives in the layers asked for (in query chunks, so no ``(N, N)`` map per head is kept).
* ``check_attention``: flash / flex attention are refused (they take no float bias and return no
  scores).
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from tokenprune import ops

ATTENTION_NAME = "tokenprune"
BASE_ATTENTIONS = ("sdpa", "eager")


def transformers_class(module: str, name: str) -> type | None:
    """``transformers.models.<module>.modeling_<module>.<name>``, or None where this transformers lacks it."""
    try:
        return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name, None)
    except ImportError:
        return None


def implementation_name(module: nn.Module) -> str:
    """The name of the attention implementation ``module`` runs (the one it had before routing, if routed)."""
    return getattr(module, "_tokenprune_base_attention", None) or module.config._attn_implementation


def implementation(module: nn.Module) -> Callable:
    """The attention function ``module`` runs."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = implementation_name(module)
    if name == "eager":  # every transformers modeling file defines its own eager function
        cls = getattr(module, "_tokenprune_base", type(module))  # the module's own class, if swapped
        return sys.modules[cls.__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


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


def scoring_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      tokenprune_scores: ScoreRequest | None = None, **kwargs):
    """The module's own attention; with ``tokenprune_scores`` it first records the attention received in
    the requested layers."""
    if tokenprune_scores is not None and module._tokenprune_layer in tokenprune_scores.layers:
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        tokenprune_scores.received.setdefault(module._tokenprune_layer, []).append(
            ops.received_attention(query, key, scaling, attention_mask))
    return implementation(module)(module, query, key, value, attention_mask, **kwargs)


def route_attention(attention_modules: list[nn.Module], config) -> None:
    """Point these attention modules (numbered in order, for ``ScoreRequest``) at the scoring attention
    function, which calls the implementation ``config`` named before."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, scoring_attention)
    # Without a mask function for the new name transformers would drop a user's attention mask silently.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
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
    if impl not in BASE_ATTENTIONS + (ATTENTION_NAME,):
        raise TypeError(f"tokenprune keeps the {where}'s attention, which must be one of {BASE_ATTENTIONS} "
                        f"(it adds a log-size bias to the mask or reads attention scores); it uses {impl!r}: "
                        "call model.set_attn_implementation('sdpa') first")
