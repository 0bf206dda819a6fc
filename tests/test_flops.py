"""FLOP counting, checked against the analytic count of a ViT forward."""
from __future__ import annotations

import pytest
from conftest import tiny_timm

import tokenprune


def analytic_vit_flops(entering, leaving=None, dim=48, classes=10, patches=64, patch=4, chans=3, mlp_ratio=4):
    """2 x MACs of patch embedding, every block's matmuls and the head. Tokens are
    reduced between attention and MLP, so block i's MLP sees block i+1's count."""
    leaving = entering[-1] if leaving is None else leaving
    macs = patches * patch * patch * chans * dim
    for n, m in zip(entering, entering[1:] + [leaving]):
        macs += 4 * n * dim * dim + 2 * n * n * dim  # qkv + proj, q @ k^T + attn @ v
        macs += 2 * m * dim * mlp_ratio * dim  # mlp
    return 2 * (macs + dim * classes)


def test_unpatched_count_includes_cpu_sdpa():
    model = tiny_timm()
    count = tokenprune.count_flops(model, batch_size=2)
    assert count.flops == 2 * analytic_vit_flops([65] * 4)
    assert count.macs == count.flops / 2
    assert any("scaled_dot_product" in op for op in count.by_op)


@pytest.mark.parametrize("keep", [0.7, 0.5, 0.25])
def test_random_schedule_counts_exactly(keep):
    model = tiny_timm()
    tokenprune.apply(model, "random", keep=keep)
    count = tokenprune.count_flops(model, input_size=(3, 32, 32))
    report = tokenprune.last_forward(model)
    assert count.flops == analytic_vit_flops(report.token_counts, report.output_tokens)


def test_tome_counts_its_matching_matmuls():
    model = tiny_timm()
    tokenprune.apply(model, "tome", keep=0.5)
    count = tokenprune.count_flops(model)
    report = tokenprune.last_forward(model)
    head_dim = 16
    # A @ B^T per block, A and B alternating over all tokens (the class token is A's first, masked)
    matching = sum(2 * ((n + 1) // 2) * (n // 2) * head_dim for n in report.token_counts)
    assert count.flops == analytic_vit_flops(report.token_counts, report.output_tokens) + matching


def test_default_input_follows_an_in_chans_override():
    # a grey model built from a 3-channel architecture: timm's data config keeps the pretrained 3 channels,
    # and a 3-channel zero image does not run the model (nor a FLOPs budget on it)
    model = tiny_timm(in_chans=1)
    from tokenprune.flops import default_input_size

    assert default_input_size(model) == (1, 32, 32)
    assert tokenprune.count_flops(model).flops == analytic_vit_flops([65] * 4, chans=1)
    tokenprune.apply(model, "random", flops=0.6)
    assert tokenprune.reducer_of(model).keep < 1


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_a_dual_encoder_is_refused_by_the_default_image_in_one_line(kind):
    # CLIPModel / SiglipModel take text first: a zero image alone went in as input_ids and failed deep in
    # transformers (AttributeError on None.shape); a FLOPs budget counts their image tower (test_budget.py)
    import torch
    from test_hf_patch import TEXT, TINY
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    torch.manual_seed(0)
    model = (CLIPModel(CLIPConfig(text_config=TEXT, vision_config=TINY)) if kind == "clip"
             else SiglipModel(SiglipConfig(text_config=TEXT, vision_config=TINY))).eval()
    with pytest.raises(TypeError, match="takes input_ids first.*vision_model") as error:
        tokenprune.count_flops(model)
    assert len(str(error.value).splitlines()) == 1
    # what it suggests works: the image tower alone, or the whole model with its inputs
    assert tokenprune.count_flops(model.vision_model).flops > 0
    inputs = {"input_ids": torch.tensor([[2, 3, 4]]), "pixel_values": torch.zeros(1, 3, 32, 32)}
    assert tokenprune.count_flops(model, inputs=inputs).flops > tokenprune.count_flops(model.vision_model).flops


def test_a_processor_s_batch_feature_is_keyword_inputs():
    # processor(...) returns a BatchFeature, a Mapping but not a dict: it was passed positionally as the pixel
    # values and the forward failed inside the model
    import torch
    from test_hf_patch import tiny_hf
    from transformers import BatchFeature

    model = tiny_hf("vit")
    pixels = torch.zeros(2, 3, 32, 32)
    count = tokenprune.count_flops(model, inputs=BatchFeature({"pixel_values": pixels}))
    assert count.flops == tokenprune.count_flops(model, inputs={"pixel_values": pixels}).flops
    assert count.batch_size == 2


def test_inputs_with_an_input_size_or_a_batch_size_is_refused():
    """Given inputs fix the size and the batch: an input_size or batch_size beside them was silently ignored."""
    import torch

    model, x = tiny_timm(), torch.zeros(2, 3, 32, 32)
    assert tokenprune.count_flops(model, inputs=x).flops == tokenprune.count_flops(model, batch_size=2).flops
    for extra in ({"input_size": (3, 32, 32)}, {"batch_size": 2}):
        with pytest.raises(TypeError, match="give inputs, or input_size / batch_size for a zero image, not both"):
            tokenprune.count_flops(model, inputs=x, **extra)



@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "2"])
def test_a_bad_batch_size_is_refused_in_one_line(batch_size):
    # batch_size=0 counted 0 FLOPs (and gflops_per_sample divided by zero); 2.5 failed inside torch.zeros
    with pytest.raises(ValueError, match=f"^batch_size must be an int >= 1, got {batch_size!r}$"):
        tokenprune.count_flops(tiny_timm(), batch_size=batch_size)


