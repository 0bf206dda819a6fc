"""Every documented option has an effect a test checks: each test here fails when its option is ignored.

The options checked elsewhere (tests/test_ops.py, test_mctf.py, test_zero_tprune.py, test_timm_patch.py) are
not repeated; mutation/documented_options.py switches each option off in turn and runs the suite. The
references here are written from docs/methods.md and use only the pure functions of tokenprune.ops and the
methods' modules (which are pinned against slow references of their own), so they hold whatever A/B
partition the matching uses.
"""
from __future__ import annotations

import pytest
import torch
from conftest import images, tiny_timm
from test_hf_patch import hf_and_timm_vit

import tokenprune
from tokenprune import ops
from tokenprune.methods import mctf
from tokenprune.methods.mctf import MCTF
from tokenprune.methods.zero_tprune import ZeroTPrune
from tokenprune.state import AttentionTaps, ForwardState


def run(model, x):
    with torch.inference_mode():
        return model(x)


# ----------------------------------------------------------------------------- proportional attention

def blocks_by_hand(model, t, size, start, prop_attn):
    """Blocks ``start..`` of a timm ViT written out with explicit softmax attention, adding ``log(size)``
    to every key's logit when ``prop_attn``; then the class-token head."""
    for blk in model.blocks[start:]:
        attn, h = blk.attn, blk.norm1(t)
        B, N, _ = h.shape
        q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if prop_attn:
            logits = logits + size.log()[:, None, None, :, 0]
        t = t + blk.ls1(attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1)))
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.head(model.norm(t)[:, 0])


# merges happen in one block only (ToMe: inside block 0; MCTF: at the input of block 1), so every later
# block sees the same merged tokens and sizes: those the report gives at the end
@pytest.mark.parametrize("method, options, first_plain_block", [("tome", {"r": [12]}, 1), ("mctf", {"r": [12]}, 2)])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_proportional_attention_is_a_log_size_key_bias_exactly_when_asked(method, options, first_plain_block,
                                                                          prop_attn):
    model, x = tiny_timm(), images()
    with torch.no_grad():
        for block in model.blocks:  # sharper attention, so that the bias matters
            block.attn.qkv.weight.mul_(3)
    tokenprune.apply(model, method, prop_attn=prop_attn, **options)
    entering = []
    hook = model.blocks[first_plain_block].register_forward_pre_hook(lambda m, args: entering.append(args[0]))
    out = run(model, x)
    hook.remove()
    size = tokenprune.last_forward(model).size
    assert size.max() > 1  # tokens did merge
    with torch.inference_mode():
        expected = blocks_by_hand(model, entering[0], size, first_plain_block, prop_attn)
        other = blocks_by_hand(model, entering[0], size, first_plain_block, not prop_attn)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out, other, atol=1e-3)  # the two settings are told apart


# ----------------------------------------------------------------------------- MCTF schedule options

def counts(model, x, method, **options):
    tokenprune.apply(model, method, **options)
    run(model, x)
    report = tokenprune.last_forward(model)
    return report.token_counts, report.output_tokens


def test_mctf_min_tokens_stops_merging_at_that_many_tokens():
    model, x = tiny_timm(), images()  # 65 tokens
    assert counts(model, x, "mctf", r=16) == ([65, 65, 49, 33], 17)  # the default 10 does not bind
    assert counts(model, x, "mctf", r=16, min_tokens=50) == ([65, 65, 50, 50], 50)
    small = tiny_timm(img_size=16)  # 16 patches + class token: the default floor of 10 binds
    assert counts(small, images(2, 16), "mctf", r=4) == ([17, 17, 13, 10], 10)
    assert counts(small, images(2, 16), "mctf", r=4, min_tokens=0) == ([17, 17, 13, 9], 5)


