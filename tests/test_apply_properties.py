"""Property: whatever ``apply`` accepts runs, on the planned schedule; whatever it refuses leaves the model as it was.

Over method x keep x native options (valid and invalid values, drawn from pools written here, not
from the declarations) x tiny timm ViT shapes (depth 1-4, 4-64 patch tokens, with or without a
class token, 0-2 register tokens), each case is either

* refused by ``apply`` with a ValueError or TypeError whose message names an offending argument
  (one of the invalid ones when there are any), the model unpatched and its state_dict unchanged; or
* run: the token counts in ``last_forward`` are the reducer's schedule, the cap holds, a ``keep``
  that drives the schedule ends at ``max(1, round(keep * N))`` patch tokens, prefix tokens stay.

``keep`` is any real number the README allows (floats, ints, fractions, numpy scalars; down to tiny ones) or
None, ``method`` may be None (the family's default); about one case in three applies to a model already
patched, which a refusal must leave patched as it was and a success re-configures (one ``remove`` then gives
the model as built). Methods of the other kind (VLM selectors) and ``positions`` are refused on a ViT.
"""
from __future__ import annotations

import copy
import math
import re
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import Block, VisionTransformer

import tokenprune
from tokenprune.api import DEFAULT_KEEP

# ----------------------------------------------------------------------------- value pools: (value, valid)


def good(strategy):
    return strategy.map(lambda v: (v, True))


def bad(*values):
    return st.sampled_from([(v, False) for v in values])


def pool(good_values, bad_values, one_in: int = 6):
    """Mostly valid values; an invalid one about once in ``one_in`` draws (most cases then combine valid ones)."""
    return st.sampled_from(range(one_in)).flatmap(lambda i: bad_values if i == one_in // 2 else good_values)


NAN = float("nan")
FLAG = pool(good(st.booleans()), bad("False", "True", 0, 1, None, 1.0))
SEED = pool(good(st.integers(0, 2**32 - 1)), bad(-1, 2**70, "a", True, 1.5))
LAYERS = pool(good(st.none() | st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True).map(sorted)),
              bad([], [2, 1], [1, 1], [-1], "1", 3, [True]))
EVERY_BLOCK_R = pool(good(st.none() | st.integers(0, 40) | st.tuples(st.integers(0, 20), st.floats(-1, 1))
                          | st.lists(st.integers(0, 20), max_size=5)),
                     bad(-1, 2.5, "8", (8, 3.0), [1, -1], True, (8,), [1.5]))

POOLS = {
    "tome": {"r": EVERY_BLOCK_R, "prop_attn": FLAG, "trace_source": FLAG},
    "random": {"r": EVERY_BLOCK_R, "seed": SEED, "trace_source": FLAG},
    "mctf": {
        "r": pool(good(st.none() | st.integers(0, 40) | st.floats(0.01, 0.99)
                       | st.lists(st.integers(0, 20), max_size=4)),
                  bad(-1, 1.5, 0.0, "x", True, [0.5], (8, 0.5))),
        "layers": LAYERS,
        "fast": FLAG,
        "tau": pool(good(st.sampled_from([(1.0, 20.0, 40.0), (1, 1, 1), [0.5, 2.0, 3.0]])),
                    bad((1, 2), (0, 1, 1), (-1, 1, 1), "abc", (True, 1, 1), (NAN, 1, 1), (1, 2, math.inf))),
        "similarity": FLAG, "informativeness": FLAG, "size": FLAG, "bidirectional": FLAG, "prop_attn": FLAG,
        "one_step_ahead": pool(good(st.sampled_from(["approximate", "exact"])), bad("precise", 1, None, True)),
        "min_tokens": pool(good(st.integers(0, 20)), bad(-1, 1.5, "10", True, None)),
        "trace_source": FLAG,
    },
    "zero-tprune": {
        "layers": LAYERS,
        "keep_rates": pool(good(st.none() | st.lists(st.floats(0.05, 1.0), min_size=1, max_size=3)),
                           bad([1.5], [0.0], [], "0.5", [True], 0.5)),
        "iterations": pool(good(st.none() | st.integers(1, 30) | st.lists(st.integers(1, 5), min_size=1, max_size=3)),
                           bad(0, -1, 1.5, "5", True, [0], [])),
        "tol": pool(good(st.sampled_from([None, 1e-6, 1e-3, 0.5])), bad(0, -1, True, "1e-3", NAN, math.inf)),
        "uniform_start": FLAG, "eir": FLAG, "vhf": FLAG, "s_stage": FLAG, "renormalize": FLAG,
        "vhf_range": pool(good(st.sampled_from([(0.01, 0.7), (0.0, 1e9), [0.1, 0.5]])),
                          bad((0.7, 0.1), ("a", "b"), (0.1,), (-0.1, 0.5), (True, 2), 0.5)),
        "s_fraction": pool(good(st.floats(0.0, 1.0)), bad(-0.1, 1.5, True, "0.5", NAN)),
        "importance": pool(good(st.sampled_from(["wpr", "random"])), bad("attn", None, 1)),
        "seed": SEED,
        "trace_source": FLAG,
    },
}
# keep=None is the default (0.33), so a valid value; any real number in (0, 1] is a keep, tiny ones included (they
# fail as out of reach where the schedule cannot get there)
KEEP = pool(good(st.floats(0.01, 1.0) | st.just(1.0) | st.none() | st.floats(0.0, 0.01, exclude_min=True)
                 | st.sampled_from([1, Fraction(1, 3), Fraction(3, 4), np.float64(0.5), np.float32(0.25),
                                    np.int64(1)])),
            bad(0, 1.5, "0.5", True, NAN, -0.5, math.inf, -math.inf, np.float64("nan"), [0.5], Fraction(3, 2)),
            one_in=8)