def test_a_parameter_passed_straight_into_a_submodule_is_counted_and_its_gradient_flag_restored():
    # timm's attention pool ('map') hands its latent Parameter to a submodule: torch's FLOP counter hooks
    # the backward of every module input that requires grad and fails on a leaf. count_flops switches the
    # flags off for the count and back on after, also on a frozen part of the model.
    model = tiny_timm(global_pool="map")
    model.head.requires_grad_(False)
    tokenprune.apply(model, "tome", keep=0.5)
    assert tokenprune.count_flops(model).flops > 0
    assert all(p.requires_grad for p in model.blocks.parameters())
    assert not any(p.requires_grad for p in model.head.parameters())


@pytest.mark.parametrize("size", [(32, 32), "x", 224, (3, 32.0, 32), [3, True, 32], (3, 0, 32), (1, 3, 32, 32)])
def test_a_bad_input_size_is_one_line_everywhere_it_is_taken(size):
    # it failed in torch.zeros or in an unpacking, as a TypeError/ValueError that named neither input_size
    # nor what is accepted
    model = tiny_timm()
    calls = [lambda: tokenprune.count_flops(model, input_size=size),
             lambda: tokenprune.apply(model, "tome", flops=0.7, input_size=size),
             lambda: tokenprune.check_speed(model, "tome", keep=0.5, input_size=size, repeats=1)]
    for call in calls:
        with pytest.raises(ValueError, match=r"^input_size must be \(channels, height, width\), three ints >= 1, "
                                             r"got ") as error:
            call()
        assert len(str(error.value).splitlines()) == 1
    assert not tokenprune.is_patched(model)


def test_an_input_size_a_fixed_size_model_does_not_take_is_one_line():
    model = tiny_timm()  # timm asserts the image size of a model without dynamic_img_size
    for call in (lambda: tokenprune.count_flops(model, input_size=(3, 36, 32)),
                 lambda: tokenprune.apply(model, "tome", flops=0.7, input_size=(3, 36, 32))):
        with pytest.raises(ValueError, match=r"does not run on an input of size \(3, 36, 32\): Input height \(36\)"):
            call()
    assert not tokenprune.is_patched(model)
    import numpy as np

    assert tokenprune.count_flops(model, input_size=np.array([3, 32, 32])) == tokenprune.count_flops(model)
    gray = tiny_timm(in_chans=1)  # one channel is a size (>= 1), as the Fashion-MNIST testbeds take
    assert tokenprune.count_flops(gray, input_size=(1, 32, 32)) == tokenprune.count_flops(gray)


@pytest.mark.parametrize("method, options", [("zero-tprune", {}), ("zero-tprune", {"s_fraction": 0.5}), ("tome", {}),
                                             ("mctf", {}), ("random", {})])
def test_the_count_does_not_depend_on_the_extension(method, options, monkeypatch):
    """The extension's kernels choose the reference's tokens, but Zero-TPrune's CPU kernel takes its I'-stage vote
    (a product with the attention map) in its own loops, out of the counter's sight: its count was 0.1% lower with
    the kernel than with the PyTorch ops. The count now runs the reference, whatever TOKENPRUNE_EXT says."""
    from tokenprune import extension

    extension.load(cuda=False)  # the CPU build, so that "auto" and "all" do run the kernels
    model = tokenprune.apply(tiny_timm(), method, keep=0.5, **options)
    counts = {}
    for setting in ("off", "auto", "all"):
        monkeypatch.setenv("TOKENPRUNE_EXT", setting)
        counts[setting] = tokenprune.count_flops(model, batch_size=2).by_op
    assert counts["auto"] == counts["off"] and counts["all"] == counts["off"]
