"""A pruned VLM under ``generate``: every decoding mode at keep=1.0, beams over several images per prompt,
the two position schemes against their own references, and HiPrune's options through the adapter."""
from __future__ import annotations

import copy

import pytest
import torch
from test_vlm import (
    LLAVA_IMAGE,
    QWEN_GRIDS,
    QWEN_IMAGE,
    left_padded,
    llava_batch,
    qwen_batch,
    qwen_scores_by_hand,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen,
    tiny_qwen2,
)

import tokenprune
from tokenprune.methods.hiprune import hiprune_select

NEW = 5  # new tokens per generate call


# ------------------------------------------------------------------ inputs with several images per prompt

def llava_prompt(images: int, text: int, first: int = 5) -> list[int]:
    ids = [first, 6]
    for i in range(images):
        ids += [LLAVA_IMAGE] * 64 + [7 + i]
    return ids + list(range(10, 10 + text))


def llava_two_images():
    """One prompt, two images."""
    ids = torch.tensor([llava_prompt(2, 3)])
    return dict(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)))


def llava_two_by_two():
    """A left-padded batch of two prompts with two images each."""
    ids, mask = left_padded([llava_prompt(2, 3), llava_prompt(2, 1, first=4)])
    return dict(input_ids=ids, attention_mask=mask,
                pixel_values=torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4)))


def qwen_prompt(grids, text: int) -> list[int]:
    ids = [5]
    for t, h, w in grids:
        ids += [91] + [QWEN_IMAGE] * (t * h * w // 4) + [92]
    return ids + list(range(10, 10 + text))


def qwen_two_images():
    """A left-padded batch: both images in the first prompt, the second image alone in the second."""
    grids = [QWEN_GRIDS[0], QWEN_GRIDS[1], QWEN_GRIDS[1]]
    ids, mask = left_padded([qwen_prompt(grids[:2], 2), qwen_prompt(grids[2:], 4)])
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(5))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=torch.tensor(grids),
                mm_token_type_ids=(ids == QWEN_IMAGE).int())


def llava_next_two_images():
    """LLaVA-NeXT, one prompt holding both of the test's images (an unpadded one and a square one)."""
    model, inputs = tiny_llava_next()
    placeholders = (inputs["input_ids"] == LLAVA_IMAGE).sum(dim=1).tolist()
    ids = torch.tensor([[5] + [LLAVA_IMAGE] * placeholders[0] + [7] + [LLAVA_IMAGE] * placeholders[1] + [8, 10]])
    return model, dict(input_ids=ids, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])


CASES = {
    "llava-two-images": lambda: (tiny_llava(), llava_two_images()),
    "llava-batch": lambda: (tiny_llava(), llava_batch()),
    "llava-two-by-two": lambda: (tiny_llava(), llava_two_by_two()),
    "llava-next-batch": tiny_llava_next,
    "llava-next-two-images": llava_next_two_images,
    "qwen2.5-batch": lambda: (tiny_qwen(), qwen_batch()),
    "qwen2.5-two-images": lambda: (tiny_qwen(), qwen_two_images()),
    "qwen2-batch": lambda: (tiny_qwen2(), qwen_batch()),
}

MODES = {
    "greedy": dict(do_sample=False),
    "greedy-no-cache": dict(do_sample=False, use_cache=False),
    "sampling": dict(do_sample=True, num_return_sequences=2),
    "beams": dict(num_beams=3, num_return_sequences=2),
    "beams-no-cache": dict(num_beams=2, use_cache=False),
    "beam-sampling": dict(num_beams=2, do_sample=True),
}


def generate(model, inputs, **mode):
    torch.manual_seed(0)  # sampling modes draw the same numbers in both runs
    # a random model may pick an image placeholder, which a cache-less step would then count as an image
    suppress = [LLAVA_IMAGE, QWEN_IMAGE, 91, 92]
    with torch.no_grad():
        return model.generate(**inputs, **mode, max_new_tokens=NEW, suppress_tokens=suppress,
                              return_dict_in_generate=True, output_logits=True, output_scores=True)


