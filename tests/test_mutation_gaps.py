"""Tests for behaviour that mutation testing (mutation/) found unchecked: each kills mutants that every
other test let survive."""
from __future__ import annotations

import pytest
import torch
from conftest import images, tiny_timm

import tokenprune
from tokenprune import ops
from tokenprune.methods._scheduled import capped
from tokenprune.methods.mctf import MCTF
from tokenprune.methods.random_drop import RandomDrop
from tokenprune.methods.tome import ToMe
from tokenprune.methods.zero_tprune import ZeroTPrune, weighted_pagerank
from tokenprune.state import ForwardState


@pytest.mark.parametrize("pool", ["max", "avgmax", "avg"])
def test_timm_pools_count_merged_tokens_by_size(pool):
    """'avg' is the size-weighted mean; 'max' is unchanged by merging (a merged token is an average);
    'avgmax' is half of each."""
    model, x = tiny_timm("vit_base_patch16_siglip_gap_224", global_pool=pool), images()
    tokenprune.apply(model, "tome", keep=0.25)
    with torch.inference_mode():
        logits = model(x)
        size = tokenprune.last_forward(model).size
        feats = model.forward_features(x)
    mean, peak = ops.size_weighted_mean(feats, size), feats.amax(dim=1)
    pooled = {"avg": mean, "max": peak, "avgmax": 0.5 * (mean + peak)}[pool]
    torch.testing.assert_close(logits, model.head(model.fc_norm(pooled)))


def test_random_reduce_removes_at_most_half_the_patch_tokens():
    """The 50% cap holds in the method itself, not only in the schedules that call it."""
    reducer = RandomDrop(seed=1)
    x = torch.randn(2, 1 + 11, 4)
    state = ForwardState(reducer=reducer, num_prefix=1, token_counts=[12])
    assert reducer.after_attention(x, 9, None, state).tokens.shape == (2, 1 + 6, 4)
    assert reducer.after_attention(x, 3, None, state).tokens.shape == (2, 1 + 8, 4)


def test_r_inflection_bounds_are_inclusive():
    model = tiny_timm()
    for inflection in (-1.0, 1.0, 1):
        tokenprune.apply(model, "tome", r=(4, inflection))
    for bad in ((4, 1.01), (4, -1.01), (-1, 0.0), (4, 0.5, 1)):
        with pytest.raises(ValueError, match="inflection"):
            tokenprune.apply(model, "tome", r=bad)


def test_scratch_buffer_follows_size_dtype_and_autograd():
    state = ForwardState(reducer=RandomDrop(), num_prefix=0)
    first = state.scratch(10, torch.zeros(1))
    assert first.numel() == 10 and first.dtype == torch.float32
    assert state.scratch(6, torch.zeros(1)).data_ptr() == first.data_ptr()  # reused while big enough
    wider = state.scratch(10, torch.zeros(1, dtype=torch.float64))
    assert wider.dtype == torch.float64 and wider.numel() == 10
    assert state.scratch(20, torch.zeros(1, dtype=torch.float64)).numel() == 20
    assert state.scratch(5, torch.zeros(1, requires_grad=True)) is None  # out= cannot join autograd


def test_random_default_seed_is_zero():
    model, x = tiny_timm(), images()
    tokenprune.apply(model, "random", keep=0.5, trace_source=True)
    with torch.inference_mode():
        model(x)
    default = tokenprune.last_forward(model).source
    tokenprune.apply(model, "random", keep=0.5, seed=0, trace_source=True)
    with torch.inference_mode():
        model(x)
    assert torch.equal(tokenprune.last_forward(model).source, default)
    tokenprune.apply(model, "random", keep=0.5, seed=1, trace_source=True)
    with torch.inference_mode():
        model(x)
    assert not torch.equal(tokenprune.last_forward(model).source, default)


# ----------------------------------------------------------------------------- methods/_scheduled.py

