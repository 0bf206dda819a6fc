"""The vLLM plugin on a tiny random Qwen2.5-VL (``check.save_random_qwen``: 4 vision blocks, whole-image
attention in the 2nd and 4th, windows elsewhere; images of three sizes, so the token grids differ), against
tokenprune's transformers adapter on the same weights: the budget per image, the kept indices, and the greedy
tokens with their log-probabilities, which move when a kept token's M-RoPE position is wrong."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from stock_vllm import stock_vllm  # noqa: E402

from tokenprune.vllm import check  # noqa: E402

PROMPTS = 5  # the last holds two images of different sizes
SETTINGS = {"method": "hiprune", "keep": 1 / 3, "object_layer": 2}  # layer 2: a whole-image block


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return check.save_random_qwen(tmp_path_factory.mktemp("qwen") / "model")


@pytest.fixture(scope="module")
def prompts(model):
    from transformers import AutoProcessor

    return check.testbed_prompts(AutoProcessor.from_pretrained(model), PROMPTS, check.QWEN_IMAGE_SIZES,
                                 two_images=True)


def test_hiprune_in_vllm_keeps_the_budget_and_the_original_positions(model, prompts):
    """Token grids of 7x7, 10x6 and 8x12 keep 16, 20 and 32 tokens; the two-image prompt 20 + 32. The kept
    indices are the adapter's, and so are the greedy tokens and their log-probabilities, which differ by 1e-3
    and more when the kept tokens' (row, column) offsets are not added (measured)."""
    result = check.compare(model, SETTINGS, prompts, max_new_tokens=8)
    assert result.budget == [16, 20, 32, 16, 52]
    assert result.visual_tokens == result.budget
    assert all(result.kept_equal) and len(result.kept_equal) == PROMPTS
    assert all(result.tokens_equal) and len(result.tokens_equal) == PROMPTS
    assert max(result.logprob_gap) <= check.LOGPROB_TOLERANCE and result.ok


