"""The pure tensor functions, against slow references written here from the ToMe spec."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import images, tiny_timm

import tokenprune
from tokenprune import ops


def reference_tome_merge(x, size, metric, r, prefix):
    """ToMe for one sample, loop by loop: returns (x, size) in ToMe's output order.

    The official convention: A and B alternate over all tokens from position 0; prefix tokens
    in either set are left out of the matching, and come first in the output."""
    a = [i for i in range(0, x.shape[0], 2) if i >= prefix]
    b = [j for j in range(1, x.shape[0], 2) if j >= prefix]
    r = min(r, (x.shape[0] - prefix) // 2)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    best = []
    for i in a:
        sims = [float(unit[i] @ unit[j]) for j in b]
        j = max(range(len(b)), key=lambda k: sims[k])
        best.append((sims[j], i, b[j]))
    # stable sort by similarity, descending (ties keep A order, as argsort does for distinct values)
    ranked = sorted(best, key=lambda t: -t[0])
    sources = {i: dst for _, i, dst in ranked[:r]}
    sums = {j: x[j] * size[j] for j in b}
    sizes = {j: size[j].clone() for j in b}
    for i, dst in sources.items():
        sums[dst] = sums[dst] + x[i] * size[i]
        sizes[dst] = sizes[dst] + size[i]
    rows = [x[i] for i in range(prefix)] + [x[i] for i in a if i not in sources] + [sums[j] / sizes[j] for j in b]
    row_sizes = [size[i] for i in range(prefix)] + [size[i] for i in a if i not in sources] + [sizes[j] for j in b]
    return torch.stack(rows), torch.stack(row_sizes)


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("n, r", [(16, 4), (17, 8), (9, 6), (20, 0)])
def test_tome_merge_matches_the_slow_reference(prefix, n, r):
    g = torch.Generator().manual_seed(n * 10 + r + prefix)
    x = torch.randn(3, prefix + n, 8, generator=g, dtype=torch.float64)
    metric = torch.randn(3, prefix + n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (3, prefix + n, 1), generator=g).double()
    plan = ops.bipartite_soft_matching(metric, r, prefix)
    merged, merged_size = ops.merge_mean(x, size, plan, prefix)
    assert merged.shape == (3, prefix + n - min(r, n // 2), 8)
    for s in range(3):
        ref_x, ref_size = reference_tome_merge(x[s], size[s], metric[s], r, prefix)
        torch.testing.assert_close(merged[s], ref_x)
        torch.testing.assert_close(merged_size[s], ref_size)


def test_merge_sum_conserves_mass_and_leaves_inputs_alone():
    x = torch.randn(2, 11, 4)
    x_before = x.clone()
    plan = ops.bipartite_soft_matching(torch.randn(2, 11, 3), 3, 1)
    out = ops.merge_sum(x, plan, 1)
    torch.testing.assert_close(out.sum(1), x.sum(1))
    assert torch.equal(x, x_before)


def reference_tome_forward(model, x, r):
    """A whole timm ViT under ToMe, written out with explicit softmax attention."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    size = torch.ones(t.shape[0], t.shape[1], 1, dtype=t.dtype)
    p = model.num_prefix_tokens
    for blk in model.blocks:
        attn, h = blk.attn, blk.norm1(t)
        B, N, _ = h.shape
        q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :, 0]
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1)
        t = t + blk.ls1(attn.proj(out))
        merged = [reference_tome_merge(t[s], size[s], k.mean(1)[s], r, p) for s in range(B)]
        t, size = torch.stack([m[0] for m in merged]), torch.stack([m[1] for m in merged])
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.head(model.norm(t)[:, 0])


def test_patched_tome_model_matches_the_reference_forward():
    model, x = tiny_timm("deit3_small_patch16_224", init_values=0.5), images()
    with torch.inference_mode():
        expected = reference_tome_forward(model, x, r=9)
        tokenprune.apply(model, "tome", r=9)
        torch.testing.assert_close(model(x), expected, atol=2e-5, rtol=1e-4)


def test_trace_source_maps_every_input_token_once():
    model, x = tiny_timm("deit_small_distilled_patch16_224"), images()
    for method in ("tome", "random"):
        tokenprune.apply(model, method, keep=0.25, trace_source=True)
        with torch.inference_mode():
            model(x)
        report = tokenprune.last_forward(model)
        assert report.source.shape == (2, report.output_tokens, 66)
        if method == "tome":
            assert torch.equal(report.source.sum(-1, keepdim=True), report.size)
            assert torch.equal(report.source.sum(1), torch.ones(2, 66))  # every input token lands once
        else:
            kept = report.source.argmax(-1)
            assert torch.equal(kept, kept.sort(-1).values)  # spatial order survives dropping


def test_random_is_seeded():
    model, x = tiny_timm(), images()
    outs = {}
    for seed in (0, 0, 1):
        tokenprune.apply(model, "random", keep=0.3, seed=seed, trace_source=True)
        with torch.inference_mode():
            model(x)
        outs.setdefault(seed, []).append(tokenprune.last_forward(model).source)
    assert torch.equal(*outs[0])
    assert not torch.equal(outs[0][0], outs[1][0])
    assert not torch.equal(outs[0][0][0], outs[0][0][1])  # samples differ


@pytest.mark.parametrize("n, depth", [(196, 12), (64, 4), (1369, 12), (50, 3)])
def test_plan_removals(n, depth):
    for target in range(1, n + 1):
        try:
            steps = ops.plan_removals(n, depth, target)
        except ValueError:
            assert target < n / 2 ** depth + 1  # only when halving every layer can't get there
            continue
        assert sum(steps) == n - target and len(steps) == depth
        left = n
        for s in steps:
            assert 0 <= s <= left // 2
            left -= s
        base, extra = divmod(n - target, depth)
        even = [base + (i < extra) for i in range(depth)]
        counts = [n - sum(even[:i]) for i in range(depth)]
        if all(s <= c // 2 for s, c in zip(even, counts)):
            assert list(steps) == even  # even (early layers take the remainder) unless the cap forbids it
        else:
            assert steps[0] >= steps[-1]  # the cap pushes removal to the early layers


def test_log_size_bias_and_weighted_mean():
    size = torch.tensor([[[1.0], [3.0]]])
    assert torch.equal(ops.log_size_bias(size), size.log().view(1, 1, 1, 2))
    x = torch.tensor([[[0.0], [4.0]]])
    assert float(ops.size_weighted_mean(x, size)) == 3.0
    # A bias of log(s) is the same attention as s copies of that key:
    q, k, v = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)
    biased = F.scaled_dot_product_attention(q, k, v, attn_mask=ops.log_size_bias(size))
    copies = F.scaled_dot_product_attention(q, k[:, :, [0, 1, 1, 1]], v[:, :, [0, 1, 1, 1]])
    torch.testing.assert_close(biased, copies)

