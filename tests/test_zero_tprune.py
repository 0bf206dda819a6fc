"""Zero-TPrune: WPR against networkx, the stages, the options, and the patched model."""
from __future__ import annotations

import networkx as nx
import pytest
import torch
from conftest import images, tiny_timm

import tokenprune
from tokenprune import extension
from tokenprune.methods import zero_tprune as zt


def random_attention(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2).softmax(-1)


def networkx_stationary(attn: torch.Tensor) -> torch.Tensor:
    """The stationary distribution of the walk i -> j with probability A[i, j] (PageRank, no teleport)."""
    graph = nx.DiGraph()
    n = attn.shape[0]
    graph.add_weighted_edges_from((i, j, float(attn[i, j])) for i in range(n) for j in range(n))
    rank = nx.pagerank(graph, alpha=1.0, weight="weight", tol=1e-14, max_iter=10_000)
    return torch.tensor([rank[i] for i in range(n)], dtype=torch.float64)


def test_weighted_pagerank_matches_networkx_batched_over_samples_and_heads():
    attn = random_attention(2, 3, 12, 12)
    start = zt.initial_scores(2, 3, 12, emphasize=0, device="cpu", dtype=torch.float64)
    scores = zt.weighted_pagerank(attn, start, tol=1e-13)
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(scores[b, h], networkx_stationary(attn[b, h]), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.sum(-1), torch.ones(2, 3, dtype=torch.float64))


def test_one_wpr_round_is_one_vote():
    attn = random_attention(1, 2, 6, 6, seed=3)
    start = zt.initial_scores(1, 2, 6, emphasize=None, device="cpu", dtype=torch.float64)
    assert torch.allclose(start, torch.full((1, 2, 6), 1 / 6, dtype=torch.float64))
    one = zt.weighted_pagerank(attn, start, iterations=1)
    torch.testing.assert_close(one, torch.einsum("bhj,bhji->bhi", start, attn))


def test_class_token_start_is_emphasized():
    s = zt.initial_scores(1, 1, 17, emphasize=0, device="cpu", dtype=torch.float64)[0, 0]
    assert s[0] / s[1] == pytest.approx(17 ** 0.5) and s.sum() == pytest.approx(1.0)


def test_head_aggregation_eir_and_vhf():
    flat = torch.full((1, 1, 4), 0.25)  # uniform head: variance 0 on the mean-1 scale
    peaked = torch.tensor([[[0.4, 0.2, 0.2, 0.2]]])  # variance 0.12
    onehot = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])  # variance 3: filtered by (0.01, 0.7)
    scores = torch.cat([flat, peaked, onehot], dim=1)
    mean = zt.aggregate_heads(scores, rms=False)
    rms = zt.aggregate_heads(scores, rms=True)
    torch.testing.assert_close(mean, (scores / scores.mean(-1, keepdim=True)).mean(1))
    torch.testing.assert_close(rms, (scores / scores.mean(-1, keepdim=True)).square().mean(1).sqrt())
    assert rms[0, 0] > mean[0, 0]  # RMS lets one strongly-voting head show
    filtered = zt.aggregate_heads(scores, rms=False, variance_range=(0.01, 0.7))
    torch.testing.assert_close(filtered, peaked[0] * 4)  # only the peaked head passes
    nothing_passes = zt.aggregate_heads(scores, rms=False, variance_range=(10.0, 20.0))
    torch.testing.assert_close(nothing_passes, mean)  # no head in range: keep all


def test_s_stage_drops_duplicates_of_important_tokens():
    importance = torch.tensor([[5.0, 4.0, 3.0, 0.1, 0.2, 0.3]])  # tokens 3, 4, 5 are the unimportant half
    metric = torch.eye(6)[None]
    metric[0, 4] = metric[0, 0]  # token 4 duplicates important token 0
    dropped = zt.redundant_tokens(importance, metric, remove=1)
    assert dropped.tolist() == [[4]]


def test_wpr_direction_on_cases_whose_answer_is_known():
    # every token gives half its attention to token 3: token 3 is the most important, by a margin
    n = 6
    attn = torch.full((n, n), 0.5 / (n - 1), dtype=torch.float64)
    attn[:, 3] = 0.5
    attn[3, 3] = 0.5 / (n - 1) + 0.5 - 0.5 / (n - 1)
    attn = attn / attn.sum(-1, keepdim=True)
    start = zt.initial_scores(1, 1, n, emphasize=0, device="cpu", dtype=torch.float64)
    for iterations in (1, 5, 30):
        scores = zt.weighted_pagerank(attn[None, None], start, iterations=iterations)[0, 0]
        assert scores.argmax() == 3 and scores[3] > 2 * scores[torch.arange(n) != 3].max()


