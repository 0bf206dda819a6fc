"""The official ToMe / MCTF conventions, pinned by slow references written here from their spec.

The conventions (docs/methods.md): A and B alternate over the whole sequence from position 0,
prefix tokens included; a prefix token is never a source nor a destination; every output starts
with the prefix in its original order. After it, ToMe keeps the unmerged A tokens then the B tokens,
each in position order; MCTF keeps the remaining A tokens in position order, then the remaining B
tokens in the order of their descending second-step score. The references below work sample by
sample with Python lists and loops, score pairs with the official formulas (products of powers, not
our log space) and return the groups of input tokens that make up each output token, in output
order, so that the tests compare values and token order.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import images, tiny_timm
from tokenprune.eval import compare_official

import tokenprune
from tokenprune import ops
from tokenprune.methods import mctf

NEG = -math.inf


def _cosines(t) -> list[list[float]]:
    """Cosine similarity of every pair of rows of ``t`` (N, d), as Python floats."""
    unit = t / t.norm(dim=-1, keepdim=True)
    return (unit @ unit.T).tolist()


def _ranked(scores: dict[int, tuple[float, int]]) -> list[tuple[int, int]]:
    """(token, best partner) by descending best score; distinct random scores, so no ties but -inf."""
    return [(i, j) for i, (_, j) in sorted(scores.items(), key=lambda kv: -kv[1][0])]


def reference_tome_groups(metric, r: int, prefix: int) -> list[list[int]]:
    """ToMe's matching on one sample ``metric`` (N, d): the groups of input tokens per output token."""
    n = metric.shape[0]
    a, b = list(range(0, n, 2)), list(range(1, n, 2))
    r = min(r, (n - prefix) // 2)
    cos = _cosines(metric)

    def score(i, j):
        return NEG if i < prefix or j < prefix else cos[i][j]

    best = {}
    for i in a:
        sims = [score(i, j) for j in b]
        k = max(range(len(b)), key=lambda m: sims[m])
        best[i] = (sims[k], b[k])
    sources = dict(_ranked(best)[:r])
    groups = {t: [t] for t in range(n)}
    for i, j in sources.items():
        groups[j].append(i)
    order = list(range(prefix)) + [i for i in a if i >= prefix and i not in sources] + [j for j in b if j >= prefix]
    return [sorted(groups[t]) for t in order]


def reference_mctf_groups(x, received, size, r: int, prefix: int, tau=(1.0, 20.0, 40.0),
                          bidirectional: bool = True) -> list[list[int]]:
    """MCTF's matching on one sample: x (N, d) block input, received (N,) attention, size (N,)."""
    n = x.shape[0]
    a, b = list(range(0, n, 2)), list(range(1, n, 2))
    inv_attn = [1 / float(v) for v in received]
    inv_size = [1 / float(v) for v in size]
    max_attn, max_size = max(inv_attn), max(inv_size)
    cos = _cosines(x)

    def weight(i, j):
        if i < prefix or j < prefix:
            return NEG
        sim = ((cos[i][j] + 1) / 2) ** (1 / tau[0])
        info = (inv_attn[i] / max_attn * inv_attn[j] / max_attn) ** (1 / tau[1])
        sz = (inv_size[i] / max_size * inv_size[j] / max_size) ** (1 / tau[2])
        return sim * info * sz

    r1 = r // 2 if bidirectional else r
    best = {i: max((weight(i, j), j) for j in b) for i in a}
    src1 = dict(_ranked(best)[:r1])
    kept_a = [i for i in a if i not in src1]
    groups = {t: [t] for t in range(n)}
    if bidirectional:
        best2 = {j: max((weight(i, j), i) for i in kept_a) for j in b}
        ranked2 = _ranked(best2)
        src2 = dict(ranked2[:r - r1])
        kept_b = [j for j, _ in ranked2[r - r1:]]
    else:
        src2, kept_b = {}, b
    for i, j in src1.items():
        groups[j].append(i)
    for j, i in src2.items():
        groups[i].extend(groups[j])
    order = list(range(prefix)) + [i for i in kept_a if i >= prefix] + [j for j in kept_b if j >= prefix]
    return [sorted(groups[t]) for t in order]


def pool(t, weight, groups):
    """Each group's ``weight``-ed mean of the rows of ``t`` (N, ...); weight (N,)."""
    return torch.stack([sum(t[i] * weight[i] for i in g) / sum(weight[i] for i in g) for g in groups])


def groups_of(dest, n_out) -> list[list[int]]:
    return [[i for i, d in enumerate(dest.tolist()) if d == s] for s in range(n_out)]


# ----------------------------------------------------------------------------- one step on random tensors

PREFIXES = [0, 1, 2, 5]
CASES = [(16, 4), (17, 8), (9, 3), (30, 1)]  # (non-prefix tokens, r)


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("n, r", CASES)
def test_tome_step_follows_the_official_conventions(prefix, n, r):
    g = torch.Generator().manual_seed(100 * prefix + n + r)
    x = torch.randn(3, prefix + n, 6, generator=g, dtype=torch.float64)
    metric = torch.randn(3, prefix + n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (3, prefix + n, 1), generator=g).double()
    plan = ops.bipartite_soft_matching(metric, r, prefix)
    merged, merged_size = ops.merge_mean(x, size, plan, prefix)
    one_hot = torch.eye(prefix + n, dtype=torch.float64).expand(3, -1, -1)
    source = ops.merge_sum(one_hot, plan, prefix)
    for s in range(3):
        groups = reference_tome_groups(metric[s], r, prefix)
        assert groups_of(source[s].argmax(0), len(groups)) == groups  # which tokens, in which order
        assert groups[:prefix] == [[t] for t in range(prefix)]
        torch.testing.assert_close(merged[s], pool(x[s], size[s, :, 0], groups), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged_size[s, :, 0], size[s, :, 0].new_tensor([sum(size[s, i, 0] for i in gr)
                                                                                   for gr in groups]))


def test_tome_alternation_includes_the_class_token():
    """With a class token the first patch token is in B (odd position), so it can absorb but never be a
    source; the old convention (alternation from the first patch token) would put it in A."""
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.1]]])
    plan = ops.bipartite_soft_matching(metric, 1, 1)
    # A = positions 0 (class), 2, 4; B = 1, 3. Position 2 matches position 1 exactly.
    assert plan.src.tolist() == [[1]] and plan.dst.tolist() == [[0]]
    assert plan.unmerged.tolist() == [[2]]
    source = ops.merge_sum(torch.eye(5)[None], plan, 1)
    assert source.argmax(-1).tolist() == [[0, 4, 1, 3]]  # class, unmerged A (position 4), then B


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("n, r", CASES + [(16, 8)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_mctf_step_follows_the_official_conventions(prefix, n, r, bidirectional):
    g = torch.Generator().manual_seed(100 * prefix + n + r + bidirectional)
    x = torch.randn(2, prefix + n, 6, generator=g, dtype=torch.float64)
    received = torch.rand(2, prefix + n, generator=g, dtype=torch.float64) + 0.05
    size = torch.randint(1, 5, (2, prefix + n), generator=g).double()
    tau = (1.0, 20.0, 40.0)
    log_w = mctf.pair_scores(x, received, size, tau, (True, True, True), prefix)
    dest, n_out = mctf.bidirectional_assignment(log_w, r, prefix, bidirectional)
    assert n_out == prefix + n - r
    weight = received * size
    fused = ops.assign_mean(x, weight[..., None], dest, n_out)
    for s in range(2):
        groups = reference_mctf_groups(x[s], received[s], size[s], r, prefix, tau, bidirectional)
        assert groups_of(dest[s], n_out) == groups
        torch.testing.assert_close(fused[s], pool(x[s], weight[s], groups), rtol=1e-12, atol=1e-12)


def test_mctf_keeps_b_tokens_in_score_order():
    """The B tokens that stay come in the order of the second step's scores, not in position order."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 41, 8, generator=g)
    received, size = torch.rand(1, 41, generator=g) + 0.05, torch.ones(1, 41)
    dest, n_out = mctf.bidirectional_assignment(mctf.pair_scores(x, received, size, (1, 20, 40), (True,) * 3, 1), 6, 1)
    first_member = [group[0] for group in groups_of(dest[0], n_out)]
    kept_b = [t for t in first_member if t % 2 == 1 and len(groups_of(dest[0], n_out)[first_member.index(t)]) == 1]
    assert kept_b != sorted(kept_b)


# ----------------------------------------------------------------------------- whole models


def _attention(blk, h, size, prop_attn=True):
    attn = blk.attn
    batch, n, _ = h.shape
    q, k, v = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if prop_attn:
        logits = logits + size.log()[:, None, None, :, 0]
    return logits.softmax(-1), k, v


def _finish_attention(blk, probs, v):
    batch, _, n, _ = probs.shape
    return blk.attn.proj(blk.attn.norm((probs @ v).transpose(1, 2).reshape(batch, n, -1)))


def reference_tome_features(model, x, r):
    """A timm ViT under ToMe (merge between attention and MLP), token by token; returns (tokens, sources)."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    p, batch = model.num_prefix_tokens, t.shape[0]
    size = torch.ones(batch, t.shape[1], 1, dtype=t.dtype)
    source = torch.eye(t.shape[1], dtype=t.dtype).expand(batch, -1, -1)
    for blk in model.blocks:
        probs, k, v = _attention(blk, blk.norm1(t), size)
        t = t + blk.ls1(_finish_attention(blk, probs, v))
        groups = [reference_tome_groups(k.mean(1)[s], r, p) for s in range(batch)]
        t = torch.stack([pool(t[s], size[s, :, 0], groups[s]) for s in range(batch)])
        source = torch.stack([pool(source[s], torch.ones(len(source[s])), groups[s]) * torch.tensor(
            [len(gr) for gr in groups[s]], dtype=t.dtype)[:, None] for s in range(batch)])
        size = torch.stack([pool(size[s], torch.ones(len(size[s])), groups[s]) * torch.tensor(
            [len(gr) for gr in groups[s]], dtype=t.dtype)[:, None] for s in range(batch)])
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.norm(t), source


def _mctf_removals(num_patches, depth, r):
    """Merges per block for a constant ``r`` at blocks 1..L-1, or ``r`` itself when it is a per-block list."""
    if isinstance(r, list):
        return r + [0] * (depth - len(r))
    steps, left = [0] * depth, num_patches
    for layer in range(1, depth):
        steps[layer] = min(r, left // 2)
        left -= steps[layer]
    return steps


def reused_attention(probs, weight, groups):
    """One sample's attention (H, N, N) for the merged tokens: the key columns of a group add up, the
    query rows of a group are averaged with ``weight`` (N,)."""
    member = probs.new_zeros(len(groups), probs.shape[-1])  # (groups, tokens) 0/1
    for g, tokens in enumerate(groups):
        member[g, tokens] = 1
    by_key = probs @ member.T  # (H, N queries, groups)
    return (member * weight) @ by_key / (member @ weight)[:, None]


def reference_mctf_features(model, x, r, exact=False):
    """A timm ViT under MCTF (merge at the input of blocks 1..L-1, attention reused one step ahead:
    key columns of a group add up, query rows are averaged with attention x size), token by token."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    p, batch = model.num_prefix_tokens, t.shape[0]
    size = torch.ones(batch, t.shape[1], 1, dtype=t.dtype)
    source = torch.eye(t.shape[1], dtype=t.dtype).expand(batch, -1, -1)
    for blk, remove in zip(model.blocks, _mctf_removals(t.shape[1] - p, len(model.blocks), r)):
        probs, _, v = _attention(blk, blk.norm1(t), size)
        remove = min(remove, max(0, t.shape[1] - 10))
        if remove:
            received = probs.mean(dim=(1, 2))
            weight = received * size[..., 0]
            groups = [reference_mctf_groups(t[s], received[s], size[s, :, 0], remove, p) for s in range(batch)]
            ones = torch.ones(t.shape[1], dtype=t.dtype)
            counts = [torch.tensor([len(gr) for gr in groups[s]], dtype=t.dtype)[:, None] for s in range(batch)]
            t = torch.stack([pool(t[s], weight[s], groups[s]) for s in range(batch)])
            source = torch.stack([pool(source[s], ones, groups[s]) * counts[s] for s in range(batch)])
            size = torch.stack([pool(size[s], ones, groups[s]) * counts[s] for s in range(batch)])
            merged_probs, _, v = _attention(blk, blk.norm1(t), size)
            if not exact:
                merged_probs = torch.stack([reused_attention(probs[s], weight[s], groups[s]) for s in range(batch)])
            probs = merged_probs
        t = t + blk.ls1(_finish_attention(blk, probs, v))
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.norm(t), source


FAMILIES = ["vit_base_patch16_siglip_gap_224", "vit_base_patch16_224", "deit_small_distilled_patch16_224",
            "vit_small_patch14_reg4_dinov2"]  # 0, 1, 2 and 5 prefix tokens


def _ours(model, x, method, **options):
    tokenprune.apply(model, method, trace_source=True, **options)
    with torch.inference_mode():
        out = model.forward_features(x)
    report = tokenprune.last_forward(model)
    tokenprune.remove(model)
    return out, report


@pytest.mark.parametrize("name", FAMILIES)
def test_tome_models_match_the_reference(name):
    model, x = tiny_timm(name, depth=3).double(), images(2).double()
    for r in (3, 9, 20):
        with torch.inference_mode():
            expected, expected_source = reference_tome_features(model, x, r)
        out, report = _ours(model, x, "tome", r=r)
        assert torch.equal(report.source, expected_source), r  # the same tokens, in the same order
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", FAMILIES)
def test_mctf_models_match_the_reference(name):
    model, x = tiny_timm(name, depth=4, embed_dim=24).double(), images(2).double()
    for r in (4, 11, 20):
        with torch.inference_mode():
            expected, expected_source = reference_mctf_features(model, x, r)
        out, report = _ours(model, x, "mctf", r=r)
        assert torch.equal(report.source, expected_source), r
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_mctf_exact_mode_matches_the_reference():
    model, x = tiny_timm(depth=3, embed_dim=24).double(), images(2).double()
    with torch.inference_mode():
        expected, _ = reference_mctf_features(model, x, 11, exact=True)
    out, _ = _ours(model, x, "mctf", r=11, one_step_ahead="exact")
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- the comparison command


@pytest.mark.parametrize("argv, message", [
    ([], "give --tome PATH and/or --mctf PATH"),
    (["--tome", "/nonexistent/ToMe"], "is not a checkout of facebookresearch/ToMe"),
    (["--mctf", "/nonexistent/MCTF"], "is not a checkout of mlvlab/MCTF"),
    (["--mctf", "."], "no utils/mctf.py in it"),
    (["--tome", ".", "--batch", "0"], "is not a checkout"),
])
def test_compare_official_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare_official.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_compare_official_rejects_a_bad_batch(tmp_path, capsys):
    (tmp_path / "tome").mkdir()
    (tmp_path / "tome" / "merge.py").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        compare_official.main(["--tome", str(tmp_path), "--batch", "0"])
    assert exit_info.value.code == 2 and "--batch must be a positive int" in capsys.readouterr().err
