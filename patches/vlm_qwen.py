"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLModel``, ``Qwen2_5_VLModel``): a native-resolution tower whose
2x2 patches merge into one visual token; Qwen2.5-VL attends within windows except in a few blocks."""
from __future__ import annotations

import torch
from torch import Tensor

from .vlm import VLMFamily, register_family


@register_family
class Qwen2VL(VLMFamily):
    name, module, model_class = "Qwen2-VL", "qwen2_vl", "Qwen2VLModel"
    default_positions, default_object_layer = "original", 16

    def vision_layers(self, model):
        return list(model.visual.blocks)

    def attention(self, layer):
        return layer.attn

    def output_layer(self, model, kw):
        return len(model.visual.blocks) - 1

    def encode(self, model, kw):
        return model.get_image_features(kw["pixel_values"], kw["image_grid_thw"], return_dict=True)

    def encode_videos(self, model, kw):
        return model.get_video_features(kw["pixel_values_videos"], kw.get("video_grid_thw"), return_dict=True)

    def _window_index(self, model, grid_thw: Tensor) -> Tensor | None:
        return None  # Qwen2-VL attends over whole images in every block

    def image_scores(self, model, kw, request, layer):
        merge = model.visual.spatial_merge_size ** 2
        scores = request.collect(layer).reshape(-1, merge).mean(dim=-1)  # one score per merged token
        window_index = self._window_index(model, kw["image_grid_thw"])
        if window_index is not None:  # blocks run in window order; the features come back in raster order
            scores = scores[torch.argsort(window_index)]
        return list(scores.split(self._tokens_per_image(model, kw)))

    def _tokens_per_image(self, model, kw) -> list[int]:
        return (kw["image_grid_thw"].prod(-1) // model.visual.spatial_merge_size ** 2).tolist()

    def grids(self, model, kw):
        merge = model.visual.spatial_merge_size
        grids = []
        for t, h, w in kw["image_grid_thw"].tolist():
            if t != 1:
                raise TypeError("tokenprune prunes Qwen-VL images; video inputs (t > 1) are not supported")
            grids.append((h // merge, w // merge))
        return grids


@register_family
class Qwen25VL(Qwen2VL):
    name, module, model_class = "Qwen2.5-VL", "qwen2_5_vl", "Qwen2_5_VLModel"

    def _window_index(self, model, grid_thw):
        from transformers.vision_utils import get_vision_window_index

        visual = model.visual
        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        return window_index
