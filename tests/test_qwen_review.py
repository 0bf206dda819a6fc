"""Qwen2.5-VL through the VLM adapter: several images of different grids per prompt next to text-only rows,
windows that do not tile an image, per-image budgets, M-RoPE positions after a pruned prefill, a pruned
cache continued by generate, videos, dtypes and attention implementations."""
from __future__ import annotations

import pytest
import torch
from test_vlm import QWEN_IMAGE, left_padded, tiny_qwen
from test_vlm import qwen_scores_by_hand as scores_by_hand
from test_vlm_generate import continuing_a_pruned_cache_is_refused

import tokenprune
from tokenprune.methods.hiprune import hiprune_roles

START, END, VIDEO = 91, 92, 93
SUPPRESS = [QWEN_IMAGE, START, END, VIDEO]  # a random model may pick a placeholder, which a decode step cannot take
NEW = 4
#: row 0: two images (the second's 3x5 merged grid does not tile the 2x2 merged windows); row 1: text only;
#: row 2: one image whose 5x3 grid does not tile them either
ROWS = [([(1, 8, 12), (1, 6, 10)], 2), ([], 4), ([(1, 10, 6)], 3)]


def prompt(grids, text: int, first: int) -> list[int]:
    ids = [first]
    for t, h, w in grids:
        ids += [START] + [QWEN_IMAGE] * (t * h * w // 4) + [END]
    return ids + list(range(10, 10 + text))


def patches(grids, seed: int = 7) -> torch.Tensor:
    rows = sum(t * h * w for t, h, w in grids)
    return torch.randn(rows, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(seed))


def batch(rows=ROWS) -> dict:
    """The rows left-padded into one batch, images in prompt order, as Qwen's processor gives them."""
    ids, mask = left_padded([prompt(grids, text, 5 + i) for i, (grids, text) in enumerate(rows)])
    grids = [grid for row, _ in rows for grid in row]
    return dict(input_ids=ids, attention_mask=mask, pixel_values=patches(grids), image_grid_thw=torch.tensor(grids),
                mm_token_type_ids=(ids == QWEN_IMAGE).int())


def sample(row: int, rows=ROWS) -> dict:
    """Row ``row`` of ``batch(rows)`` alone, unpadded, with its own images' patches."""
    grids, text = rows[row]
    ids = torch.tensor([prompt(grids, text, 5 + row)])
    inputs = dict(input_ids=ids, mm_token_type_ids=(ids == QWEN_IMAGE).int())
    if grids:
        before = sum(t * h * w for row_grids, _ in rows[:row] for t, h, w in row_grids)
        count = sum(t * h * w for t, h, w in grids)
        every = patches([grid for row_grids, _ in rows for grid in row_grids])
        inputs.update(pixel_values=every[before:before + count], image_grid_thw=torch.tensor(grids))
    return inputs


def generate(model, inputs, **options):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, suppress_tokens=SUPPRESS,
                              return_dict_in_generate=True, output_logits=True, **options)


# ------------------------------------------------------------------ batches against single prompts

@pytest.mark.parametrize("budget", [dict(keep=0.34), dict(tokens=3), dict(tokens=15)])
def test_a_mixed_batch_equals_each_prompt_alone(budget):
    """Two images of different grids, a text-only row and a one-image row, left-padded: each row generates
    what it generates alone (the text-only row as the stock model), with each image's own budget."""
    model = tiny_qwen()
    inputs = batch()
    with torch.no_grad():
        alone_text = generate(model, sample(1))
    tokenprune.apply(model, "hiprune", object_layer=2, **budget)
    out = generate(model, inputs)
    report = tokenprune.last_forward(model)
    assert report.placeholders == [39, 0, 15]
    per_image = [min(budget.get("tokens") or round(budget.get("keep", 1) * n), n) for n in (24, 15, 15)]
    assert report.visual_tokens == [per_image[0] + per_image[1], 0, per_image[2]]
    length = inputs["input_ids"].shape[1]
    for row in range(3):
        alone = alone_text if row == 1 else generate(model, sample(row))
        assert torch.equal(out.sequences[row, length:], alone.sequences[0, -NEW:]), row
        for step, (a, b) in enumerate(zip(out.logits, alone.logits, strict=True)):
            torch.testing.assert_close(a[row], b[0], atol=1e-5, rtol=0, msg=f"row {row}, step {step}")


