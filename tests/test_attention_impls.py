"""Every attention implementation (issue 16, part 2): a transformers model configured with
``flash_attention_2``, ``flex_attention`` or ``sdpa`` takes every method, or is refused with a message
naming what to change.

Flash attention cannot run here (no CUDA, no ``flash_attn``), so a stand-in is registered under its
name with ``AttentionInterface``. It behaves as the real one does where it matters: it loads nothing
unless ``module.config._attn_implementation`` names a flash attention (the real one loads its kernels
by that name), it refuses any mask but a 2-D padding mask (it has no float bias), and with
``cu_seq_lens_q`` it attends within each packed sequence. Flex attention is the real one (it compiles
on CPU). The global registries are restored after each test.
"""
from __future__ import annotations

import pytest
import torch
from conftest import images
from test_hf_patch import tiny_hf
from test_vlm import GREEDY, llava_batch, qwen_batch, tiny_llava, tiny_qwen, tiny_qwen2
from tokenprune.patches.hf_attention import ScoreRequest
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.utils.generic import is_flash_attention_requested

import tokenprune

FLASH, FLEX = "flash_attention_2", "flex_attention"
ENCODER_METHODS = ["tome", "mctf", "zero-tprune", "random"]


class FlashStandIn:
    """Registered as ``flash_attention_2``; records each call's sequence length and whether it was packed."""

    def __init__(self):
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                 cu_seq_lens_k=None, max_length_q=None, max_length_k=None, is_causal=None, **kwargs):
        name = module.config._attn_implementation
        if name != FLASH:  # transformers' flash_attention_forward loads its kernels by this name
            raise RuntimeError(f"flash attention loads its kernels by config._attn_implementation, here {name!r}")
        if attention_mask is not None and not (attention_mask.dim() == 2 and not attention_mask.is_floating_point()):
            raise ValueError(f"flash attention takes a 2-D padding mask at most, got {tuple(attention_mask.shape)}")
        assert attention_mask is None, "the vision towers here pass no padding mask"
        self.calls.append((query.shape[-2], cu_seq_lens_q is not None))
        attend = torch.nn.functional.scaled_dot_product_attention
        if cu_seq_lens_q is None:
            out = attend(query, key, value, scale=scaling)
        else:
            assert max_length_q is not None and torch.equal(cu_seq_lens_q, cu_seq_lens_k)
            edges = cu_seq_lens_q.tolist()
            out = torch.cat([attend(query[..., s:e, :], key[..., s:e, :], value[..., s:e, :], scale=scaling)
                             for s, e in zip(edges[:-1], edges[1:])], dim=-2)
        return out.transpose(1, 2).contiguous(), None


class FlexRecorder:
    """The real flex attention, registered under its own name, recording the mask type of each call."""

    def __init__(self):
        from transformers.integrations.flex_attention import flex_attention_forward

        self.flex, self.masks = flex_attention_forward, []

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.masks.append(type(attention_mask).__name__)
        return self.flex(module, query, key, value, attention_mask, **kwargs)


@pytest.fixture
def flash():
    """The flash stand-in and a recording flex under the real names (``flash.flex``), and both global
    registries as they were afterwards."""
    saved = dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)
    stand_in = FlashStandIn()
    stand_in.flex = FlexRecorder()
    AttentionInterface.register(FLASH, stand_in)
    AttentionInterface.register(FLEX, stand_in.flex)
    yield stand_in
    for registry, entries in zip((AttentionInterface, AttentionMaskInterface), saved):
        registry._global_mapping.clear()
        registry._global_mapping.update(entries)


