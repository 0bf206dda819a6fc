"""The FLOPs budget solver: ``apply(model, method, flops=...)`` / ``gflops=...``.

On every supported family (timm and transformers encoders) and every encoder method, the chosen keep
runs within the budget and within 2% of it, counted on the real forward, and one more patch token
would break it (the largest keep that fits).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import TIMM_FAMILIES, tiny_timm
from test_hf_patch import tiny_hf

import tokenprune
from tokenprune import count_flops
from tokenprune.budget import fit_flops_budget

METHODS = ["tome", "mctf", "zero-tprune", "random"]
HF_FAMILIES = ["vit", "deit", "clip", "siglip", "dinov2", "dinov2-reg"]


def build(family: str):
    """A 16 x 16 = 256-patch tiny model: fine enough a grid that 2% of the FLOPs is several tokens."""
    if family.startswith("hf:"):
        return tiny_hf(family[3:], image_size=64)
    return tiny_timm(family, img_size=64)


def flops_with(model, method, keep) -> int:
    probe = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenprune.apply(probe, method, keep=keep)
    return count_flops(probe).flops


FAMILIES = sorted(TIMM_FAMILIES) + [f"hf:{f}" for f in HF_FAMILIES]
# Every method on one timm and one transformers family; each other family with one method, in turn.
CASES = [(f, m) for f in ("vit_base_patch16_224", "hf:clip") for m in METHODS]
CASES += [(f, METHODS[i % len(METHODS)]) for i, f in enumerate(f for f in FAMILIES if (f, "tome") not in CASES)]


@pytest.mark.parametrize("family,method", CASES)
def test_the_budget_is_met_within_two_percent_with_the_largest_keep(family, method):
    model = build(family)
    baseline = count_flops(model).flops
    fit = fit_flops_budget(model, method, flops=0.7)
    assert fit.baseline_flops == baseline
    assert 0.98 * 0.7 <= fit.fraction <= 0.7
    assert fit.flops == flops_with(model, method, fit.keep)  # what the real forward counts
    if fit.final_patches < fit.num_patches:  # one more patch token out of the encoder breaks the budget
        assert flops_with(model, method, (fit.final_patches + 1) / fit.num_patches) > 0.7 * baseline
    assert not tokenprune.is_patched(model)  # fitting touches a copy


def test_apply_with_a_budget_patches_at_the_fitted_keep():
    model = build("vit_base_patch16_224")
    baseline = count_flops(model).flops
    fit = fit_flops_budget(model, "tome", flops=0.55)
    tokenprune.apply(model, "tome", flops=0.55)
    assert tokenprune.reducer_of(model).keep == fit.keep
    assert count_flops(model).flops == fit.flops <= 0.55 * baseline
    # re-applying to a patched model fits against the unpatched model's FLOPs, not the patched ones
    tokenprune.apply(model, "random", flops=0.8)
    assert 0.98 * 0.8 * baseline <= count_flops(model).flops <= 0.8 * baseline


@pytest.mark.parametrize("family", ["vit_base_patch16_224", "hf:clip"])
def test_fitting_runs_none_of_the_callers_hooks_and_keeps_them(family):
    """The counted forwards run on a copy, whose hooks are the caller's functions: they must not run there (a
    hook recording features would record each of them), and the caller's model keeps its hooks."""
    model, calls = build(family), []
    layer = next(m for m in model.modules() if type(m).__name__ in ("Block", "CLIPEncoderLayer"))
    layer.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    layer.register_forward_hook(lambda module, args, kwargs, out: calls.append("kwargs"), with_kwargs=True)
    layer.register_forward_hook(lambda module, args, out: calls.append("always"), always_call=True)
    tokenprune.apply(model, "tome", flops=0.7)
    assert calls == []
    with torch.inference_mode():
        model(torch.zeros(1, 3, 64, 64))
    assert sorted(calls) == ["always", "kwargs", "pre"]


