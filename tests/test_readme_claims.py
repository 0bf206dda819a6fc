"""Numbers and behaviour the README and docs/methods.md state that no other test pins: a change that moves one of
them fails here, so the text is updated with the code (docs audit, 2026-12-06)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import timm
import torch
from tokenprune.eval import op_count

import tokenprune
from tokenprune import testbed
from tokenprune import visualize as tv
from tokenprune.flops import random_model


def gmacs(model, method, **options) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r above the per-block cap warns; the schedule is the point here
        tokenprune.apply(model, method, **options)
    return tokenprune.count_flops(model).gflops_per_sample / 2


# --------------------------------------------------------------- README "Looking at what a method kept"

def test_show_captions_on_the_testbed_image():
    """The captions under the two `tokenprune show` pictures: 129 of the 196 patches are background (mean
    intensity under 10/255); at keep 0.33 ToMe's 65 tokens include 38 of background only; Zero-TPrune keeps 41 of
    the shoe's 67 patches and 24 background ones; random keeps 21 of the shoe's."""
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    model = timm.create_model("vit_testbed_fmnist", pretrained=True).eval()
    image = testbed.load_fashion_mnist("test")[0][0]  # the image `tokenprune show` draws by default
    background = (image.float().view(14, 2, 14, 2).permute(0, 2, 1, 3).reshape(196, 4).mean(1) < 10).numpy()
    assert background.sum() == 129
    x = create_transform(**resolve_model_data_config(model))(Image.fromarray(image.numpy())).unsqueeze(0)
    seen = {}
    for method in ("tome", "zero-tprune", "random"):
        tokenprune.apply(model, method, keep=0.33, trace_source=True)
        with torch.inference_mode():
            model(x)
        seen[method] = tv.token_groups(tokenprune.last_forward(model), (14, 14))[0].reshape(-1)
    tome = seen["tome"]
    groups = [tome == g for g in np.unique(tome[tome >= 0])]
    assert len(groups) == 65 and sum(bool(background[g].all()) for g in groups) == 38
    for method, shoe, rest in (("zero-tprune", 41, 24), ("random", 21, 44)):
        kept = seen[method] >= 0
        assert (int((kept & ~background).sum()), int((kept & background).sum())) == (shoe, rest), method


# --------------------------------------------------------------- README speed sections, docs/methods.md (MCTF)

@pytest.mark.parametrize("method, options, expected", [
    (None, None, 4.60),                                             # "DeiT-S GMACs: 4.60 unpatched, ..."
    ("tome", dict(r=13), 2.71),                                     # "... 2.71 with ToMe r=13"
    ("zero-tprune", dict(keep=0.33), 2.70),                         # "2.70 GMACs" (re-timed with its defaults)
    ("mctf", dict(r=16), 2.61),                                     # mctf r=16 row; docs/methods.md
    ("mctf", dict(fast=True), 2.76),                                # docs/methods.md: MCTF-Fast
    ("mctf", dict(r=16, one_step_ahead="exact"), 2.98),             # docs/methods.md: "exact" +0.37 over 2.61
])
def test_deit_small_gmacs_as_the_docs_state(method, options, expected):
    model = random_model("deit_small_patch16_224")
    got = tokenprune.count_flops(model).gflops_per_sample / 2 if method is None else gmacs(model, method, **options)
    assert round(got, 2) == expected


def test_hf_vit_gmacs_as_the_readme_states():
    """`tokenprune bench --model hf:vit`: 17.56 -> 10.37 GMACs with ToMe r=13, 9.95 with MCTF r=16."""
    model = random_model("hf:vit")
    assert round(tokenprune.count_flops(model).gflops_per_sample / 2, 2) == 17.56
    assert round(gmacs(model, "tome", r=13), 2) == 10.37
    assert round(gmacs(model, "mctf", r=16), 2) == 9.95


# the GFLOPs column of the README's testbed table (docs/results/testbed.jsonl), every method at keep 0.7 / 0.5 / 0.33
TESTBED_GFLOPS = {"tome": (0.591, 0.511, 0.449), "zero-tprune": (0.574, 0.482, 0.402),
                  "mctf": (0.606, 0.534, 0.474), "random": (0.585, 0.506, 0.446)}


def test_testbed_table_gflops():
    model = timm.create_model("vit_testbed_fmnist", pretrained=True).eval()
    assert round(tokenprune.count_flops(model).gflops_per_sample, 3) == 0.712
    for method, column in TESTBED_GFLOPS.items():
        got = tuple(round(2 * gmacs(model, method, keep=keep), 3) for keep in (0.7, 0.5, 0.33))
        assert got == column, method


def test_operation_counts_the_readme_quotes():
    """README, speed on a GPU: DeiT-S at batch 1 launches 125 operations unpatched, ToMe 473, MCTF 1183 (1193 counted
    on the CPU, where ``head_products`` adds the log-size bias after the product: one operation more in each of the 10
    merging blocks that have one), Zero-TPrune 260 (257 on the day of the GPU run), random 161
    (`python -m tokenprune.eval.op_count`)."""
    rows = op_count.op_rows("deit_small_patch16_224", ["tome", "mctf", "zero-tprune", "random"], keep=0.5, batch=1)
    assert {r.method: r.unpatched for r in rows} == dict.fromkeys(["tome", "mctf", "zero-tprune", "random"], 125)
    assert {r.method: r.patched for r in rows} == {"tome": 473, "mctf": 1183 + 10, "zero-tprune": 260, "random": 161}


# --------------------------------------------------------------- `tokenprune methods`

def test_methods_offers_a_flops_budget_only_to_encoder_methods():
    """A FLOPs budget fits image encoders: apply refuses one for the VLM selectors (it was offered to every method)."""
    listing = tokenprune.methods().split("\n")
    for name in ("hiprune", "random-select", "tome", "mctf", "zero-tprune", "random"):
        keep_line = listing[listing.index(next(line for line in listing if line.startswith(f"{name} "))) + 1]
        encoder = name not in ("hiprune", "random-select")
        assert keep_line.startswith("    keep=") and ("FLOPs budget" in keep_line) == encoder, name