def test_mctf_fraction_r_removes_that_share_of_the_patch_tokens_left():
    """A fractional r removes that fraction of the patch tokens each merging block sees (rounded down)."""
    assert MCTF(r=0.25).schedule(64, 4) == (0, 64 // 4, 48 // 4, 36 // 4)


def test_per_block_cap_clamps_and_reports_only_where_r_exceeds_it():
    reducer = ToMe()
    with reducer.collecting_notes() as notes:
        assert capped(reducer, (4, 4, 32), 64) == (4, 4, 28)  # 56 left at the last block: at most 28
    assert len(notes) == 1 and "block 2 28 instead of 32" in notes[0] and "block 0" not in notes[0]
    assert "r exceeds the per-block cap (half the patch tokens a block sees) on 64 patch tokens" in notes[0]
    with reducer.collecting_notes() as notes:
        assert capped(reducer, (4, 4, 28), 64) == (4, 4, 28)  # exactly at the cap: nothing to report
    assert notes == []


def test_per_block_cap_removes_nothing_below_the_floor():
    """A block that already sees fewer patch tokens than the floor removes none (never a negative count)."""
    reducer = ToMe()
    with reducer.collecting_notes() as notes:
        assert capped(reducer, (4, 4), 16, floor=49) == (0, 0)
        assert capped(reducer, (4, 4), 16, floor=14) == (2, 0)
    assert all("(half the patch tokens a block sees, leaving at least " in note for note in notes)


def test_sources_are_traced_only_when_asked():
    model, x = tiny_timm(), images()
    for method in ("tome", "random", "zero-tprune"):
        tokenprune.apply(model, method, keep=0.5)
        with torch.inference_mode():
            model(x)
        assert tokenprune.last_forward(model).source is None, method


def test_seed_accepts_the_whole_32_bit_range_only():
    assert RandomDrop(seed=2**32 - 1).options["seed"] == 2**32 - 1
    for bad in (2**32, 2**32 + 1, -1):
        with pytest.raises(TypeError, match=r"seed must be an int in \[0, 2\*\*32\)"):
            RandomDrop(seed=bad)


# ----------------------------------------------------------------------------- methods/zero_tprune.py

def test_zero_tprune_default_iterations_follow_the_papers_rule_by_block():
    """docs/methods.md: 30 WPR rounds in blocks 0-2, 1 in the last three, 5 between; an int or a per-layer list
    replaces the rule, and ``tol`` (iterate to convergence) overrides both."""
    assert [ZeroTPrune().iterations_at(layer, 12, 0) for layer in range(12)] == [30] * 3 + [5] * 6 + [1] * 3
    assert [ZeroTPrune().iterations_at(layer, 5, 0) for layer in range(5)] == [30, 30, 30, 1, 1]
    assert ZeroTPrune(iterations=7).iterations_at(0, 12, 0) == 7
    assert ZeroTPrune(layers=[1, 4, 9], iterations=[2, 3, 4]).iterations_at(4, 12, 1) == 3
    assert ZeroTPrune(iterations=7, tol=1e-6).iterations_at(0, 12, 0) is None


def test_zero_tprune_default_layers_by_depth():
    """depth/4 - 1, depth/2 - 1, 3*depth/4 - 1 (2, 5, 8 of 12), collapsing to distinct blocks >= 0 on shallow
    models; a layer past the last block is refused, the last block itself is allowed."""
    assert ZeroTPrune().pruning_layers(12) == [2, 5, 8]
    assert ZeroTPrune().pruning_layers(16) == [3, 7, 11]
    assert ZeroTPrune().pruning_layers(4) == [0, 1, 2]
    assert ZeroTPrune().pruning_layers(2) == ZeroTPrune().pruning_layers(1) == [0]
    with pytest.raises(ValueError, match="outside a model of 4 blocks"):
        ZeroTPrune(layers=[1, 4]).pruning_layers(4)


def test_zero_tprune_keep_rates_keep_at_least_one_patch_token():
    assert ZeroTPrune(layers=[0, 2], keep_rates=[0.001, 1.0]).schedule(64, 4) == (63, 0, 0, 0)
    assert ZeroTPrune(layers=[1], keep_rates=[0.5]).schedule(64, 4) == (0, 32, 0, 0)


def test_weighted_pagerank_with_tol_stops_after_max_iterations():
    """A walk that never converges (two tokens attending only to each other) runs ``max_iterations`` rounds."""
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    start = torch.tensor([0.25, 0.75], dtype=torch.float64)
    assert torch.equal(weighted_pagerank(swap, start, tol=1e-9), start)  # 200 rounds: back where it started
    assert torch.equal(weighted_pagerank(swap, start, tol=1e-9, max_iterations=3), start.flip(0))


def test_zero_tprune_documented_defaults():
    """docs/methods.md's table: S-stage does all the removal, EIR + VHF on [0.01, 0.7], renormalised sub-graph,
    class-token start, WPR importance."""
    o = ZeroTPrune().options
    assert (o["s_stage"], o["s_fraction"], o["eir"], o["vhf"], tuple(o["vhf_range"]), o["renormalize"]) == \
        (True, 1.0, True, True, (0.01, 0.7), True)
    assert (o["uniform_start"], o["importance"], o["layers"], o["keep_rates"], o["iterations"], o["tol"]) == \
        (False, "wpr", None, None, None, None)


@pytest.mark.parametrize("key, good, bad", [
    ("s_fraction", [0, 0.0, 0.5, 1, 1.0], [-0.1, 1.1, float("nan")]),
    ("keep_rates", [[1.0], [1e-6, 0.5]], [[0.0], [1.1], [], [-0.5]]),
    ("vhf_range", [(0.0, 1e-9), [0.2, 5.0]], [(-0.1, 0.5), (0.5, 0.5), (0.7, 0.1), (0.1,), (0.1, 0.2, 0.3)]),
    ("tol", [1e-12, 1], [0, 0.0, -1e-6]),
    ("iterations", [1, [1, 2, 3]], [0, [1, 0, 2], []]),
])
def test_zero_tprune_option_ranges_are_the_documented_ones(key, good, bad):
    """Each option accepts exactly what its description says (ends included where it says so)."""
    for value in good:
        ZeroTPrune(**{key: value})
    for value in bad:
        with pytest.raises(ValueError, match=f"zero-tprune: {key} must be"):
            ZeroTPrune(**{key: value})


def test_weighted_pagerank_stops_once_no_score_moves_more_than_tol():
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64).softmax(-1)
    start = torch.full((2, 3, 6), 1 / 6, dtype=torch.float64)
    assert torch.equal(weighted_pagerank(attn, start, tol=1.0), weighted_pagerank(attn, start, iterations=1))
    rounds = [weighted_pagerank(attn, start, iterations=i) for i in range(1, 200)]
    got = weighted_pagerank(attn, start, tol=1e-6)
    for b in range(2):  # each graph (a head of an image) at its own first round that moved no score by tol
        for h in range(3):
            first = next(i for i in range(1, len(rounds)) if (rounds[i][b, h] - rounds[i - 1][b, h]).abs().max() < 1e-6)
            assert torch.equal(got[b, h], rounds[first][b, h])