def test_gflops_is_an_absolute_budget_per_image():
    model = build("deit_small_distilled_patch16_224")
    baseline = count_flops(model).flops
    target = 0.6 * baseline / 1e9
    fit = fit_flops_budget(model, "zero-tprune", gflops=target)
    assert 0.98 * target <= fit.flops / 1e9 <= target
    assert count_flops(model, batch_size=3).flops == 3 * baseline  # per image, whatever the batch


def test_a_budget_above_the_model_keeps_everything():
    model = build("vit_base_patch16_224")
    fit = fit_flops_budget(model, "tome", flops=1.0)
    assert fit.keep == 1.0 and fit.fraction == 1.0


def test_an_input_size_changes_what_is_counted():
    model = tiny_timm("vit_base_patch16_224", img_size=64, dynamic_img_size=True)
    small = fit_flops_budget(model, "tome", flops=0.7, input_size=(3, 32, 32))
    assert small.num_patches == 64
    assert 0.98 * 0.7 <= small.fraction <= 0.7


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(flops=0.5, keep=0.3), TypeError, "keep or a FLOPs budget"),
    (dict(flops=0.5, gflops=1.0), TypeError, "one FLOPs budget"),
    (dict(flops=1.5), ValueError, r"flops must be a number in \(0, 1\], got 1.5"),
    (dict(flops=0), ValueError, "flops must be"),
    (dict(flops=True), ValueError, "flops must be"),
    (dict(gflops=-1.0), ValueError, "gflops must be a positive number"),
    (dict(gflops=float("nan")), ValueError, "gflops must be"),
    (dict(flops=0.01), ValueError, r"out of tome's reach on this model: the least it runs is .* GFLOPs \(\d"),
    (dict(flops=0.6, r=8), TypeError, "r=8 fix the token schedule themselves"),
    (dict(input_size=(3, 32, 32)), TypeError, "input_size applies to a FLOPs budget"),
])
def test_bad_budgets_are_refused_and_leave_the_model_alone(kwargs, error, match):
    model = build("vit_base_patch16_224")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(error, match=match):
        tokenprune.apply(model, "tome", **kwargs)
    assert not tokenprune.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("method, schedule", [("tome", {"r": [0, 0, 0, 8]}),
                                              ("zero-tprune", {"layers": [3], "keep_rates": [0.5]})])
def test_a_schedule_that_reduces_only_in_the_last_block_excludes_a_budget(method, schedule):
    """The options fix the schedule even where only the last block reduces (which no block's input count shows)."""
    model = tiny_timm("vit_base_patch16_224", img_size=64, depth=4)
    with pytest.raises(TypeError, match="fix the token schedule themselves"):
        tokenprune.apply(model, method, flops=0.99, **schedule)
    assert not tokenprune.is_patched(model)


def test_a_vlm_takes_keep_not_a_budget():
    from test_vlm import tiny_llava

    with pytest.raises(TypeError, match="FLOPs budget fits image encoders"):
        tokenprune.apply(tiny_llava(), flops=0.5)


def test_keep_defaults_to_a_third_when_neither_keep_nor_a_budget_is_given():
    for kwargs in ({}, {"keep": None}):
        model = tokenprune.apply(build("vit_base_patch16_224"), "tome", **kwargs)
        assert tokenprune.reducer_of(model).keep == tokenprune.api.DEFAULT_KEEP == 0.33


def test_an_unreachable_budget_names_the_least_the_method_runs():
    """The least is found by bisection over the counts the method reaches; here checked by a full scan."""
    import re

    model = tiny_timm("vit_base_patch16_224")  # 64 patches: a scan is quick
    baseline = count_flops(model).flops
    reachable = []
    for final in range(1, 65):
        try:
            reachable.append(flops_with(model, "tome", final / 64))
            break  # the first count that applies is the least (FLOPs grow with the count)
        except ValueError:
            continue
    with pytest.raises(ValueError) as error:
        fit_flops_budget(model, "tome", flops=0.01)
    least, percent = re.search(r"the least it runs is ([\d.e+-]+) GFLOPs \(([\d.]+)%\)", str(error.value)).groups()
    assert float(least) == pytest.approx(reachable[0] / 1e9, rel=5e-3)
    assert float(percent) == pytest.approx(100 * reachable[0] / baseline, abs=0.05)
    asked, share, whole = re.search(r"a FLOPs budget of ([\d.e+-]+) GFLOPs \(([\d.]+)% of the model's ([\d.e+-]+)\)",
                                    str(error.value)).groups()
    assert float(asked) == pytest.approx(0.01 * baseline / 1e9, rel=5e-3)
    assert float(share) == pytest.approx(1.0)
    assert float(whole) == pytest.approx(baseline / 1e9, rel=5e-3)