def test_a_windowed_output_layer_is_scored_per_window_as_in_transformers(tmp_path):
    """A tower whose last block (HiPrune's output layer) attends within windows: the adapter scores it per window,
    as the block attends; so does the plugin (scored per image, it kept other tokens than the adapter)."""
    import json

    from transformers import AutoProcessor

    folder = check.save_random_qwen(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["fullatt_block_indexes"] = [1]  # the object layer (2) whole-image, the output layer not
    (folder / "config.json").write_text(json.dumps(config))
    prompts = check.testbed_prompts(AutoProcessor.from_pretrained(folder), 3, check.QWEN_IMAGE_SIZES)
    result = check.compare(folder, SETTINGS, prompts, max_new_tokens=2)
    assert result.visual_tokens == result.budget == [16, 20, 32]
    assert result.kept_equal == [True] * 3 and result.ok


def test_without_settings_or_at_keep_one_vllm_answers_as_its_own_model(model, prompts):
    stock_tokens, stock_visual, stock_logprobs = stock_vllm(model, prompts, 6)
    assert stock_visual == [49, 60, 96, 49, 156]
    for settings in (None, {**SETTINGS, "keep": 1.0}):
        llm = check.engine(model, settings)
        tokens, visual, logprobs = check.greedy(llm, prompts, 6)
        assert visual == stock_visual and tokens == stock_tokens, settings
        assert max(abs(a - b) for x, y in zip(logprobs, stock_logprobs) for a, b in zip(x, y)) <= 1e-5, settings
    assert llm.apply_model(unapplied_offsets_raise) == ["positions were never applied"]


def unapplied_offsets_raise(model) -> str:
    """In vLLM's worker: two embedding steps without a forward between them (a replayed CUDA graph would skip
    the Python forward that adds the offsets) raise instead of shifting the next step's positions."""
    import torch

    ids = torch.zeros(3, dtype=torch.long)
    mask = torch.tensor([False, True, True])
    features = torch.zeros(2, model.config.text_config.hidden_size + 2)
    model.embed_input_ids(ids, [features], is_multimodal=mask)
    try:
        model.embed_input_ids(ids, [features], is_multimodal=mask)
    except RuntimeError as error:
        return "positions were never applied" if "never applied" in str(error) else str(error)
    finally:
        model._tokenprune_offsets = None
    return "no error"


def test_what_cannot_be_served_right_is_refused():
    from tokenprune.vllm.qwen import refuse_unservable

    def config(tp=1, pp=1, encoder_tp="weights", video_pruning=False, compile_encoder=False, encoder_graphs=False,
               speculative=None, graphs="PIECEWISE"):
        return SimpleNamespace(
            parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
            model_config=SimpleNamespace(multimodal_config=SimpleNamespace(
                mm_encoder_tp_mode=encoder_tp, is_multimodal_pruning_enabled=lambda: video_pruning)),
            compilation_config=SimpleNamespace(compile_mm_encoder=compile_encoder,
                                               cudagraph_mm_encoder=encoder_graphs,
                                               cudagraph_mode=SimpleNamespace(name=graphs)),
            speculative_config=speculative)

    refuse_unservable(config())
    refuse_unservable(config(graphs="FULL_AND_PIECEWISE"))
    for bad, message in [(dict(tp=2), "tensor_parallel_size=1"), (dict(pp=2), "pipeline_parallel_size=1"),
                         (dict(encoder_tp="data"), "unsharded"), (dict(video_pruning=True), "video pruning"),
                         (dict(compile_encoder=True), "compiled or CUDA-graph encoder"),
                         (dict(encoder_graphs=True), "compiled or CUDA-graph encoder"),
                         (dict(speculative=object()), "speculative"), (dict(graphs="FULL"), "FULL CUDA graph")]:
        with pytest.raises(ValueError, match=message):
            refuse_unservable(config(**bad))


def test_offsets_that_a_dtype_cannot_hold_exactly_are_refused():
    import torch

    from tokenprune.vllm.qwen import _with_offsets

    rows = torch.tensor([0, 255, 256])
    out = _with_offsets(torch.zeros(3, 4, dtype=torch.bfloat16), rows, rows)
    assert out[:, -2:].long().tolist() == [[0, 0], [255, 255], [256, 256]]
    with pytest.raises(ValueError, match="not exact in torch.bfloat16"):
        _with_offsets(torch.zeros(1, 4, dtype=torch.bfloat16), torch.tensor([257]), torch.tensor([0]))


@functools.cache
def _tiny_qwen():
    from tokenprune.vlm_testbed import WORDS, random_qwen25vl

    return random_qwen25vl(WORDS)[0]


def _full_positions(items: list[tuple[int, int, int]], texts: list[int], seconds: float):
    """transformers' M-RoPE positions ``(3, L)`` of an unpruned prompt: ``texts[i]`` text tokens, then item i
    (``(frames, rows, cols)``: an image where frames is 1, else a video of ``seconds`` per frame pair), ...,
    then ``texts[-1]`` text tokens; and the prompt's token ids."""
    import torch

    config = _tiny_qwen().config
    ids, types = [], []
    for text, (frames, rows, cols) in zip(texts, items):
        token, kind = (config.image_token_id, 1) if frames == 1 else (config.video_token_id, 2)
        ids += [5] * text + [token] * (frames * rows * cols)
        types += [0] * text + [kind] * (frames * rows * cols)
    ids += [5] * texts[-1]
    types += [0] * texts[-1]
    merge = config.vision_config.spatial_merge_size
    grids = [[frames, rows * merge, cols * merge] for frames, rows, cols in items]
    images, videos = [g for g in grids if g[0] == 1], [g for g in grids if g[0] > 1]
    positions, _ = _tiny_qwen().model.get_rope_index(
        torch.tensor([ids]), torch.tensor([types]), image_grid_thw=torch.tensor(images) if images else None,
        video_grid_thw=torch.tensor(videos) if videos else None,
        second_per_grid_ts=torch.tensor([seconds] * len(videos)) if videos else None)
    return positions[:, 0], torch.tensor(ids)


@pytest.mark.parametrize("seed", range(8))
def test_provisional_positions_plus_offsets_are_the_unpruned_positions(seed):
    """The two halves of Qwen's positions, composed: ``get_mrope_input_positions`` on the pruned prompt, plus
    each kept token's (row, column), equal transformers' positions of the unpruned prompt at the kept tokens;
    the decode position after the prompt is the unpruned one. Images of random grids keep random subsets (a
    precomputed-embedding image keeps all, at stock positions), a video keeps its stock time-scaled positions,
    and the prompt may end on an image."""
    import torch
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    from tokenprune.vllm.qwen import TokenpruneQwen25VL

    gen = torch.Generator().manual_seed(seed)
    config = _tiny_qwen().config

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    # odd seeds: one of the items is a video of two frame pairs (never pruned: stock positions, time-scaled)
    items = [(1, draw(1, 6), draw(1, 6)) for _ in range(draw(1, 3))]
    if seed % 2:
        items.insert(draw(0, len(items)), (2, draw(1, 4), draw(1, 4)))
    # at least one token before each item (its vision-start marker, in real prompts); odd seeds end on text
    texts = [draw(1, 4) for _ in items] + [draw(1, 3) * (seed % 2)]
    selected = [frames == 1 and draw(0, 3) > 0 for frames, _, _ in items]  # else every token, no offsets
    kept = [torch.randperm(r * c, generator=gen)[:draw(1, r * c)].sort().values if s else torch.arange(f * r * c)
            for (f, r, c), s in zip(items, selected)]
    seconds = 1.5
    full, ids = _full_positions(items, texts, seconds)

    features, stock_features, keep_sequence, offsets, start, full_start = [], [], [], [], 0, 0
    for text, (frames, rows, cols), keep, s in zip(texts, items, kept, selected):
        keep_sequence += list(range(full_start, full_start + text)) + [full_start + text + int(i) for i in keep]
        grid = SimpleNamespace(data=torch.tensor([frames, 2 * rows, 2 * cols]))
        if frames > 1:
            modality, data = "video", {"pixel_values_videos": None, "video_grid_thw": grid,
                                       "second_per_grid_ts": SimpleNamespace(data=torch.tensor(seconds))}
        else:
            modality, data = "image", ({"pixel_values": None, "image_grid_thw": grid} if s else
                                       {"image_embeds": None, "image_grid_thw": grid})
        features.append(SimpleNamespace(modality=modality, data=data,
                                        mm_position=SimpleNamespace(offset=start + text, length=len(keep))))
        stock_features.append(SimpleNamespace(modality=modality, data=data, mm_position=SimpleNamespace(
            offset=full_start + text, length=frames * rows * cols)))
        offsets.append(torch.stack([keep // cols, keep % cols]) if s else torch.zeros(2, len(keep), dtype=torch.long))
        start, full_start = start + text + len(keep), full_start + text + frames * rows * cols
    keep_sequence += list(range(full_start, full_start + texts[-1]))
    model = SimpleNamespace(tokenprune_selector=object(), config=config)
    model.iter_mm_grid_thw = functools.partial(Qwen2_5_VLForConditionalGeneration.iter_mm_grid_thw, model)
    pruned = [int(t) for t in ids[keep_sequence]]
    positions, delta = TokenpruneQwen25VL.get_mrope_input_positions(model, pruned, features)
    for feature, offset in zip(features, offsets):
        rows = slice(feature.mm_position.offset, feature.mm_position.offset + feature.mm_position.length)
        positions[1:, rows] += offset
    # vLLM's own positions of the unpruned prompt: transformers' for images; after a video vLLM starts the text
    # past the video's time-scaled frames, transformers 5.19 at max(rows, columns) (stock vLLM, left as it is)
    stock, stock_delta = Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions(model, ids.tolist(),
                                                                                     stock_features)
    assert torch.equal(stock, full) or seed % 2
    assert torch.equal(positions, stock[:, keep_sequence])
    assert len(pruned) + delta == len(ids) + stock_delta


def test_a_selection_of_another_size_than_the_placeholders_is_refused():
    """vLLM would cut or misplace the rows of an image whose selection does not match its placeholder count."""
    import torch

    from tokenprune.vllm.selection import select_exactly, selector_for

    selector = selector_for({"keep": 0.5})
    scores = (torch.rand(16), torch.rand(16))
    assert len(select_exactly(selector, scores, (4, 4), 16)) == 8
    selector.select = lambda scores, grid: torch.arange(9)
    with pytest.raises(RuntimeError, match="9 features selected for 8 placeholders"):
        select_exactly(selector, scores, (4, 4), 16)
