"""The vLLM plugin on a tiny random Qwen2.5-VL (``check.save_random_qwen``: 4 vision blocks, whole-image
attention in the 2nd and 4th, windows elsewhere; images of three sizes, so the token grids differ), against
tokenprune's transformers adapter on the same weights: the budget per image, the kept indices, and the greedy
tokens with their log-probabilities, which move when a kept token's M-RoPE position is wrong."""
from __future__ import annotations

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