def run(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def configured(implementation: str, family: str = "vit"):
    model = tiny_hf(family)
    model.config._attn_implementation = implementation  # as from_pretrained(attn_implementation=...) leaves it
    return model


def options(method: str) -> dict:
    return {"seed": 3} if method == "random" else {}


# ------------------------------------------------------------------ encoder methods

@pytest.mark.parametrize("implementation", [FLASH, FLEX])
@pytest.mark.parametrize("method", ENCODER_METHODS)
def test_keep_one_is_the_stock_model_under_flash_and_flex(flash, implementation, method):
    model, x = configured(implementation), images()
    expected = run(model, x)
    tokenprune.apply(model, method, keep=1.0, **options(method))
    flash.flex.masks.clear()
    assert torch.equal(run(model, x), expected)
    if implementation == FLEX:  # the stock calls: with the model's own (full) BlockMask
        assert flash.flex.masks == ["BlockMask"] * 4
    tokenprune.remove(model)
    assert model.config._attn_implementation == implementation
    assert torch.equal(run(model, x), expected)


# keep 0.25: every layer of the 4 reduces (MCTF: layers 1-3, each attending through its own scores); the
# explicit schedules leave layers that reduce nothing after a merge: the stock layer, with the bias
CASES = [(method, dict(keep=0.25, **options(method))) for method in ENCODER_METHODS] + [
    ("tome", dict(r=[16, 0, 8, 0])), ("mctf", dict(layers=[1], keep=0.6))]
CASE_IDS = [f"{method}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for method, kw in CASES]


@pytest.mark.parametrize("family", ["vit", "clip", "dinov2"])
@pytest.mark.parametrize(("method", "plan"), CASES, ids=CASE_IDS)
def test_flash_runs_every_encoder_method_as_sdpa_does(flash, family, method, plan):
    """The log-size bias is never dropped: a layer that has one runs SDPA with it, and the output is the
    SDPA model's; layers without one run flash attention."""
    x = images()
    reference = tiny_hf(family)
    tokenprune.apply(reference, method, **plan)
    model = configured(FLASH, family)
    tokenprune.apply(model, method, **plan)
    torch.testing.assert_close(run(model, x), run(reference, x), atol=1e-5, rtol=1e-5)
    assert tokenprune.last_forward(model).token_counts == tokenprune.last_forward(reference).token_counts
    if method in ("tome", "mctf"):  # a bias from the second layer on: flash only ran the first
        assert len(flash.calls) == 1
    if method == "random":  # no bias ever: flash ran every layer
        assert len(flash.calls) == 4


@pytest.mark.parametrize("method", ["tome", "mctf"])
def test_the_bias_matters_here_and_flash_keeps_it_or_drops_it_as_asked(flash, method):
    """The comparison above can see a dropped bias: without proportional attention the output moves;
    with ``prop_attn=False`` flash runs every layer it attends in."""
    x = images()
    with_bias, without = configured(FLASH), configured(FLASH)
    tokenprune.apply(with_bias, method, keep=0.25)
    tokenprune.apply(without, method, keep=0.25, prop_attn=False)
    assert (run(with_bias, x) - run(without, x)).abs().max() > 1e-3
    reference = tiny_hf("vit")
    tokenprune.apply(reference, method, keep=0.25, prop_attn=False)
    flash.calls.clear()
    torch.testing.assert_close(run(without, x), run(reference, x), atol=1e-5, rtol=1e-5)
    assert len(flash.calls) == (4 if method == "tome" else 1)  # MCTF's merging layers reuse their own scores


@pytest.mark.parametrize(("method", "plan"), CASES, ids=CASE_IDS)
def test_flex_runs_every_encoder_method_as_sdpa_does(method, plan):
    """Flex attention takes the bias as a score modification (the real flex attention, compiled on CPU)."""
    x = images()
    reference, model = tiny_hf("vit"), configured(FLEX)
    for m in (reference, model):
        tokenprune.apply(m, method, **plan)
    torch.testing.assert_close(run(model, x), run(reference, x), atol=1e-5, rtol=1e-5)


def test_flex_key_bias_equals_sdpa_with_the_bias():
    from tokenprune.patches.hf_attention import flex_key_bias_attention

    q, k, v = torch.randn(3, 2, 3, 21, 8).unbind(0)
    bias = torch.rand(2, 1, 1, 21).log()
    out, _ = flex_key_bias_attention(torch.nn.Module().eval(), q, k, v, bias, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_an_implementation_that_cannot_take_the_bias_is_refused_naming_what_to_change(flash):
    AttentionInterface.register("my_attention", AttentionInterface._global_mapping["sdpa"])
    model, x = configured("my_attention"), images()
    for method in ("tome", "mctf"):
        with pytest.raises(TypeError, match=r"'my_attention'.*set_attn_implementation\('sdpa'\).*prop_attn=False"):
            tokenprune.apply(model, method, keep=0.5)
        assert not tokenprune.is_patched(model)
    reference = tiny_hf("vit")
    for method, extra in [("tome", {"prop_attn": False}), ("random", {"seed": 3}), ("zero-tprune", {})]:
        for m in (model, reference):
            tokenprune.apply(m, method, keep=0.25, **extra)
        torch.testing.assert_close(run(model, x), run(reference, x), atol=1e-5, rtol=1e-5)


def test_an_unregistered_implementation_is_refused():
    model = configured("no_such_attention")
    with pytest.raises(TypeError, match=r"'no_such_attention' is not registered.*set_attn_implementation\('sdpa'\)"):
        tokenprune.apply(model, "random", keep=0.5)
    assert not tokenprune.is_patched(model)


def test_tome_on_llava_tower_under_flash(flash):
    inputs = llava_batch()
    reference, model = tiny_llava(), tiny_llava()
    model.model.vision_tower.config._attn_implementation = FLASH
    for m in (reference, model):
        tokenprune.apply(m, "tome", keep=0.25)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=1e-5)
    assert flash.calls


# ------------------------------------------------------------------ HiPrune: scores from q and k, not the outputs

def _tower_config(model):
    return (model.model.visual if hasattr(model.model, "visual") else model.model.vision_tower).config


def _scores(model, inputs, layers):
    """The attention received at ``layers``, as the patched tower's scoring records it."""
    request = ScoreRequest(layers=frozenset(layers))
    kw = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    with torch.no_grad():
        type(model.model).get_image_features(model.model, **kw, tokenprune_scores=request)
    return [request.collect(layer) for layer in layers]


@pytest.mark.parametrize("build,batch", [(tiny_llava, llava_batch), (tiny_qwen, qwen_batch), (tiny_qwen2, qwen_batch)])
@pytest.mark.parametrize("implementation", [FLASH, FLEX])
def test_hiprune_under_flash_and_flex_chooses_as_sdpa_does(flash, build, batch, implementation):
    inputs = batch()
    reference, model = build(), build()
    _tower_config(model)._attn_implementation = implementation
    with torch.no_grad():
        expected = model.generate(**inputs, **GREEDY)
        tokenprune.apply(model, "hiprune", keep=1.0, object_layer=2)
        assert torch.equal(model.generate(**inputs, **GREEDY), expected)
    for m in (reference, model):
        tokenprune.apply(m, "hiprune", keep=0.25, object_layer=2)
    # scores at every layer: Qwen2.5-VL's layers 0 and 2 attend per window, 1 and 3 per image
    for got, want in zip(_scores(model, inputs, range(4)), _scores(reference, inputs, range(4))):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        out, ref = model(**inputs).logits, reference(**inputs).logits
    ours, theirs = tokenprune.last_forward(model), tokenprune.last_forward(reference)
    assert all(torch.equal(a, b) for a, b in zip(ours.roles, theirs.roles))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if implementation == FLASH and build is not tiny_llava:  # packed windows / images, as the stock tower runs flash
        assert flash.calls and all(packed for _, packed in flash.calls)
    tokenprune.remove(model)
    assert _tower_config(model)._attn_implementation == implementation
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, **GREEDY), expected)


