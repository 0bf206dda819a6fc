"""Review of Zero-TPrune, HiPrune and the random methods: the bugs found (each test failed before its fix) and the
promises that had no test (per-image selection, the official HiPrune selection, keep=1.0 through the options)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import images, tiny_timm
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenprune
from tokenprune import extension
from tokenprune.methods import zero_tprune as zt
from tokenprune.methods.hiprune import HiPrune, hiprune_roles, hiprune_select
from tokenprune.methods.random_select import RandomSelect

# ----------------------------------------------------------------------------- Zero-TPrune: tol is per graph


def periodic_graph(n: int) -> torch.Tensor:
    """A walk that cycles through the tokens (nine tenths of each row on the next token): it never converges, so
    its WPR runs to ``max_iterations`` whatever ``tol`` is."""
    eye = torch.eye(n, dtype=torch.float64)
    return torch.roll(eye, 1, dims=1) * 0.9 + eye * 0.1


@pytest.mark.parametrize("seed", range(8))
def test_wpr_with_tol_stops_each_graph_on_its_own(seed):
    """The convergence test took the largest change over the whole batch: an image (or a head) that had converged
    kept iterating while another had not, so its scores, and the tokens it kept, depended on the other images of its
    batch (beside the periodic graph below, every one of these images scored differently than alone)."""
    n = 6
    g = torch.Generator().manual_seed(seed)
    attn = (torch.randn(1, 1, n, n, generator=g, dtype=torch.float64) * 3).softmax(-1)
    start = zt.initial_scores(1, 1, n, 0, "cpu", torch.float64)
    alone = zt.weighted_pagerank(attn, start, tol=3e-2)
    other = periodic_graph(n)[None, None]
    beside_an_image = zt.weighted_pagerank(torch.cat([attn, other]), start.expand(2, 1, n), tol=3e-2)[:1]
    beside_a_head = zt.weighted_pagerank(torch.cat([attn, other], dim=1), start.expand(1, 2, n), tol=3e-2)[:, :1]
    torch.testing.assert_close(beside_an_image, alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(beside_a_head, alone, rtol=0, atol=1e-12)


def test_wpr_with_tol_stops_at_the_round_that_converges():
    """Per graph, the rule is Algorithm 1's: the first iterate whose change is below ``tol`` is the result."""
    g = torch.Generator().manual_seed(0)
    attn = (torch.randn(3, 2, 7, 7, generator=g, dtype=torch.float64) * 2).softmax(-1)
    start = zt.initial_scores(3, 2, 7, 0, "cpu", torch.float64)
    tol = 1e-4
    got = zt.weighted_pagerank(attn, start, tol=tol)
    for b in range(3):
        for h in range(2):
            s = start[b, h]
            for _ in range(200):
                nxt = s @ attn[b, h]
                if (nxt - s).abs().max() < tol:
                    break
                s = nxt
            torch.testing.assert_close(got[b, h], nxt, rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- per-image selection


def kept_and_output(model, x):
    with torch.inference_mode():
        out = model(x)
    return tokenprune.last_forward(model).source.argmax(-1), out


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "vit_small_patch14_reg4_dinov2",
                                  "vit_base_patch16_siglip_224"])
@pytest.mark.parametrize("options", [{}, {"s_fraction": 0.5}, {"s_stage": False}, {"s_stage": False, "tol": 1e-3},
                                     {"s_fraction": 0.3, "renormalize": False, "uniform_start": True}])
@pytest.mark.parametrize("kernels", [True, False])
def test_zero_tprune_chooses_each_images_tokens_as_if_it_were_alone(name, options, kernels):
    """Selection is per image: an image keeps the same tokens whatever else is in its batch (the PyTorch ops and
    the CPU kernel alike)."""
    model = tiny_timm(name, depth=6, seed=3)
    with torch.no_grad():
        for block in model.blocks:  # sharper attention than random init gives
            block.attn.qkv.weight.mul_(3)
    x = images(4, seed=5)
    tokenprune.apply(model, "zero-tprune", keep=0.3, trace_source=True, **options)
    with contextlib.nullcontext() if kernels else extension.pytorch_ops_only():
        batch_kept, batch_out = kept_and_output(model, x)
        for i in range(x.shape[0]):
            kept, out = kept_and_output(model, x[i:i + 1])
            assert torch.equal(kept[0], batch_kept[i]), i
            torch.testing.assert_close(out[0], batch_out[i], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- keep=1.0 through the options


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "deit_small_distilled_patch16_224",
                                  "vit_small_patch14_reg4_dinov2", "vit_base_patch16_siglip_224"])