def test_a_budget_that_only_one_patch_token_meets_is_met():
    """The least count is one patch token (Zero-TPrune drops down to it): a budget of its FLOPs is met there,
    not refused as out of reach."""
    model = tiny_timm("vit_base_patch16_224")
    least = flops_with(model, "zero-tprune", 1 / 64)
    assert least < flops_with(model, "zero-tprune", 2 / 64)
    fit = fit_flops_budget(model, "zero-tprune", gflops=(least + 0.5) / 1e9)
    assert (fit.final_patches, fit.flops) == (1, least)


def test_a_budget_above_the_whole_model_keeps_everything():
    model = build("vit_base_patch16_224")
    fit = fit_flops_budget(model, "tome", gflops=2 * count_flops(model).flops / 1e9)
    assert fit.keep == 1.0 and fit.final_patches == fit.num_patches


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_a_dual_encoder_s_budget_is_its_image_tower_s(kind):
    """CLIPModel and SiglipModel take text first: a zero image cannot run them whole, and the text tower's FLOPs do
    not change with keep. The budget is the image tower's: the same keep as the tower alone, with the same FLOPs,
    and `apply` patches the whole model at it."""
    from test_hf_patch import TINY
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    vision = {**TINY, "image_size": 64}
    torch.manual_seed(0)
    model = (CLIPModel(CLIPConfig(text_config=text, vision_config=vision)) if kind == "clip"
             else SiglipModel(SiglipConfig(text_config=text, vision_config=vision))).eval()
    tower = copy.deepcopy(model.vision_model)
    fit = fit_flops_budget(model, "tome", flops=0.6)
    alone = fit_flops_budget(tower, "tome", flops=0.6)
    assert (fit.keep, fit.flops, fit.baseline_flops) == (alone.keep, alone.flops, count_flops(tower).flops)
    assert 0.98 * 0.6 <= fit.fraction <= 0.6
    tokenprune.apply(model, "tome", flops=0.6)
    assert tokenprune.reducer_of(model).keep == fit.keep and count_flops(model.vision_model).flops == fit.flops
    with pytest.raises(ValueError, match="of the image tower's"):  # an unreachable budget says what it counted
        fit_flops_budget(model, "tome", gflops=1e-6)


def test_check_budget_accepts_the_bounds_it_states():
    from tokenprune.budget import check_budget

    check_budget(1.0, None)  # the whole model is a budget: (0, 1] is closed at 1
    check_budget(None, 2.5)  # GFLOPs have no upper bound
    with pytest.raises(ValueError, match=r"flops must be a number in \(0, 1\], got 1.01"):
        check_budget(1.01, None)
    numpy = pytest.importorskip("numpy")
    check_budget(numpy.float32(0.5), None)  # any real number, as keep takes
    check_budget(None, numpy.float64(2.5))
    with pytest.raises(ValueError, match="flops must be a number"):
        check_budget(numpy.bool_(True), None)


@pytest.mark.parametrize("schedule", [{"r": 0}, {"r": []}, {"r": [0, 0, 0, 0]}])
def test_a_schedule_that_removes_nothing_also_excludes_a_budget(schedule):
    # keep changes nothing under it: the budget was reported out of reach ("the least it runs is 100%")
    model = tiny_timm()
    with pytest.raises(TypeError, match=r"fix the token schedule themselves \(it reduces nothing here\)"):
        fit_flops_budget(model, "tome", flops=0.6, **schedule)
    with pytest.raises(ValueError, match="out of tome's reach on this model: the least it runs is"):
        fit_flops_budget(model, "tome", flops=0.01, trace_source=True)  # options that leave keep in charge
