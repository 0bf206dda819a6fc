"""MCTF: scores, bidirectional matching, one-step-ahead attention, options, the patched model."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import images, tiny_timm
from test_official_conventions import reference_mctf_features
from tokenprune.patches.timm_vit import TimmAttention

import tokenprune
from tokenprune import ops
from tokenprune.block import AttentionRequest, attend
from tokenprune.methods import mctf
from tokenprune.state import AttentionTaps, ForwardState


def reference_assignment(log_w, remove, bidirectional=True):
    """Bidirectional matching for one sample, written out with Python sets."""
    n_a, n_b = log_w.shape
    r1 = remove // 2 if bidirectional else remove
    best = [(float(log_w[i].max()), i, int(log_w[i].argmax())) for i in range(n_a)]
    src1 = {i: j for _, i, j in sorted(best, key=lambda t: -t[0])[:r1]}
    kept_a = [i for i in range(n_a) if i not in src1]
    best2 = [(float(log_w[kept_a, j].max()), j, kept_a[int(log_w[kept_a, j].argmax())]) for j in range(n_b)]
    ranked2 = sorted(best2, key=lambda t: -t[0])
    src2 = {j: i for _, j, i in ranked2[:remove - r1]}
    # the official order: B tokens that stay follow the second step's ranking (position order if one-directional)
    kept_b = [j for _, j, _ in ranked2[remove - r1:]] if bidirectional else list(range(n_b))
    slot_a = {i: s for s, i in enumerate(kept_a)}
    slot_b = {j: len(kept_a) + s for s, j in enumerate(kept_b)}
    slot_b.update({j: slot_a[i] for j, i in src2.items()})
    slot_a.update({i: slot_b[j] for i, j in src1.items()})
    return [slot_a[k // 2] if k % 2 == 0 else slot_b[k // 2] for k in range(n_a + n_b)]


@pytest.mark.parametrize("n, remove, bidirectional", [(16, 6, True), (15, 7, True), (16, 5, False), (9, 1, True)])
def test_bidirectional_assignment_matches_the_reference(n, remove, bidirectional):
    log_w = torch.randn(3, (n + 1) // 2, n // 2, generator=torch.Generator().manual_seed(n + remove))
    dest, n_out = mctf.bidirectional_assignment(log_w, remove, bidirectional=bidirectional)
    assert n_out == n - remove
    for b in range(3):
        assert dest[b].tolist() == reference_assignment(log_w[b], remove, bidirectional)
        assert sorted(set(dest[b].tolist())) == list(range(n_out))  # every slot used


def test_merged_attention_rows_sum_to_one_and_identity_changes_nothing():
    probs = (torch.randn(2, 3, 9, 9) * 2).softmax(-1)
    weight = torch.rand(2, 9) + 0.1
    dest = torch.tensor([[0, 1, 1, 2, 3, 3, 3, 4, 5], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    merged = mctf.merge_attention(probs, dest, 6, weight)
    assert merged.shape == (2, 3, 6, 6)
    torch.testing.assert_close(merged.sum(-1), torch.ones(2, 3, 6))
    # key columns add up; query rows are the weighted mean of their members
    torch.testing.assert_close(merged[0, :, 0, 1], probs[0, :, 0, 1] + probs[0, :, 0, 2])
    w = weight[0, 4:7]
    expected_row = (probs[0, :, 4:7, :] * w[None, :, None]).sum(1) / w.sum()
    torch.testing.assert_close(merged[0, :, 3, 3], expected_row[:, 4:7].sum(-1))
    identity = torch.arange(9).expand(2, 9)
    torch.testing.assert_close(mctf.merge_attention(probs, identity, 9, weight), probs)
    v = torch.randn(2, 3, 6, 5)
    torch.testing.assert_close(mctf.attend_merged(probs, dest, 6, weight, v), merged @ v)


def test_approximate_and_recomputed_attention_agree_when_nothing_merges():
    model, x = tiny_timm(qkv_bias=True), images()
    block = model.blocks[1]
    with torch.inference_mode():
        h = block.norm1(model._pos_embed(model.patch_embed(x)))
        parts = TimmAttention(block.attn)
        q, k = parts.project_qk(h)
        probs = AttentionTaps(q=q, k=k, scale=parts.softmax_scale).probabilities()
        out = attend(parts, h, None, AttentionRequest(core=partial(torch.matmul, probs)))[0]
        torch.testing.assert_close(out, block.attn(h), atol=1e-6, rtol=1e-5)


def test_scores_follow_the_criteria():
    g = torch.Generator().manual_seed(0)
    x, received, size = torch.randn(2, 10, 8, generator=g), torch.rand(2, 10, generator=g) + 0.01, torch.ones(2, 10)
    sim_only = mctf.pair_scores(x, received, size, (1, 20, 40), (True, False, False))
    unit = x / x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(sim_only, ((unit[:, ::2] @ unit[:, 1::2].transpose(1, 2) + 1) / 2).log())
    size_only = mctf.pair_scores(x, received, size, (1, 20, 40), (False, False, True))
    assert (size_only == 0).all()  # equal sizes: no preference
    info_only = mctf.pair_scores(x, received, size, (1, 20, 40), (False, True, False))
    inv = 1 / received
    inv = inv / inv.amax(-1, keepdim=True)
    torch.testing.assert_close(info_only, (inv[:, ::2, None] * inv[:, None, 1::2]).log() / 20)
    both = mctf.pair_scores(x, received, size, (1, 20, 40), (True, True, True))
    torch.testing.assert_close(both, sim_only + info_only)


def merged_slots(model, x, **options):
    tokenprune.apply(model, "mctf", r=8, trace_source=True, **options)
    with torch.inference_mode():
        out = model(x)
    return tokenprune.last_forward(model).source, out


def test_each_criterion_and_direction_changes_the_matching():
    model, x = tiny_timm(depth=4), images(2)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4)
    default, _ = merged_slots(model, x)
    for options in ({"similarity": False}, {"informativeness": False}, {"bidirectional": False},
                    {"tau": (1.0, 1.0, 40.0)}):
        assert not torch.equal(merged_slots(model, x, **options)[0], default), options
    # size only matters once tokens have merged: block 1 merges first, so with one merging block it can't
    first_only, _ = merged_slots(model, x, layers=[1])
    assert torch.equal(first_only, merged_slots(model, x, layers=[1], size=False)[0])


def test_schedules_and_token_counts():
    model = tiny_timm(depth=12, img_size=224, patch_size=16)
    for options, expected, out in [
            ({"r": 16}, [197, 197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37], 21),
            ({"fast": True}, [197] * 4 + [129] * 3 + [85] * 3 + [56] * 2, 56),
            ({"keep": 0.5}, [197, 197] + [197 - 9 * i for i in range(1, 11)], 99)]:
        tokenprune.apply(model, "mctf", **options)
        with torch.inference_mode():
            model(images(1, 224))
        report = tokenprune.last_forward(model)
        assert report.token_counts == expected and report.output_tokens == out, options


def test_exact_mode_recomputes_after_the_same_merges():
    # The two modes differ by the one-step-ahead approximation itself (reused vs recomputed attention),
    # not by rounding, so they are not compared with each other; each is compared with its own slow
    # reference instead, in float64, as tightly as the arithmetic allows.
    model, x = tiny_timm(depth=4).double(), images().double()
    approx_src, approx = merged_slots(model, x, layers=[1])
    exact_src, exact = merged_slots(model, x, layers=[1], one_step_ahead="exact")
    assert torch.equal(approx_src, exact_src)  # the same merges (scored before attention) ...
    assert not torch.equal(approx, exact)  # ... but attention is recomputed, not reused
    tokenprune.remove(model)
    with torch.inference_mode():
        for output, exact_mode in ((approx, False), (exact, True)):
            features, _ = reference_mctf_features(model, x, [0, 8], exact=exact_mode)
            torch.testing.assert_close(output, model.forward_head(features), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "deit_small_distilled_patch16_224"])
def test_prefix_tokens_are_never_merged(name):
    model, x = tiny_timm(name, depth=5), images()
    source, _ = merged_slots(model, x)
    p = model.num_prefix_tokens
    assert torch.equal(source[:, :p, :p], torch.eye(p).expand(2, p, p))
    assert (source[:, :p, p:] == 0).all() and (source[:, p:, :p] == 0).all()
    assert torch.equal(source.sum(1), torch.ones(2, p + 64))  # every input token lands in one output token
    assert torch.equal(source.sum(-1, keepdim=True), tokenprune.last_forward(model).size)


def test_fusion_is_the_attention_times_size_weighted_mean():
    x = torch.randn(1, 5, 4)
    weight = torch.tensor([[[1.0], [2.0], [3.0], [1.0], [1.0]]])
    dest = torch.tensor([[0, 1, 1, 2, 2]])
    out = ops.assign_mean(x, weight, dest, 3)
    torch.testing.assert_close(out[0, 1], (2 * x[0, 1] + 3 * x[0, 2]) / 5)
    torch.testing.assert_close(out[0, 0], x[0, 0])


@pytest.mark.parametrize("kernel", ["off", "auto"])
def test_a_token_that_receives_no_attention_at_all_still_merges_soundly(monkeypatch, kernel):
    """Every query's probability for one key underflows to 0 (its logits far below the rest): the official
    ``1 / a`` would be inf and the scores NaN. Its received attention counts as ``finfo.tiny``: finite scores, a
    valid plan (every slot taken, the class token alone in its own), the same in the kernel and the PyTorch ops,
    and a finite fusion."""
    monkeypatch.setenv("TOKENPRUNE_EXT", kernel)
    g = torch.Generator().manual_seed(0)
    batch, heads, n, dim, remove = 2, 3, 11, 8, 4
    q, k = torch.rand(batch, heads, n, dim, generator=g) + 0.5, torch.randn(batch, heads, n, dim, generator=g)
    k[:, :, 6] = -100.0  # key 6: logits some 400 below the others for every query (q is positive)
    probs = AttentionTaps(q=q, k=k, scale=1.0).probabilities()
    assert probs[:, :, :, 6].eq(0).all()
    received = mctf.attention_received(probs)
    tiny = torch.finfo(torch.float32).tiny
    assert received[:, 6].eq(tiny).all() and torch.equal(received[:, :6], probs.mean(dim=(1, 2))[:, :6])
    x, size = torch.randn(batch, n, dim, generator=g), torch.ones(batch, n)
    dest, n_out = mctf.merge_plan(x, received, size, (1.0, 20.0, 40.0), (True, True, True), remove, 1, True)
    assert n_out == n - remove and dest[:, 0].eq(0).all() and dest[:, 1:].gt(0).all()
    assert all(sorted(set(row.tolist())) == list(range(n_out)) for row in dest)
    monkeypatch.setenv("TOKENPRUNE_EXT", "off")
    scores = mctf.pair_scores(x, received, size, (1.0, 20.0, 40.0), (True, True, True), 1)
    assert scores[:, 1:].isfinite().all()  # every pair but the class token's (A row 0, protected at -inf)
    assert torch.equal(dest, mctf.bidirectional_assignment(scores, remove, 1)[0])
    monkeypatch.setenv("TOKENPRUNE_EXT", kernel)
    assert ops.assign_mean(x, received[..., None], dest, n_out).isfinite().all()


@pytest.mark.parametrize("with_bias", [False, True])
def test_probabilities_in_the_scratch_buffer_equal_the_plain_ones(with_bias):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    bias = ops.log_size_bias(torch.randint(1, 4, (2, 7, 1), generator=g).float()) if with_bias else None
    taps = AttentionTaps(q=q, k=k, scale=0.5, bias=bias)
    state = ForwardState(reducer=mctf.MCTF(), num_prefix=1)
    in_buffer = taps.probabilities(state)
    torch.testing.assert_close(in_buffer, taps.probabilities())
    torch.testing.assert_close(in_buffer.sum(-1), torch.ones(2, 3, 7))
    # the next block's map (fewer tokens) reuses the same memory instead of allocating a new map
    smaller = AttentionTaps(q=q[:, :, :5], k=k[:, :, :5], scale=0.5, bias=None if bias is None else bias[..., :5])
    assert smaller.probabilities(state).data_ptr() == in_buffer.data_ptr()


def test_mctf_runs_under_autograd_without_the_scratch_buffer():
    model, x = tiny_timm(), images()
    tokenprune.apply(model, "mctf", keep=0.5)
    with torch.inference_mode():
        expected = model(x)
    out = model(x)  # parameters require grad: the out= path must step aside
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    assert model.blocks[1].attn.qkv.weight.grad is not None
