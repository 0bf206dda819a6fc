"""``random-select``: HiPrune's budget per image (per crop for LLaVA-NeXT), drawn uniformly, seeded, on every
VLM family; exact at keep=1.0."""
from __future__ import annotations

import pytest
import torch
from test_vlm import GREEDY, llava_batch, qwen_batch, tiny_llava, tiny_llava_next, tiny_qwen

import tokenprune
from tokenprune.methods.random_select import RandomSelect


def kept(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        model(**inputs)
    return tokenprune.last_forward(model).kept


@pytest.mark.parametrize("build, batch, counts", [(tiny_llava, llava_batch, [16, 16, 16]),
                                                  (tiny_qwen, qwen_batch, [6, 4])])
def test_the_budget_per_image_and_exactness_at_keep_one(build, batch, counts):
    model, inputs = build(), batch()
    with torch.no_grad():
        expected = model.generate(**inputs, **GREEDY)
        tokenprune.apply(model, "random-select", keep=1.0)
        assert torch.equal(model.generate(**inputs, **GREEDY), expected)
    tokenprune.apply(model, "random-select", keep=0.25)
    assert [int(k.sum()) for k in kept(model, inputs)] == counts
    tokenprune.apply(model, "random-select", tokens=5)
    assert [int(k.sum()) for k in kept(model, inputs)] == [5] * len(counts)


def test_seeded_different_per_image_and_per_seed():
    model, inputs = tiny_llava(), llava_batch()
    tokenprune.apply(model, "random-select", keep=0.25)
    first = kept(model, inputs)
    assert not torch.equal(first[0], first[1])  # each image its own draw
    tokenprune.apply(model, "random-select", keep=0.25)  # a fresh apply: the same draws again
    assert all(torch.equal(a, b) for a, b in zip(first, kept(model, inputs)))
    tokenprune.apply(model, "random-select", keep=0.25, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(first, kept(model, inputs)))


def test_draws_are_uniform():
    """Every position is kept k/n of the time (8 of 32 over 4,000 draws: 1,000 expected, sd ~27)."""
    selector = RandomSelect(keep=0.25)
    scores = (torch.zeros(32),)
    counts = sum(selector.explain(scores, (4, 8)).long() for _ in range(4000))
    assert int(counts.sum()) == 8 * 4000
    assert int(counts.min()) > 850 and int(counts.max()) < 1150


def test_only_allowed_tokens_and_a_budget_on_them():
    selector = RandomSelect(keep=0.5)
    allowed = torch.zeros(16, dtype=torch.bool)
    allowed[:6] = True
    for _ in range(20):
        roles = selector.explain((torch.zeros(16),), (4, 4), allowed)
        assert int(roles.sum()) == 3 and not bool(roles[6:].any())
    assert int(RandomSelect(keep=0.1).explain((torch.zeros(16),), (4, 4), allowed).sum()) == 1  # round(0.6)
    assert int(RandomSelect(keep=0.05).explain((torch.zeros(16),), (4, 4), allowed).sum()) == 0


def test_llava_next_keeps_k_per_crop():
    model, inputs = tiny_llava_next()
    tokenprune.apply(model, "random-select", keep=0.25)
    with torch.no_grad():
        model(**inputs)
    report = tokenprune.last_forward(model)
    assert (report.crop_roles[1] > 0).sum(dim=1).tolist() == [16] * 5  # the 64x64 image: 16 of 64 in every crop


def test_an_encoder_model_refuses_it():
    from conftest import tiny_timm

    with pytest.raises(TypeError, match="visual-token selector"):
        tokenprune.apply(tiny_timm(), "random-select", keep=0.5)


def test_select_gives_the_sorted_kept_indices():
    a, b = RandomSelect(keep=0.25), RandomSelect(keep=0.25)
    for _ in range(5):
        roles, chosen = a.explain((torch.zeros(32),), (4, 8)), b.select((torch.zeros(32),), (4, 8))
        assert chosen.shape == (8,) and torch.equal(chosen, roles.nonzero().flatten())
        assert torch.equal(chosen, chosen.sort().values)
    allowed = torch.zeros(16, dtype=torch.bool)
    allowed[3] = True  # a crop with one token: the budget is that token
    assert RandomSelect(keep=1.0).select((torch.zeros(16),), (4, 4), allowed).tolist() == [3]
    assert RandomSelect().keep == 0.33  # the default keep of every method
