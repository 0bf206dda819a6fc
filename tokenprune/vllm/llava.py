"""LLaVA-1.5 in vLLM with its visual tokens selected (``tokenprune.vllm``).

Two halves, in two processes, agree on the budget by computing it with the same function (the selector's
``budget``) from the same engine-wide settings:

* the processor (vLLM's front end) writes K placeholders per image instead of N (``get_num_image_tokens``);
* the model (the workers) runs the tower as vLLM does, with pre-hooks on its attention at the object and
  output layers recording the attention each patch receives, and returns the K selected features of each
  image in raster order (``embed_multimodal``).

The language model then sees exactly what tokenprune's transformers adapter gives LLaVA by default
("reindex"): the kept visual tokens, numbered contiguously.
"""
from __future__ import annotations

import re

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from .selection import AttentionScores, refuse_parallelism, select_exactly, selector_from
from .towers import built_as_expected, llava_tower


class TokenpruneLlavaInfo(LlavaProcessingInfo):
    """LLaVA's processing info with the pruned placeholder count."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        count = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        selector = selector_from(self.get_hf_config())
        return count if selector is None else selector.budget(count)


def _info(ctx):
    info = _build_llava_or_pixtral_hf_info(ctx)
    if type(info) is not LlavaProcessingInfo:  # Pixtral's tower: the same checkpoint class, another model
        if selector_from(ctx.get_hf_config()) is not None:
            raise ValueError("tokenprune serves LLaVA-1.5 (a CLIP tower) in vLLM, not Pixtral")
        return info
    return TokenpruneLlavaInfo(ctx)


def refuse_unservable(config, vllm_config) -> None:
    """Raise ValueError for what the plugin cannot serve right, before any weight is loaded."""
    refuse_parallelism(vllm_config)
    llava_tower(config)


@MULTIMODAL_REGISTRY.register_processor(_build_llava_or_pixtral_hf_processor, info=_info,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class TokenpruneLlava(LlavaForConditionalGeneration):
    """vLLM's LLaVA; with ``hf_overrides["tokenprune"]`` set, each image's features are the selected ones."""

    # transformers 5 saves the CLIP tower's weights without the "vision_model." level that vLLM's CLIP (and
    # every checkpoint saved by transformers 4) has; vLLM 0.32 cannot load those. Mapped here so a model saved
    # with today's transformers serves; checkpoints in the old layout are untouched (the lookahead).
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_regex={
        re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): r"\1vision_tower.vision_model."}
    ) | LlavaForConditionalGeneration.hf_to_vllm_mapper

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenprune_selector = selector = selector_from(self.config)
        if selector is None:
            return
        refuse_unservable(self.config, vllm_config)
        layers = self.vision_tower.vision_model.encoder.layers
        tower = llava_tower(self.config)
        selector.check(tower)
        built_as_expected(tower, len(layers))
        self.tokenprune_layers = selector.score_layers(tower)
        self.tokenprune_scores = AttentionScores({i: layers[i].self_attn.attn for i in set(self.tokenprune_layers)})
        vision = self.config.vision_config
        self.tokenprune_grid = (vision.image_size // vision.patch_size,) * 2

    def embed_multimodal(self, **kwargs: object):
        selector = self.tokenprune_selector
        if selector is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if isinstance(image_input, LlavaImageEmbeddingInputs):  # no tower ran: nothing to score; stock count too
            return self._process_image_input(image_input)
        features, kept = self._tokenprune_select(image_input)
        return [image[keep.to(image.device)] for image, keep in zip(features, kept)]

    def tokenprune_kept(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The indices (raster order) each image of ``pixel_values`` keeps: what ``embed_multimodal`` selects,
        for ``tokenprune.vllm.check`` to compare with the transformers adapter (``LLM.apply_model``)."""
        image_input = self._parse_and_validate_image_input(pixel_values=pixel_values.to(self.config.torch_dtype))
        return [keep.cpu() for keep in self._tokenprune_select(image_input)[1]]

    def _tokenprune_select(self, image_input) -> tuple[torch.Tensor, list[torch.Tensor]]:
        selector = self.tokenprune_selector
        with self.tokenprune_scores.recording() as scores:
            features = self._process_image_input(image_input)
        kept = []
        for i, image in enumerate(features):
            # the class token's column is not a feature (strategy "default"), as in the transformers adapter
            kept.append(select_exactly(selector, tuple(scores[layer][i, 1:] for layer in self.tokenprune_layers),
                                       self.tokenprune_grid, len(image)))
        return features, kept
