"""Every bad argument fails clearly, before anything is patched."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_timm
from timm.models.vision_transformer import Block

import tokenprune


def assert_untouched(model, state_before):
    assert type(model).__name__ == "VisionTransformer"
    assert all(type(b) is Block for b in model.blocks)
    assert not hasattr(model, "tokenprune_reducer")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state_before.items())


@pytest.mark.parametrize("keep, error, message", [
    (0, ValueError, r"keep must be in \(0, 1\]"),
    (-0.5, ValueError, r"keep must be in \(0, 1\]"),
    (1.5, ValueError, r"keep must be in \(0, 1\]"),
    (float("nan"), ValueError, r"keep must be in \(0, 1\]"),
    ("0.5", TypeError, "keep must be a number"),
    (True, TypeError, "keep must be a number"),
])
def test_bad_keep(keep, error, message):
    model = tiny_timm()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        tokenprune.apply(model, "tome", keep=keep)
    assert_untouched(model, before)


def test_unknown_method_lists_the_valid_ones():
    model = tiny_timm()
    with pytest.raises(ValueError, match=r"unknown method 'tome2'.*random.*tome"):
        tokenprune.apply(model, "tome2")
    with pytest.raises(TypeError, match="method must be a string"):
        tokenprune.apply(model, 3)
    assert_untouched(model, model.state_dict())


@pytest.mark.parametrize("method, options, error, message", [
    ("tome", {"seed": 1}, TypeError, r"unknown option\(s\) seed; its options are: keep, prop_attn, r, trace_source"),
    ("random", {"prop_attn": False}, TypeError, "unknown option"),
    ("tome", {"r": -1}, ValueError, "r must be a non-negative int"),
    ("tome", {"r": 2.5}, ValueError, "r must be a non-negative int"),
    ("tome", {"r": (8, 3.0)}, ValueError, "inflection in"),
    ("tome", {"r": [1, 2, 3, 4, 5]}, ValueError, "r has 5 entries but the model has 4 blocks"),
    ("tome", {"prop_attn": "yes"}, TypeError, "prop_attn must be True or False"),
    ("random", {"seed": "a"}, TypeError, "seed must be an int"),
    ("tome", {"keep": 0.02}, ValueError, "cannot reduce 64 patch tokens to 1 in 4 layers"),
])
def test_bad_options(method, options, error, message):
    model = tiny_timm()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        tokenprune.apply(model, method, **options)
    assert_untouched(model, before)


def test_bad_options_leave_an_existing_patch_as_it_was():
    model = tiny_timm()
    tokenprune.apply(model, "tome", keep=0.5)
    with pytest.raises(TypeError):
        tokenprune.apply(model, "tome", keep=0.5, bogus=1)
    assert tokenprune.reducer_of(model).keep == 0.5 and tokenprune.reducer_of(model).name == "tome"


@pytest.mark.parametrize("name, culprit", [
    ("eva02_tiny_patch14_224", "Eva"),
    ("vit_small_patch16_18x2_224", "ParallelThingsBlock"),
    ("beit_base_patch16_224", "Beit"),
])
def test_unsupported_models_are_named(name, culprit):
    model = tiny_timm(name, img_size=28 if "patch14" in name else 32, patch_size=14 if "patch14" in name else 4,
                      **({"depth": 2} if "18x2" in name else {}))
    before = copy.deepcopy(model.state_dict())
    model_class = type(model)
    with pytest.raises(TypeError, match=f"{culprit}.*supported.*VisionTransformer"):
        tokenprune.apply(model, keep=0.5)
    assert type(model) is model_class
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        tokenprune.apply("deit_small_patch16_224")
    with pytest.raises(TypeError, match=r"does not support torch.nn.modules.linear.Linear; supported"):
        tokenprune.apply(torch.nn.Linear(2, 2))


def test_a_wrapper_around_a_supported_model_says_where_to_apply():
    model = tiny_timm()
    with pytest.raises(TypeError, match=r"OptimizedModule \(a torch.compile wrapper: apply to .*_orig_mod, before"):
        tokenprune.apply(torch.compile(model), keep=0.5)

    class PeftLike(torch.nn.Module):  # peft's PeftModel: the wrapped model behind get_base_model()
        def __init__(self, inner):
            super().__init__()
            self.base_model = inner

        def get_base_model(self):
            return self.base_model

    with pytest.raises(TypeError, match=r"PeftLike \(a peft model: apply to the model it wraps, .get_base_model\(\)\)"):
        tokenprune.apply(PeftLike(model), keep=0.5)
    assert not tokenprune.is_patched(model)
