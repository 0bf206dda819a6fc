"""Behaviours of the matching core that mutation testing (mutation/core.toml) found untested."""
from __future__ import annotations

import pytest
import torch
from conftest import images, tiny_timm

import tokenprune
from tokenprune import ops


def test_mctf_never_merges_below_min_tokens():
    """min_tokens is a floor on all tokens: with it above what the model has, MCTF merges nothing and the
    output is the stock model's."""
    model, x = tiny_timm(), images()
    with torch.inference_mode():
        expected = model(x)
    tokenprune.apply(model, "mctf", r=8, min_tokens=65)  # 64 patches + the class token
    with torch.inference_mode():
        out = model(x)
    assert tokenprune.last_forward(model).token_counts == [65] * 4
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    tokenprune.apply(model, "mctf", r=8, min_tokens=60)  # the floor stops block 1 at 60 tokens, then nothing
    with torch.inference_mode():
        model(x)
    assert tokenprune.last_forward(model).token_counts == [65, 65, 60, 60]


@pytest.mark.parametrize("r", [0.0, 1.0, -0.5])
def test_mctf_rejects_a_fraction_outside_the_open_interval(r):
    with pytest.raises(ValueError, match=r"a fraction in \(0, 1\)"):
        tokenprune.apply(tiny_timm(), "mctf", r=r)


def test_linear_r_schedule_on_a_one_block_model():
    """(r, inflection) on a single block is just r at that block (no step to spread over)."""
    assert ops.tome_r_schedule((4, 0.0), 1) == (4,)
    assert ops.tome_r_schedule((4, -1.0), 1) == (8,)
    assert ops.tome_r_schedule((4, -1.0), 3) == (8, 4, 0)


@pytest.mark.parametrize("row_bias", [False, True])
def test_received_attention_is_the_mean_attention_a_key_receives(row_bias):
    """Chunked over queries (chunk 3 of 7), with a key bias or a per-query bias; against the plain formula."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    bias = torch.randn(2, 1, 7 if row_bias else 1, 5, generator=g)
    probs = ((q @ k.transpose(-2, -1)) * 0.5 + bias).softmax(-1)
    torch.testing.assert_close(ops.received_attention(q, k, 0.5, bias, chunk=3), probs.mean(dim=(1, 2)))
    plain = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1).mean(dim=(1, 2))
    torch.testing.assert_close(ops.received_attention(q, k, 0.5, chunk=3), plain)


def test_mctf_default_floor_is_ten_tokens():
    """The official floor: never merge below 10 tokens in all (class token included)."""
    model = tiny_timm()
    tokenprune.apply(model, "mctf", r=32)
    with torch.inference_mode():
        model(images())
    report = tokenprune.last_forward(model)
    assert report.token_counts == [65, 65, 33, 17] and report.output_tokens == 10


def test_mctf_per_block_r_list_fits_the_merging_blocks():
    model = tiny_timm()
    tokenprune.apply(model, "mctf", r=[4, 4, 4])  # one per merging block (1, 2, 3): accepted
    with torch.inference_mode():
        model(images())
    assert tokenprune.last_forward(model).token_counts == [65, 65, 61, 57]
    with pytest.raises(ValueError, match="r has 4 entries for 3 merging blocks"):
        tokenprune.apply(model, "mctf", r=[4, 4, 4, 4])


def test_mctf_on_a_one_block_model_has_no_merging_block():
    model, x = tiny_timm(depth=1), images()
    with torch.inference_mode():
        expected = model(x)
    with pytest.raises(ValueError, match=r"layers=\[0\]"):  # a reducing keep would merge nothing: refused
        tokenprune.apply(model, "mctf", keep=0.5)
    tokenprune.apply(model, "mctf", keep=1.0)
    with torch.inference_mode():
        assert torch.equal(model(x), expected)
    assert tokenprune.last_forward(model).token_counts == [65]


def _greedy(n, depth, total, r):
    """Constant r per layer, capped at half the tokens a layer sees, until ``total`` are removed."""
    steps, left, t = [], total, n
    for _ in range(depth):
        steps.append(min(r, t // 2, left))
        left -= steps[-1]
        t -= steps[-1]
    return steps, left


@pytest.mark.parametrize("n, depth", [(196, 12), (64, 4), (50, 3)])
def test_plan_removals_uses_the_smallest_constant_r_when_the_cap_binds(n, depth):
    for target in range(1, n // 4):
        try:
            steps = ops.plan_removals(n, depth, target)
        except ValueError:
            continue
        total = n - target
        r = next(r for r in range(1, n + 1) if _greedy(n, depth, total, r)[1] == 0)
        even = [total // depth + (i < total % depth) for i in range(depth)]
        if any(s > c // 2 for s, c in zip(even, [n - sum(even[:i]) for i in range(depth)])):
            assert list(steps) == _greedy(n, depth, total, r)[0], target


def test_mctf_fraction_r_merges_that_share_of_the_tokens_left():
    model = tiny_timm()
    tokenprune.apply(model, "mctf", r=0.25)  # 64 patches: 16, then 12 of 48, then 9 of 36
    with torch.inference_mode():
        model(images())
    report = tokenprune.last_forward(model)
    assert report.token_counts == [65, 65, 49, 37] and report.output_tokens == 28


def test_final_patch_count_keeps_at_least_one_patch():
    assert ops.final_patch_count(64, 0.001) == 1
    assert ops.final_patch_count(64, 0.5) == 32


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
def test_matching_with_nothing_to_merge_is_an_empty_plan(num_prefix):
    """A single patch token (B may hold no patch token at all) or r=0: no merge, every token stays."""
    for n_patches, r in ((1, 1), (4, 0)):
        metric = torch.randn(2, num_prefix + n_patches, 8)
        plan = ops.bipartite_soft_matching(metric, r, num_prefix)
        assert plan.removed == 0
        x = torch.randn(2, num_prefix + n_patches, 3)
        merged, size = ops.merge_mean(x, None, plan, num_prefix)
        assert merged.shape == x.shape and torch.equal(size, torch.ones(2, x.shape[1], 1))
        assert sorted(ops.merge_sum(torch.arange(x.shape[1]).expand(2, -1)[..., None], plan, num_prefix)[0, :, 0]
                      .tolist()) == list(range(x.shape[1]))


def test_plan_removals_without_layers_cannot_reach_a_target():
    assert ops.plan_removals(16, 0, 16) == ()
    with pytest.raises(ValueError, match="without a reducing layer"):
        ops.plan_removals(16, 0, 8)


def test_plan_removals_reaches_a_single_token():
    """keep small enough leaves max(1, ...) = 1 patch token: a valid target, spread under the 50% cap."""
    steps = ops.plan_removals(16, 4, 1)
    assert sum(steps) == 15 and len(steps) == 4
    with pytest.raises(ValueError, match=r"target must be in \[1, 16\]"):
        ops.plan_removals(16, 4, 0)
