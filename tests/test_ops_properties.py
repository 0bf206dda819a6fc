"""Properties of the pure ops in tokenprune.ops, for any shapes and inputs hypothesis draws.

Nothing here depends on how bipartite matching splits the tokens into its two sets: the merge checks
use only what any plan must satisfy (sizes and mass conserved, each input token in exactly one output
token, prefix tokens first and untouched, ``min(r, N // 2)`` tokens removed).
"""
from __future__ import annotations

import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenprune import extension, ops

settings.register_profile("tokenprune", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("tokenprune")


@st.composite
def tokens(draw, min_patches=2, max_patches=24):
    """(x, size, metric, prefix): float64 tokens, integer sizes >= 1, a matching metric. At least two patch
    tokens: with one, set B is empty and the matching fails (no caller gets there: r is clamped to 0 and a
    block removing nothing does not match)."""
    batch = draw(st.integers(1, 3))
    prefix = draw(st.integers(0, 3))
    n = draw(st.integers(min_patches, max_patches))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    x = torch.randn(batch, prefix + n, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (batch, prefix + n, 1), generator=g).double()
    metric = torch.randn(batch, prefix + n, 3, generator=g, dtype=torch.float64)
    return x, size, metric, prefix


@given(tokens(), st.integers(0, 30))
def test_matching_removes_min_r_half_and_merge_mean_conserves_size_and_mass(data, r):
    x, size, metric, prefix = data
    n = x.shape[1] - prefix
    plan = ops.bipartite_soft_matching(metric, r, prefix)
    assert plan.removed == min(r, n // 2)
    merged, merged_size = ops.merge_mean(x, size, plan, prefix)
    assert merged.shape == (x.shape[0], x.shape[1] - plan.removed, 4)
    assert merged_size.shape == (x.shape[0], x.shape[1] - plan.removed, 1)
    torch.testing.assert_close(merged_size.sum(1), size.sum(1))  # every patch counted once
    torch.testing.assert_close((merged * merged_size).sum(1), (x * size).sum(1))  # size-weighted sum kept
    # prefix tokens stay first and never merge (x * size / size, the official arithmetic: exact for size 1)
    torch.testing.assert_close(merged[:, :prefix], x[:, :prefix], rtol=1e-15, atol=0)
    assert torch.equal(merged_size[:, :prefix], size[:, :prefix])
    unit = ops.merge_mean(x, None, plan, prefix)  # None: every size is 1
    ones = torch.ones_like(size)
    torch.testing.assert_close(unit[0], ops.merge_mean(x, ones, plan, prefix)[0])
    torch.testing.assert_close(unit[1], ops.merge_mean(x, ones, plan, prefix)[1])


@given(tokens(), st.integers(0, 30))
def test_plan_indices_are_disjoint_cover_their_sets(data, r):
    x, _, metric, prefix = data
    plan = ops.bipartite_soft_matching(metric, r, prefix)
    in_a, in_b = ops.prefix_in_sets(prefix)  # A = even, B = odd positions of the whole sequence
    size_a, size_b = (x.shape[1] + 1) // 2, x.shape[1] // 2
    for b in range(x.shape[0]):
        a_ids = sorted(plan.src[b].tolist() + plan.unmerged[b].tolist())
        assert a_ids == list(range(in_a, size_a))  # sources and unmerged split set A's non-prefix tokens
        assert plan.unmerged[b].tolist() == sorted(plan.unmerged[b].tolist())  # unmerged keep their order
        assert all(in_b <= d < size_b for d in plan.dst[b].tolist())  # destinations: B's non-prefix tokens


@given(tokens(), st.integers(0, 30))
def test_merge_sum_of_one_hot_sources_is_a_partition(data, r):
    x, _, metric, prefix = data
    batch, total = x.shape[:2]
    plan = ops.bipartite_soft_matching(metric, r, prefix)
    source = ops.merge_sum(torch.eye(total, dtype=torch.float64).expand(batch, total, total), plan, prefix)
    assert source.shape == (batch, total - plan.removed, total)
    assert ((source == 0) | (source == 1)).all()
    assert torch.equal(source.sum(1), torch.ones(batch, total, dtype=torch.float64))  # each input once
    assert (source.sum(-1) >= 1).all()  # no output token is empty
    assert torch.equal(source[:, :prefix, :prefix], torch.eye(prefix, dtype=torch.float64).expand(batch, -1, -1))
    # merging features by the same plan is the source map applied to them (the mean by sizes)
    merged, size = ops.merge_mean(x, None, plan, prefix)
    torch.testing.assert_close(size[..., 0], source.sum(-1))
    torch.testing.assert_close(merged, source @ x / size)


@given(tokens(), st.data())
def test_keep_tokens_keeps_the_prefix_and_the_chosen_patches(data, draw):
    x, _, _, prefix = data
    n = x.shape[1] - prefix
    keep = [sorted(draw.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n).map(sorted)))
            for _ in range(x.shape[0])]
    k = min(len(ids) for ids in keep)
    idx = torch.tensor([ids[:k] for ids in keep])
    for setting in ("off", "auto"):  # the PyTorch ops, and the CPU build's row copy (the default on CPU)
        with mock.patch.dict(os.environ, {extension.ENV: setting}):
            out = ops.keep_tokens(x, idx, prefix)
        assert out.shape == (x.shape[0], prefix + k, 4)
        assert torch.equal(out[:, :prefix], x[:, :prefix])
        for b in range(x.shape[0]):
            assert torch.equal(out[b, prefix:], x[b, prefix + idx[b]])