def test_weighted_pagerank_renormalizes_the_survivors_rows_by_default():
    g = torch.Generator().manual_seed(1)
    attn = torch.randn(1, 2, 6, 6, generator=g, dtype=torch.float64).softmax(-1)
    start = torch.full((1, 2, 6), 1 / 6, dtype=torch.float64)
    alive = torch.tensor([[[True, False, True, True, False, True]]])
    default = weighted_pagerank(attn, start, iterations=3, alive=alive)
    assert torch.equal(default, weighted_pagerank(attn, start, iterations=3, alive=alive, renormalize=True))
    assert not torch.allclose(default, weighted_pagerank(attn, start, iterations=3, alive=alive, renormalize=False))


# ----------------------------------------------------------------------------- patches/timm_vit.py

def test_timm_attention_dropout_is_off_in_eval_mode():
    """The attention that keeps q/k for a method follows the stock block: dropout only while training."""
    model, x = tiny_timm(attn_drop_rate=0.5).eval(), images()
    tokenprune.apply(model, "tome", keep=0.5)
    with torch.inference_mode():
        assert torch.equal(model(x), model(x))


def test_timm_unsupported_pool_names_the_supported_ones():
    model = tiny_timm()
    model.global_pool = "prr"
    supported = r"supported: \('token', 'avg', 'avgmax', 'max', '', 'map'\)"
    with pytest.raises(TypeError, match=r"global_pool='prr'; " + supported):
        tokenprune.apply(model, "tome", keep=0.5)


# ----------------------------------------------------------------------------- HiPrune's pure parts


