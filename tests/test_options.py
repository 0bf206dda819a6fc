"""Native options: one declaration per method, checked before any model is touched or loaded."""
from __future__ import annotations

import copy
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import images, tiny_timm
from timm.models.vision_transformer import Block

import tokenprune
from tokenprune.cli import main as cli_main
from tokenprune.registry import get_method

# Written out here, not read from the declarations: the test says which options are booleans.
FLAGS = {
    "tome": ["prop_attn", "trace_source"],
    "random": ["trace_source"],
    "mctf": ["fast", "similarity", "informativeness", "size", "bidirectional", "prop_attn", "trace_source"],
    "zero-tprune": ["uniform_start", "eir", "vhf", "s_stage", "renormalize", "trace_source"],
    "hiprune": ["wrap"],
}


def assert_untouched(model, state_before, model_class):
    assert type(model) is model_class
    assert all(type(b) is Block for b in model.blocks)
    assert not hasattr(model, "tokenprune_reducer")
    after = model.state_dict()
    assert after.keys() == state_before.keys()
    assert all(torch.equal(after[k], v) for k, v in state_before.items())


def refused(model, method, error, match, **kwargs):
    before, model_class = copy.deepcopy(model.state_dict()), type(model)
    with pytest.raises(error, match=match):
        tokenprune.apply(model, method, **kwargs)
    assert_untouched(model, before, model_class)


def counts_from(schedule, num_patches, prefix):
    counts, n = [], num_patches
    for step in schedule:
        counts.append(prefix + n)
        n -= step
    return counts, prefix + n


def run_and_check_plan(model, x=None):
    """Run a forward; the token counts must be the reducer's own plan. Returns the schedule."""
    with torch.inference_mode():
        model(images() if x is None else x)
    report, reducer = tokenprune.last_forward(model), tokenprune.reducer_of(model)
    schedule = reducer.schedule(model.patch_embed.num_patches, len(model.blocks), model.num_prefix_tokens)
    counts, out = counts_from(schedule, model.patch_embed.num_patches, model.num_prefix_tokens)
    assert report.token_counts == counts and report.output_tokens == out, (schedule, report.token_counts)
    return schedule


# ----------------------------------------------------------------------------- booleans

@pytest.mark.parametrize("method", sorted(FLAGS))
@pytest.mark.parametrize("value", ["False", "True", 0, 1, None, 1.0])
def test_boolean_options_accept_only_bools(method, value):
    for key in FLAGS[method]:
        with pytest.raises(TypeError, match=rf"{method}: {key} must be True or False, got {re.escape(repr(value))}"):
            get_method(method)(keep=0.5, **{key: value})
        get_method(method)(keep=0.5, **{key: True})
        get_method(method)(keep=0.5, **{key: False})


def test_the_boolean_list_here_is_every_boolean_option():
    declared = {m: sorted(k for k, o in get_method(m).native_options.items() if isinstance(o.default, bool))
                for m in FLAGS}
    assert declared == {m: sorted(keys) for m, keys in FLAGS.items()}


def test_trace_source_false_as_a_string_is_refused_not_traced():
    model = tiny_timm()
    refused(model, "tome", TypeError, "trace_source must be True or False", keep=0.5, trace_source="False")


# ----------------------------------------------------------------------------- method

def test_empty_method_is_an_error_and_none_is_the_default():
    model = tiny_timm()
    refused(model, "", ValueError, r"unknown method ''; registered methods: .*tome")
    tokenprune.apply(model, None, keep=0.5)
    assert tokenprune.reducer_of(model).name == "tome"


# ----------------------------------------------------------------------------- r above the per-block cap

@pytest.mark.parametrize("method", ["tome", "random", "mctf"])
def test_r_above_the_per_block_cap_warns_and_runs_the_clamped_plan(method):
    model = tiny_timm()  # 64 patches, 4 blocks
    cap = rf"{method}: r=40 exceeds the per-block cap .*block \d+ \d+ instead of 40"
    with pytest.warns(UserWarning, match=cap) as got:
        tokenprune.apply(model, method, r=40)
    assert got[0].filename == __file__  # the apply call's line
    with pytest.warns(UserWarning, match="exceeds the per-block cap") as got:  # through check_speed's apply too
        tokenprune.check_speed(model, method, r=40, repeats=1, warmup=0)
    assert got[0].filename == __file__
    schedule = run_and_check_plan(model)
    left = 64
    for step in schedule:  # every block removes at most half its patch tokens
        assert step <= left // 2
        left -= step
    assert schedule[:2] == ((32, 16) if method != "mctf" else (0, 32))


@pytest.mark.parametrize("method, r", [("tome", 8), ("random", (8, -1)), ("mctf", 8)])
def test_r_within_the_cap_does_not_warn(method, r):
    model = tiny_timm()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenprune.apply(model, method, r=r)
    run_and_check_plan(model)