# ------------------------------------------------------------------ keep=1.0 is the stock model, in every mode

# LLaVA-NeXT's prompts are long (1,100 placeholders) and Qwen2-VL shares Qwen2.5-VL's path: the modes that expand
# the batch are enough there
SHORT_MODES = ("sampling", "beams")


@pytest.mark.parametrize("case,mode", [(case, mode) for case in CASES for mode in MODES
                                       if mode in SHORT_MODES or not case.startswith(("llava-next", "qwen2-"))])
def test_keep_one_equals_the_stock_model_in_every_generate_mode(case, mode):
    model, inputs = CASES[case]()
    expected = generate(model, inputs, **MODES[mode])
    tokenprune.apply(model, "hiprune", keep=1.0, object_layer=2)
    got = generate(model, inputs, **MODES[mode])
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits, strict=True))


@pytest.mark.parametrize("case", ["llava-two-by-two", "llava-next-two-images", "qwen2.5-two-images"])
def test_generate_encodes_each_image_once_before_expanding_for_beams(case):
    """generate encodes the images before it repeats the batch for beams (the stock order): the vision
    tower sees each image once, never a row-by-row repeat of the pixels."""
    model, inputs = CASES[case]()
    tower = model.model.vision_tower if hasattr(model.model, "vision_tower") else model.model.visual
    seen = []
    tower.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["pixel_values"]).shape[0]),
                                    with_kwargs=True)
    tokenprune.apply(model, "hiprune", keep=0.25, object_layer=2)
    generate(model, inputs, num_beams=3, num_return_sequences=2)
    pixels = inputs["pixel_values"]
    assert seen == [pixels.shape[0] * pixels.shape[1] if pixels.dim() == 5 else pixels.shape[0]]


# ------------------------------------------------------------------ pruned beams: per-sample references