def test_mctf_per_block_r_list_is_per_merging_block_and_zero_padded():
    model, x = tiny_timm(), images()
    assert counts(model, x, "mctf", r=[8, 0, 4]) == ([65, 65, 57, 57], 53)
    assert counts(model, x, "mctf", r=[6]) == ([65, 65, 59, 59], 59)
    assert counts(model, x, "mctf", r=[6, 2], layers=[0, 3]) == ([65, 59, 59, 59], 57)


# ----------------------------------------------------------------------------- MCTF scoring options

def mctf_reference(x, q, k, size, p, remove, o):
    """One MCTF step (docs/methods.md): attention with the log-size bias, received attention (mean over
    heads and queries), pair scores by the enabled criteria, bidirectional assignment, fusion by the
    attention x size weighted mean; sizes add."""
    probs = ((q * 0.5) @ k.transpose(-2, -1) + ops.log_size_bias(size)).softmax(-1)
    received = probs.mean(dim=(1, 2))
    log_w = mctf.pair_scores(x, received, size[..., 0], tuple(o["tau"]),
                             (o["similarity"], o["informativeness"], o["size"]), p)
    dest, n_out = mctf.bidirectional_assignment(log_w, remove, p, bidirectional=o["bidirectional"])
    weight = received.unsqueeze(-1) * size
    return ops.assign_mean(x, weight, dest, n_out), ops.assign_sum(size, dest, n_out), probs, dest, weight