def test_the_warning_comes_once_at_apply_not_at_every_forward():
    model = tiny_timm()
    with pytest.warns(UserWarning):
        tokenprune.apply(model, "tome", r=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_and_check_plan(model)


def test_keep_out_of_reach_names_keep():
    refused(tiny_timm(), "tome", ValueError, r"tome: keep=0.02: cannot reduce 64 patch tokens to 1", keep=0.02)


# ----------------------------------------------------------------------------- MCTF

def test_one_directional_mctf_at_the_cap_runs_the_plan():
    model = tiny_timm()  # keep 0.15 of 64: 10 patches, the cap bites (24, 20, 10 at blocks 1-3)
    tokenprune.apply(model, "mctf", keep=0.15, bidirectional=False)
    schedule = run_and_check_plan(model)
    assert schedule == (0, 24, 20, 10)
    assert tokenprune.last_forward(model).output_tokens == 1 + 10


def test_mctf_min_tokens_is_in_the_plan():
    model = tiny_timm()
    with pytest.warns(UserWarning, match="leaving at least 19"):  # 20 tokens: the class token and 19 patches
        tokenprune.apply(model, "mctf", r=20, min_tokens=20)
    schedule = run_and_check_plan(model)
    assert 1 + 64 - sum(schedule) == 20


def test_mctf_keep_below_min_tokens_is_refused():
    refused(tiny_timm(), "mctf", ValueError,
            r"keep=0.125 leaves 9 tokens \(8 of 64 patch tokens\), fewer than min_tokens=10", keep=0.125)
    model = tiny_timm()
    tokenprune.apply(model, "mctf", keep=0.14, min_tokens=10)  # 9 patch tokens + the class token: allowed
    run_and_check_plan(model)
    assert tokenprune.last_forward(model).output_tokens == 1 + 9
    tokenprune.apply(model, "mctf", keep=0.125, min_tokens=0)
    run_and_check_plan(model)
    assert tokenprune.last_forward(model).output_tokens == 1 + 8


@pytest.mark.parametrize("layers", [[2, 1], [1, 1], [], [-1], "1", 3, [True]])
def test_mctf_layers_must_be_increasing_block_indices(layers):
    refused(tiny_timm(), "mctf", ValueError, "mctf: layers must be a non-empty, increasing list", layers=layers)


def test_mctf_on_a_one_block_model_needs_layers():
    refused(tiny_timm(depth=1), "mctf", ValueError, r"keep=0.5 needs a merging block.*layers=\[0\]", keep=0.5)
    refused(tiny_timm(depth=1), "mctf", ValueError, r"r=4 needs a merging block", r=4)
    model = tiny_timm(depth=1)
    tokenprune.apply(model, "mctf", keep=0.5, layers=[0])
    run_and_check_plan(model)
    assert tokenprune.last_forward(model).output_tokens == 1 + 32


def test_mctf_fast_on_a_shallow_model_names_fast():
    refused(tiny_timm(), "mctf", ValueError, r"fast=True \(blocks 3, 6, 9\)", fast=True)


# ----------------------------------------------------------------------------- Zero-TPrune and random

@pytest.mark.parametrize("options, error, name", [
    ({"iterations": [5]}, ValueError, "iterations"),  # one entry for 3 pruning layers: an IndexError mid-forward
    ({"iterations": [5, 5], "layers": [1, 2, 3]}, ValueError, "iterations"),
    ({"iterations": True}, ValueError, "iterations"),
    ({"seed": "a"}, TypeError, "seed"),
    ({"seed": -1}, TypeError, "seed"),
    ({"seed": 2**70}, TypeError, "seed"),
    ({"tol": True}, ValueError, "tol"),
    ({"tol": float("nan")}, ValueError, "tol"),
    ({"tol": float("inf")}, ValueError, "tol"),  # results files hold the options as JSON: no infinity there
    ({"vhf_range": (0.01, float("inf"))}, ValueError, "vhf_range"),
    ({"s_fraction": True}, ValueError, "s_fraction"),
    ({"vhf_range": ("a", "b")}, ValueError, "vhf_range"),
    ({"vhf_range": (True, 2)}, ValueError, "vhf_range"),
    ({"layers": [2, 1]}, ValueError, "layers"),
    ({"keep_rates": []}, ValueError, "keep_rates"),
    ({"keep_rates": [True, 0.5, 0.5]}, ValueError, "keep_rates"),
    ({"keep_rates": [0.5, 0.5]}, ValueError, "keep_rates"),
    ({"importance": None}, ValueError, "importance"),
])
def test_zero_tprune_options_are_checked(options, error, name):
    refused(tiny_timm(), "zero-tprune", error, rf"zero-tprune: {name}", **options)


@pytest.mark.parametrize("seed", [-1, 2**70, 1.0, True, "0"])
def test_random_seed_range(seed):
    refused(tiny_timm(), "random", TypeError, r"random: seed must be an int in \[0, 2\*\*32\)", keep=0.5, seed=seed)


def test_valid_zero_tprune_and_random_options_run_their_plan():
    for method, options in [("zero-tprune", {"iterations": [3, 2, 1], "seed": 7, "tol": 1e-4}),
                            ("zero-tprune", {"layers": [0, 2], "keep_rates": [0.5, 0.5], "iterations": [2, 1]}),
                            ("random", {"seed": 2**32 - 1, "keep": 0.25})]:
        model = tiny_timm()
        tokenprune.apply(model, method, **options)
        run_and_check_plan(model)


def test_hiprune_options_are_checked():
    with pytest.raises(TypeError, match="hiprune: wrap must be True or False"):
        get_method("hiprune")(keep=0.5, wrap="no")
    with pytest.raises(ValueError, match="hiprune: alpha must be a number in"):
        get_method("hiprune")(keep=0.5, alpha=True)


# ----------------------------------------------------------------------------- pipeline

class Loaded(Exception):
    """Raised by the stand-in transformers.pipeline: the model would have been loaded."""


@pytest.fixture
def no_loading(monkeypatch):
    import transformers

    def factory(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(transformers, "pipeline", factory)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(options={"bogus": 1}), ValueError, r"options \['bogus'\] need an explicit method"),
    (dict(options={"r": 8}), ValueError, "need an explicit method"),
    (dict(method="tome", options={"bogus": 1}), TypeError, "unknown option"),
    (dict(method="tome", options={"trace_source": "False"}), TypeError, "trace_source must be True or False"),
    (dict(method="mctf", options={"layers": [3, 1]}), ValueError, "layers must be"),
    (dict(method=""), ValueError, "unknown method ''"),
    (dict(method="tome", options="r=8"), TypeError, "options must be a dict"),
    (dict(keep=0), ValueError, "keep must be in"),
])
def test_pipeline_checks_everything_before_loading(no_loading, kwargs, error, match):
    with pytest.raises(error, match=match):
        tokenprune.pipeline("image-classification", model="google/vit-base-patch16-224", **kwargs)


