"""Vision-language models: HiPrune and encoder methods on tiny LLaVA and Qwen2.5-VL built from configs."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

import tokenprune
from tokenprune.methods.hiprune import hiprune_roles, hiprune_select

LLAVA_IMAGE, QWEN_IMAGE, PAD = 99, 90, 0
GREEDY = dict(max_new_tokens=6, do_sample=False)


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                              image_size=32, patch_size=4)  # an 8x8 grid: 64 visual tokens per image
    text = LlamaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=96, max_position_embeddings=512, pad_token_id=PAD)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=LLAVA_IMAGE, vision_feature_layer=-2)
    return LlavaForConditionalGeneration(config).eval()


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, rows))
    ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    return ids, (ids != PAD).long()


def llava_batch():
    """Two samples, left-padded: one image and three text tokens, two images and two text tokens."""
    def prompt(images, text):
        ids = [5, 6]
        for _ in range(images):
            ids += [LLAVA_IMAGE] * 64 + [7]
        return ids + list(range(10, 10 + text))
    ids, mask = left_padded([prompt(1, 3), prompt(2, 2)])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 32, 32,
                                                                            generator=torch.Generator().manual_seed(1)))


def tiny_qwen(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                           fullatt_block_indexes=[1, 3], in_channels=3),
        text_config=dict(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]}),
        image_token_id=QWEN_IMAGE, vision_start_token_id=91, vision_end_token_id=92)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


QWEN_GRIDS = [(1, 8, 12), (1, 8, 8)]  # patches; 24 and 16 tokens after the 2x2 merger


def qwen_batch():
    def prompt(grid, text):
        return [5, 91] + [QWEN_IMAGE] * (grid[0] * grid[1] * grid[2] // 4) + [92] + list(range(10, 10 + text))
    ids, mask = left_padded([prompt(QWEN_GRIDS[0], 3), prompt(QWEN_GRIDS[1], 5)])
    pixels = torch.randn(sum(t * h * w for t, h, w in QWEN_GRIDS), 3 * 2 * 4 * 4,
                         generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=torch.tensor(QWEN_GRIDS),
                mm_token_type_ids=(ids == QWEN_IMAGE).int())  # as the processor returns them: M-RoPE needs them


def language_model_inputs(model, run):
    """The inputs_embeds each language-model call received while ``run()`` ran."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        out = run()
    finally:
        handle.remove()
    return out, seen


# ------------------------------------------------------------------ exactness

@pytest.mark.parametrize("build,batch", [(tiny_llava, llava_batch), (tiny_qwen, qwen_batch)])
@pytest.mark.parametrize("method", ["hiprune", "tome"])
def test_keep_one_generates_identically_and_remove_restores(build, batch, method):
    model, inputs = build(), batch()
    if method == "tome" and build is tiny_qwen:
        pytest.skip("encoder methods serve LLaVA's tower")
    options = {"object_layer": 2} if method == "hiprune" else {}
    with torch.no_grad():
        expected, logits = model.generate(**inputs, **GREEDY), model(**inputs).logits
        tokenprune.apply(model, method, keep=1.0, **options)
        assert torch.equal(model.generate(**inputs, **GREEDY), expected)
        assert torch.equal(model(**inputs).logits, logits)
        tokenprune.apply(model, method, keep=0.25, **options)
        assert model(**inputs).logits.shape[1] < logits.shape[1]
        tokenprune.remove(model)
        assert torch.equal(model.generate(**inputs, **GREEDY), expected)
    assert not tokenprune.is_patched(model)
    assert "get_image_features" not in vars(model.model)
    assert model.config.vision_config._attn_implementation == "sdpa"


# ------------------------------------------------------------------ K tokens reach the language model