def test_the_major_group_collects_the_pagerank_mass():
    # The effect the S-stage exists for (paper, I'->S->I): a large group of alike tokens that attend only
    # to each other (a uniform background) takes the stationary mass, even from tokens that the class token
    # and the object attend to. Token 0: class token; 1-3: object; 4-9: background.
    attn = torch.zeros(10, 10, dtype=torch.float64)
    attn[0, 1:4] = 1 / 3  # the class token looks at the object
    attn[1:4, 0:4] = 0.2 / 4  # the object attends to the class token and itself a little ...
    attn[1:4, 1:4] += torch.eye(3, dtype=torch.float64) * 0.6  # ... mostly to itself ...
    attn[1:4, 4:10] = 0.2 / 6  # ... and a little to the background
    attn[4:10, 4:10] = 1 / 6  # the background attends to the background only
    start = zt.initial_scores(1, 1, 10, emphasize=0, device="cpu", dtype=torch.float64)
    one_round = zt.weighted_pagerank(attn[None, None], start, iterations=1)[0, 0]
    assert one_round[1:4].min() > one_round[4:].max()  # one vote: the class token's choice still shows
    stationary = zt.weighted_pagerank(attn[None, None], start, tol=1e-12)[0, 0]
    assert stationary[4:].sum() > 0.999 and stationary[1:4].max() < 1e-3  # converged: the background wins


@pytest.mark.parametrize("renormalize", [True, False])
def test_masked_pagerank_is_pagerank_on_the_survivors_subgraph(renormalize):
    attn = random_attention(2, 3, 10, 10, seed=5)
    alive = torch.tensor([[1, 1, 0, 1, 1, 0, 1, 1, 1, 0], [1, 0, 1, 1, 1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    start = zt.initial_scores(2, 3, 10, emphasize=0, device="cpu", dtype=torch.float64)
    masked = zt.weighted_pagerank(attn, start, iterations=4, alive=alive[:, None], renormalize=renormalize)
    importance = zt.aggregate_heads(masked, variance_range=(0.01, 0.7), alive=alive)
    for b in range(2):
        idx = alive[b].nonzero()[:, 0]
        sub = attn[b][:, idx][:, :, idx]
        if renormalize:
            sub = sub / sub.sum(-1, keepdim=True)
        expected = zt.weighted_pagerank(sub, start[b][:, idx], iterations=4)
        expected = expected / expected.sum(-1, keepdim=True)
        torch.testing.assert_close(masked[b][:, idx], expected)
        assert (masked[b][:, ~alive[b]] == 0).all()
        torch.testing.assert_close(importance[b, idx],
                                   zt.aggregate_heads(expected[None], variance_range=(0.01, 0.7))[0])
        assert (importance[b, ~alive[b]] == float("-inf")).all()


def test_a_row_with_no_attention_left_on_the_survivors_casts_no_vote():
    """A row whose probabilities on the survivors all underflowed to 0 made 1 / 0 = inf and a NaN head (the
    I-stage then kept the lowest indices): it votes for nothing, as on the survivors' sub-graph, where its
    re-normalised row is undefined."""
    attn = torch.tensor([[[[.7, .1, .1, .1], [.2, .5, .2, .1], [.1, .2, .6, .1], [0., 0., 0., 1.]]]])
    alive = torch.tensor([True, True, True, False])[None, None]
    start = zt.initial_scores(1, 1, 4, None, "cpu", torch.float32)
    masked = zt.weighted_pagerank(attn, start, iterations=5, alive=alive)
    sub = attn[..., :3, :3] / attn[..., :3, :3].sum(-1, keepdim=True)
    expected = zt.weighted_pagerank(sub, start[..., :3], iterations=5)
    torch.testing.assert_close(masked[..., :3], expected)
    assert masked[..., 3].item() == 0
    lost = torch.zeros(1, 2, 4)  # a head whose every vote was lost: it counts 0, not 0 / 0
    lost[:, 0] = torch.tensor([.1, .2, .3, .4])
    assert torch.isfinite(zt.aggregate_heads(lost)).all()
    to_the_cut = attn.clone()
    to_the_cut[..., 3, :] = torch.tensor([1., 0., 0., 0.])  # the survivor's every vote leaks to a cut token
    only_last = torch.tensor([False, False, False, True])[None, None]
    leaked = zt.weighted_pagerank(to_the_cut, start, iterations=2, alive=only_last, renormalize=False)
    assert torch.isfinite(leaked).all()


def test_explicit_probabilities_of_float64_are_float64_throughout():
    """A float64 model's map (Zero-TPrune's pruning blocks apply and score it) was a float32 softmax cast back."""
    from tokenprune.block import explicit_probabilities

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 5, 4, dtype=torch.float64, generator=g) for _ in range(2))
    expected = ((q @ k.transpose(-1, -2)) * 0.5).softmax(-1)
    torch.testing.assert_close(explicit_probabilities(q, k, 0.5, None), expected, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_the_class_token_and_no_register_is_emphasised(monkeypatch, reg_tokens):
    """The start vector gives the class token sqrt(N); a timm model of register tokens without a class token has
    none to emphasise (register 0 got it: its attention then decided the ranking)."""
    seen = []
    start = zt.initial_scores
    monkeypatch.setattr(zt, "initial_scores", lambda b, h, n, emphasize, *a: seen.append(emphasize) or
                        start(b, h, n, emphasize, *a))
    x = images()
    for class_token in (True, False):
        model = tiny_timm(class_token=class_token, reg_tokens=reg_tokens, global_pool="token" if class_token
                          else "avg", no_embed_class=reg_tokens > 0)
        for options in ({"s_fraction": 0.5}, {"s_stage": False}):
            tokenprune.apply(model, "zero-tprune", keep=0.5, **options)
            with extension.pytorch_ops_only(), torch.no_grad():
                model(x)
            assert seen and set(seen) == ({0} if class_token else {None}), (class_token, options)
            seen.clear()


def test_schedule_layers_keep_rates_and_counts():
    model, x = tiny_timm(depth=8), images()
    tokenprune.apply(model, "zero-tprune", keep=0.25)  # layers 1, 3, 5; geometric 64 -> 16
    with torch.inference_mode():
        model(x)
    report = tokenprune.last_forward(model)
    assert report.token_counts == [65, 65, 41, 41, 26, 26, 17, 17] and report.output_tokens == 17
    tokenprune.apply(model, "zero-tprune", layers=[0, 5], keep_rates=[0.5, 0.5])
    with torch.inference_mode():
        model(x)
    assert tokenprune.last_forward(model).token_counts == [65, 33, 33, 33, 33, 33, 17, 17]


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "deit_small_distilled_patch16_224",
                                  "vit_base_patch16_siglip_224"])
