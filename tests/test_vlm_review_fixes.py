"""VLM paths a review found wrong: LLaVA-NeXT's per-image budget, a VLM's vision tower patched or restored on
its own, SigLIP towers and the "full" select strategy, chunked prefill, right padding, the loss hooks after a
remove through the inner model, and LLaVA-NeXT's first row newline."""
from __future__ import annotations

import pytest
import torch
from test_vlm import (
    GREEDY,
    LLAVA_IMAGE,
    PAD,
    language_model_inputs,
    llava_batch,
    tiny_llava,
    tiny_llava_next,
)
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    SiglipVisionConfig,
)

import tokenprune
from tokenprune.methods.hiprune import HiPrune, hiprune_roles

# ------------------------------------------------------------------ LLaVA-NeXT: tokens= is the image's budget


def test_crop_budgets_split_the_images_tokens_over_its_crops():
    """The official code gives each crop int(tokens / crops); the remainder goes to the first crops, and a crop
    short of its share (unpadded) passes the rest on, so the image keeps min(tokens, its tokens)."""
    assert HiPrune(tokens=16).crop_budgets([64] * 5) == [4, 3, 3, 3, 3]
    assert HiPrune(tokens=640).crop_budgets([576] * 5) == [128] * 5  # the paper's LLaVA-NeXT setting
    assert HiPrune(tokens=10).crop_budgets([64, 2, 64]) == [5, 2, 3]
    assert HiPrune(tokens=200).crop_budgets([64, 30, 64]) == [64, 30, 64]
    assert HiPrune(tokens=2).crop_budgets([64] * 5) == [1, 1, 0, 0, 0]
    assert HiPrune(keep=0.25).crop_budgets([64, 40, 2]) == [16, 10, 0]  # keep: round(keep * count) per crop


def test_llava_next_tokens_is_a_budget_per_image():
    model, inputs = tiny_llava_next()
    tokenprune.apply(model, "hiprune", tokens=16, object_layer=2)
    with torch.no_grad():
        model(**inputs)
    report = tokenprune.last_forward(model)
    for crops, roles, visual in zip(report.crop_roles, report.roles, report.visual_tokens):
        assert int((crops > 0).sum()) == int((roles > 0).sum()) == 16  # not 16 per crop
        assert visual == 16 + int((roles == -1).sum())  # and the newlines of the rows that keep a token
    assert (report.crop_roles[1] > 0).sum(dim=1).tolist() == [4, 3, 3, 3, 3]  # the 64x64 image: 5 full crops
    from tokenprune.patches.vlm import visual_tokens_per_image

    assert visual_tokens_per_image(model) is None  # no fixed count per image for eval-vlm to turn --tokens into keep


# ------------------------------------------------------------------ the tower of a patched VLM

@pytest.mark.parametrize("method", ["tome", "hiprune"])
def test_the_tower_of_a_patched_vlm_is_refused_on_its_own_and_the_vlm_stays_removable(method):
    model, inputs = tiny_llava(), llava_batch()
    tower = model.model.vision_tower
    options = {"object_layer": 2} if method == "hiprune" else {}
    with torch.no_grad():
        expected = model(**inputs).logits
        tokenprune.apply(model, method, keep=0.5, **options)
        pruned = model(**inputs).logits
        for call in (lambda: tokenprune.remove(tower), lambda: tokenprune.apply(tower, "tome", keep=0.5)):
            with pytest.raises(TypeError, match="^tokenprune: this vision tower belongs to a patched "
                                                "LlavaForConditionalGeneration: call tokenprune.apply or "
                                                "tokenprune.remove on that model$"):
                call()
        assert torch.equal(model(**inputs).logits, pruned)  # the refusals left the patch whole
        tokenprune.remove(model)
        assert torch.equal(model(**inputs).logits, expected)
        tokenprune.apply(model, method, keep=0.5, **options)  # and it applies again
        assert torch.equal(model(**inputs).logits, pruned)
        tokenprune.remove(model)
        # the tower is its own again: the encoder adapter takes it, and the VLM refuses to patch over it
        tokenprune.apply(tower, "tome", keep=0.5)
        with pytest.raises(TypeError, match="patched on its own"):
            tokenprune.apply(model, method, keep=0.5, **options)
        tokenprune.remove(tower)
        assert torch.equal(model(**inputs).logits, expected)