def test_tokens_covering_every_image_is_the_stock_model():
    """tokens= at least every image's count keeps everything: the stock model's logits, exactly."""
    model, inputs = tiny_qwen(), batch()
    expected = generate(model, inputs)
    tokenprune.apply(model, "hiprune", tokens=24, object_layer=2)
    got = generate(model, inputs)
    assert tokenprune.last_forward(model).visual_tokens == [39, 0, 15]
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits, strict=True))


def test_use_cache_off_and_a_second_call_agree_with_the_cached_run():
    model, inputs = tiny_qwen(), batch()
    tokenprune.apply(model, "hiprune", keep=0.34, object_layer=2)
    cached = generate(model, inputs)
    uncached = generate(model, inputs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    generate(model, sample(2))  # another batch between (Qwen keeps rope_deltas on the model)
    assert torch.equal(generate(model, inputs).sequences, cached.sequences)


# ------------------------------------------------------------------ HiPrune's scores through the windows


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_scores_of_images_the_windows_do_not_tile(attention):
    """HiPrune's choice per image equals hiprune_roles on the attention received, recomputed by hand from the
    vision blocks, for grids the 2x2 merged windows do not tile (3x5, 5x3, 7x3), a 2x2 image and a one-token
    image, under either implementation."""
    grids = [(1, 6, 10), (1, 10, 6), (1, 8, 12), (1, 4, 4), (1, 2, 2), (1, 14, 6)]
    rows = [(grids[:3], 2), (grids[3:], 3)]
    model, inputs = tiny_qwen(), batch(rows)
    model.set_attn_implementation(attention)
    counts = [t * h * w // 4 for t, h, w in grids]
    obj, out = scores_by_hand(model, inputs, 1, counts), scores_by_hand(model, inputs, 3, counts)
    tokenprune.apply(model, "hiprune", tokens=4, alpha=1.0, object_layer=2)
    with torch.no_grad():
        model(**inputs)
    roles = tokenprune.last_forward(model).roles
    for grid, got, o, d in zip(grids, roles, obj, out, strict=True):
        expected = hiprune_roles(o, d, (grid[1] // 2, grid[2] // 2), min(4, o.numel()), alpha=1.0)
        assert torch.equal(got, expected), grid


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_eager_and_sdpa_choose_alike(dtype):
    chosen = {}
    for attention in ("sdpa", "eager"):
        model, inputs = tiny_qwen().to(dtype), batch()
        model.set_attn_implementation(attention)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        expected = generate(model, inputs)
        tokenprune.apply(model, "hiprune", keep=1.0, object_layer=2)
        assert torch.equal(generate(model, inputs).sequences, expected.sequences)
        tokenprune.apply(model, "hiprune", keep=0.34, object_layer=2)
        out = generate(model, inputs)
        chosen[attention] = [roles.tolist() for roles in tokenprune.last_forward(model).roles], out.sequences
    assert chosen["sdpa"][0] == chosen["eager"][0]
    assert torch.equal(chosen["sdpa"][1], chosen["eager"][1])


# ------------------------------------------------------------------ positions after a pruned prefill

def test_a_callers_decode_step_continues_every_axis_after_the_prompts_largest_position():
    """A caller's decode step with no position_ids after a pruned prefill gets the position generate gives:
    every M-RoPE axis continues at the prompt's largest position + 1 (Qwen's rope delta). For a prompt ending
    in image tokens each axis had continued after its own largest position ([3, 6, 8], not [8, 8, 8])."""
    model = tiny_qwen()
    ids = torch.tensor([[5, START] + [QWEN_IMAGE] * 24])
    inputs = dict(input_ids=ids, pixel_values=patches([(1, 8, 12)]), image_grid_thw=torch.tensor([(1, 8, 12)]),
                  mm_token_type_ids=(ids == QWEN_IMAGE).int())
    seen = []
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True)

    def prefill_and_one_step():
        seen.clear()
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            model(input_ids=torch.tensor([[7]]), past_key_values=out.past_key_values, use_cache=True)
        return seen[1].flatten().tolist()

    stock = prefill_and_one_step()
    assert stock == [8, 8, 8]
    tokenprune.apply(model, "hiprune", keep=0.5, object_layer=2)
    assert prefill_and_one_step() == stock


def test_generate_continuing_a_pruned_qwen_cache_is_refused():
    """generate given a cache a pruned prefill filled (a second turn) cuts input_ids at the cache's compacted
    length and feeds cached tokens again; Qwen's continuation positions (its text positions plus the rope
    delta, one row for every axis) had passed the check, so the answer was silently wrong."""
    model, inputs = tiny_qwen(), sample(0)

    def continued():
        with torch.no_grad():
            first = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS,
                                   return_dict_in_generate=True)
            more = torch.cat([first.sequences, torch.tensor([[12, 13]])], dim=1)
            return model.generate(input_ids=more, past_key_values=first.past_key_values, max_new_tokens=3,
                                  do_sample=False, suppress_tokens=SUPPRESS)

    continuing_a_pruned_cache_is_refused(model, continued)


# ------------------------------------------------------------------ videos

def with_videos():
    """Row 0: an image then a video; row 1: a video alone (not pruned: images only)."""
    model = tiny_qwen()
    model.config.video_token_id = model.model.config.video_token_id = VIDEO
    image, videos = (1, 8, 8), [(2, 8, 8), (2, 4, 8)]
    ids, mask = left_padded([[5, START] + [QWEN_IMAGE] * 16 + [END, START] + [VIDEO] * 32 + [END, 10, 11],
                             [6, START] + [VIDEO] * 16 + [END, 10, 11, 12]])
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=patches([image]),
                       image_grid_thw=torch.tensor([image]), pixel_values_videos=patches(videos, 8),
                       video_grid_thw=torch.tensor(videos), second_per_grid_ts=torch.ones(2),
                       mm_token_type_ids=(ids == QWEN_IMAGE).int() + 2 * (ids == VIDEO).int())


def test_videos_stay_whole_next_to_pruned_images_and_a_video_alone_is_refused_when_tokens_drop():
    model, inputs = with_videos()
    expected = generate(model, inputs)
    tokenprune.apply(model, "hiprune", keep=1.0, object_layer=2)
    assert torch.equal(generate(model, inputs).sequences, expected.sequences)
    tokenprune.apply(model, "hiprune", keep=0.5, object_layer=2)
    generate(model, inputs)
    report = tokenprune.last_forward(model)
    assert report.placeholders == [16, 0] and report.visual_tokens == [8, 0]
    video_only = {key: value for key, value in inputs.items() if key not in ("pixel_values", "image_grid_thw")}
    video_only["input_ids"] = inputs["input_ids"][1:]
    for key in ("attention_mask", "mm_token_type_ids"):
        video_only[key] = inputs[key][1:]
    video_only.update(pixel_values_videos=inputs["pixel_values_videos"][128:],
                      video_grid_thw=inputs["video_grid_thw"][1:], second_per_grid_ts=torch.ones(1))
    with pytest.raises(ValueError, match="has no image"):
        generate(model, video_only)


@pytest.mark.parametrize("method", ["tome", "mctf", "random", "zero-tprune"])
def test_encoder_methods_are_refused_by_name_and_leave_the_model_stock(method):
    model = tiny_qwen()
    with pytest.raises(TypeError, match=f"encoder method '{method}' on Qwen2.5-VL: only LLaVA-1.5's"):
        tokenprune.apply(model, method, keep=0.5)
    assert not tokenprune.is_patched(model)
