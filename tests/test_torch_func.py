"""torch.func transforms through a patched model (docs/design.md: tokenprune stays differentiable where a user
differentiates, under autograd, forward-mode AD and torch.func): ``jvp`` gives reverse mode's directional
derivative, ``vmap`` gives each batch's own forward, and neither leaves anything behind that breaks a later
plain forward (the memoised random draw once held a tensor of the transform)."""
from __future__ import annotations

import pytest
import torch
from conftest import images, tiny_timm

import tokenprune

METHODS = ["tome", "mctf", "zero-tprune", "random"]


def patched(method: str) -> torch.nn.Module:
    model = tiny_timm(depth=4).double()
    for block in model.blocks:  # the stock CPU SDPA has no forward-mode formula: eager attention, as in timm
        block.attn.fused_attn = False
    return tokenprune.apply(model, method, keep=0.5)


@pytest.mark.parametrize("method", METHODS)
def test_jvp_is_the_directional_derivative_of_reverse_mode(method):
    model = patched(method)
    x = images().double()
    tangent = torch.randn_like(x)
    out, forward_mode = torch.func.jvp(model, (x,), (tangent,))
    with torch.no_grad():  # the same forward, up to rounding (no out= buffers, no fused bias under the transform)
        torch.testing.assert_close(out, model(x), rtol=1e-12, atol=1e-12)
    leaf = x.clone().requires_grad_(True)
    weights = torch.randn_like(out)
    grad, = torch.autograd.grad((model(leaf) * weights).sum(), leaf)
    torch.testing.assert_close((forward_mode * weights).sum(), (grad * tangent).sum(), rtol=1e-7, atol=1e-10)
    with torch.no_grad():  # nothing of the transform is left in the model's memo or buffers
        torch.testing.assert_close(model(x), out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_vmap_gives_each_batch_its_own_forward(method):
    model = patched(method)
    stacked = torch.stack([images(seed=s).double() for s in (1, 2, 3)])
    mapped = torch.func.vmap(model)(stacked)
    with torch.no_grad():
        expected = torch.stack([model(batch) for batch in stacked])
    torch.testing.assert_close(mapped, expected, rtol=1e-10, atol=1e-10)
