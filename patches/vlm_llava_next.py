"""LLaVA-NeXT (``LlavaNextModel``): any-resolution LLaVA, a base crop plus high-resolution crops per image."""
from __future__ import annotations

import torch

from .vlm import ImageChoice, register_family
from .vlm_llava import Llava


@register_family
class LlavaNext(Llava):
    """Any-resolution LLaVA: a base crop plus high-resolution crops, packed per image (unpadded, with a
    newline token after each row of the high-resolution grid). A selector runs per crop on the crop's surviving
    (unpadded) tokens, with a budget of round(keep * survivors), or its share of the image's ``tokens``
    (``VisualTokenSelector.crop_budgets``); a row's newline stays when the row keeps a token. The report keeps
    each crop's roles on its own grid (``crop_roles``), for drawing."""

    name, module, model_class = "LLaVA-NeXT", "llava_next", "LlavaNextModel"
    takes_encoder_methods = False  # crops are packed after unpadding: the placeholders do not follow a prefix

    def encode(self, model, kw):
        return model.get_image_features(pixel_values=kw["pixel_values"], image_sizes=kw["image_sizes"],
                                        vision_feature_layer=kw.get("vision_feature_layer"),
                                        vision_feature_select_strategy=kw.get("vision_feature_select_strategy"),
                                        return_dict=True)

    def _crops_per_image(self, model, kw) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [image_size_to_num_patches(image_size=size, grid_pinpoints=model.config.image_grid_pinpoints,
                                          patch_size=model.config.vision_config.image_size)
                for size in kw["image_sizes"]]

    def check_features(self, model, kw, reducer):
        prefix, cut = self._layout(model, kw)
        if cut != prefix:  # the stock packing reads such features as a grid all the same (a warning at most)
            strategy, n = self._strategy(model, kw), self._side(model) ** 2
            raise TypeError(f"{self.name} lays each crop's features out as its patch grid; "
                            f"vision_feature_select_strategy={strategy!r} leaves {n + prefix - cut} features per crop "
                            f"of its {'CLIP' if prefix else 'SigLIP'} tower, not {n}: use "
                            f"{'default' if prefix else 'full'!r}")

    def tokens_per_image(self, model):
        return None  # the crops and their unpadding follow each image's size

    def budget_unit(self, model):
        return self._side(model) ** 2  # keep applies per crop: a full crop's budget under one token fails at apply

    def choose(self, model, kw, request, selector, features, layers):
        per_layer = [self.image_scores(model, kw, request, layer) for layer in layers]  # per crop
        side = self._side(model)
        n = side * side
        # packed position -> crop * n + patch (or -1 for a newline): the model's own packing of an index map
        crops = len(per_layer[0])
        index = torch.arange(crops * n, dtype=torch.float32, device=features[0].device).view(crops, n, 1)
        packed, _ = model.pack_image_features(list(index.split(self._crops_per_image(model, kw))), kw["image_sizes"],
                                              self._strategy(model, kw), image_newline=index.new_tensor([-1.0]))
        images = []
        for where in packed:
            where = where[:, 0].long()
            is_token = where >= 0
            crop, patch = where // n, where % n
            present = crop[is_token].unique().tolist()  # the image's crops with tokens left, its base crop first
            allowed = []
            for c in present:
                allowed.append(torch.zeros(n, dtype=torch.bool, device=where.device))
                allowed[-1][patch[is_token & (crop == c)]] = True
            roles = torch.zeros(is_token.shape, dtype=torch.int8, device=where.device)
            crops = []
            budgets = selector.crop_budgets([int(a.sum()) for a in allowed])
            for c, crop_allowed, budget in zip(present, allowed, budgets):
                in_crop = is_token & (crop == c)
                with selector.crop_budget(budget):
                    crop_roles = selector.explain(tuple(scores[c] for scores in per_layer), (side, side), crop_allowed)
                roles[in_crop] = crop_roles.to(where.device)[patch[in_crop]]
                crops.append(crop_roles.to(where.device))
            # The newlines end the rows of the high-resolution grid, which follows the base crop: the base crop's
            # tokens belong to no row (an image of the base crop alone has one newline, after it: its row).
            in_rows = (roles != 0) & ((crop != present[0]) if len(present) > 1 else is_token)
            row = torch.cumsum(~is_token, 0) - (~is_token).long()  # newlines before each position
            rows_kept = torch.zeros(int(row.max()) + 1, dtype=torch.long, device=where.device)
            rows_kept.index_add_(0, row, in_rows.long())
            roles[~is_token & (rows_kept[row] > 0)] = -1  # a row's newline stays when the row keeps a token
            images.append(ImageChoice(roles, torch.stack(crops)))
        return images

    def grids(self, model, kw):
        side = self._side(model)
        return [(side, side)] * sum(self._crops_per_image(model, kw))