#: a configuration already on the model before the case's apply (None: the model as built)
PRIOR = st.sampled_from([None, None, ("random", dict(keep=1.0, seed=3)), ("tome", dict(r=0))])

# ----------------------------------------------------------------------------- tiny models, built once per shape

_MODELS: dict[tuple, tuple] = {}


def tiny_vit(depth: int, grid: tuple[int, int], class_token: bool, reg_tokens: int, pool_kind: str):
    """(model, its state_dict, its class, input images, stock output) for one shape, built once."""
    key = (depth, grid, class_token, reg_tokens, pool_kind)
    if key not in _MODELS:
        torch.manual_seed(0)
        model = VisionTransformer(img_size=(2 * grid[0], 2 * grid[1]), patch_size=2, embed_dim=16, depth=depth,
                                  num_heads=2, mlp_ratio=2.0, num_classes=3, class_token=class_token,
                                  reg_tokens=reg_tokens, global_pool=pool_kind).eval()
        x = torch.randn(2, 3, 2 * grid[0], 2 * grid[1], generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            stock = model(x)
        _MODELS[key] = (model, copy.deepcopy(model.state_dict()), type(model), x, stock)
    return _MODELS[key]


@st.composite
def shapes(draw):
    class_token = draw(st.booleans())
    pool_kind = draw(st.sampled_from(["token", "avg"])) if class_token else "avg"
    return (draw(st.integers(1, 4)), (draw(st.integers(2, 8)), draw(st.integers(2, 8))), class_token,
            draw(st.integers(0, 2)), pool_kind)


@st.composite
def cases(draw, method: str):
    keep, keep_ok = draw(KEEP)
    options, invalid = {}, set()
    for name in draw(st.lists(st.sampled_from(sorted(POOLS[method])), unique=True, max_size=4)):
        options[name], ok = draw(POOLS[method][name])
        if not ok:
            invalid.add(name)
    if draw(st.sampled_from(range(16))) == 8:  # an option the method does not have
        options["bogus"] = 1
        invalid.add("bogus")
    if not keep_ok:
        invalid.add("keep")
    return keep, options, invalid


def names(message: str, name: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message) is not None


def assert_as_built(model, state, model_class):
    assert type(model) is model_class
    assert all(type(b) is Block for b in model.blocks)
    assert not hasattr(model, "tokenprune_reducer")
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def keep_drives(method: str, options: dict) -> bool:
    if method == "zero-tprune":
        return options.get("keep_rates") is None
    if method == "mctf":
        return options.get("r") is None and not options.get("fast", False)
    return options.get("r") is None


# ----------------------------------------------------------------------------- the property

@pytest.mark.parametrize("method", [*sorted(POOLS), None])  # None: the default method, tome on a ViT
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_apply_refuses_cleanly_or_runs_the_planned_schedule(method, data):
    name = method or "tome"
    keep, options, invalid = data.draw(cases(name), label="keep, options, invalid")
    shape = data.draw(shapes(), label="depth, grid, class token, registers, pool")
    prior = data.draw(PRIOR, label="configuration before")
    model, state, model_class, x, stock = tiny_vit(*shape)
    depth, n, p = shape[0], model.patch_embed.num_patches, model.num_prefix_tokens
    prior_reducer = None
    if prior is not None:  # reduces nothing, so it runs on every shape; the forward is the stock one
        tokenprune.apply(model, prior[0], **prior[1])
        prior_reducer = tokenprune.reducer_of(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # r clamped to the cap: a warning, tested in test_options.py
            tokenprune.apply(model, method, keep=keep, **options)
    except (ValueError, TypeError) as e:
        message = str(e)
        if prior_reducer is not None:  # refused: the configuration before stays, and still runs
            try:
                assert tokenprune.reducer_of(model) is prior_reducer
                with torch.inference_mode():
                    assert torch.equal(model(x), stock)
            finally:
                tokenprune.remove(model)
        assert_as_built(model, state, model_class)
        culprits = invalid or set(options) | {"keep"}
        assert any(names(message, c) for c in culprits), (message, culprits)
        event(f"{method}: refused ({'invalid value' if invalid else 'out of reach for this model'})")
        return
    event(f"{method}: ran")
    try:  # from here on, the model is unpatched again whatever fails (it is shared with later cases)
        assert not invalid, f"apply accepted invalid {sorted(invalid)}: {options}, keep={keep!r}"
        assert tokenprune.last_forward(model) is None  # a new configuration: no forward of it yet
        with torch.inference_mode():
            out = model(x)
        report, reducer = tokenprune.last_forward(model), tokenprune.reducer_of(model)
        assert reducer.name == name and reducer is not prior_reducer
        steps = reducer.schedule(n, depth, p)
        assert len(steps) == depth and all(s >= 0 for s in steps)
        expected, left = [], n
        for step in steps:
            expected.append(p + left)
            if name != "zero-tprune":  # the bipartite methods' cap (random shares ToMe's schedule)
                assert step <= left // 2, steps
            left -= step
        assert left >= 1
        assert report.token_counts == expected and report.output_tokens == p + left, (steps, report.token_counts)
        assert report.num_prefix_tokens == p
        if keep_drives(name, options):
            assert left == max(1, round((DEFAULT_KEEP if keep is None else float(keep)) * n))
        if name == "mctf" and left < n:
            assert p + left >= options.get("min_tokens", 10)  # the floor counts prefix tokens too
        if left == n:
            assert torch.equal(out, stock)  # nothing reduced: the stock model's output, bit for bit
        assert out.shape == stock.shape and torch.isfinite(out).all()
        if options.get("trace_source"):  # prefix tokens stay first and alone
            source = report.source
            assert source.shape == (2, p + left, p + n)
            assert torch.equal(source[:, :p, :p], torch.eye(p).expand(2, p, p))
            assert not source[:, :p, p:].any() and not source[:, p:, :p].any()
            if name in ("tome", "mctf"):  # merging: every input token lands in exactly one output token
                assert torch.equal(source.sum(1), torch.ones(2, p + n))
    finally:
        tokenprune.remove(model)  # once, whatever was there before: applying again never patches twice
    assert_as_built(model, state, model_class)


@pytest.mark.parametrize("method", [m for m in tokenprune.registry.method_names()
                                    if issubclass(tokenprune.registry.get_method(m), tokenprune.VisualTokenSelector)])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_method_of_the_other_kind_or_a_vlm_setting_is_refused_on_a_vit(method, data):
    """A VLM selector (hiprune, random-select) is refused on a ViT, naming it; so is ``positions`` (a VLM setting)
    with an encoder method. The model stays as built."""
    keep, _ = data.draw(KEEP.filter(lambda drawn: drawn[1]), label="keep")
    model, state, model_class, _, _ = tiny_vit(*data.draw(shapes(), label="shape"))
    with pytest.raises(TypeError) as refused:
        tokenprune.apply(model, method, keep=keep)
    assert names(str(refused.value), method) and "VisionTransformer takes" in str(refused.value)
    assert_as_built(model, state, model_class)
    positions = data.draw(st.sampled_from(["reindex", "original", None, 1]), label="positions")
    if positions is not None:
        with pytest.raises(TypeError, match="positions applies to vision-language models only"):
            tokenprune.apply(model, data.draw(st.sampled_from(sorted(POOLS))), keep=keep, positions=positions)
        assert_as_built(model, state, model_class)


def test_the_pools_cover_every_declared_option():
    for method, pools in POOLS.items():
        assert set(pools) == set(tokenprune.registry.get_method(method).native_options), method


def test_the_pools_and_the_selectors_cover_every_built_in_method():
    selectors = {"hiprune", "random-select"}
    assert all(issubclass(tokenprune.registry.get_method(m), tokenprune.VisualTokenSelector) for m in selectors)
    assert set(POOLS) | selectors <= set(tokenprune.registry.method_names())
    assert {m for m in tokenprune.registry.method_names() if tokenprune.registry.get_method(m).__module__
            .startswith("tokenprune.methods")} == set(POOLS) | selectors


@pytest.mark.parametrize("message, name, expected", [("mctf: keep=0.5 ...", "keep", True),
                                                     ("keep_rates must be", "keep", False)])
def test_names_matches_whole_option_names(message, name, expected):
    assert names(message, name) is expected