@pytest.mark.parametrize("grid", [(1, 1), (1, 4), (3, 1), (3, 4), (5, 5)])
def test_hiprune_neighbours_match_a_brute_force_grid(grid):
    """Left, right, above, below on the patch grid (an off-grid neighbour is the anchor itself); with
    ``wrap`` the official code's raster-order +-1 / +-cols, clamped to the sequence."""
    from tokenprune.methods.hiprune import neighbours
    rows, cols = grid
    n = rows * cols
    index = torch.arange(n)
    expected, wrapped = [], []
    for i in range(n):
        r, c = divmod(i, cols)
        expected.append([i - 1 if c > 0 else i, i + 1 if c < cols - 1 else i,
                         i - cols if r > 0 else i, i + cols if r < rows - 1 else i])
        wrapped.append([min(max(i + d, 0), n - 1) for d in (-1, 1, -cols, cols)])
    assert neighbours(index, grid).tolist() == expected
    assert neighbours(index, grid, wrap=True).tolist() == wrapped


def test_hiprune_select_refuses_scores_that_do_not_fill_the_grid():
    from tokenprune.methods.hiprune import hiprune_select
    scores = torch.rand(6)
    assert hiprune_select(scores, scores, (2, 3), 3).shape == (3,)
    with pytest.raises(ValueError, match="6 scores do not fill a 3x3 grid"):
        hiprune_select(scores, scores, (3, 3), 3)


@pytest.mark.parametrize("key", ["tokens", "object_layer"])
def test_hiprune_positive_int_options(key):
    from tokenprune.methods.hiprune import HiPrune
    HiPrune(**{key: None}), HiPrune(**{key: 1})
    for bad in (0, -1, 1.5, True):
        with pytest.raises((TypeError, ValueError), match=key):
            HiPrune(**{key: bad})


# --- state.py (mutation/state.toml survivors) ------------------------------------------------------------------------

def test_probabilities_with_a_full_mask_bias_match_with_and_without_the_scratch_buffer():
    """The scratch path fuses a key bias (B, 1, 1, N); a full (B, 1, N, N) mask takes the plain path. Both
    must give softmax(scale * q k^T + bias)."""
    from tokenprune.state import AttentionTaps

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    state = ForwardState(reducer=ToMe(), num_prefix=0)
    for bias in (torch.randn(2, 1, 1, 5, generator=g), torch.randn(2, 1, 5, 5, generator=g),
                 torch.randn(2, 3, 5, 5, generator=g)):
        expected = ((q * 0.5) @ k.transpose(-2, -1) + bias).softmax(-1)
        taps = AttentionTaps(q=q, k=k, scale=0.5, bias=bias)
        torch.testing.assert_close(taps.probabilities(state), expected)
        torch.testing.assert_close(taps.probabilities(), expected)