def compactions(model, run):
    """The keep masks (B, L) the adapter hands to the language model at each prefill while ``run()`` runs."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["tokenprune_compaction"].keep.clone()) if "tokenprune_compaction" in kw
        else None, with_kwargs=True, prepend=True)  # before the adapter's hook consumes it
    try:
        run()
    finally:
        handle.remove()
    return seen


def llava_choice(model, pixels, k, object_layer=2, alpha=0.1, wrap=False) -> list[torch.Tensor]:
    """HiPrune by hand on an unpatched LLaVA: per image, the kept feature indices, from eager attention maps."""
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = tower(pixels, output_attentions=True).attentions
    finally:
        tower.set_attn_implementation("sdpa")
    received = [a.mean(dim=(1, 2))[:, 1:] for a in attentions]  # drop the class token's column
    return [hiprune_select(received[object_layer - 1][i], received[2][i], (8, 8), k, alpha, wrap)  # output: 3rd
            for i in range(pixels.shape[0])]


def kept_sequence(stock, ids, features, chosen, image_token):
    """One sample's full embeddings (placeholders filled with its images' features) and which positions
    survive: text, and per image the ``chosen`` features."""
    embeds = stock.get_input_embeddings()(ids).clone()
    at = (ids == image_token).nonzero().squeeze(1)
    embeds[at] = torch.cat(list(features))
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[at] = False
    offset = 0
    for feats, idx in zip(features, chosen):
        keep[at[offset + idx]] = True
        offset += feats.shape[0]
    return embeds, keep


def images_of(row: int, per_row: list[int]) -> slice:
    """Which images (rows of pixel_values) belong to prompt ``row``."""
    start = sum(per_row[:row])
    return slice(start, start + per_row[row])


BEAMS = dict(num_beams=3, num_return_sequences=2)


def assert_beams_equal(got, reference, row: int):
    n = BEAMS["num_return_sequences"]
    prompt = got.sequences.shape[1] - len(got.logits)
    assert torch.equal(got.sequences[row * n:(row + 1) * n, prompt:], reference.sequences), row
    torch.testing.assert_close(got.sequences_scores[row * n:(row + 1) * n], reference.sequences_scores,
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("positions", ["reindex", "original"])
@pytest.mark.parametrize("batch,images_per_row", [(llava_two_images, [2]), (llava_batch, [1, 2]),
                                                  (llava_two_by_two, [2, 2])])
def test_llava_pruned_beams_equal_per_sample_references(batch, images_per_row, positions):
    model, inputs = tiny_llava(), batch()
    stock = copy.deepcopy(model)
    tokenprune.apply(model, "hiprune", keep=0.25, positions=positions, object_layer=2)
    got = None

    def run():
        nonlocal got
        got = generate(model, inputs, **BEAMS)

    keeps = compactions(model, run)
    with torch.no_grad():
        features = stock.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    chosen = llava_choice(stock, inputs["pixel_values"], 16)
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    for row, ids in enumerate(inputs["input_ids"]):
        real = mask[row] == 1
        images = images_of(row, images_per_row)
        embeds, keep = kept_sequence(stock, ids[real], features[images], chosen[images], LLAVA_IMAGE)
        beams = keeps[0][row * BEAMS["num_beams"]:(row + 1) * BEAMS["num_beams"], -len(keep):]
        assert all(torch.equal(b, keep) for b in beams), row  # every beam of the row: its own images' choice
        extra = {} if positions == "reindex" else dict(position_ids=keep.nonzero().T)  # original positions
        reference = generate(stock, dict(inputs_embeds=embeds[keep][None], **extra), **BEAMS)
        assert_beams_equal(got, reference, row)


def test_qwen_pruned_beams_equal_per_sample_references():
    model, inputs = tiny_qwen(), qwen_batch()
    stock = copy.deepcopy(model)
    object_scores, output_scores = qwen_scores_by_hand(stock, inputs, 1), qwen_scores_by_hand(stock, inputs, 3)
    tokenprune.apply(model, "hiprune", keep=0.34, object_layer=2)
    got = generate(model, inputs, **BEAMS)
    with torch.no_grad():
        features = stock.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    for row, (grid, feats) in enumerate(zip(QWEN_GRIDS, features)):
        grid = (grid[1] // 2, grid[2] // 2)
        idx = hiprune_select(object_scores[row], output_scores[row], grid, round(0.34 * grid[0] * grid[1]))
        ids = inputs["input_ids"][row][inputs["attention_mask"][row] == 1]
        embeds, keep = kept_sequence(stock, ids, [feats], [idx], QWEN_IMAGE)
        with torch.no_grad():  # the full prompt's M-RoPE positions; the kept tokens keep theirs
            positions = stock.model.compute_3d_position_ids(
                input_ids=ids[None], image_grid_thw=inputs["image_grid_thw"][row:row + 1], video_grid_thw=None,
                inputs_embeds=None, attention_mask=None, cache=None,
                mm_token_type_ids=(ids[None] == QWEN_IMAGE).int())
        reference = generate(stock, dict(inputs_embeds=embeds[keep][None], position_ids=positions[..., keep]),
                             **BEAMS)
        assert_beams_equal(got, reference, row)


# ------------------------------------------------------------------ position schemes, each against its own reference

def language_model_positions(model, run):
    """The position_ids each language-model call received (after the adapter's hook) while ``run()`` ran."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)  # after the adapter's hook
    try:
        out = run()
    finally:
        handle.remove()
    return out, seen


@pytest.mark.parametrize("positions", ["reindex", "original"])
def test_llava_positions_and_logits_follow_the_chosen_scheme(positions):
    """Per sample: the positions the language model receives, at prefill and at every decode step, are the
    scheme's (re-indexed: 0..K-1 then K, K+1, ...; original: the kept tokens' prompt positions, then the
    prompt's length onwards), and the logits of every step equal a stock run on the kept sequence with
    those positions. The two schemes' references differ, so a swap or a lost decode shift fails."""
    model, inputs = tiny_llava(), llava_batch()
    stock = copy.deepcopy(model)
    tokenprune.apply(model, "hiprune", keep=0.25, positions=positions, object_layer=2)
    got, seen = language_model_positions(model, lambda: generate(model, inputs, do_sample=False))
    features = stock.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    chosen = llava_choice(stock, inputs["pixel_values"], 16)
    prompt = inputs["input_ids"].shape[1]
    for row, ids in enumerate(inputs["input_ids"]):
        real = inputs["attention_mask"][row] == 1
        images = images_of(row, [1, 2])
        embeds, keep = kept_sequence(stock, ids[real], features[images], chosen[images], LLAVA_IMAGE)
        kept, length = int(keep.sum()), int(real.sum())
        own = {"reindex": torch.arange(kept + NEW - 1),
               "original": torch.cat([keep.nonzero().squeeze(1), torch.arange(length, length + NEW - 1)])}
        expected = own[positions]
        received = torch.cat([seen[0][row, -kept:]] + [step[row] for step in seen[1:]])
        assert torch.equal(received, expected), row
        references = {scheme: generate(stock, dict(inputs_embeds=embeds[keep][None], position_ids=pos[None, :kept]),
                                       do_sample=False) for scheme, pos in own.items()}
        reference = references[positions]
        assert torch.equal(got.sequences[row, prompt:], reference.sequences[0]), row
        for step, (a, b) in enumerate(zip(got.logits, reference.logits, strict=True)):
            torch.testing.assert_close(a[row], b[0], atol=1e-6, rtol=0, msg=f"row {row}, step {step}")
        other = references["original" if positions == "reindex" else "reindex"]
        assert max((a[0] - b[0]).abs().max() for a, b in zip(reference.logits[1:], other.logits[1:])) > 1e-3


# ------------------------------------------------------------------ HiPrune's options reach the selection

def adapter_choice(model, inputs, image_token=LLAVA_IMAGE, per_image=64) -> list[torch.Tensor]:
    """Per image (in prompt order), the feature indices the patched model keeps at a prefill."""
    with torch.no_grad():
        keeps = compactions(model, lambda: model(**inputs))
    chosen = []
    for ids, keep in zip(inputs["input_ids"], keeps[0]):
        at = (ids == image_token).nonzero().squeeze(1)
        chosen += [keep[image].nonzero().squeeze(1) for image in at.split(per_image)]
    return chosen


BASE = dict(alpha=1.0, object_layer=2)  # alpha=1: K/5 anchors, so the object layer and buffers matter
VARIANTS = {"base": {}, "alpha": dict(alpha=0.5), "object_layer=1": dict(object_layer=1),
            "object_layer=4": dict(object_layer=4), "wrap": dict(wrap=True)}


def test_hiprune_options_change_the_selection_as_documented():
    """Each option, through apply(), gives HiPrune-by-hand's choice with that option (anchors from the
    object layer's scores, round(alpha * K / 5) of them, buffers wrapping across rows or not), and each
    differs from the base choice, so an option the adapter dropped would fail."""
    model, inputs = tiny_llava(), llava_two_by_two()
    stock = copy.deepcopy(model)
    k = 32
    choices = {}
    for name, variant in VARIANTS.items():
        options = {**BASE, **variant}
        tokenprune.apply(model, "hiprune", keep=k / 64, **options)
        choices[name] = adapter_choice(model, inputs)
        expected = llava_choice(stock, inputs["pixel_values"], k, **options)
        assert all(torch.equal(a, b) for a, b in zip(choices[name], expected, strict=True)), name
    for name in VARIANTS:
        if name != "base":
            assert any(not torch.equal(a, b) for a, b in zip(choices[name], choices["base"])), name


def test_hiprune_tokens_overrides_keep():
    """tokens=T: T visual tokens per image whatever keep says, HiPrune's choice of T."""
    model, inputs = tiny_llava(), llava_two_by_two()
    stock = copy.deepcopy(model)
    tokenprune.apply(model, "hiprune", keep=0.5, tokens=10, **BASE)
    chosen = adapter_choice(model, inputs)
    assert tokenprune.last_forward(model).visual_tokens == [20, 20]
    expected = llava_choice(stock, inputs["pixel_values"], 10, **BASE)
    assert all(torch.equal(a, b) for a, b in zip(chosen, expected, strict=True))
    qwen, inputs = tiny_qwen(), qwen_two_images()
    tokenprune.apply(qwen, "hiprune", keep=0.9, tokens=5, object_layer=2)
    with torch.no_grad():
        qwen(**inputs)
    assert tokenprune.last_forward(qwen).visual_tokens == [10, 5]


# ------------------------------------------------------------------ a KV cache the caller holds

def caller_decode(model, prefill: dict, steps: int, with_mask: bool) -> list[torch.Tensor]:
    """A caller's own greedy loop: a prefill through ``model(...)``, then one token at a time with the
    returned cache and no position_ids (the model derives them), the 2-D mask at the uncompressed length
    (as the caller built it) or none. Returns each step's last logits."""
    with torch.no_grad():
        out = model(**prefill, use_cache=True)
        logits, cache = [out.logits[:, -1]], out.past_key_values
        mask = prefill.get("attention_mask", torch.ones_like(prefill["input_ids"]))
        for _ in range(steps - 1):
            token = logits[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            extra = dict(attention_mask=mask) if with_mask else {}
            out = model(input_ids=token, past_key_values=cache, use_cache=True, **extra)
            logits.append(out.logits[:, -1])
    return logits


@pytest.mark.parametrize("case,positions", [("llava", "original"), ("llava", "reindex"), ("qwen", "original")])
def test_a_callers_decode_loop_continues_at_the_schemes_positions(case, positions):
    """After a pruned prefill, decode steps the caller runs with the returned cache and no position_ids
    take the scheme's positions, as in generate: "original" continues at the prompt's length (LLaVA had
    restarted at the compacted length, overwriting the kept tokens' positions; Qwen's rope_deltas path
    went negative), "reindex" right after the kept tokens."""
    if case == "llava":
        model, ids = tiny_llava(), torch.tensor([llava_prompt(1, 3)])
        prefill = dict(input_ids=ids, pixel_values=llava_two_images()["pixel_values"][:1])
    else:
        model, inputs = tiny_qwen(), qwen_batch()
        real = inputs["attention_mask"][1] == 1
        ids = inputs["input_ids"][1:, real]
        prefill = dict(input_ids=ids, pixel_values=inputs["pixel_values"][96:],
                       image_grid_thw=inputs["image_grid_thw"][1:], mm_token_type_ids=(ids == QWEN_IMAGE).int())
    tokenprune.apply(model, "hiprune", keep=0.25, positions=positions, object_layer=2)
    expected = generate(model, prefill, do_sample=False).logits
    masks = [False] if case == "qwen" else [False, True]  # stock Qwen fails on a full mask without positions
    for with_mask in masks:
        got = caller_decode(model, prefill, NEW, with_mask)
        for step, (a, b) in enumerate(zip(got, expected, strict=True)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"mask={with_mask}, step {step}")



def test_generate_continuing_a_pruned_cache_is_refused():
    """generate given a cache a pruned prefill filled, with the whole conversation as input_ids (prefix
    caching, a second turn), slices input_ids at the cache's (compacted) length and so fed the language
    model L - K prompt tokens it had already seen (image placeholders included) on top of the cache. That
    step is refused, with the reason; keep=1.0 continues as the stock model does."""
    model, ids = tiny_llava(), torch.tensor([llava_prompt(1, 3)])
    pixels = llava_two_images()["pixel_values"][:1]

    def continued():
        with torch.no_grad():
            first = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False,
                                   return_dict_in_generate=True)
            more = torch.cat([first.sequences, torch.tensor([[12, 13]])], dim=1)
            return model.generate(input_ids=more, past_key_values=first.past_key_values, max_new_tokens=3,
                                  do_sample=False)

    continuing_a_pruned_cache_is_refused(model, continued)


def qwen_one_prompt():
    """Qwen2.5-VL, one unpadded prompt with both of the test's images (assisted decoding takes batch 1 only)."""
    ids = torch.tensor([qwen_prompt(QWEN_GRIDS, 2)])
    pixels = torch.randn(sum(t * h * w for t, h, w in QWEN_GRIDS), 3 * 2 * 4 * 4,
                         generator=torch.Generator().manual_seed(5))
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor(QWEN_GRIDS),
                mm_token_type_ids=(ids == QWEN_IMAGE).int())