@pytest.mark.parametrize("kwargs", [dict(), dict(options={}), dict(method="tome", options={"r": 8}),
                                    dict(method="mctf", options={"layers": [1, 3]}, keep=0.5)])
def test_pipeline_with_good_arguments_goes_on_to_load(no_loading, kwargs):
    with pytest.raises(Loaded):
        tokenprune.pipeline("image-classification", model="google/vit-base-patch16-224", **kwargs)


# ----------------------------------------------------------------------------- methods(), the CLI, the docs

def test_methods_lists_every_option_with_its_default_and_what_it_accepts():
    text = tokenprune.methods()
    for name in FLAGS:
        for key, option in get_method(name).native_options.items():
            assert f"    {key}={option.default!r}: {option.accepts}" in text
    assert "trace_source=False: True or False" in text


def test_readme_lists_exactly_the_declared_options():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in FLAGS:
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))
        listed = set(re.findall(r"`(\w+)`", row.rsplit("|", 2)[1]))
        assert listed == set(get_method(name).native_options), name


def test_cli_refuses_a_string_boolean_before_building_a_model(capsys, monkeypatch):
    import tokenprune.flops

    monkeypatch.setattr(tokenprune.flops, "random_model", lambda *a, **k: pytest.fail("model built"))
    assert cli_main(["flops", "--method", "tome", "-o", "trace_source=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trace_source must be True or False, got 'false'" in err


def test_is_real_bounds_and_what_it_refuses():
    from tokenprune.registry import is_real

    assert is_real(0.0, 0.0) and is_real(1.0, 0.0, 1.0) and is_real(0.5, 0.0, 1.0) and is_real(-2.5) and is_real(3)
    assert not is_real(0.0, 0.0, low_open=True) and is_real(1e-300, 0.0, low_open=True)
    assert not is_real(-1.0, 0.0, low_open=True)  # below an open bound too, not only at it
    assert not is_real(-1e-9, 0.0) and not is_real(1.0 + 1e-9, 0.0, 1.0)
    assert not any(is_real(v) for v in (math.inf, -math.inf, math.nan, True, "1", None))
    with pytest.raises(TypeError):  # low_open is keyword-only: a fourth positional argument is a mistake
        is_real(0.0, 0.0, 1.0, True)


@pytest.mark.parametrize("method, options, shown", [
    ("tome", {}, "ToMe(keep=0.5)"),
    ("tome", dict(r=3), "ToMe(r=3)"),
    ("tome", dict(r=0), "ToMe(r=0)"),  # r=0 decides the counts too: nothing removed, whatever keep says
    ("mctf", dict(fast=True), "MCTF(fast=True)"),
    ("mctf", dict(layers=[3, 6]), "MCTF(keep=0.5, layers=[3, 6])"),  # layers leaves the counts to keep
    ("zero-tprune", dict(keep_rates=[0.5]), "ZeroTPrune(keep_rates=[0.5])"),
    ("hiprune", dict(tokens=64), "HiPrune(tokens=64)"),
    ("random-select", dict(seed=1), "RandomSelect(keep=0.5, seed=1)"),
])
def test_a_reducers_repr_shows_keep_only_where_keep_decides_the_counts(method, options, shown):
    """The flops command prints the reducer: ToMe(keep=0.33, r=3) read as if keep applied under r."""
    assert repr(get_method(method)(keep=0.5, **options)) == shown
