"""The host-neutral half of the vLLM plugin: which selector ``hf_overrides["tokenprune"]`` asks for, and the
attention each visual token receives, read from vLLM's own encoder-attention modules. The selection itself is
the selector's (``tokenprune.methods``), the same code the transformers adapter calls."""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import Tensor, nn

from .. import ops
from ..registry import VisualTokenSelector, get_method

#: the key of vLLM's ``hf_overrides`` (engine-wide; it reaches the processor and the model workers alike)
SETTINGS_KEY = "tokenprune"


def selector_from(hf_config) -> VisualTokenSelector | None:
    """The selector ``hf_config.tokenprune`` configures, or None where the key is absent: the model is then
    vLLM's own."""
    settings = getattr(hf_config, SETTINGS_KEY, None)
    return None if settings is None else selector_for(settings)


def selector_for(settings) -> VisualTokenSelector:
    """The selector of the plugin's settings (``{"method": "hiprune", "keep": 1/3, ...}``; method defaults to
    hiprune), checked as ``tokenprune.apply`` checks its arguments."""
    if not isinstance(settings, dict):
        raise ValueError(f"tokenprune: hf_overrides['{SETTINGS_KEY}'] must be a dict such as "
                         f"{{'method': 'hiprune', 'keep': 0.333}}, got {settings!r}")
    options = dict(settings)
    method = get_method(options.pop("method", "hiprune"))
    if not issubclass(method, VisualTokenSelector):
        raise ValueError(f"tokenprune: vLLM serves the visual-token selectors (hiprune, random-select); "
                         f"{method.name!r} works inside the vision tower, which vLLM runs as its own code")
    return method(**options)


def select_exactly(selector: VisualTokenSelector, scores: tuple[Tensor, ...], grid: tuple[int, int],
                   features: int) -> Tensor:
    """The selector's indices for one image of ``features`` rows, checked to be as many as the placeholders the
    processor wrote (``budget(features)``): vLLM would silently cut or misplace rows otherwise."""
    keep = selector.select(scores, grid)
    if len(keep) != selector.budget(features):
        raise RuntimeError(f"tokenprune: {len(keep)} features selected for {selector.budget(features)} placeholders")
    return keep


def refuse_parallelism(vllm_config) -> None:
    """Raise ValueError where vLLM would split what one selection must see whole."""
    if vllm_config.parallel_config.tensor_parallel_size > 1:
        raise ValueError("tokenprune in vLLM runs with tensor_parallel_size=1: each rank would score its own "
                         "heads and keep different tokens")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("tokenprune in vLLM runs with pipeline_parallel_size=1")


class AttentionScores:
    """Forward pre-hooks on vLLM's encoder attention modules (``MMEncoderAttention``, called with q and k of
    shape ``(B, N, heads * head_size)`` as CLIP calls it, or ``(B, N, heads, head_size)`` as Qwen's tower
    does): inside ``recording()``, the attention each token receives at those layers (mean over heads and
    queries, ``tokenprune.ops.received_attention``, computed in query chunks), while vLLM's own kernel still
    computes the outputs. Outside it the hooks do nothing.

    ``segments`` (per recorded layer, token counts along N): the sequences the layer's attention is split into,
    as Qwen's tower packs its images (a full-attention block attends within each image, a windowed block within
    each window), so each segment's scores are its own softmax, as the transformers adapter scores them."""

    def __init__(self, modules: dict[int, nn.Module]) -> None:
        self._scores: dict[int, Tensor] | None = None
        self._segments: dict[int, list[int]] | None = None
        self.handles = [module.register_forward_pre_hook(functools.partial(self._record, layer), with_kwargs=True)
                        for layer, module in modules.items()]

    @contextlib.contextmanager
    def recording(self, segments: dict[int, list[int]] | None = None) -> Iterator[dict[int, Tensor]]:
        self._scores, self._segments = {}, segments
        try:
            yield self._scores
        finally:
            self._scores = self._segments = None

    def _record(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._scores is None:
            return
        query = kwargs["query"] if "query" in kwargs else args[0]
        key = kwargs["key"] if "key" in kwargs else args[1]
        heads, size = module.num_heads, module.head_size
        if query.dim() == 3:
            query, key = query.unflatten(-1, (heads, size)), key.unflatten(-1, (module.num_kv_heads, size))
        query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, heads, N, size)
        if key.shape[1] != heads:  # grouped keys: each query head reads its group's key
            key = key.repeat_interleave(heads // key.shape[1], dim=1)
        with torch.no_grad():
            if self._segments is None:
                self._scores[layer] = ops.received_attention(query, key, module.scale)
            else:
                segments = self._segments[layer]
                self._scores[layer] = torch.cat([
                    ops.received_attention(q, k, module.scale)
                    for q, k in zip(query.split(segments, dim=2), key.split(segments, dim=2))], dim=-1)