@pytest.mark.parametrize("method", ["hiprune", "tome", "mctf", "zero-tprune"])
def test_llava_language_model_sees_k_visual_tokens_per_image(method):
    model, inputs = tiny_llava(), llava_batch()
    options = {"object_layer": 2} if method == "hiprune" else {}
    tokenprune.apply(model, method, keep=0.25, **options)
    with torch.no_grad():
        _, lengths = language_model_inputs(model, lambda: model.generate(**inputs, **GREEDY))
    report = tokenprune.last_forward(model)
    assert report.placeholders == [64, 128] and report.visual_tokens == [16, 32]
    text = (inputs["input_ids"] != LLAVA_IMAGE).sum(dim=1) - (inputs["attention_mask"] == 0).sum(dim=1)
    # prefill: the longer compacted row (text + kept visual tokens), then one token per decode step
    assert lengths == [int(max(text[0] + 16, text[1] + 32))] + [1] * (GREEDY["max_new_tokens"] - 1)


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        vision_config=dict(depth=4, embed_dim=32, hidden_size=48, mlp_ratio=2, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        text_config=dict(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]}),
        image_token_id=QWEN_IMAGE, vision_start_token_id=91, vision_end_token_id=92)
    return Qwen2VLForConditionalGeneration(config).eval()


@pytest.mark.parametrize("build", [tiny_qwen, tiny_qwen2])
def test_qwen_keeps_k_per_image_after_the_merger(build):
    model, inputs = build(), qwen_batch()
    with torch.no_grad():
        expected = model.generate(**inputs, **GREEDY)
        tokenprune.apply(model, "hiprune", keep=1.0, object_layer=2)
        assert torch.equal(model.generate(**inputs, **GREEDY), expected)
    tokenprune.apply(model, "hiprune", keep=0.34, object_layer=2)
    with torch.no_grad():
        model(**inputs)
    assert tokenprune.last_forward(model).visual_tokens == [round(0.34 * 24), round(0.34 * 16)]
    assert tokenprune.last_forward(model).placeholders == [24, 16]


# ------------------------------------------------------------------ against references built by hand

def _llava_reference(model, input_ids, pixels, keep, object_layer):
    """One sample, unpatched: HiPrune's choice from eager attention maps, then generation from
    inputs_embeds holding only the kept features (re-indexed positions: contiguous). Returns the
    generation and HiPrune's roles per image."""
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tower(pixels, output_attentions=True, output_hidden_states=True)
            features = model.model.multi_modal_projector(out.hidden_states[-2][:, 1:])
    finally:
        tower.set_attn_implementation("sdpa")
    received = [a.mean(dim=(1, 2))[:, 1:] for a in out.attentions]  # drop the class token's column
    embeds = model.get_input_embeddings()(input_ids[None])[0]
    pieces, at, chosen = [], 0, []
    for i in range(pixels.shape[0]):
        k = round(keep * 64)
        roles = hiprune_roles(received[object_layer - 1][i], received[2][i], (8, 8), k)  # output layer: 3rd of 4
        idx = roles.nonzero().flatten()
        chosen.append(roles)
        start = (input_ids == LLAVA_IMAGE).nonzero()[i * 64].item()
        pieces += [embeds[at:start], features[i, idx]]
        at = start + 64
    pieces.append(embeds[at:])
    inputs_embeds = torch.cat(pieces)[None]
    mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long)
    with torch.no_grad():
        return model.generate(inputs_embeds=inputs_embeds, attention_mask=mask, **GREEDY), chosen


def test_llava_pruned_generation_equals_a_per_sample_reference():
    model, inputs = tiny_llava(), llava_batch()
    tokenprune.apply(model, "hiprune", keep=0.25, object_layer=2)
    with torch.no_grad():
        batch_out = model.generate(**inputs, **GREEDY)[:, inputs["input_ids"].shape[1]:]
    report = tokenprune.last_forward(model)  # per image, in batch order
    assert report.role_names == ("dropped", "anchor", "buffer", "register")
    assert all(torch.equal(kept, roles != 0) for kept, roles in zip(report.kept, report.roles))
    tokenprune.remove(model)
    images = [inputs["pixel_values"][:1], inputs["pixel_values"][1:]]
    reported = [report.roles[:1], report.roles[1:]]
    for row, pixels in enumerate(images):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row] == 1]
        reference, chosen = _llava_reference(model, ids, pixels, 0.25, object_layer=2)
        assert torch.equal(batch_out[row], reference[0]), row
        assert [roles.tolist() for roles in reported[row]] == [roles.tolist() for roles in chosen]