@given(st.integers(1, 4), st.integers(1, 200), st.data(), st.integers(0, 2 ** 31))
def test_random_keep_indices_are_ascending_unique_and_in_range(batch, n, draw, seed):
    keep = draw.draw(st.integers(0, n))
    idx = ops.random_keep_indices(batch, n, keep, seed, torch.device("cpu"))
    assert idx.shape == (batch, keep)
    for row in idx.tolist():
        assert row == sorted(set(row)) and all(0 <= i < n for i in row)
    again = ops._keep_smallest_keys(batch, n, keep, seed, torch.device("cpu"))  # not the memo's answer
    assert torch.equal(idx, again)  # seeded
    keys = ops.random_keys(batch, n, seed, "cpu")
    assert keys.unique().numel() == batch * n and 0 <= keys.min() and keys.max() < 2 ** 31  # distinct 31-bit keys
    assert torch.equal(idx, keys.argsort(dim=-1)[:, :keep].sort(dim=-1).values)  # the smallest keys


def _reference_mix31(h: int) -> int:
    """The documented hash, on Python ints: two rounds of h ^= h >> 16, h *= 0x45D9F3B (mod 2**31), then
    h ^= h >> 16."""
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) % 2 ** 31
    return h ^ (h >> 16)


def _reference_keys(batch: int, n: int, stream: int) -> list[list[int]]:
    start = _reference_mix31((stream ^ (stream >> 31)) % 2 ** 31)  # seeds past 2**31 fold in their high bits
    return [[_reference_mix31((start + b * n + j) % 2 ** 31) for j in range(n)] for b in range(batch)]


@given(st.integers(1, 3), st.integers(1, 40), st.integers(0, 2 ** 32 + 64))
def test_random_keys_follow_the_documented_hash(batch, n, stream):
    assert ops.random_keys(batch, n, stream, "cpu").tolist() == _reference_keys(batch, n, stream)


def test_random_keys_wrap_the_counter_and_fold_large_seeds():
    # a stream whose start lies within 2**16 of 2**31: its counters wrap to 0 within one draw of 2**16 + 64 keys
    stream = next(s for s in range(10 ** 6) if _reference_mix31(s) > 2 ** 31 - 2 ** 16)
    n = 2 ** 16 + 64
    keys = ops.random_keys(1, n, stream, "cpu")[0]
    start = _reference_mix31(stream)
    for j in [*range(8), *range(n - 64, n)]:  # the last 64 counters are past the wrap
        assert keys[j].item() == _reference_mix31((start + j) % 2 ** 31)
    # seeds reach 2**32 + depth: 5 and 2**31 + 5 must not draw alike
    assert not torch.equal(ops.random_keys(1, 64, 5, "cpu"), ops.random_keys(1, 64, 2 ** 31 + 5, "cpu"))


