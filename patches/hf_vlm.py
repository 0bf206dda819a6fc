"""Adapter for transformers 5.x vision-language models: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL.

The language model receives ``round(keep * N)`` visual tokens per image (per crop for LLaVA-NeXT),
chosen per sample. Everything goes through hooks on the multimodal ``*Model``; no forward is
rewritten (docs/design.md has the reasoning, ``../shared/reference/vlm.md`` the transformers internals):

* **Selection** (forward pre-hook on the ``*Model``, at prefill): it runs the model's own
  ``get_image_features`` with a ``ScoreRequest`` in its keyword arguments; the vision tower's
  attention modules point at tokenprune's registered attention function, which records the
  attention each token receives at the two layers HiPrune reads (in query chunks; SDPA computes the
  outputs). The method picks the tokens per image; the pre-hook hands the features on as
  ``mm_encoder_outputs`` (full length, so the model's placeholder check holds) and adds a
  ``Compaction`` (which sequence positions survive) to the keyword arguments the ``*Model`` passes
  on to its language model. Encoder methods (ToMe, ...) instead reduce inside the vision tower
  (the ``hf_vision`` adapter, with the schedule ending at the feature layer); their K features
  fill the first K placeholders of each image.
* **Compaction** (forward pre-hook on the language model): at prefill it removes the dropped
  placeholder rows from ``inputs_embeds``, ``attention_mask`` and ``position_ids``, re-padding rows
  on the left when samples keep different counts, and leaves a note on the KV cache; at each decode
  step it rebuilds the 2-D mask (``generate`` keeps it at the uncompressed length) and, with
  re-indexed positions, shifts the position ids.
* **Positions**: ``"reindex"`` (contiguous, as the LLaVA-codebase papers; LLaVA's default) or
  ``"original"`` (kept tokens keep their positions; Qwen's only mode, whose M-RoPE layout cannot be
  re-indexed).
"""
from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokenprune.methods.hiprune import hiprune_select
from tokenprune.registry import TokenReducer

from . import hf_vision
from ._hooks import remove_hooks
from ._swap import refuse_jit_tracing
from .hf_vision import ScoreRequest

FAMILY = "transformers LLaVA-1.5 (LlavaForConditionalGeneration), LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL"
DEFAULT_METHOD = "hiprune"
POSITIONS = ("reindex", "original")


# ---------------------------------------------------------------- per-family knowledge