@pytest.mark.parametrize("method, options", [
    ("zero-tprune", {"keep_rates": [1.0, 1.0, 1.0]}), ("zero-tprune", {"importance": "random", "s_stage": False}),
    ("zero-tprune", {"layers": [0, 3], "tol": 1e-6}), ("random", {"r": 0}), ("random", {"r": [0, 0]}),
    ("random", {"seed": 2**32 - 1})])
def test_options_that_remove_nothing_run_the_stock_model_bit_for_bit(name, method, options):
    model, x = tiny_timm(name), images(3)
    with torch.inference_mode():
        expected = model(x)
        tokenprune.apply(model, method, keep=1.0, **options)
        assert torch.equal(model(x), expected)
        assert tokenprune.last_forward(model).token_counts == [model.num_prefix_tokens + 64] * 4


# ----------------------------------------------------------------------------- HiPrune against the official rule


def official_selection(obj, out, rows, cols, k, alpha, wrap):
    """HiPrune's selection written from the official LLaVA code (``encode_images``), in loops: anchors the top
    round(K alpha / 5) by object-layer score, their cross (``idx -+ 1``, ``idx -+ cols`` clamped to the sequence
    with ``wrap``; on the grid only, without), then the registers by output-layer score among the others. Where
    anchors and buffers exceed K (the official code fails there), the documented rule: anchors, then buffers by
    object-layer score."""
    n = rows * cols
    anchors = sorted(range(n), key=lambda i: -obj[i])[:round(k * alpha / 5)]
    buffers = set()
    for a in anchors:
        r, c = divmod(a, cols)
        if wrap:
            buffers |= {min(max(a + d, 0), n - 1) for d in (-1, 1, -cols, cols)}
        else:
            buffers |= {i for i, ok in ((a - 1, c > 0), (a + 1, c < cols - 1), (a - cols, r > 0),
                                        (a + cols, r < rows - 1)) if ok}
    buffers -= set(anchors)
    chosen = set(anchors) | set(sorted(buffers, key=lambda i: -obj[i])[:max(0, k - len(anchors))])
    registers = sorted((i for i in range(n) if i not in chosen), key=lambda i: -out[i])[:k - len(chosen)]
    return sorted(chosen | set(registers))


@settings(max_examples=150, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), fraction=st.floats(0.01, 1.0),
       alpha=st.sampled_from([0.0, 0.1, 0.5, 1.0, 0.37]), wrap=st.booleans(), seed=st.integers(0, 2**16))
def test_hiprune_selects_as_the_official_code(rows, cols, fraction, alpha, wrap, seed):
    n = rows * cols
    k = max(1, round(fraction * n))
    g = torch.Generator().manual_seed(seed)
    obj, out = torch.rand(n, generator=g), torch.rand(n, generator=g)  # distinct scores: no ties to break
    got = hiprune_select(obj, out, (rows, cols), k, alpha, wrap)
    assert got.tolist() == official_selection(obj.tolist(), out.tolist(), rows, cols, k, alpha, wrap)
    roles = hiprune_roles(obj, out, (rows, cols), k, alpha, wrap)
    assert int((roles == 1).sum()) == min(round(alpha * k / 5), k)


@pytest.mark.parametrize("selector", [HiPrune(keep=0.5), RandomSelect(keep=0.5)])
def test_a_crop_share_of_zero_keeps_nothing_without_an_allowed_mask(selector):
    """``crop_budget(0)`` (a crop's share when ``tokens`` is below the crops) with no ``allowed`` mask: HiPrune
    raised an AttributeError (it read the mask's shape for its empty answer)."""
    layers = 1 if isinstance(selector, RandomSelect) else 2  # the score layers each reads
    scores = tuple(torch.rand(16, generator=torch.Generator().manual_seed(i)) for i in range(layers))
    with selector.crop_budget(0):
        roles = selector.explain(scores, (4, 4))
        kept = selector.select(scores, (4, 4))
    assert roles.shape == (16,) and not roles.any() and kept.numel() == 0