def test_eager_random_draws_are_memoised_and_equal_to_a_fresh_draw():
    first = ops.random_keep_indices(2, 30, 12, 4, "cpu")
    assert ops.random_keep_indices(2, 30, 12, 4, torch.device("cpu")) is first  # one draw, asked twice
    assert torch.equal(first, ops._keep_smallest_keys(2, 30, 12, 4, torch.device("cpu")))


def test_random_keys_are_uniform_and_independent_of_the_stream():
    """Each position is kept about equally often over streams, and neighbouring streams (seed + block index)
    give unrelated draws: a hash with poor mixing would keep some positions far more often, or repeat a draw."""
    n, keep, streams = 64, 16, 2000
    counts = torch.zeros(n)
    overlap = []
    previous = None
    for stream in range(streams):
        idx = ops._keep_smallest_keys(1, n, keep, stream, torch.device("cpu"))[0]
        counts[idx] += 1
        if previous is not None:
            overlap.append(len(set(idx.tolist()) & previous))
        previous = set(idx.tolist())
    expected = streams * keep / n  # 500; binomial sd ~19
    assert (counts - expected).abs().max() < 6 * expected ** 0.5
    assert abs(sum(overlap) / len(overlap) - keep * keep / n) < 0.3  # independent draws share keep^2/n = 4
    # and within a batch: rows differ
    rows = ops._keep_smallest_keys(8, n, keep, 3, torch.device("cpu"))
    assert len({tuple(r) for r in rows.tolist()}) == 8


def fits_under_the_cap(n, depth, target, fraction=0.5):
    """Whether removing the most each layer may (floor(fraction * tokens)) gets down to ``target``."""
    t = n
    for _ in range(depth):
        t -= math.floor(fraction * t)
    return t <= target


@given(st.integers(1, 400), st.integers(1, 14), st.data())
def test_plan_removals_reaches_the_target_under_the_cap_or_says_why(n, depth, draw):
    target = draw.draw(st.integers(1, n))
    if not fits_under_the_cap(n, depth, target):
        try:
            ops.plan_removals(n, depth, target)
        except ValueError as e:
            assert str(n) in str(e)
            return
        raise AssertionError("an unreachable target must raise")
    steps = ops.plan_removals(n, depth, target)
    assert len(steps) == depth and all(isinstance(s, int) and s >= 0 for s in steps)
    assert sum(steps) == n - target
    left = n
    for s in steps:
        assert s <= left // 2  # at most half of the tokens a layer sees
        left -= s
    base = (n - target) // depth
    assert max(steps, default=0) <= base + 1 or steps[0] >= steps[-1]  # even, or the cap pushed it early


@given(st.integers(0, 40), st.integers(1, 24))
def test_tome_r_schedule_constant_int(r, depth):
    assert ops.tome_r_schedule(r, depth) == (r,) * depth


@given(st.lists(st.integers(0, 20), max_size=12), st.integers(1, 24))
def test_tome_r_schedule_list_is_zero_padded_or_refused(values, depth):
    if len(values) > depth:
        try:
            ops.tome_r_schedule(values, depth)
        except ValueError:
            return
        raise AssertionError("a list longer than the depth must raise")
    assert ops.tome_r_schedule(values, depth) == tuple(values) + (0,) * (depth - len(values))


@given(st.integers(0, 40), st.floats(-1.0, 1.0), st.integers(1, 24))
def test_tome_r_schedule_inflection_is_linear_around_r(r, inflection, depth):
    steps = ops.tome_r_schedule((r, inflection), depth)
    assert len(steps) == depth and all(s >= 0 for s in steps)
    start = int(r * (1.0 - inflection))
    assert steps[0] == start
    if depth > 1:
        assert abs(steps[-1] - (2 * r - start)) <= 1  # ends at twice r minus the start
    diffs = [b - a for a, b in zip(steps, steps[1:])]
    assert all(d >= 0 for d in diffs) if inflection >= 0 else all(d <= 0 for d in diffs)
    if depth > 1:
        assert abs(sum(steps) - r * depth) <= depth  # the mean stays r (up to the int rounding per block)
    if inflection == 0:
        assert steps == (r,) * depth