@pytest.mark.parametrize("build,inputs", [(tiny_llava, llava_two_images), (tiny_qwen, qwen_one_prompt)])
def test_assisted_decoding_of_a_pruned_model_gives_its_greedy_output(build, inputs):
    """Prompt-lookup and assistant-model decoding verify several candidate tokens per step against the pruned
    prefill's cache (decode steps of more than one token); greedy, they must give plain greedy decoding's tokens.
    The random model repeats itself, so prompt lookup's candidates are accepted in runs."""
    model, batch = build(), inputs()
    tokenprune.apply(model, "hiprune", keep=0.5, object_layer=2)
    new = dict(max_new_tokens=12, do_sample=False, suppress_tokens=[LLAVA_IMAGE, QWEN_IMAGE, 91, 92])
    with torch.no_grad():
        greedy = model.generate(**batch, **new)
        assert torch.equal(model.generate(**batch, **new, prompt_lookup_num_tokens=3), greedy)
        assert torch.equal(model.generate(**batch, **new, assistant_model=build(seed=1)), greedy)


@pytest.mark.parametrize("case", ["llava-batch", "qwen2.5-batch", "llava-next-two-images"])
def test_labels_give_the_stock_loss_at_keep_one_and_are_refused_when_tokens_drop(case):
    """A forward with ``labels``: keep=1.0 gives the stock model's loss; a pruned prefill's logits cover the
    kept positions only, so the loss is refused with the reason instead of a cross-entropy size error."""
    model, batch = CASES[case]()
    labels = batch["input_ids"].masked_fill(torch.isin(batch["input_ids"], torch.tensor([LLAVA_IMAGE, QWEN_IMAGE])),
                                            -100)
    with torch.no_grad():
        expected = model(**batch, labels=labels).loss
        tokenprune.apply(model, "hiprune", keep=1.0, object_layer=2)
        assert torch.equal(model(**batch, labels=labels).loss, expected)
        tokenprune.apply(model, "hiprune", keep=0.5, object_layer=2)
        with pytest.raises(ValueError, match="labels= with a prefill that drops visual tokens"):
            model(**batch, labels=labels)
        assert model(**batch).loss is None  # the same model without labels runs
        tokenprune.remove(model)
        assert not model._forward_pre_hooks  # the labels' hook went with the patch
        assert torch.equal(model(**batch, labels=labels).loss, expected)


def test_a_static_cache_is_refused_by_name_and_works_at_keep_one():
    model, batch = tiny_llava(), llava_batch()
    static = dict(max_new_tokens=3, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        expected = model.generate(**batch, **static)
        tokenprune.apply(model, "hiprune", keep=1.0, object_layer=2)
        assert torch.equal(model.generate(**batch, **static), expected)
        tokenprune.apply(model, "hiprune", keep=0.5, object_layer=2)
        with pytest.raises(TypeError, match="static KV cache"):
            model.generate(**batch, **static)
        model.generate(**batch, max_new_tokens=3, do_sample=False)  # the default cache still works


def continuing_a_pruned_cache_is_refused(model, continued):
    """``continued()`` (a generate that continues a cache a first generate filled) gives the stock tokens at
    keep=1.0, and is refused once the prefill was pruned (its cache holds fewer tokens than the prompt)."""
    expected = continued()
    tokenprune.apply(model, "hiprune", keep=1.0, object_layer=2)
    assert torch.equal(continued(), expected)
    tokenprune.apply(model, "hiprune", keep=0.25, object_layer=2)
    with pytest.raises(ValueError, match="cache a pruned prefill filled"):
        continued()
