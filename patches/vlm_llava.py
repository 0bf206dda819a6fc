"""LLaVA-1.5 (``LlavaModel``): a CLIP/SigLIP tower, one square feature map per image, the features of
``vision_feature_layer`` without the class token."""
from __future__ import annotations

from .vlm import VLMFamily, register_family


@register_family
class Llava(VLMFamily):
    name, module, model_class = "LLaVA", "llava", "LlavaModel"
    default_positions, default_object_layer = "reindex", 9
    takes_encoder_methods = True  # one fixed-size CLIP/SigLIP feature map per image

    def vision_layers(self, model):
        return list(model.vision_tower.encoder.layers)

    def attention(self, layer):
        return layer.self_attn

    def _feature_layer(self, model, kw) -> int:
        layer = kw.get("vision_feature_layer")
        layer = model.config.vision_feature_layer if layer is None else layer
        if not isinstance(layer, int):
            raise TypeError(f"tokenprune needs one vision_feature_layer (an int), got {layer!r}")
        return layer

    def _strategy(self, model, kw) -> str:
        return kw.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy

    def output_layer(self, model, kw):
        depth = len(self.vision_layers(model))
        return self._feature_layer(model, kw) % (depth + 1) - 1  # hidden_states[0] is the embeddings

    def encode(self, model, kw):
        if kw.get("image_sizes") is not None:
            raise TypeError("tokenprune does not support LLaVA with per-image sizes (Pixtral-style towers)")
        return model.get_image_features(pixel_values=kw["pixel_values"],
                                        vision_feature_layer=kw.get("vision_feature_layer"),
                                        vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
                                        return_dict=True)

    def image_scores(self, model, kw, request, layer):
        if self._strategy(model, kw) != "default":
            raise TypeError("hiprune on LLaVA needs vision_feature_select_strategy='default' (features without "
                            "the class token)")
        return list(request.collect(layer)[:, 1:])  # the class token's column is not a feature

    def tokens_per_image(self, model):
        vision = model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def grids(self, model, kw):
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        return [(side, side)] * kw["pixel_values"].shape[0]