@st.composite
def assignments(draw):
    batch, n = draw(st.integers(1, 3)), draw(st.integers(1, 16))
    n_out = draw(st.integers(1, n))
    dest = torch.tensor([draw(st.lists(st.integers(0, n_out - 1), min_size=n, max_size=n)) for _ in range(batch)])
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    t = torch.randn(batch, n, 3, generator=g, dtype=torch.float64)
    weight = torch.rand(batch, n, 1, generator=g, dtype=torch.float64) + 0.1
    return t, weight, dest, n_out


@given(assignments())
def test_assign_sum_and_mean_equal_the_dense_one_hot_products(data):
    t, weight, dest, n_out = data
    onehot = torch.nn.functional.one_hot(dest, n_out).double().transpose(1, 2)  # (B, n_out, N)
    torch.testing.assert_close(ops.assign_sum(t, dest, n_out), onehot @ t)
    mean = ops.assign_mean(t, weight, dest, n_out)
    used = onehot.sum(-1) > 0
    torch.testing.assert_close(mean[used], ((onehot @ (t * weight)) / (onehot @ weight))[used])
    four_d = t[..., None].expand(-1, -1, -1, 2)  # trailing dimensions ride along
    torch.testing.assert_close(ops.assign_sum(four_d, dest, n_out), (onehot @ t)[..., None].expand(-1, -1, -1, 2))


@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 20), st.integers(1, 20), st.integers(1, 25),
       st.sampled_from(["none", "key", "full"]), st.integers(0, 2 ** 31))
def test_received_attention_is_the_dense_mean_for_any_chunk(batch, heads, n_q, n_k, chunk, bias_kind, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_q, 4, generator=g, dtype=torch.float64)
    k = torch.randn(batch, heads, n_k, 4, generator=g, dtype=torch.float64)
    bias = {"none": None, "key": torch.randn(batch, 1, 1, n_k, generator=g, dtype=torch.float64),
            "full": torch.randn(batch, 1, n_q, n_k, generator=g, dtype=torch.float64)}[bias_kind]
    logits = q @ k.transpose(-2, -1) * 0.7
    dense = (logits if bias is None else logits + bias).softmax(-1).mean(dim=(1, 2))
    got = ops.received_attention(q, k, 0.7, bias, chunk=chunk)
    torch.testing.assert_close(got, dense, atol=1e-12, rtol=1e-10)  # float64 in, float64 out
    torch.testing.assert_close(got.sum(-1), torch.ones(batch, dtype=torch.float64), atol=1e-12, rtol=0)


@given(st.integers(1, 3), st.integers(1, 12), st.integers(0, 2 ** 31))
def test_size_weighted_mean_is_the_mean_over_copies_and_the_bias_is_log_size(batch, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 3, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (batch, n, 1), generator=g).double()
    for b in range(batch):
        copies = x[b].repeat_interleave(size[b, :, 0].long(), dim=0)
        torch.testing.assert_close(ops.size_weighted_mean(x, size)[b], copies.mean(0))
    assert torch.equal(ops.log_size_bias(size), size.log().view(batch, 1, 1, n))


@given(st.integers(1, 5000), st.floats(0.0, 1.0, exclude_min=True))
def test_final_patch_count(n, keep):
    count = ops.final_patch_count(n, keep)
    assert 1 <= count <= n and count == max(1, round(keep * n))


