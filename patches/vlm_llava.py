"""LLaVA-1.5 (``LlavaModel``): a CLIP/SigLIP tower, one square feature map per image. The features are the
tower's tokens at ``vision_feature_layer`` after the select strategy: ``"default"`` cuts the first token (CLIP's
class token; SigLIP has none, so there it cuts the first patch), ``"full"`` cuts none (CLIP's class token is then
a feature)."""
from __future__ import annotations

import torch

from tokenprune.registry import VisualTokenSelector

from . import hf_vision
from .vlm import ImageChoice, VLMFamily, register_family


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

    def _class_tokens(self, model) -> int:
        """Tokens ahead of the patch grid in the tower's output: CLIP's class token; SigLIP has none."""
        found = hf_vision._encoders(model.vision_tower)
        if len(found) != 1:
            raise TypeError(f"tokenprune prunes {self.name} with a CLIP or SigLIP vision tower, not "
                            f"{type(model.vision_tower).__name__}")
        return found[0].family.num_prefix(found[0].backbone.config)

    def _layout(self, model, kw) -> tuple[int, int]:
        """(class tokens ahead of the patch grid, tokens the select strategy cuts from the front of the tower's
        output): the model cuts one under "default", meant for CLIP's class token (on SigLIP its first patch)."""
        return self._class_tokens(model), int(self._strategy(model, kw) == "default")

    def _side(self, model) -> int:
        vision = model.config.vision_config
        return vision.image_size // vision.patch_size

    def check_features(self, model, kw, reducer):
        prefix, cut = self._layout(model, kw)
        if isinstance(reducer, VisualTokenSelector) and cut < prefix:  # CLIP under "full"
            raise TypeError(f"{reducer.name} on {self.name} chooses among patch tokens; vision_feature_select_strategy="
                            f"{self._strategy(model, kw)!r} also hands the language model the class token of its "
                            "CLIP tower: use 'default'")

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
        """Per image, the scores of its patch grid (a class token's column is not a patch)."""
        return list(request.collect(layer)[:, self._layout(model, kw)[0]:])

    def choose(self, model, kw, request, selector, features, layers):
        prefix, cut = self._layout(model, kw)
        side = self._side(model)
        # patches the strategy cuts (SigLIP under "default": the first): not features, so never chosen
        skip = cut - prefix  # >= 0: check_features refused a class token among the features
        scores = zip(*(self.image_scores(model, kw, request, layer) for layer in layers))
        choices = []
        for feats, image_scores in zip(features, scores):
            allowed = None if skip == 0 else torch.arange(side * side, device=image_scores[0].device) >= skip
            roles = selector.explain(tuple(image_scores), (side, side), allowed)[skip:]
            choices.append(ImageChoice(roles.to(feats.device)))
        return choices

    def _features_per_image(self, model, kw) -> int:
        """The patch grid, plus a class token the strategy keeps, less a patch it cuts (SigLIP under "default")."""
        prefix, cut = self._layout(model, kw)
        return self._side(model) ** 2 + prefix - cut

    def tokens_per_image(self, model):
        return self._features_per_image(model, {})

    def feature_counts(self, model, kw):
        return [self._features_per_image(model, kw)] * kw["pixel_values"].shape[0]

    def grids(self, model, kw):
        side = self._side(model)
        return [(side, side)] * kw["pixel_values"].shape[0]