def test_unpatch_encoder_twice_is_harmless():
    from tokenprune.patches import hf_vision

    from tokenprune.registry import get_method

    model, inputs = tiny_llava(), llava_batch()
    tower = model.model.vision_tower
    with torch.no_grad():
        expected = tower(inputs["pixel_values"]).last_hidden_state
        hf_vision.patch_encoder(tower, get_method("tome")(keep=0.5))
        hf_vision.unpatch_encoder(tower)
        hf_vision.unpatch_encoder(tower)
        assert torch.equal(tower(inputs["pixel_values"]).last_hidden_state, expected)


# ------------------------------------------------------------------ SigLIP towers, the "full" strategy

def tiny_llava_with(tower: str, strategy: str, next_: bool = False, prompt: bool = True):
    """A tiny LLaVA (or LLaVA-NeXT) with a CLIP or SigLIP tower (8x8 patches) and the given select strategy, and one
    prompt with as many placeholders as the stock model gives features (``prompt``)."""
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=4)
    vision = SiglipVisionConfig(**sizes) if tower == "siglip" else CLIPVisionConfig(**sizes)
    text = LlamaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=96, max_position_embeddings=2048, pad_token_id=PAD)
    common = dict(vision_config=vision, text_config=text, image_token_id=LLAVA_IMAGE, vision_feature_layer=-2,
                  vision_feature_select_strategy=strategy)
    gen = torch.Generator().manual_seed(1)
    if next_:
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(
            **common, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])).eval()
        inputs = dict(pixel_values=torch.randn(1, 5, 3, 32, 32, generator=gen), image_sizes=torch.tensor([[40, 60]]))
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(**common)).eval()
        inputs = dict(pixel_values=torch.randn(1, 3, 32, 32, generator=gen))
    if not prompt:
        return model, None
    with torch.no_grad():
        features = len(model.model.get_image_features(**inputs).pooler_output[0])
    return model, dict(input_ids=torch.tensor([[5, 6] + [LLAVA_IMAGE] * features + [7, 10]]), **inputs)


def received(model, pixels, layer: int) -> torch.Tensor:
    """Attention each token of the tower receives at ``layer`` (0-based), mean over heads and queries, computed
    here from the layer's own q and k."""
    tower = model.model.vision_tower
    block = tower.encoder.layers[layer]
    h = block.layer_norm1(tower(pixels, output_hidden_states=True).hidden_states[layer])
    attn, (batch, n, _) = block.self_attn, h.shape
    q, k = (proj(h).view(batch, n, -1, attn.head_dim).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj))
    return (q @ k.transpose(-1, -2) * attn.scale).softmax(-1).mean(dim=(1, 2))[0]