def mctf_step(options, remove=6, p=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, n, C, H, D = 3, 20, 8, 2, 4
    x, q, k = torch.randn(B, p + n, C, generator=g), torch.randn(B, H, p + n, D, generator=g) * 2, \
        torch.randn(B, H, p + n, D, generator=g) * 2
    size = torch.cat([torch.ones(B, p, 1), torch.randint(1, 6, (B, n, 1), generator=g).float()], dim=1)
    reducer = MCTF(**options)
    state = ForwardState(reducer=reducer, num_prefix=p)
    state.size = size
    taps = AttentionTaps(q=q, k=k, scale=0.5, bias=state.attention_bias())
    reduced = reducer.before_attention(x, remove, taps, state)
    out, core = reduced.tokens, reduced.attention_core
    return x, q, k, size, out, core, state


SIZE_DOMINATES = {"tau": (1.0, 20.0, 0.05)}  # size scores on a scale where they decide the matching


@pytest.mark.parametrize("base, key, value", [
    ({}, "similarity", False), ({}, "informativeness", False), (SIZE_DOMINATES, "size", False),
    ({}, "bidirectional", False), ({}, "tau", (1.0, 0.5, 40.0)), ({}, "one_step_ahead", "exact")])
def test_mctf_step_follows_each_scoring_option(base, key, value):
    options = {**base, key: value}
    x, q, k, size, out, core, state = mctf_step(options)
    full = {**MCTF.defaults, **options}
    expected, expected_size, probs, dest, weight = mctf_reference(x, q, k, size, 1, 6, full)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(state.size, expected_size)
    if full["one_step_ahead"] == "exact":
        assert core is None
    else:  # the block's attention, merged: keys summed, queries averaged with the fusion weights
        v = torch.randn(3, 2, out.shape[1], 4)
        merged = mctf.merge_attention(probs, dest, out.shape[1], weight[..., 0])
        torch.testing.assert_close(core(v), merged @ v)
    if key != "one_step_ahead":  # this input tells the option's two settings apart
        ignored = mctf_reference(x, q, k, size, 1, 6, {**MCTF.defaults, **base})[0]
        assert ignored.shape != out.shape or not torch.allclose(ignored, out), key


# ----------------------------------------------------------------------------- Zero-TPrune stage options

def zero_tprune_reference(attn, keys, p, remove, o, rounds):
    """One Zero-TPrune pruning step for one sample, written from docs/methods.md with sub-matrices and loops.

    attn (H, N, N) row-stochastic, keys (N, d) head-mean keys; returns the kept patch indices, ascending."""
    heads, total, _ = attn.shape
    n = total - p
    start = torch.ones(heads, total, dtype=attn.dtype)
    if not o["uniform_start"] and p:
        start[:, 0] = total ** 0.5  # the class token starts at sqrt(N) times the others

    def importance(scores, vhf_range):  # scores (H, m) over patch tokens: mean-1 scale, VHF, EIR
        scaled = scores / scores.mean(-1, keepdim=True)
        heads_used = list(range(heads))
        if vhf_range is not None:
            var = (scaled - 1).square().mean(-1)
            heads_used = [h for h in range(heads) if vhf_range[0] <= var[h] <= vhf_range[1]] or heads_used
        used = scaled[heads_used]
        return used.square().mean(0).sqrt() if o["eir"] else used.mean(0)

    alive = list(range(n))
    s_remove = min(round(remove * o["s_fraction"]), n // 2) if o["s_stage"] else 0
    if s_remove:  # I'-stage: one vote from the start; S-stage: drop the unimportant half's near-duplicates
        votes = (start / start.sum(-1, keepdim=True)).unsqueeze(-1).mul(attn).sum(1)
        rough = importance(votes[:, p:], None)
        order = sorted(range(n), key=lambda i: float(rough[i]))
        candidates, anchors = order[: n // 2], order[n // 2:]
        unit = keys[p:] / keys[p:].norm(dim=-1, keepdim=True)
        redundancy = [max(float(unit[c] @ unit[a]) for a in anchors) for c in candidates]
        dropped = {candidates[i] for i in sorted(range(len(candidates)), key=lambda i: -redundancy[i])[:s_remove]}
        alive = [i for i in range(n) if i not in dropped]
    if s_remove == remove:
        return alive
    nodes = list(range(p)) + [p + i for i in alive]  # I-stage: weighted PageRank on the survivors' graph
    sub = attn[:, nodes][:, :, nodes]
    if o["renormalize"]:
        sub = sub / sub.sum(-1, keepdim=True)
    s = start[:, nodes] / start[:, nodes].sum(-1, keepdim=True)
    for _ in range(rounds if rounds is not None else 200):
        nxt = s.unsqueeze(-1).mul(sub).sum(1)
        nxt = nxt / nxt.sum(-1, keepdim=True)
        done = o["tol"] is not None and (nxt - s).abs().max() < o["tol"]
        s = nxt
        if done:
            break
    score = importance(s[:, p:], tuple(o["vhf_range"]) if o["vhf"] else None)
    best = sorted(range(len(alive)), key=lambda i: -float(score[i]))[: n - remove]
    return sorted(alive[i] for i in best)


def zero_tprune_step(options, remove=10, p=1, seed=0):
    """The method's step at block 10 of 12 (the paper's rule: one WPR round there), on attention whose heads
    range from flat to peaked (so VHF has heads on both sides of its range)."""
    g = torch.Generator().manual_seed(seed)
    B, n, H, D = 4, 24, 4, 6
    temperature = torch.tensor([0.3, 1.0, 2.0, 4.0], dtype=torch.float64)[:, None, None]
    q = torch.randn(B, H, p + n, D, generator=g, dtype=torch.float64) * temperature
    k = torch.randn(B, H, p + n, D, generator=g, dtype=torch.float64)
    x = torch.randn(B, p + n, 5, generator=g, dtype=torch.float64)
    probs = (q @ k.transpose(-2, -1) * 0.5).softmax(-1)
    reducer = ZeroTPrune(layers=[10], **options)
    state = ForwardState(reducer=reducer, num_prefix=p, schedule=reducer.schedule(n, 12))
    state.token_counts = [p + n] * 11  # the state is at block 10
    out = reducer.after_attention(x, remove, AttentionTaps(q=q, k=k, scale=0.5, probs=probs), state).tokens
    return x, probs, k.mean(1), out


def reference_kept(options, probs, keys, p=1, remove=10):
    o = {**ZeroTPrune.defaults, **options}
    rounds = None if o["tol"] is not None else (o["iterations"] or 1)
    return [zero_tprune_reference(probs[b], keys[b], p, remove, o, rounds) for b in range(probs.shape[0])]


I_STAGE = {"s_stage": False}


@pytest.mark.parametrize("base, key, value", [
    ({}, "uniform_start", True), ({}, "eir", False), ({}, "s_stage", False), ({}, "s_fraction", 0.5),
    ({"s_fraction": 0.5}, "renormalize", False), (I_STAGE, "iterations", 3), (I_STAGE, "tol", 1e-10),
    (I_STAGE, "uniform_start", True), ({**I_STAGE, "vhf": False}, "eir", False), (I_STAGE, "vhf", False),
    (I_STAGE, "vhf_range", (0.0, 0.5))])
def test_zero_tprune_step_follows_each_option(base, key, value):
    options = {**base, key: value}
    x, probs, keys, out = zero_tprune_step(options)
    kept = reference_kept(options, probs, keys)
    expected = torch.stack([torch.cat([x[b, :1], x[b, [1 + i for i in kept[b]]]]) for b in range(x.shape[0])])
    torch.testing.assert_close(out, expected)
    assert reference_kept(base, probs, keys) != kept, key  # this input tells the option's two settings apart


# ----------------------------------------------------------------------------- random: seed + block index

def test_random_draws_each_block_from_seed_plus_block_index():
    model, x = tiny_timm(), images(3)
    tokenprune.apply(model, "random", r=[6, 0, 6], seed=7, trace_source=True)
    run(model, x)
    kept = tokenprune.last_forward(model).source[:, 1:, 1:].argmax(-1)
    expected = torch.arange(64).expand(3, -1)
    for block, step in ((0, 6), (2, 6)):
        n = expected.shape[1]
        expected = expected.gather(1, ops.random_keep_indices(3, n, n - step, 7 + block, torch.device("cpu")))
    assert torch.equal(kept, expected)


def test_random_draws_memoised_under_inference_mode_serve_a_training_forward():
    """The eager draws are memoised: one first asked under inference_mode must still index tokens autograd records."""
    model, x = tiny_timm(), images(3)
    tokenprune.apply(model, "random", keep=0.5, seed=11)
    with torch.inference_mode():
        expected = model(x)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    assert model.patch_embed.proj.weight.grad is not None


# ----------------------------------------------------------------------------- the transformers adapter

@pytest.mark.parametrize("method, options", [
    ("tome", {"prop_attn": False}), ("mctf", {"prop_attn": False, "r": 12}), ("mctf", {"min_tokens": 50, "r": 16}),
    ("zero-tprune", {"s_fraction": 0.5, "renormalize": False}), ("random", {"seed": 5})])
def test_transformers_adapter_follows_the_options_and_traces_sources_as_timm(method, options):
    """The same options give the same tokens, sources and outputs through both adapters (the timm path is
    pinned by the references above); ``trace_source`` works on transformers models too."""
    hf, tv = hf_and_timm_vit()
    x = images()
    for model in (hf, tv):
        tokenprune.apply(model, method, keep=0.25, trace_source=True, **options)
    with torch.inference_mode():
        hf_out, tv_out = hf(x).last_hidden_state, tv(x)
    torch.testing.assert_close(hf_out, tv_out, atol=1e-5, rtol=1e-5)
    hf_report, tv_report = tokenprune.last_forward(hf), tokenprune.last_forward(tv)
    assert hf_report.source is not None and torch.equal(hf_report.source, tv_report.source)
    assert hf_report.token_counts == tv_report.token_counts
    assert hf_report.output_tokens == tv_report.output_tokens == hf_out.shape[1]
    assert hf_report.num_prefix_tokens == 1 and hf_report.method == method