def test_reports_and_taps_cannot_be_altered_after_the_fact():
    import dataclasses

    from tokenprune.state import AttentionTaps

    model = tiny_timm()
    tokenprune.apply(model, "tome", keep=0.5)
    with torch.inference_mode():
        model(images())
    report = tokenprune.last_forward(model)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.token_counts = []
    taps = AttentionTaps(q=torch.zeros(1, 1, 2, 2), k=torch.zeros(1, 1, 2, 2), scale=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        taps.q = None


@pytest.mark.parametrize("method", ["tome", "random", "mctf"])
def test_layers_past_a_vlm_feature_layer_reduce_nothing(method):
    """LLaVA takes features from layer -2: the schedule ends there, and the tower's last layer (which still
    runs) removes nothing."""
    from test_vlm import llava_batch, tiny_llava

    model, inputs = tiny_llava(), llava_batch()
    tokenprune.apply(model, method, keep=0.25, **({"min_tokens": 0} if method == "mctf" else {}))
    with torch.no_grad():
        model(**inputs)
    encoder = model.model.vision_tower.encoder
    counts = encoder._tokenprune_last.token_counts
    assert len(counts) == 4 and counts[-1] == 1 + 16  # the feature layer's input holds the final count
    assert encoder._tokenprune_last.output_tokens == 1 + 16


# --- patches/hf_vision.py (mutation/hf_vision.toml survivors) --------------------------------------------------------

@pytest.mark.parametrize("family", ["vit", "deit", "clip", "siglip", "dinov2", "dinov2-reg"])
def test_each_transformers_family_row_names_the_parts_of_its_stock_layer(family):
    """The block step rebuilt from a Family row's parts (norms, attention, what follows attention and the MLP:
    dropout, layer scale, drop path) is the stock layer; layer scale away from 1 so that skipping it shows."""
    from test_hf_patch import tiny_hf
    from tokenprune.patches.hf_vision import FAMILIES, LayerParts, _encoder

    from tokenprune.block import AttentionRequest

    overrides = {"layerscale_value": 0.3} if family.startswith("dinov2") else {}
    model = tiny_hf(family, **overrides)
    enc = _encoder(model)
    tokenprune.apply(model, "tome", keep=0.5)  # swaps the attention modules in, so run_attention works
    layer = enc.layers[1]
    x = torch.randn(2, 17, 48, generator=torch.Generator().manual_seed(0))
    parts = LayerParts(layer, next(f for f in FAMILIES if f.name == enc.family.name), {})
    with torch.inference_mode():
        h = x + parts.attention_residual(parts.run_attention(parts.attention_input(x), None, AttentionRequest()))
        rebuilt = h + parts.mlp_residual(h)
        stock = parts.stock_block(x, None)
    stock = stock[0] if isinstance(stock, tuple) else stock
    torch.testing.assert_close(rebuilt, stock, atol=1e-6, rtol=1e-5)


def test_transformers_plan_counts_non_square_patches():
    """A ViT with 4x8 patches on 32x32 images has 8 x 4 = 32 patch tokens: ToMe cannot reach 1 of them in 4
    blocks (half at most per block: 32 -> 2), which apply refuses before patching."""
    from test_hf_patch import tiny_hf

    model = tiny_hf("vit", patch_size=(4, 8))
    with pytest.raises(ValueError, match="keep"):
        tokenprune.apply(model, "tome", keep=1 / 32)
    assert not tokenprune.is_patched(model)
    tokenprune.apply(model, "tome", keep=1 / 16)  # 2 of 32: reachable
    with torch.inference_mode():
        model(images())
    assert tokenprune.last_forward(model).output_tokens == 1 + 2


# --- patches/vlm.py (mutation/vlm.toml survivors) -----------------------------------------------------------------

def test_a_prefill_compacted_to_one_token_still_decodes_right():
    """A prompt of one image and nothing else, kept to one visual token: the first decode step sees a
    one-token cache, and its mask must still be rebuilt (the by-hand reference: the kept feature alone)."""
    from test_vlm import GREEDY, LLAVA_IMAGE, _llava_reference, tiny_llava

    model = tiny_llava()
    ids = torch.tensor([[LLAVA_IMAGE] * 64])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tokenprune.apply(model, "hiprune", keep=1 / 64, object_layer=2)
    with torch.no_grad():
        pruned = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, **GREEDY)
    assert tokenprune.last_forward(model).visual_tokens == [1]
    tokenprune.remove(model)
    reference, _ = _llava_reference(model, ids[0], pixels, 1 / 64, object_layer=2)
    assert torch.equal(pruned[0, 64:], reference[0])


# --- methods/hiprune.py (mutation/hiprune.toml survivors after hiprune_roles) ----------------------------------------

def test_hiprune_tiny_budget_keeps_the_anchor_and_its_best_buffers_as_such():
    """k = 4 on an 8x8 grid with alpha = 1: one anchor and its 4 neighbours do not fit; the anchor stays an
    anchor and its three best neighbours (by object-layer score) are buffers."""
    from tokenprune.methods.hiprune import hiprune_roles

    obj = torch.zeros(64)
    obj[27] = 1.0  # the anchor, row 3 col 3; its neighbours 26, 28, 19, 35
    obj[[26, 28, 19, 35]] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    roles = hiprune_roles(obj, torch.rand(64, generator=torch.Generator().manual_seed(0)), (8, 8), 4, alpha=1.0)
    assert torch.nonzero(roles == 1).flatten().tolist() == [27]
    assert torch.nonzero(roles == 2).flatten().tolist() == [19, 26, 28]
    assert int((roles == 3).sum()) == 0


def test_hiprune_grid_error_names_the_grid():
    from tokenprune.methods.hiprune import hiprune_select

    with pytest.raises(ValueError, match="16 scores do not fill a 3x5 grid"):
        hiprune_select(torch.rand(16), torch.rand(16), (3, 5), 4)