@pytest.mark.parametrize("tower, strategy, features, hiprune_kept, tome_kept", [
    ("clip", "default", 64, 32, 32),
    ("clip", "full", 65, None, 33),  # the class token is a feature: an encoder method keeps it (hiprune: refused)
    ("siglip", "full", 64, 32, 32),
    ("siglip", "default", 63, 32, 31),  # the model cuts the first patch (no class token): of the tower's 32 too
])
def test_llava_select_strategies_and_towers(tower, strategy, features, hiprune_kept, tome_kept):
    model, inputs = tiny_llava_with(tower, strategy)
    with torch.no_grad():
        expected = model(**inputs).logits
        for method, kept in (("hiprune", hiprune_kept), ("tome", tome_kept)):
            options = {"object_layer": 2} if method == "hiprune" else {}
            if kept is None:
                with pytest.raises(TypeError, match="^hiprune on LLaVA chooses among patch tokens; "
                                                    "vision_feature_select_strategy='full' .* use 'default'$"):
                    tokenprune.apply(model, method, keep=1.0, **options)
                assert not tokenprune.is_patched(model)
                continue
            tokenprune.apply(model, method, keep=1.0, **options)
            assert torch.equal(model(**inputs).logits, expected)
            tokenprune.apply(model, method, keep=0.5, **options)
            model(**inputs)
            report = tokenprune.last_forward(model)
            assert report.placeholders == [features] and report.visual_tokens == [kept]
            if method == "hiprune":  # the choice HiPrune makes on the patch grid's scores, cut as the features are
                obj, out = (received(model, inputs["pixel_values"], layer) for layer in (1, 2))
                prefix = int(tower == "clip")
                allowed = torch.arange(64) >= 1 if features == 63 else None
                roles = hiprune_roles(obj[prefix:], out[prefix:], (8, 8), 32, allowed=allowed)
                assert torch.equal(report.roles[0], roles[64 - features:])
            tokenprune.remove(model)
        assert torch.equal(model(**inputs).logits, expected)


def test_a_calls_own_strategy_is_checked_at_the_forward():
    model, inputs = tiny_llava(), llava_batch()
    tokenprune.apply(model, "hiprune", keep=0.5, object_layer=2)
    with torch.no_grad(), pytest.raises(TypeError, match="strategy='full'"):
        model(**inputs, vision_feature_select_strategy="full")


def test_llava_next_with_a_siglip_tower():
    model, inputs = tiny_llava_with("siglip", "full", next_=True)
    with torch.no_grad():
        expected = model(**inputs).logits
        tokenprune.apply(model, "hiprune", keep=1.0, object_layer=2)
        assert torch.equal(model(**inputs).logits, expected)
        tokenprune.apply(model, "hiprune", tokens=16, object_layer=2)
        model(**inputs)
    assert int((tokenprune.last_forward(model).roles[0] > 0).sum()) == 16
    # a layout the model's own packing reads as a grid regardless (an error here; a wrong grid where the sizes fit)
    with pytest.raises(TypeError, match="leaves 63 features per crop of its SigLIP tower, not 64: use 'full'$"):
        tokenprune.apply(tiny_llava_with("siglip", "default", True, prompt=False)[0], "hiprune", keep=1.0,
                         object_layer=2)


# ------------------------------------------------------------------ generate: chunked prefill, right padding

def test_chunked_prefill_is_stock_at_keep_one_and_refused_by_name_when_tokens_drop():
    model, inputs = tiny_llava(), llava_batch()
    with torch.no_grad():
        expected = model.generate(**inputs, **GREEDY)
        assert torch.equal(model.generate(**inputs, **GREEDY, prefill_chunk_size=16), expected)
        for method, options in (("hiprune", {"object_layer": 2}), ("tome", {})):
            tokenprune.apply(model, method, keep=1.0, **options)
            assert torch.equal(model.generate(**inputs, **GREEDY, prefill_chunk_size=16), expected)
            tokenprune.apply(model, method, keep=0.5, **options)
            with pytest.raises(ValueError, match=r"prefill_chunk_size=\.\.\.\) re-slices them per chunk"):
                model.generate(**inputs, **GREEDY, prefill_chunk_size=16)
            with pytest.raises(ValueError, match=r"no image.*prefill_chunk_size"):  # a first chunk of text only
                model.generate(**inputs, **GREEDY, prefill_chunk_size=1)


def right_padded(inputs):
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    length = max(map(len, rows))
    ids = torch.tensor([row + [PAD] * (length - len(row)) for row in rows])
    return dict(inputs, input_ids=ids, attention_mask=(ids != PAD).long())