class Family:
    """What differs between VLM families: the vision tower, the layers HiPrune reads, the image grids."""

    name: str
    module: str
    model_class: str  # the multimodal *Model holding get_image_features and language_model
    default_positions: str
    default_object_layer: int  # 1-based

    def model_type(self) -> type | None:
        return hf_vision.transformers_class(self.module, self.model_class)

    def vision_layers(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def attention(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [self.attention(layer) for layer in self.vision_layers(model)]

    def vision_config(self, model: nn.Module):
        return self.attention(self.vision_layers(model)[0]).config

    def output_layer(self, model: nn.Module, kw: dict) -> int:
        """0-based index of the vision layer whose features (and attention) the VLM uses."""
        raise NotImplementedError

    def encode(self, model: nn.Module, kw: dict):
        """``model.get_image_features`` called with the image arguments of a forward call ``kw``."""
        raise NotImplementedError

    def image_scores(self, model: nn.Module, kw: dict, request: ScoreRequest, layer: int) -> list[Tensor]:
        """Attention received at ``layer``, per image, in the order of that image's features."""
        raise NotImplementedError

    def grids(self, model: nn.Module, kw: dict) -> list[tuple[int, int]]:
        raise NotImplementedError

    def choose(self, model: nn.Module, kw: dict, request: ScoreRequest, reducer: TokenReducer,
               features: list[Tensor], layers: tuple[int, int]) -> list[Tensor]:
        """Per image, which of its features (placeholders) the method keeps (bool)."""
        scores = zip(self.image_scores(model, kw, request, layers[0]), self.image_scores(model, kw, request, layers[1]))
        keeps = []
        for feats, (obj, last), grid in zip(features, scores, self.grids(model, kw)):
            keep = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
            keep[reducer.select(obj, last, grid)] = True
            keeps.append(keep)
        return keeps


class Llava(Family):
    name, module, model_class = "LLaVA", "llava", "LlavaModel"
    default_positions, default_object_layer = "reindex", 9

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

    def grids(self, model, kw):
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        return [(side, side)] * kw["pixel_values"].shape[0]


class LlavaNext(Llava):
    """Any-resolution LLaVA: a base crop plus high-resolution crops, packed per image (unpadded, with a
    newline token after each row). HiPrune runs per crop on the crop's surviving (unpadded) tokens with
    a budget of round(keep * survivors); a row's newline stays when the row keeps a token."""

    name, module, model_class = "LLaVA-NeXT", "llava_next", "LlavaNextModel"

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

    def choose(self, model, kw, request, reducer, features, layers):
        obj, last = (self.image_scores(model, kw, request, layer) for layer in layers)  # per crop
        side = self.grids(model, kw)[0][0]
        n = side * side
        # packed position -> crop * n + patch (or -1 for a newline): the model's own packing of an index map
        index = torch.arange(len(obj) * n, dtype=torch.float32, device=features[0].device).view(len(obj), n, 1)
        packed, _ = model.pack_image_features(list(index.split(self._crops_per_image(model, kw))), kw["image_sizes"],
                                              self._strategy(model, kw), image_newline=index.new_tensor([-1.0]))
        keeps = []
        for where in packed:
            where = where[:, 0].long()
            is_token = where >= 0
            crop, patch = where // n, where % n
            keep = torch.zeros_like(is_token)
            for c in crop[is_token].unique().tolist():
                in_crop = is_token & (crop == c)
                allowed = torch.zeros(n, dtype=torch.bool, device=where.device)
                allowed[patch[in_crop]] = True
                count = int(allowed.sum())
                k = min(reducer.options["tokens"] or round(reducer.keep * count), count)
                chosen = torch.zeros_like(allowed)
                if k:
                    chosen[hiprune_select(obj[c], last[c], (side, side), k, reducer.options["alpha"],
                                          reducer.options["wrap"], allowed)] = True
                keep[in_crop] = chosen[patch[in_crop]]
            row = torch.cumsum(~is_token, 0) - (~is_token).long()  # newlines before each position
            rows_kept = torch.zeros(int(row.max()) + 1, dtype=torch.long, device=where.device)
            rows_kept.index_add_(0, row, keep.long())
            keep |= ~is_token & (rows_kept[row] > 0)
            keeps.append(keep)
        return keeps

    def grids(self, model, kw):
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        return [(side, side)] * sum(self._crops_per_image(model, kw))


class Qwen2VL(Family):
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


class Qwen25VL(Qwen2VL):
    name, module, model_class = "Qwen2.5-VL", "qwen2_5_vl", "Qwen2_5_VLModel"

    def _window_index(self, model, grid_thw):
        from transformers.vision_utils import get_vision_window_index

        visual = model.visual
        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        return window_index


FAMILIES: tuple[Family, ...] = (Llava(), LlavaNext(), Qwen2VL(), Qwen25VL())


# ---------------------------------------------------------------- what the hooks carry

@dataclass
class Compaction:
    """Which positions of the full (placeholder-length) sequence the language model keeps, per sample."""

    keep: Tensor  # (B, L) bool
    positions: str


@dataclass(frozen=True)
class VLMReport:
    """What the last prefill kept (``tokenprune.last_forward(vlm)``): per sample, the image placeholder
    tokens of the prompt and the visual tokens the language model received."""

    method: str
    placeholders: list[int]
    visual_tokens: list[int]


@dataclass
class CompactedPrefill:
    """Left on the KV cache by the prefill, for the decode steps of the same ``generate`` call."""

    mask: Tensor  # (B, L_kept) the compacted prefill's attention mask
    shift: Tensor | None  # (B,) position shift for decode steps ("reindex"), None for "original"


def _full_positions(mask: Tensor) -> Tensor:
    """Position ids as ``generate`` makes them from a 2-D mask (left padding gets 1)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def compact(kwargs: dict, compaction: Compaction) -> CompactedPrefill:
    """Remove the dropped rows from the language model's prefill inputs (in ``kwargs``), re-padding
    on the left to the longest row; returns what the decode steps need."""
    keep, embeds = compaction.keep, kwargs["inputs_embeds"]
    batch, length, _ = embeds.shape
    mask = kwargs.get("attention_mask")
    mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device) if mask is None else mask
    if mask.dim() != 2:
        raise TypeError("tokenprune compacts a 2-D attention_mask (batch, length); got a "
                        f"{mask.dim()}-D mask")
    keep = keep & (mask != 0)  # old padding goes; rows are padded again on the left below
    lengths = keep.sum(dim=1)
    kept = int(lengths.max())
    rows, cols = keep.nonzero(as_tuple=True)
    dest = (kept - lengths)[rows] + (keep.long().cumsum(dim=1) - 1)[rows, cols]
    new_embeds = embeds.new_zeros(batch, kept, embeds.shape[-1])
    new_embeds[rows, dest] = embeds[rows, cols]
    new_mask = mask.new_zeros(batch, kept)
    new_mask[rows, dest] = mask[rows, cols]
    positions = kwargs.get("position_ids")
    full = _full_positions(mask) if positions is None else positions
    if compaction.positions == "reindex":
        if full.dim() != 2:
            raise TypeError("positions='reindex' needs 1-D text positions; this model uses multi-axis (M-RoPE) "
                            "positions: use positions='original'")
        new_positions = _full_positions(new_mask)
        shift = full[:, -1] - new_positions[:, -1]
    else:
        new_positions = full.new_ones(*full.shape[:-2], batch, kept)
        new_positions[..., rows, dest] = full[..., rows, cols]
        shift = None
    kwargs.update(inputs_embeds=new_embeds, attention_mask=new_mask, position_ids=new_positions)
    return CompactedPrefill(mask=new_mask, shift=shift)


def decode_fix(kwargs: dict, note: CompactedPrefill, past: int) -> None:
    """A decode step after a compacted prefill: the 2-D mask ``generate`` passes still has the prefill's
    full length; replace that part by the compacted mask, and shift re-indexed positions."""
    steps = past + kwargs["inputs_embeds"].shape[1] - note.mask.shape[1]
    mask = kwargs.get("attention_mask")
    tail = mask[:, -steps:] if mask is not None and mask.dim() == 2 else note.mask.new_ones(note.mask.shape[0], steps)
    kwargs["attention_mask"] = torch.cat([note.mask, tail.to(note.mask.dtype)], dim=1)
    positions = kwargs.get("position_ids")
    if note.shift is not None and positions is not None:
        kwargs["position_ids"] = positions - note.shift[:, None]


# ---------------------------------------------------------------- the hooks

def _cache_key(kwargs: dict) -> str:
    """Where the KV cache travels: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    return "cache" if kwargs.get("cache") is not None else "past_key_values"


def _bind(forward, args: tuple, kwargs: dict) -> dict:
    """Every argument of a forward call as a keyword."""
    bound = inspect.signature(forward).bind_partial(*args, **kwargs)
    kw = dict(bound.arguments)
    kw.update(kw.pop("kwargs", {}))
    return kw


def _selecting_image_features(vlm: nn.Module, *args, **kwargs):
    """``get_image_features`` of a patched VLM (installed on the instance; ``generate`` calls it before
    the prefill): the model's own, run with a ``ScoreRequest``, then the method's choice per image.
    Each image's feature tensor carries its choice as ``tokenprune_keep`` (bool, one per placeholder),
    so the choice travels wherever ``generate`` moves the features (it repeats them for beams)."""
    refuse_jit_tracing()
    family, reducer = _family(vlm), vlm.tokenprune_reducer
    stock = type(vlm).get_image_features
    kw = _bind(stock, (vlm, *args), kwargs)
    kw.pop("self")
    as_tuple = kw.pop("return_dict", True) is False
    if reducer.scope == "vlm":
        out_layer = family.output_layer(vlm, kw)
        obj_layer = (reducer.options["object_layer"] or family.default_object_layer) - 1
        request = ScoreRequest(layers=frozenset({obj_layer, out_layer}))
        out = stock(vlm, **kw, return_dict=True, tokenprune_scores=request)
        features = list(out.pooler_output)
        for feats, keep in zip(features, family.choose(vlm, kw, request, reducer, features, (obj_layer, out_layer))):
            feats.tokenprune_keep = keep
    else:  # an encoder method reduced inside the tower: its K features fill an image's first K placeholders
        out = stock(vlm, **kw, return_dict=True)
        features = []
        for reduced, (rows, cols) in zip(out.pooler_output, family.grids(vlm, kw)):
            feats = torch.cat([reduced, reduced.new_zeros(rows * cols - reduced.shape[0], reduced.shape[1])])
            feats.tokenprune_keep = torch.arange(rows * cols, device=feats.device) < reduced.shape[0]
            features.append(feats)
    out.pooler_output = features
    return out.to_tuple() if as_tuple else out


def _selecting_features_of(vlm: nn.Module):
    """``_selecting_image_features`` bound to ``vlm``, showing the stock method's signature.

    The signature matters: ``generate`` encodes the images once, before it repeats the batch for beams
    or ``num_return_sequences``, only if ``get_image_features``'s signature names ``pixel_values``.
    Behind a bare ``(*args, **kwargs)`` it skips the encoding and repeats ``pixel_values`` row by row
    (``repeat_interleave``): per image for LLaVA ([A, B] -> [A, A, B, B], so a two-image prompt's beams
    got A twice and B twice), per patch for Qwen; the prefill then encoded those wrong rows."""
    selecting = functools.partial(_selecting_image_features, vlm)
    return functools.update_wrapper(selecting, type(vlm).get_image_features.__get__(vlm))


def _select(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the multimodal *Model: at a prefill, turn the per-image choices into the
    sequence positions the language model keeps (a ``Compaction`` among the keyword arguments that
    the *Model hands to its language model)."""
    refuse_jit_tracing()
    kw = _bind(model.forward, args, kwargs)
    cache = kw.get(_cache_key(kw))
    if cache is not None and cache.get_seq_length() > 0:
        return (), kw  # a decode step: the language model's pre-hook fixes the mask
    if kw.get("pixel_values") is not None:  # a direct call; generate encodes the images beforehand
        kw["mm_encoder_outputs"] = {**(kw.get("mm_encoder_outputs") or {}), "image": _family(model).encode(model, kw)}
        kw["pixel_values"] = None
    image = (kw.get("mm_encoder_outputs") or {}).get("image")
    if image is None:
        raise ValueError("tokenprune: this prefill has no image; a pruned VLM needs at least one image per "
                         "batch. For text-only prompts call tokenprune.remove(model) first")
    if kw.get("input_ids") is None:
        raise ValueError("tokenprune needs input_ids (to find the image placeholders), not inputs_embeds")
    keeps = [getattr(feats, "tokenprune_keep", None) for feats in image.pooler_output]
    if any(keep is None for keep in keeps):
        raise ValueError("tokenprune: these image features were not computed by the patched model "
                         "(pass pixel_values, not precomputed mm_encoder_outputs)")
    placeholders = kw["input_ids"] == model.config.image_token_id
    keep_all = torch.cat(keeps)
    if int(placeholders.sum()) != keep_all.numel():
        raise ValueError(f"tokenprune: the prompt has {int(placeholders.sum())} image placeholder tokens for "
                         f"{keep_all.numel()} image features")
    keep_seq = torch.ones_like(placeholders)
    keep_seq[placeholders] = keep_all.to(placeholders.device)
    if not bool(keep_all.all()):  # nothing dropped (keep=1.0): the language model runs exactly as stock
        kw["tokenprune_compaction"] = Compaction(keep=keep_seq, positions=model.tokenprune_positions)
    model._tokenprune_last = VLMReport(method=model.tokenprune_reducer.name,
                                       placeholders=placeholders.sum(dim=1).tolist(),
                                       visual_tokens=(keep_seq & placeholders).sum(dim=1).tolist())
    return (), kw


def _compact(language_model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the language model: compaction at prefill, mask fix-up at decode."""
    compaction = kwargs.pop("tokenprune_compaction", None)
    cache = kwargs.get(_cache_key(kwargs))
    if compaction is not None:
        note = compact(kwargs, compaction)
        use_cache = kwargs.get("use_cache")
        if cache is None and (use_cache or (use_cache is None and language_model.config.use_cache)):
            from transformers import DynamicCache

            key = "cache" if "cache" in inspect.signature(language_model.forward).parameters else "past_key_values"
            cache = kwargs[key] = DynamicCache(config=language_model.config)
        if cache is not None:
            cache.tokenprune_prefill = note
    elif cache is not None and getattr(cache, "tokenprune_prefill", None) is not None:
        past = cache.get_seq_length()
        if past > 0:
            decode_fix(kwargs, cache.tokenprune_prefill, past)
    return args, kwargs


# ---------------------------------------------------------------- finding the model

def _models(model: nn.Module) -> list[tuple[Family, nn.Module]]:
    by_class = {f.model_type(): f for f in FAMILIES}  # looked up once, not per module
    by_class.pop(None, None)
    return [(by_class[type(m)], m) for m in model.modules() if type(m) in by_class]


def _vlm(model: nn.Module) -> nn.Module:
    found = _models(model)
    if len(found) != 1:
        raise TypeError(f"tokenprune found {len(found)} vision-language models in {type(model).__name__}")
    return found[0][1]


def _family(vlm: nn.Module) -> Family:
    return next(f for f in FAMILIES if f.model_type() is type(vlm))


# ---------------------------------------------------------------- the adapter API

def handles(model: nn.Module) -> bool:
    return "transformers" in sys.modules and bool(_models(model))


def is_patched(model: nn.Module) -> bool:
    return hasattr(_vlm(model), "tokenprune_reducer")


def reducer_of(model: nn.Module) -> TokenReducer:
    return _vlm(model).tokenprune_reducer


def last_forward(model: nn.Module) -> VLMReport | None:
    return _vlm(model)._tokenprune_last


def check(model: nn.Module) -> None:
    vlm = _vlm(model)
    family = _family(vlm)
    hf_vision.check_attention(family.vision_config(vlm), f"{family.name} vision tower")


def check_schedule(model: nn.Module, reducer: TokenReducer, positions: str | None = None) -> None:
    """Everything ``patch`` needs, checked before anything changes."""
    vlm = _vlm(model)
    family = _family(vlm)
    if positions is not None and positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if family.default_positions == "original" and positions == "reindex":
        raise ValueError(f"{family.name} keeps original (M-RoPE) positions; positions='reindex' is not available")
    depth = len(family.vision_layers(vlm))
    if reducer.scope == "vlm":
        layer = reducer.options["object_layer"] or family.default_object_layer
        if not 1 <= layer <= depth:
            raise ValueError(f"hiprune: object_layer={layer} is outside the {depth}-layer vision tower of "
                             f"{family.name} (1-based)")
        full = getattr(family.vision_config(vlm), "fullatt_block_indexes", None)
        if full is not None and layer - 1 not in full:
            raise ValueError(f"hiprune: object_layer={layer} of {family.name} attends within windows; scores need a "
                             f"full-attention block: one of {[i + 1 for i in full]} (1-based)")
        if isinstance(family, Llava):
            side = vlm.config.vision_config.image_size // vlm.config.vision_config.patch_size
            reducer.budget(side * side)  # a budget under one token fails now
        return
    if type(family) is not Llava:
        raise TypeError(f"encoder method {reducer.name!r} on {family.name}: only LLaVA-1.5's CLIP/SigLIP tower "
                        "takes encoder methods (LLaVA-NeXT packs full crops; Qwen merges 2x2 patches); "
                        "use method='hiprune'")
    tower = vlm.vision_tower
    hf_vision.check(tower)
    feature_depth = family.output_layer(vlm, {}) + 1
    enc = hf_vision._encoder(tower)
    reducer.schedule(enc.num_patches, feature_depth, enc.family.num_prefix(enc.backbone.config))


def patch(model: nn.Module, reducer: TokenReducer, positions: str | None = None) -> None:
    vlm = _vlm(model)
    family = _family(vlm)
    if is_patched(model):
        unpatch(model)
    if reducer.scope == "vlm":
        hf_vision.route_attention(family.attention_modules(vlm), family.vision_config(vlm))
    else:
        hf_vision.patch(vlm.vision_tower, reducer, depth=family.output_layer(vlm, {}) + 1)
    vlm.get_image_features = _selecting_features_of(vlm)
    vlm.register_forward_pre_hook(_select, with_kwargs=True)
    vlm.language_model.register_forward_pre_hook(_compact, with_kwargs=True)
    vlm.tokenprune_reducer = reducer
    vlm.tokenprune_positions = positions or family.default_positions
    vlm._tokenprune_last = None


def unpatch(model: nn.Module) -> None:
    vlm = _vlm(model)
    family = _family(vlm)
    if vlm.tokenprune_reducer.scope == "vlm":
        hf_vision.unroute_attention(family.attention_modules(vlm), family.vision_config(vlm))
    else:
        hf_vision.unpatch(vlm.vision_tower)
    del vlm.get_image_features  # the instance attribute; the class's method shows again
    remove_hooks(vlm, _select)
    remove_hooks(vlm.language_model, _compact)
    for name in ("tokenprune_reducer", "tokenprune_positions", "_tokenprune_last"):
        vlm.__dict__.pop(name, None)