@st.composite
def head_operands(draw):
    """(a, b, add, alpha): per-head operands (B, H, n, m) and (B, H, m, p), either contiguous or as a qkv
    projection leaves them (heads between tokens: one product over B*H would copy them), and an additive bias
    shaped as attention biases are, or None."""
    batch, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n, m, p = draw(st.integers(1, 6)), draw(st.integers(1, 5)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    # each operand's layout drawn on its own: either one of them may be the one that does not fold
    a = torch.randn(batch, n, heads, m, generator=g, dtype=torch.float64).transpose(1, 2) if draw(st.booleans()) \
        else torch.randn(batch, heads, n, m, generator=g, dtype=torch.float64)
    b = torch.randn(batch, p, heads, m, generator=g, dtype=torch.float64).permute(0, 2, 3, 1) if draw(st.booleans()) \
        else torch.randn(batch, heads, m, p, generator=g, dtype=torch.float64)
    shape = draw(st.sampled_from((None, (batch, 1, 1, p), (1, 1, 1, p), (batch, heads, 1, p), (batch, 1, n, p))))
    add = None if shape is None else torch.randn(*shape, generator=g, dtype=torch.float64)
    return a, b, add, draw(st.sampled_from((1.0, 0.125, 0.3)))


@given(head_operands(), st.booleans())
def test_head_products_are_alpha_a_b_plus_add_into_out(operands, into_buffer):
    """Whatever the layout (one product over B*H, or one per sample) and the bias's broadcast, the result is
    alpha * a @ b + add, written into ``out`` where one is given."""
    a, b, add, alpha = operands
    expected = alpha * (a @ b) + (0 if add is None else add)
    out = torch.full((a.shape[0], a.shape[1], a.shape[2], b.shape[-1]), float("nan"), dtype=torch.float64) \
        if into_buffer else None
    got = ops.head_products(a, b, alpha=alpha, add=add, out=out)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert out is None or got.data_ptr() == out.data_ptr()


@given(head_operands(), st.booleans())
def test_head_products_off_the_cpu_are_one_batched_product(operands, into_buffer):
    """Off the CPU (a GPU) the operands that do not fold into (B*H, ...) views are copied into one product, not
    multiplied sample by sample (a kernel launch per sample): the same result."""
    a, b, add, alpha = operands
    expected = alpha * (a @ b) + (0 if add is None else add)
    out = torch.full((a.shape[0], a.shape[1], a.shape[2], b.shape[-1]), float("nan"), dtype=torch.float64) \
        if into_buffer else None
    with mock.patch.object(ops, "_per_sample_products_pay", lambda device: False):
        got = ops.head_products(a, b, alpha=alpha, add=add, out=out)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert out is None or got.data_ptr() == out.data_ptr()


@pytest.mark.parametrize("device,products", [("cpu", 4), ("meta", 1)])
@pytest.mark.parametrize("unfolded", ["q and k", "q", "k"])
def test_head_products_count_per_device(device, products, unfolded):
    """q and k as a qkv projection leaves them (batch 4; either or both): four products on the CPU, one elsewhere
    (meta stands for a GPU: what is not the CPU)."""
    from tokenprune.eval.op_count import OpCounter

    qkv = torch.randn(4, 5, 3, 2, 8, device=device).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D), heads between tokens
    q = qkv[0] if "q" in unfolded else qkv[0].contiguous()
    k = qkv[1] if "k" in unfolded else qkv[1].contiguous()
    with OpCounter() as counter:
        ops.head_products(q, k.transpose(-2, -1), alpha=0.5)
    assert counter.counts["baddbmm"] == products


@pytest.mark.parametrize("learns", ["a", "b", "add", "all"])
def test_head_products_follow_autograd(learns):
    """Under autograd (no ``out=``), whichever operand requires grad: the gradient of alpha * a @ b + add."""
    a, b, add = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5, 2), torch.randn(2, 1, 1, 2)
    for name, t in (("a", a), ("b", b), ("add", add)):
        t.requires_grad_(learns in (name, "all"))
    ops.head_products(a, b, alpha=0.5, add=add).sum().backward()
    if a.requires_grad:
        torch.testing.assert_close(a.grad, 0.5 * torch.ones(2, 3, 4, 2) @ b.transpose(-1, -2))
    if b.requires_grad:
        torch.testing.assert_close(b.grad, 0.5 * a.transpose(-1, -2) @ torch.ones(2, 3, 4, 2))
    if add.requires_grad:
        torch.testing.assert_close(add.grad, torch.full((2, 1, 1, 2), 3.0 * 4))


def test_heads_fold_into_the_batch_only_where_that_is_a_view():
    """The per-sample products exist to spare a copy: (B, H) folds into one batch dimension only as a view."""
    q = torch.randn(2, 5, 3, 4).transpose(1, 2)  # (B, H, N, D) as a projection leaves it: heads between tokens
    assert ops._heads_as_batch(q) is None
    assert ops._heads_as_batch(torch.randn(3, 2, 5, 4).transpose(0, 1)) is None  # samples inside heads
    for view in (q[:1], q[:, :1], q.contiguous()):  # one sample, one head, or contiguous
        folded = ops._heads_as_batch(view)
        assert folded.data_ptr() == view.data_ptr() and torch.equal(folded, view.reshape(-1, 5, 4))