def test_right_padding_is_refused_at_the_prefill_when_tokens_drop():
    model, inputs = tiny_llava(), right_padded(llava_batch())
    with torch.no_grad():
        expected = model.generate(**inputs, **GREEDY)
        tokenprune.apply(model, "hiprune", keep=1.0, object_layer=2)
        assert torch.equal(model.generate(**inputs, **GREEDY), expected)
        tokenprune.apply(model, "hiprune", keep=0.5, object_layer=2)

        def refused():
            with pytest.raises(ValueError, match=r"^tokenprune: rows \[0\] of this batch are padded on the right .* "
                                                 r"pad on the left \(tokenizer.padding_side='left'\)$"):
                model.generate(**inputs, **GREEDY)

        _, seen = language_model_inputs(model, refused)
        assert seen == []  # at the prefill, before the language model ran


# ------------------------------------------------------------------ remove through the inner model

def test_remove_through_the_inner_model_takes_the_loss_hook_off_the_outer_one():
    from tokenprune.patches.vlm import _mark_loss

    model, inputs = tiny_llava(), llava_batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = model(**inputs, labels=labels).loss
        for _ in range(3):
            tokenprune.apply(model, "hiprune", keep=0.5, object_layer=2)
            tokenprune.remove(model.model)
        assert _mark_loss not in model._forward_pre_hooks.values()
        assert torch.equal(model(**inputs, labels=labels).loss, expected)
        tokenprune.apply(model, "hiprune", keep=0.5, object_layer=2)
        assert list(model._forward_pre_hooks.values()).count(_mark_loss) == 1


# ------------------------------------------------------------------ LLaVA-NeXT: rows after the base crop

def test_llava_next_drops_the_first_rows_newline_when_that_row_keeps_nothing(monkeypatch):
    """The base crop's tokens come before the high-resolution grid's first row, and have no newline: a kept base
    token kept that row's newline."""
    model, inputs = tiny_llava_next()
    inputs = dict(input_ids=inputs["input_ids"][1:, -(2 + 5 * 64 + 16 + 2):], pixel_values=inputs["pixel_values"][1:],
                  image_sizes=inputs["image_sizes"][1:])  # the 64x64 image: 4 full 8x8 crops, 16 rows
    explain, calls = HiPrune.explain, []

    def without_first_rows(self, scores, grid, allowed=None):  # every crop but the base one loses its first row
        roles = explain(self, scores, grid, allowed).clone()
        calls.append(None)
        if len(calls) > 1:
            roles[:grid[1]] = 0
        return roles

    monkeypatch.setattr(HiPrune, "explain", without_first_rows)
    tokenprune.apply(model, "hiprune", keep=1.0, object_layer=2)
    with torch.no_grad():
        model(**inputs)
    roles = tokenprune.last_forward(model).roles[0]
    assert int((roles[:64] > 0).sum()) == 64  # the base crop keeps all
    # grid rows 0 and 8 (the crops' first rows) keep nothing: their newlines go, the other 14 stay
    newline = [64 + 17 * row + 16 for row in range(16)]
    assert roles[newline].tolist() == [0 if row in (0, 8) else -1 for row in range(16)]


# ------------------------------------------------------------------ get_image_features(return_dict=False)


@pytest.mark.parametrize("method", ["hiprune", "tome"])
def test_image_features_as_a_tuple_are_the_stock_tuple_at_keep_one(method):
    """The patched get_image_features honours return_dict=False (a tuple, as the stock method gives), untested
    until a mutant of it survived."""
    model = tiny_llava()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stock = model.model.get_image_features(pixel_values=pixels, return_dict=False)
        tokenprune.apply(model, method, keep=1.0, **({"object_layer": 2} if method == "hiprune" else {}))
        patched = model.model.get_image_features(pixel_values=pixels, return_dict=False)
        as_object = model.model.get_image_features(pixel_values=pixels)
    assert isinstance(stock, tuple) and isinstance(patched, tuple) and len(patched) == len(stock)
    assert not isinstance(as_object, tuple)

    def same(a, b) -> bool:  # tensors, None (the hidden states transformers did not keep), or sequences of them
        if isinstance(a, (list, tuple)):
            return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
        return a is b is None or (torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b))

    assert same(patched, stock)
