"""Adapter for transformers 5.x vision-language models: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL.

The language model receives ``round(keep * N)`` visual tokens per image (per crop for LLaVA-NeXT; a
selector's ``tokens`` per image, split over LLaVA-NeXT's crops), chosen per sample. Everything goes through
hooks on the multimodal ``*Model``; no forward is rewritten (docs/design.md has the reasoning,
``../shared/reference/vlm.md`` the transformers internals):

* **Selection** (forward pre-hook on the ``*Model``, at prefill): it runs the model's own
  ``get_image_features`` with a ``ScoreRequest`` in its keyword arguments; the vision tower's
  attention modules point at tokenprune's registered attention function, which records the
  attention each token receives at the two layers HiPrune reads (in query chunks, from q and k; the
  tower's own implementation, SDPA, eager, flex or flash attention, computes the outputs). The method
  picks the tokens per image; the pre-hook hands the features on as ``mm_encoder_outputs`` (full
  length, so the model's placeholder check holds) and adds a ``Compaction`` (which sequence positions
  survive) to the keyword arguments the ``*Model`` passes on to its language model. Encoder methods
  (ToMe, ...) instead reduce inside the vision tower (the ``hf_vision`` adapter, with the schedule
  ending at the feature layer); their K features fill the first K placeholders of each image.
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
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tokenprune.adapters import Adapter, register_adapter
from tokenprune.registry import EncoderReducer, VisionTower, VisualTokenSelector, keep_overridden

from . import hf_vision
from ._hooks import remove_hooks
from ._swap import refuse_jit_tracing
from .hf_attention import ScoreRequest, check_attention, route_attention, transformers_class, unroute_attention

POSITIONS = ("reindex", "original")


# ---------------------------------------------------------------- per-family knowledge

class VLMFamily:
    """What differs between VLM families: where the vision tower is, how it is called, which attention
    scores belong to which image, and the images' patch grids. One subclass per family (``vlm_*.py``),
    registered with ``@register_family``."""

    name: str
    module: str  # transformers.models.<module>
    model_class: str  # the multimodal *Model holding get_image_features and language_model
    default_positions: str  # "reindex" or "original"
    default_object_layer: int  # 1-based middle layer for object-level scores (``VisionTower.object_layer``)
    #: whether encoder methods (ToMe, ...) may reduce inside its vision tower: their K features then fill
    #: each image's first K placeholders, which needs one fixed-size feature map per image
    takes_encoder_methods: bool = False

    def model_type(self) -> type | None:
        return transformers_class(self.module, self.model_class)

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

    def tower(self, model: nn.Module, kw: dict) -> VisionTower:
        """The vision tower as a selector sees it, for a forward call ``kw`` ({} at apply: the defaults)."""
        full = getattr(self.vision_config(model), "fullatt_block_indexes", None)
        return VisionTower(family=self.name, depth=len(self.vision_layers(model)),
                           output_layer=self.output_layer(model, kw), object_layer=self.default_object_layer,
                           full_attention_layers=None if full is None else tuple(full))

    def tokens_per_image(self, model: nn.Module) -> int | None:
        """Visual tokens of every image when the config fixes it (checked against the budget at apply)."""
        return None

    def budget_unit(self, model: nn.Module) -> int | None:
        """Tokens of what ``keep`` applies to (an image; a LLaVA-NeXT crop) when the config fixes them: a budget
        under one token there fails at apply."""
        return self.tokens_per_image(model)

    def check_features(self, model: nn.Module, kw: dict, reducer) -> None:
        """Raise TypeError where the features of a forward call ``kw`` ({} at apply: the config's) are laid out
        in a way ``reducer`` cannot run on (LLaVA: the select strategy and the tower's class token)."""

    def feature_counts(self, model: nn.Module, kw: dict) -> list[int]:
        """Per image, the features the unreduced tower gives (the placeholders an encoder method's K fill)."""
        return [rows * cols for rows, cols in self.grids(model, kw)]

    def encode(self, model: nn.Module, kw: dict):
        """``model.get_image_features`` called with the image arguments of a forward call ``kw``."""
        raise NotImplementedError

    def encode_videos(self, model: nn.Module, kw: dict):
        """The unpruned video features of a forward call ``kw`` with ``pixel_values_videos`` (Qwen-VL)."""
        raise NotImplementedError

    def image_scores(self, model: nn.Module, kw: dict, request: ScoreRequest, layer: int) -> list[Tensor]:
        """Attention received at ``layer``, per image, in the order of that image's features."""
        raise NotImplementedError

    def grids(self, model: nn.Module, kw: dict) -> list[tuple[int, int]]:
        raise NotImplementedError

    def choose(self, model: nn.Module, kw: dict, request: ScoreRequest, selector: VisualTokenSelector,
               features: list[Tensor], layers: tuple[int, ...]) -> list["ImageChoice"]:
        """Per image, the role the selector gave each of its features (placeholders)."""
        scores = zip(*(self.image_scores(model, kw, request, layer) for layer in layers))
        return [ImageChoice(selector.explain(tuple(image_scores), grid).to(feats.device))
                for feats, image_scores, grid in zip(features, scores, self.grids(model, kw))]


@dataclass(frozen=True)
class ImageChoice:
    """The choice for one image: ``roles`` per placeholder (int8, ``VisualTokenSelector.explain``:
    0 dropped; -1 a kept token that is not a patch, LLaVA-NeXT's row newlines; encoder methods: 1 for each
    of the K placeholders their K features fill) and, where the image is
    split into crops, ``crops`` (crops, rows * cols): each crop's roles on its own grid (0 where dropped
    or padded)."""

    roles: Tensor
    crops: Tensor | None = None


_FAMILIES: list[VLMFamily] = []


def register_family(cls: type[VLMFamily]) -> type[VLMFamily]:
    """Class decorator: the VLM adapter handles this family's models."""
    _FAMILIES.append(cls())
    _by_class.cache_clear()
    return cls


@functools.cache
def _by_class() -> dict[type, VLMFamily]:
    """Each family's model class (resolved once: ``apply``, ``is_patched``, ... look up per call)."""
    return {cls: family for family in _FAMILIES if (cls := family.model_type()) is not None}


# ---------------------------------------------------------------- what the hooks carry

@dataclass
class Compaction:
    """Which positions of the full (placeholder-length) sequence the language model keeps, per sample."""

    keep: Tensor  # (B, L) bool
    positions: str


@dataclass(frozen=True)
class VLMReport:
    """What the last prefill kept (``tokenprune.last_forward(vlm)``): per sample, the image placeholder
    tokens of the prompt and the visual tokens the language model received; per image (in the batch's
    order), which of its placeholders were kept (bool, raster order of its features; LLaVA-NeXT: the
    packed order, newlines included) and, for a selector, why."""

    method: str
    placeholders: list[int]
    visual_tokens: list[int]
    kept: list[Tensor] = field(default_factory=list)
    #: per image, each placeholder's role in a selector's choice (``VisualTokenSelector.explain``: an index
    #: into ``role_names``, 0 = dropped; -1: a kept LLaVA-NeXT newline); None for encoder methods
    roles: list[Tensor] | None = None
    role_names: tuple[str, ...] | None = None
    #: per image, (crops, rows * cols) roles on each crop's own grid (LLaVA-NeXT; None for single-grid images)
    crop_roles: list[Tensor | None] | None = None


@dataclass
class CompactedPrefill:
    """Left on the KV cache by the prefill, for the decode steps of the same ``generate`` call."""

    mask: Tensor  # (B, L_kept) the compacted prefill's attention mask
    length: int  # L, the prefill's uncompressed length (generate's 2-D mask counts from it)
    shift: Tensor | None  # (B,) position shift for decode steps ("reindex"), None for "original"
    #: (..., B) the position the first token after the prompt takes, uncompressed (M-RoPE: per row of the layout,
    #: the same on every axis), as ``generate`` continues; for decode steps whose caller passes no position_ids
    next: Tensor

    def decode_positions(self, past: int, new: int) -> Tensor:
        """Uncompressed position ids of ``new`` tokens fed after ``past`` cached entries."""
        after = past - self.mask.shape[1]  # tokens decoded since the prefill
        return self.next[..., None] + after + torch.arange(new, device=self.next.device)

    def check_continues(self, positions: Tensor, past: int) -> None:
        """Refuse a step whose first token is not the one after the cached ones. generate continuing from
        this cache with the whole conversation (prefix caching, a second turn, assisted decoding) cuts
        input_ids at the cache's length, which counts the kept tokens only, so it feeds again L - K prompt
        tokens the cache holds (placeholders without their features among them); their uncompressed text
        positions show it (2-D positions, the text row of generate's 4-row M-RoPE ones, or the one row of text
        positions plus the rope delta that Qwen's generate gives a continued cache)."""
        text = positions if positions.dim() == 2 else positions[0] if positions.shape[0] in (1, 4) else None
        if positions.dim() == 3 and positions.shape[0] == 1:  # Qwen's generate continuing a cache: its text
            expected = self.next if self.next.dim() == 1 else self.next[-1]  # positions plus the rope delta
        else:
            expected = self.next if self.next.dim() == 1 else self.next[0] if self.next.shape[0] == 4 else None
        if text is None or expected is None or text.shape[0] != expected.shape[0]:
            return
        expected = expected + past - self.mask.shape[1]
        if not torch.equal(text[:, 0], expected.to(text.device)):
            raise ValueError(
                f"tokenprune: this step continues a KV cache a pruned prefill filled ({self.mask.shape[1]} of "
                f"{self.length} prompt positions kept) at position {text[:, 0].tolist()}, not "
                f"{expected.tolist()}: generate given such a cache cuts the whole sequence at the cache's "
                "compacted length and feeds cached tokens again; continuing from a pruned cache is not "
                "supported: run the whole prompt again")


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
    following = full.masked_fill(mask == 0, -1).amax(dim=-1) + 1
    if full.dim() == 3:  # M-RoPE: every axis continues after the largest position of any (Qwen's rope delta);
        first = 1 if full.shape[0] == 4 else 0  # generate's 4-row layout leads with its 1-D text positions
        following[first:] = following[first:].amax(dim=0, keepdim=True)
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
    return CompactedPrefill(mask=new_mask, length=length, shift=shift, next=following)


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
    Each image's feature tensor carries its choice as ``tokenprune_choice`` (an ``ImageChoice``), so the
    choice travels wherever ``generate`` moves the features (it repeats them for beams)."""
    refuse_jit_tracing()
    family, reducer = _family(vlm), vlm.tokenprune_reducer
    stock = type(vlm).get_image_features
    kw = _bind(stock, (vlm, *args), kwargs)
    kw.pop("self")
    family.check_features(vlm, kw, reducer)  # a call's own select strategy, which apply could not see
    as_tuple = kw.pop("return_dict", True) is False
    if isinstance(reducer, VisualTokenSelector):
        layers = reducer.score_layers(family.tower(vlm, kw))
        request = ScoreRequest(layers=frozenset(layers))
        out = stock(vlm, **kw, return_dict=True, tokenprune_scores=request)
        features = list(out.pooler_output)
        for feats, choice in zip(features, family.choose(vlm, kw, request, reducer, features, layers)):
            feats.tokenprune_choice = choice
    else:  # an encoder method reduced inside the tower: its K features fill an image's first K placeholders
        out = stock(vlm, **kw, return_dict=True)
        features = []
        for reduced, count in zip(out.pooler_output, family.feature_counts(vlm, kw)):
            feats = torch.cat([reduced, reduced.new_zeros(count - reduced.shape[0], reduced.shape[1])])
            kept = torch.arange(count, device=feats.device) < reduced.shape[0]
            feats.tokenprune_choice = ImageChoice(kept.to(torch.int8))
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


#: what ``_mark_loss`` adds to a call with labels; the *ForConditionalGeneration hands it on to its *Model
LOSS_MARK = "tokenprune_loss"


def _mark_loss(outer: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the *ForConditionalGeneration around a patched *Model: a call with ``labels`` tells
    the selection hook, which refuses it when the prefill drops tokens (the stock code would pair the logits of
    the kept positions with the labels of every position: a cross-entropy size error)."""
    kw = _bind(outer.forward, args, kwargs)
    if kw.get("labels") is not None:
        kw[LOSS_MARK] = True
    return (), kw


def _with_loss(model: nn.Module, vlm: nn.Module) -> list[nn.Module]:
    """The modules in ``model`` around ``vlm`` (its *ForConditionalGeneration, which takes the labels)."""
    return [m for m in model.modules() if getattr(m, "model", None) is vlm]


def _select(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the multimodal *Model: at a prefill, turn the per-image choices into the
    sequence positions the language model keeps (a ``Compaction`` among the keyword arguments that
    the *Model hands to its language model)."""
    refuse_jit_tracing()
    kw = _bind(model.forward, args, kwargs)
    with_labels = kw.pop(LOSS_MARK, False)
    cache = kw.get(_cache_key(kw))
    if cache is not None and cache.get_seq_length() > 0:  # a decode step: the language model's pre-hook fixes the mask
        note = getattr(cache, "tokenprune_prefill", None)
        if note is not None and kw.get("position_ids") is None:
            # a caller's own loop (generate always passes them): the model would count from the cache's
            # length, which holds the kept tokens only (LLaVA restarted at K under "original", Qwen's
            # rope_deltas path went below the prompt's positions), so give the uncompressed ones
            # ("reindex" shifts them with generate's at the language model)
            new = (kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]).shape[1]
            kw["position_ids"] = note.decode_positions(cache.get_seq_length(), new)
        elif note is not None:
            note.check_continues(kw["position_ids"], cache.get_seq_length())
        return (), kw
    if kw.get("pixel_values") is not None:  # a direct call; generate encodes the images beforehand
        encoded = {"image": _family(model).encode(model, kw)}
        if kw.get("pixel_values_videos") is not None:  # Qwen refuses pixel values next to encoder outputs
            encoded["video"] = _family(model).encode_videos(model, kw)
            kw["pixel_values_videos"] = None
        kw["mm_encoder_outputs"] = {**(kw.get("mm_encoder_outputs") or {}), **encoded}
        kw["pixel_values"] = None
    image = (kw.get("mm_encoder_outputs") or {}).get("image")
    choices = [] if image is None else [getattr(feats, "tokenprune_choice", None) for feats in image.pooler_output]
    if image is None or any(choice is None for choice in choices):
        if _keeps_everything(model.tokenprune_reducer):
            # every token of any image stays: the stock forward. generate(prefill_chunk_size=...) gets here: it
            # prefills in chunks, handing each the rows of its placeholders re-sliced from the encoded features
            # (which loses their choice), or none to a chunk without placeholders
            model._tokenprune_last = None
            return (), kw
        if image is None:
            raise ValueError("tokenprune: this prefill has no image; a pruned VLM needs at least one image per batch "
                             "(for text-only prompts call tokenprune.remove(model) first; generate("
                             "prefill_chunk_size=...) prefills in chunks, which a prefill that drops tokens cannot: "
                             "leave it out)")
        raise ValueError("tokenprune: these image features carry no choice of the patched model: generate("
                         "prefill_chunk_size=...) re-slices them per chunk, which a prefill that drops tokens cannot "
                         "take (leave it out, or use keep=1.0), or they were precomputed (pass pixel_values, not "
                         "mm_encoder_outputs)")
    if kw.get("input_ids") is None:
        raise ValueError("tokenprune needs input_ids (to find the image placeholders), not inputs_embeds")
    placeholders = kw["input_ids"] == model.config.image_token_id
    keeps = [choice.roles != 0 for choice in choices]
    keep_all = torch.cat(keeps)
    if int(placeholders.sum()) != keep_all.numel():
        raise ValueError(f"tokenprune: the prompt has {int(placeholders.sum())} image placeholder tokens for "
                         f"{keep_all.numel()} image features")
    keep_seq = torch.ones_like(placeholders)
    keep_seq[placeholders] = keep_all.to(placeholders.device)
    if not bool(keep_all.all()):  # nothing dropped (keep=1.0): the language model runs exactly as stock
        if with_labels:
            raise ValueError("tokenprune: labels= with a prefill that drops visual tokens: the logits are the kept "
                             "positions' only, so they cannot be paired with the prompt's labels; compute the loss "
                             "from the returned logits (one per kept position, rows left-padded) or use keep=1.0")
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() == 2 and not bool(mask[:, -1].all()):
            # compaction re-pads every row on the left, and generate would continue each row after its padding
            raise ValueError(f"tokenprune: rows {(mask[:, -1] == 0).nonzero().flatten().tolist()} of this batch are "
                             "padded on the right (attention_mask ends in 0), which a prefill that drops tokens cannot "
                             "take: pad on the left (tokenizer.padding_side='left')")
        kw["tokenprune_compaction"] = Compaction(keep=keep_seq, positions=model.tokenprune_positions)
    model._tokenprune_last = VLMReport(method=model.tokenprune_reducer.name,
                                       placeholders=placeholders.sum(dim=1).tolist(),
                                       visual_tokens=(keep_seq & placeholders).sum(dim=1).tolist(),
                                       kept=keeps, **_roles(model.tokenprune_reducer, choices))
    return (), kw


def _keeps_everything(reducer) -> bool:
    """Whether ``reducer`` keeps every visual token of any image (keep=1.0, no option deciding the counts)."""
    return reducer.keep == 1.0 and not keep_overridden(reducer.options)


def _roles(reducer, choices: list[ImageChoice]) -> dict:
    """The report's ``roles``, ``role_names`` and ``crop_roles`` from a selector's choices (left on their
    device: copying them to the host would make every prefill wait for it); nothing for encoder methods."""
    if not isinstance(reducer, VisualTokenSelector):
        return {}
    return {"roles": [c.roles for c in choices], "role_names": reducer.role_names,
            "crop_roles": [c.crops for c in choices]}


def _compact(language_model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the language model: compaction at prefill, mask fix-up at decode."""
    compaction = kwargs.pop("tokenprune_compaction", None)
    cache = kwargs.get(_cache_key(kwargs))
    if compaction is not None:
        from transformers import StaticCache

        if isinstance(cache, StaticCache):
            raise TypeError("tokenprune: a static KV cache (cache_implementation='static'): generate sizes a static "
                            "cache's masks by the whole prompt, and a pruned prefill is shorter; use the default "
                            "dynamic cache")
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

def _models(model: nn.Module) -> list[tuple[VLMFamily, nn.Module]]:
    if "transformers" not in sys.modules:  # nothing from transformers can be inside
        return []
    by_class = _by_class()
    return [(by_class[type(m)], m) for m in model.modules() if type(m) in by_class]


def _vlm(model: nn.Module) -> tuple[VLMFamily, nn.Module]:
    found = _models(model)
    if len(found) != 1:
        raise TypeError(f"tokenprune found {len(found)} vision-language models in {type(model).__name__}")
    return found[0]


def _family(vlm: nn.Module) -> VLMFamily:
    return _by_class()[type(vlm)]


#: on the layer stack of a vision tower the VLM adapter patched (its attention routed, or its layers reducing): the
#: class name of the model it was applied to, which ``hf_vision.HFVisionAdapter`` names when it refuses the tower
OWNER = "_tokenprune_owner"


def _towers(vlm: nn.Module) -> list[nn.Module]:
    """The layer stacks of the transformers vision encoders in ``vlm`` (LLaVA's CLIP or SigLIP tower), which the
    encoder adapter would patch on their own."""
    return [encoder.stack for encoder in hf_vision._encoders(vlm)]


# ---------------------------------------------------------------- the adapter

@register_adapter
class VLMAdapter(Adapter):
    family = "transformers LLaVA-1.5 (LlavaForConditionalGeneration), LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL"
    default_method = "hiprune"
    method_types = (VisualTokenSelector, EncoderReducer)
    settings = ("positions",)
    lookup_order = 10  # a VLM holds a vision encoder the transformers encoder adapter would take

    def handles(self, model):
        return bool(_models(model))

    def anchor(self, model):
        return _vlm(model)[1]

    def check(self, model):
        family, vlm = _vlm(model)
        check_attention(family.vision_config(vlm), f"{family.name} vision tower")
        own = vars(vlm).get("get_image_features")
        if own is not None and getattr(own, "func", None) is not _selecting_image_features:
            raise TypeError(f"tokenprune cannot patch this {type(vlm).__name__}: its get_image_features is set on the "
                            "instance, and the patch replaces it with its own while patched (yours would not run); "
                            "delete the instance attribute, or override get_image_features in a subclass")

    def plan(self, model, reducer, positions=None):
        family, vlm = _vlm(model)
        if positions is not None and positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if family.default_positions == "original" and positions == "reindex":
            raise ValueError(f"{family.name} keeps original (M-RoPE) positions; positions='reindex' is not available")
        for stack in _towers(vlm):
            if hasattr(stack, "tokenprune_reducer") and OWNER not in vars(stack):
                raise TypeError(f"tokenprune: the vision tower of this {type(model).__name__} is patched on its own "
                                "(tokenprune.apply on the tower): call tokenprune.remove on the tower first")
        family.check_features(vlm, {}, reducer)
        if isinstance(reducer, VisualTokenSelector):
            reducer.check(family.tower(vlm, {}))
            tokens = family.budget_unit(vlm)
            if tokens is not None:
                reducer.budget(tokens)  # a budget under one token fails now
            return
        if not family.takes_encoder_methods:
            raise TypeError(f"encoder method {reducer.name!r} on {family.name}: only LLaVA-1.5's CLIP/SigLIP tower "
                            "takes encoder methods (LLaVA-NeXT packs full crops; Qwen merges 2x2 patches); "
                            "use method='hiprune'")
        hf_vision.check_encoder(vlm.vision_tower)
        hf_vision.plan_encoder(vlm.vision_tower, reducer, depth=family.output_layer(vlm, {}) + 1)

    def patch(self, model, reducer, positions=None):
        family, vlm = _vlm(model)
        if self.is_patched(model):
            self.unpatch(model)
        if isinstance(reducer, VisualTokenSelector):
            route_attention(vlm, family.attention_modules(vlm), family.vision_config(vlm))
        else:
            hf_vision.patch_encoder(vlm.vision_tower, reducer, depth=family.output_layer(vlm, {}) + 1)
        vlm.get_image_features = _selecting_features_of(vlm)
        vlm.register_forward_pre_hook(_select, with_kwargs=True)
        vlm.language_model.register_forward_pre_hook(_compact, with_kwargs=True)
        # kept on the *Model: remove may be given the *Model alone, from which its *ForConditionalGeneration
        # cannot be found (its hook stayed behind, and another came with every apply)
        vlm._tokenprune_loss_marked = _with_loss(model, vlm)
        for outer in vlm._tokenprune_loss_marked:
            outer.register_forward_pre_hook(_mark_loss, with_kwargs=True)
        for stack in _towers(vlm):  # the encoder adapter refuses to apply or remove on it while this patch holds
            setattr(stack, OWNER, type(model).__name__)
        self.configure(vlm, reducer)
        vlm.tokenprune_positions = positions or family.default_positions

    def unpatch(self, model):
        family, vlm = _vlm(model)
        if isinstance(vlm.tokenprune_reducer, VisualTokenSelector):
            unroute_attention(vlm, family.attention_modules(vlm))
        else:
            hf_vision.unpatch_encoder(vlm.vision_tower)
        del vlm.get_image_features  # the instance attribute; the class's method shows again
        remove_hooks(vlm, _select)
        remove_hooks(vlm.language_model, _compact)
        for outer in vlm.__dict__.pop("_tokenprune_loss_marked", ()):
            remove_hooks(outer, _mark_loss)
        for stack in _towers(vlm):
            stack.__dict__.pop(OWNER, None)
        vlm.__dict__.pop("tokenprune_positions", None)
        self.unconfigure(vlm)


def visual_tokens_per_image(model: nn.Module) -> int | None:
    """The visual tokens every image of ``model`` gets when its config fixes the count (LLaVA-1.5: the
    tower's patch grid); None where the count follows the image (Qwen2-VL's dynamic resolution, LLaVA-NeXT's
    crops)."""
    family, vlm = _vlm(model)
    return family.tokens_per_image(vlm)