def test_qwen_flash_scores_are_per_window(flash):
    """Under flash attention the Qwen2.5-VL tower packs its windows into one sequence: the scores are
    per window (a window's tokens receive a window's worth of attention), not over the whole sequence."""
    inputs = qwen_batch()
    model = tiny_qwen()
    _tower_config(model)._attn_implementation = FLASH
    tokenprune.apply(model, "hiprune", keep=0.25, object_layer=2)
    windowed, full = _scores(model, inputs, [0, 1])
    # per packed sequence the scores are a mean over its queries of softmax rows: they sum to 1 per sequence
    assert full.sum().item() == pytest.approx(len(inputs["image_grid_thw"]), rel=1e-5)
    assert windowed.sum().item() > full.sum().item() + 1  # one per window, and there are more windows than images


def test_routing_keeps_the_implementation_name_for_the_model_to_branch_on(flash):
    model = tiny_qwen()
    config = _tower_config(model)
    config._attn_implementation = FLASH
    tokenprune.apply(model, "hiprune", keep=0.5, object_layer=2)
    routed = _tower_config(model)  # the tower's own copy: the user's config object is shared with other models
    assert routed is not config and config._attn_implementation == FLASH
    assert is_flash_attention_requested(routed) and routed._attn_implementation.startswith("tokenprune:")
    tokenprune.apply(model, "hiprune", keep=0.25, object_layer=2)  # re-applying sees the user's implementation
    assert is_flash_attention_requested(_tower_config(model))
    tokenprune.remove(model)
    assert _tower_config(model) is config and config._attn_implementation == FLASH