def test_prefix_tokens_are_never_pruned(name):
    model, x = tiny_timm(name, depth=6), images()
    tokenprune.apply(model, "zero-tprune", keep=0.1, trace_source=True)
    with torch.inference_mode():
        model(x)
    report = tokenprune.last_forward(model)
    p = model.num_prefix_tokens
    assert torch.equal(report.source[:, :p, :p], torch.eye(p).expand(2, p, p))
    assert report.output_tokens == p + round(0.1 * 64)
    kept = report.source[:, p:].argmax(-1)
    assert (kept >= p).all() and torch.equal(kept, kept.sort(-1).values)


def test_keep_one_is_bit_identical():
    model, x = tiny_timm("vit_small_patch14_reg4_dinov2"), images()
    with torch.inference_mode():
        expected = model(x)
        tokenprune.apply(model, "zero-tprune", keep=1.0)
        assert torch.equal(model(x), expected)


def kept_tokens(model, x, **options):
    tokenprune.apply(model, "zero-tprune", keep=0.3, trace_source=True, **options)
    with torch.inference_mode():
        model(x)
    return tokenprune.last_forward(model).source.argmax(-1)


def test_each_option_changes_the_choice_and_random_matches_the_random_method():
    model, x = tiny_timm(depth=6, seed=4), images(4)
    with torch.no_grad():
        for block in model.blocks:  # sharper attention than random init gives, as trained models have
            block.attn.qkv.weight.mul_(4)
    default = kept_tokens(model, x)
    for options in ({"uniform_start": True, "iterations": 1}, {"eir": False, "vhf": False}, {"s_stage": False},
                    {"s_fraction": 0.5}, {"importance": "random"}):
        assert not torch.equal(kept_tokens(model, x, **options), default), options
    # More iterations converge: the stationary scores no longer depend on the start.
    converged = kept_tokens(model, x, tol=1e-9, s_stage=False)
    assert torch.equal(converged, kept_tokens(model, x, tol=1e-9, s_stage=False, uniform_start=True))
    # VHF with a range every head falls in changes nothing.
    assert torch.equal(kept_tokens(model, x, vhf=False), kept_tokens(model, x, vhf_range=(0.0, 1e9)))


def test_bad_options():
    model = tiny_timm()
    for options, error in [({"layers": [9]}, ValueError), ({"keep_rates": [1.5, 0.5, 0.5]}, ValueError),
                           ({"iterations": 0}, ValueError), ({"vhf_range": (0.7, 0.1)}, ValueError),
                           ({"importance": "attn"}, ValueError), ({"eir": 1}, TypeError),
                           ({"keep_rates": [0.5]}, ValueError)]:
        with pytest.raises(error):
            tokenprune.apply(model, "zero-tprune", **options)
    assert not tokenprune.is_patched(model)