def qwen_scores_by_hand(model, inputs, layer, counts=(24, 16)):
    """Attention received at vision block ``layer`` recomputed eagerly from the block's input, per
    image (full attention), averaged over each 2x2 merge unit, put back in raster order and split into the images'
    ``counts`` of merged tokens (the test batch's two images by default)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    visual, captured = model.model.visual, {}
    block = visual.blocks[layer]
    handle = block.register_forward_pre_hook(lambda m, a, kw: captured.update(x=a[0], **kw), with_kwargs=True)
    with torch.no_grad():
        visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    handle.remove()
    attn = block.attn
    x = block.norm1(captured["x"])
    q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *captured["position_embeddings"])
    bounds = captured["cu_seqlens"].tolist()
    scores = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        probs = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]).mul(attn.scaling).softmax(-1)
        scores.append(probs.mean(dim=(0, 1)))
    merged = torch.cat(scores).reshape(-1, 4).mean(-1)
    window_index, _ = get_vision_window_index(inputs["image_grid_thw"], 2, visual.window_size, visual.patch_size)
    return merged[torch.argsort(window_index)].split(list(counts))


def test_qwen_prefill_equals_a_reference_with_original_positions():
    model, inputs = tiny_qwen(), qwen_batch()
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        positions = model.model.compute_3d_position_ids(
            input_ids=inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"], video_grid_thw=None,
            inputs_embeds=None, attention_mask=inputs["attention_mask"], past_key_values=None,
            mm_token_type_ids=inputs["mm_token_type_ids"])
    object_scores, output_scores = qwen_scores_by_hand(model, inputs, 1), qwen_scores_by_hand(model, inputs, 3)
    tokenprune.apply(model, "hiprune", keep=0.34, object_layer=2)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    tokenprune.remove(model)
    for row, (grid, feats) in enumerate(zip(QWEN_GRIDS, features)):
        rows, cols = grid[1] // 2, grid[2] // 2
        idx = hiprune_select(object_scores[row], output_scores[row], (rows, cols), round(0.34 * rows * cols))
        ids, mask = inputs["input_ids"][row], inputs["attention_mask"][row] == 1
        keep = mask.clone()
        image_at = (ids == QWEN_IMAGE).nonzero().squeeze(1)
        keep[image_at] = False
        keep[image_at[idx]] = True
        embeds = model.get_input_embeddings()(ids)
        embeds[image_at] = feats
        with torch.no_grad():
            out = model.model.language_model(inputs_embeds=embeds[keep][None],
                                             position_ids=positions[:, row:row + 1, keep])
            reference = model.lm_head(out.last_hidden_state[:, -1])
        # fp32 rounding only (the batch is left-padded, the reference is one unpadded row): ~1e-7 measured
        torch.testing.assert_close(logits[row], reference[0], atol=1e-6, rtol=0)


def test_qwen_generation_matches_a_manual_decode_with_original_positions():
    model, inputs = tiny_qwen(), qwen_batch()
    tokenprune.apply(model, "hiprune", keep=0.34, object_layer=2)
    with torch.no_grad():
        batch_out = model.generate(**inputs, **GREEDY)[:, inputs["input_ids"].shape[1]:]
    # the same prefill, sample by sample (its own image), then decode by hand: positions continue at
    # the prefill's last position + 1 on every axis, as generate does
    for row in range(2):
        mask = inputs["attention_mask"][row] == 1
        image_rows = slice(0, 96) if row == 0 else slice(96, 160)
        ids = inputs["input_ids"][row][mask][None]
        single = dict(input_ids=ids, pixel_values=inputs["pixel_values"][image_rows],
                      image_grid_thw=inputs["image_grid_thw"][row:row + 1], mm_token_type_ids=(ids == QWEN_IMAGE).int())
        with torch.no_grad():
            positions = model.model.compute_3d_position_ids(
                input_ids=ids, image_grid_thw=single["image_grid_thw"], video_grid_thw=None, inputs_embeds=None,
                attention_mask=None, past_key_values=None, mm_token_type_ids=single["mm_token_type_ids"])
            out = model(**single, use_cache=True)
            cache, token, last = out.past_key_values, out.logits[:, -1].argmax(-1), positions[..., -1:]
            tokens = [token]
            for step in range(GREEDY["max_new_tokens"] - 1):
                last = last + 1
                out = model(input_ids=token[:, None], past_key_values=cache, position_ids=last, use_cache=True)
                token = out.logits[:, -1].argmax(-1)
                tokens.append(token)
        assert torch.equal(torch.cat(tokens), batch_out[row]), row


# ------------------------------------------------------------------ HiPrune selection

def test_hiprune_anchor_buffer_register_counts():
    n, grid = 576, (24, 24)
    gen = torch.Generator().manual_seed(0)
    obj, out = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    for k, anchors in ((192, 4), (128, 3), (64, 1)):  # the paper's anchor counts at alpha = 0.1
        idx = hiprune_select(obj, out, grid, k)
        assert idx.numel() == k and torch.equal(idx, idx.sort().values)
        top = obj.topk(anchors).indices
        assert set(top.tolist()) <= set(idx.tolist())
        assert round(0.1 * k / 5) == anchors
        roles = hiprune_roles(obj, out, grid, k)
        assert torch.equal(roles.nonzero().flatten(), idx)
        assert sorted(torch.nonzero(roles == 1).flatten().tolist()) == sorted(top.tolist())
        rows, cols = top // 24, top % 24
        neighbours = {(int(r) + dr) * 24 + int(c) + dc for r, c in zip(rows, cols)
                      for dr, dc in ((0, -1), (0, 1), (-1, 0), (1, 0)) if 0 <= r + dr < 24 and 0 <= c + dc < 24}
        assert set(torch.nonzero(roles == 2).flatten().tolist()) == neighbours - set(top.tolist())
        registers = torch.nonzero(roles == 3).flatten()
        rest = out.masked_fill((roles == 1) | (roles == 2), -1)
        assert sorted(registers.tolist()) == sorted(rest.topk(k - anchors - len(neighbours - set(top.tolist())))
                                                    .indices.tolist())


def test_hiprune_buffers_do_not_wrap_unless_asked():
    obj = torch.zeros(16)
    obj[7] = 1.0  # the last token of the first row of a 4x4 grid
    out = torch.arange(16.0) / 100  # registers prefer high indices
    no_wrap = hiprune_select(obj, out, (4, 4), 4, alpha=1.0)  # one anchor, 3 neighbours on the grid
    assert no_wrap.tolist() == [3, 6, 7, 11]
    wrapped = hiprune_select(obj, out, (4, 4), 5, alpha=1.0)  # the official +1 reaches the next row's start
    assert 8 not in wrapped.tolist()
    assert 8 in hiprune_select(obj, out, (4, 4), 5, alpha=1.0, wrap=True).tolist()


def test_hiprune_keeps_only_allowed_tokens():
    gen = torch.Generator().manual_seed(0)
    obj, out = torch.rand(64, generator=gen), torch.rand(64, generator=gen)
    allowed = torch.arange(64) < 40  # an unpadded crop: the last 3 rows are gone
    idx = hiprune_select(obj, out, (8, 8), 16, alpha=1.0, allowed=allowed)
    assert idx.numel() == 16 and bool(allowed[idx].all())


# ------------------------------------------------------------------ errors and copies

def test_clear_errors():
    model = tiny_llava()
    with pytest.raises(ValueError, match="at least one token"):
        tokenprune.apply(model, "hiprune", keep=0.001, object_layer=2)
    with pytest.raises(ValueError, match="object_layer=9 is outside"):
        tokenprune.apply(model, "hiprune", keep=0.5)
    assert not tokenprune.is_patched(model)
    tokenprune.apply(model, "hiprune", keep=0.5, object_layer=2)
    inputs = llava_batch()
    with pytest.raises(ValueError, match="no image"):
        model.generate(input_ids=torch.tensor([[5, 6, 7]]), **GREEDY)
    with pytest.raises(ValueError, match="positions"):
        tokenprune.apply(tiny_qwen(), "hiprune", keep=0.5, positions="reindex", object_layer=2)
    with pytest.raises(ValueError, match="full-attention"):  # Qwen2.5-VL's block 1 (1-based) attends in windows
        tokenprune.apply(tiny_qwen(), "hiprune", keep=0.5, object_layer=1)
    with pytest.raises(TypeError, match="does not support"):
        tokenprune.apply(LlamaForCausalLM(model.config.text_config), "hiprune", keep=0.5)
    from conftest import tiny_timm
    with pytest.raises(TypeError, match="VLM|LLaVA"):
        tokenprune.apply(tiny_timm(), "hiprune", keep=0.5)
    with torch.no_grad():  # the failed calls left the patched model working
        model.generate(**inputs, **GREEDY)


def test_an_instance_level_get_image_features_is_refused_and_kept():
    """The patch sets its own get_image_features on the *Model instance while patched: one the user set there would
    not run, and remove (which deletes the instance attribute) would lose it."""
    model = tiny_llava()
    vlm = model.model
    mine = vlm.get_image_features  # a bound method, as a user wrapping it would set
    vlm.get_image_features = mine
    with pytest.raises(TypeError, match="get_image_features is set on the instance"):
        tokenprune.apply(model, "hiprune", keep=0.5, object_layer=2)
    assert not tokenprune.is_patched(model) and vars(vlm)["get_image_features"] is mine
    del vlm.get_image_features
    tokenprune.apply(model, "hiprune", keep=0.5, object_layer=2)
    tokenprune.apply(model, "hiprune", keep=0.25, object_layer=2)  # its own is not refused on a second apply
    tokenprune.remove(model)
    assert "get_image_features" not in vars(vlm)


def test_an_object_layer_past_the_built_tower_says_those_layers_are_not_built():
    """vLLM builds LLaVA's tower only up to the feature layer (``VisionTower.unbuilt_layers``): the refusal says so
    where the layer lies past the built ones, and only there (transformers builds every layer: no such clause)."""
    from tokenprune.methods.hiprune import HiPrune
    from tokenprune.registry import VisionTower

    def refusal(layer, unbuilt):
        tower = VisionTower(family="LLaVA", depth=23, output_layer=22, object_layer=9, unbuilt_layers=unbuilt)
        with pytest.raises(ValueError) as error:
            HiPrune(keep=0.5, object_layer=layer).check(tower)
        return str(error.value)

    assert refusal(24, 1) == ("hiprune: object_layer=24 is outside the 23-layer vision tower of LLaVA (1-based); "
                              "the 1 layer(s) after the one whose features the language model receives are not "
                              "built here")
    assert refusal(24, 0) == "hiprune: object_layer=24 is outside the 23-layer vision tower of LLaVA (1-based)"
    HiPrune(keep=0.5, object_layer=23).check(VisionTower("LLaVA", 23, 22, 9, unbuilt_layers=1))
    with pytest.raises(ValueError, match=r"object_layer=0 is outside the 4-layer vision tower of X \(1-based\)$"):
        HiPrune(keep=0.5).check(VisionTower("X", 4, 3, object_layer=0))  # a family's default is checked too


def test_a_windowed_object_layer_is_refused_naming_the_full_attention_ones():
    from tokenprune.methods.hiprune import HiPrune
    from tokenprune.registry import VisionTower

    tower = VisionTower("Qwen", 4, 3, object_layer=2, full_attention_layers=(1, 3))  # 0-based: 2nd and 4th
    HiPrune(keep=0.5).check(tower)
    HiPrune(keep=0.5, object_layer=4).check(tower)
    with pytest.raises(ValueError) as error:
        HiPrune(keep=0.5, object_layer=3).check(tower)
    assert str(error.value) == ("hiprune: object_layer=3 of Qwen attends within windows; scores need a full-attention "
                                "block: one of [2, 4] (1-based)")


def test_qwen_budget_under_one_token_fails_at_the_image():
    model, inputs = tiny_qwen(), qwen_batch()
    tokenprune.apply(model, "hiprune", keep=0.02, object_layer=2)
    with pytest.raises(ValueError, match="at least one token"), torch.no_grad():
        model(**inputs)


def test_patched_vlm_deep_copies():
    model, inputs = tiny_llava(), llava_batch()
    tokenprune.apply(model, "hiprune", keep=0.25, object_layer=2)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone.generate(**inputs, **GREEDY), model.generate(**inputs, **GREEDY))
    tokenprune.remove(clone)
    assert tokenprune.is_patched(model) and not tokenprune.is_patched(clone)


@pytest.mark.parametrize("method", ["hiprune", "random-select"])
@pytest.mark.parametrize("build, batch", [(tiny_llava, llava_batch), (tiny_qwen, qwen_batch)])
def test_models_of_one_config_object_keep_their_own_attention(build, batch, method):
    """transformers shares the config object among the models built from it, and reads the attention
    implementation's name from it at every forward: patching one model must not change another (it failed
    with an AttributeError, a RecursionError once both were patched, and kept a routed name after both were
    removed)."""
    first, inputs = build(), batch()
    torch.manual_seed(1)
    second = type(first)(first.config).eval()
    vision = first.config.vision_config
    options = dict(object_layer=2) if method == "hiprune" else {}

    def pruned(model):  # applied afresh: random-select's draws start again from its seed
        tokenprune.apply(model, method, keep=0.25, **options)
        return model(**inputs).logits

    with torch.no_grad():
        stock = second(**inputs).logits
        alone = pruned(first)
        assert torch.equal(second(**inputs).logits, stock)  # the unpatched model of the same config
        assert pruned(second).shape == alone.shape
        assert torch.equal(pruned(first), alone)
        tokenprune.remove(first)
        tokenprune.remove(second)
        assert torch.equal(second(**inputs).logits, stock)
    assert first.config.vision_config is vision and vision._attn_implementation == "sdpa"
    assert all(m.config is vision for m in second.modules() if getattr(m, "config", None) is not None
               and type(m.config) is type(vision))


# ------------------------------------------------------------------ LLaVA-NeXT (any resolution)

def tiny_llava_next():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                              image_size=32, patch_size=4)
    text = LlamaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=96, max_position_embeddings=2048, pad_token_id=PAD)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=LLAVA_IMAGE,
                             vision_feature_layer=-2, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    model = LlavaNextForConditionalGeneration(config).eval()
    sizes = torch.tensor([[40, 60], [64, 64]])  # the first is unpadded: its high-resolution crops lose rows
    pixels = torch.randn(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        packed = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
    ids, mask = left_padded([[5, 6] + [LLAVA_IMAGE] * len(packed[0]) + [7, 10, 11],
                             [5, 6] + [LLAVA_IMAGE] * len(packed[1]) + [7, 12]])
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)


def test_llava_next_keeps_k_per_crop_and_is_exact_at_keep_one():
    model, inputs = tiny_llava_next()
    with torch.no_grad():
        expected = model.generate(**inputs, **GREEDY)
        tokenprune.apply(model, "hiprune", keep=1.0, object_layer=2)
        assert torch.equal(model.generate(**inputs, **GREEDY), expected)
        tokenprune.apply(model, "hiprune", keep=0.25, object_layer=2)
        _, lengths = language_model_inputs(model, lambda: model.generate(**inputs, **GREEDY))
    report = tokenprune.last_forward(model)
    # the 64x64 image: a base crop and 4 full crops of 8x8, 16 rows with a newline each:
    # 16 of 64 tokens per crop and every row's newline
    assert report.placeholders[1] == 5 * 64 + 16 and report.visual_tokens[1] == 5 * 16 + 16
    assert report.visual_tokens[0] < report.placeholders[0] * 0.35
    assert lengths[0] == 2 + max(report.visual_tokens[0] + 3, report.visual_tokens[1] + 2) and lengths[1:] == [1] * 5
    # roles in the packed order: -1 exactly at the 16 kept newlines, a role per kept patch token
    assert all(torch.equal(kept, roles != 0) for kept, roles in zip(report.kept, report.roles))
    assert int((report.roles[1] == -1).sum()) == 16 and int((report.roles[1] > 0).sum()) == 5 * 16
    # per crop, on its own 8x8 grid: the same roles as the packed positions of its tokens
    assert [tuple(c.shape) for c in report.crop_roles] == [(5, 64), (5, 64)]
    assert all(int((crops > 0).sum()) == int((roles > 0).sum()) for crops, roles in zip(report.crop_roles,
                                                                                         report.roles))
    assert (report.crop_roles[1] > 0).sum(dim=1).tolist() == [16] * 5  # the 64x64 image: 16 of 64 in every crop
    for crops, roles in zip(report.crop_roles, report.roles):
        assert [int((crops == r).sum()) for r in (1, 2, 3)] == [int((roles == r).sum()) for r in (1, 2, 3)]
    tokenprune.remove(model)
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, **GREEDY), expected)
    with pytest.raises(TypeError, match="only LLaVA-1.5"):
        tokenprune.apply(model, "tome", keep=0.5)


# ------------------------------------------------------------------ FLOPs

def test_llava_flops_formula_matches_a_counted_prefill():
    from torch.utils.flop_counter import FlopCounterMode

    from tokenprune.flops import llava_prefill_flops

    model = tiny_llava()
    ids = torch.tensor([[5, 6] + [LLAVA_IMAGE] * 64 + [7, 10, 11, 12]])
    pixels = torch.randn(1, 3, 32, 32)
    for keep, visual in ((1.0, 64), (0.25, 16)):
        if keep < 1:
            tokenprune.apply(model, "hiprune", keep=keep, object_layer=2)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(input_ids=ids, pixel_values=pixels, logits_to_keep=1)
        expected = llava_prefill_flops(model.config, visual_tokens=visual, text_tokens=6)["total"]
        counted = counter.get_total_flops()
        if keep == 1.0:
            assert counted == expected
        else:  # plus HiPrune's scores: q k^T at its two layers (65 x 65 per head)
            assert counted == expected + 2 * (2 * 65 * 65 * 32)


def test_generate_without_cache_with_beams_and_sampling():
    model, inputs = tiny_llava(), llava_batch()
    tokenprune.apply(model, "hiprune", keep=0.25, object_layer=2)
    with torch.no_grad():
        cached = model.generate(**inputs, **GREEDY)
        assert torch.equal(model.generate(**inputs, **GREEDY, use_cache=False), cached)
        _, lengths = language_model_inputs(model, lambda: model.generate(**inputs, **GREEDY, num_beams=2))
        assert tokenprune.last_forward(model).visual_tokens == [16, 16, 32, 32]  # each sample, once per beam
        sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    assert sampled.shape[0] == 4 and lengths[1:] == [1] * 5


def test_jit_trace_of_a_patched_vlm_is_refused_with_a_pointer_to_compile():
    model, inputs = tiny_llava(), llava_batch()
    tokenprune.apply(model, "hiprune", keep=0.25, object_layer=2)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"torch\.jit\.trace is not supported.*torch\.compile"):
        torch.jit.trace(model, example_kwarg_inputs=inputs, strict=False)


def test_qwen_forward_with_an_image_and_a_video():
    """A direct forward with pixel_values and pixel_values_videos (a prompt with an image and a video): the
    adapter encodes the images itself, and Qwen refuses pixel values next to encoder outputs, so the video had
    to be encoded there too (keep=1.0 raised Qwen's error where the stock model ran). The video's tokens
    are not pruned (images only): keep=0.5 halves the image's tokens and keeps the video's."""
    model = tiny_qwen()
    video = 93
    model.config.video_token_id = model.model.config.video_token_id = video
    ids = torch.tensor([[5, 91] + [QWEN_IMAGE] * 16 + [92, 91] + [video] * 32 + [92, 10, 11]])
    kinds = (ids == QWEN_IMAGE).int() + 2 * (ids == video).int()
    gen = torch.Generator().manual_seed(2)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(64, 96, generator=gen),
                  image_grid_thw=torch.tensor([[1, 8, 8]]), pixel_values_videos=torch.randn(128, 96, generator=gen),
                  video_grid_thw=torch.tensor([[2, 8, 8]]), mm_token_type_ids=kinds)
    with torch.no_grad():
        expected = model(**inputs).logits
        tokenprune.apply(model, "hiprune", keep=1.0, object_layer=2)
        assert torch.equal(model(**inputs).logits, expected)
        tokenprune.apply(model, "hiprune", keep=0.5, object_layer=2)
        _, lengths = language_model_inputs(model, lambda: model(**inputs))
    assert tokenprune.last_forward(model).visual_tokens == [8]
    assert lengths == [ids.shape[1] - 8]
