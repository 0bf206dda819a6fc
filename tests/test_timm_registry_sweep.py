"""timm's registry, swept: one tiny random-init model per ``VisionTransformer`` configuration the registry holds
(class token or not, registers, distillation token, every pool, LayerScale, RMSNorm, SwiGLU / GLU MLPs,
scale norms, CLIP pre-norm, hybrid stems, dynamic image size) holds the promises at every method, and the
ViT-like classes tokenprune does not patch (EVA, BEiT, Swin, ...) are refused at apply time, untouched."""
from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from conftest import images
from timm.models.vision_transformer import VisionTransformer

import tokenprune

METHODS = ["tome", "mctf", "zero-tprune", "random"]
TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=10)

#: one registry name per configuration group (the sweep built every vision_transformer / deit / hybrid name tiny
#: and grouped them by class, block, attention, MLP, norms, pool, prefix tokens and position embedding)
ACCEPTED = {
    "vit_base_patch16_224": {},  # class token, token pool
    "vit_base_patch16_clip_224": {},  # pre-norm
    "vit_base_patch16_gap_224": {},  # no class token, avg + fc_norm
    "vit_base_patch16_siglip_224": {},  # 'map' attention pool
    "test_vit3": {},  # 'map' including the prefix token
    "vit_base_patch16_reg4_gap_256": {},  # 4 registers, no_embed_class, avg
    "vit_base_patch14_reg4_dinov2": {},  # class + 4 registers, LayerScale, no_embed_class
    "vit_giant_patch14_dinov2": {},  # GLU MLP
    "deit_base_distilled_patch16_224": {},  # class + distillation token, its own head
    "beit3_base_patch16_224": {},  # class token with avg pool, scale norms
    "aimv2_large_patch14_224": {},  # RMSNorm, SwiGLU, avg
    "test_vit": {},  # dynamic_img_size
    "vit_tiny_r_s16_p8_224": dict(img_size=64, patch_size=2),  # hybrid: ResNetV2 stem, then 2x2 patches
}
#: configurations the registry does not name, built from vit_base_patch16_224
VARIANTS = {
    "pos_embed_none": dict(pos_embed="none"),
    "registers_avgmax": dict(class_token=False, reg_tokens=2, global_pool="avgmax"),
    "avg_including_prefix": dict(global_pool="avg", pool_include_prefix=True),
    "qk_norm": dict(qk_norm=True),
    "patch_dropout": dict(patch_drop_rate=0.5),
}
REFUSED = {
    "eva02_tiny_patch14_224": {},  # RoPE
    "beit_base_patch16_224": {},  # relative position bias
    "test_vit_relpos": {},
    "samvit_base_patch16": dict(global_attn_indexes=(1,), window_size=2),
    "xcit_nano_12_p16_224": dict(patch_size=16),
    "cait_xxs24_224": {},
    "naflexvit_base_patch16_gap": {},
    "vit_base_patch16_rpn_224": {},  # VisionTransformer with post-norm blocks
    "vit_base_patch16_xp_224": {},  # parallel blocks
    "vit_dlittle_patch16_reg1_gap_256": {},  # differential attention
    "vit_base_patch16_224/prr": dict(global_pool="prr"),
}


def build(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name.split("/")[0], pretrained=False, **{**TINY, **overrides}).eval()


def outputs(model, x) -> dict:
    """What must not change at keep=1.0: forward, the split call, pre-logits, intermediates, a train-mode forward."""
    with torch.no_grad():
        features = model.forward_features(x)
        out = {"forward": model(x), "batch1": model(x[:1]), "features": features,
               "head": model.forward_head(features), "pre_logits": model.forward_head(features, pre_logits=True),
               "intermediates": model.forward_intermediates(x, indices=[0, 2], output_fmt="NLC")}
        model.train()
        torch.manual_seed(0)
        out["train"] = model(x)
        model.eval()
    return out


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return type(a) is type(b) and len(a) == len(b) and all(same(p, q) for p, q in zip(a, b))


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


CASES = [(name, kw) for name, kw in ACCEPTED.items()] + \
        [(f"vit_base_patch16_224/{tag}", kw) for tag, kw in VARIANTS.items()]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,overrides", CASES, ids=[c[0] for c in CASES])
def test_registry_configuration_keeps_the_promises(name, overrides, method):
    model = build(name, **overrides)
    size = overrides.get("img_size", 32)
    x = images(2, size)
    stock, weights = outputs(model, x), state(model)
    tokenprune.apply(model, method, keep=1.0)
    patched = outputs(model, x)
    assert [k for k in stock if not same(stock[k], patched[k])] == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenprune.apply(model, method, keep=0.5)
    with torch.no_grad():
        y, y3 = model(x), model(images(3, size))
    report = tokenprune.last_forward(model)
    assert y.shape == stock["forward"].shape and torch.isfinite(y).all() and y3.shape[0] == 3
    assert report.output_tokens < report.token_counts[0]
    model.train()
    assert torch.isfinite(model(x)).all()
    model.eval()
    tokenprune.remove(model)
    assert equal_states(state(model), weights)
    assert [k for k, v in outputs(model, x).items() if not same(stock[k], v)] == []


@pytest.mark.parametrize("name,overrides", list(REFUSED.items()), ids=list(REFUSED))
def test_unsupported_registry_class_is_refused_untouched(name, overrides):
    model = build(name, **overrides)
    x = images()
    with torch.no_grad():
        expected = model(x)
    weights, model_class = state(model), type(model)
    classes = [type(m) for m in model.modules()]
    for method in METHODS:
        with pytest.raises(TypeError, match="tokenprune") as info:
            tokenprune.apply(model, method, keep=1.0)
        assert "\n" not in str(info.value)
    assert type(model) is model_class and [type(m) for m in model.modules()] == classes
    assert not tokenprune.is_patched(model) and equal_states(state(model), weights)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


class ScaledFeatures(VisionTransformer):
    """A VisionTransformer subclass with its own forward_features (as downstream projects write them)."""

    def forward_features(self, x, attn_mask=None, is_causal=False):
        return 2.0 * super().forward_features(x, attn_mask, is_causal)


class OwnForward(VisionTransformer):
    def forward(self, x, attn_mask=None, is_causal=False):
        return super().forward(x, attn_mask, is_causal) + 1.0


@pytest.mark.parametrize("cls", [ScaledFeatures, OwnForward])
def test_subclass_that_overrides_forward_is_refused(cls):
    """The patch replaces forward and forward_features: a subclass's own version was silently skipped, so keep=1.0
    differed from the stock model. It is refused at apply time, the model untouched."""
    torch.manual_seed(0)
    model = cls(**TINY).eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(TypeError, match=f"{cls.__name__} overrides VisionTransformer.forward"):
        tokenprune.apply(model, "tome", keep=1.0)
    assert type(model) is cls and not tokenprune.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_distilled_subclass_is_still_accepted():
    """DeiT's distilled class overrides only _pos_embed and the head, which the patch calls: accepted, exact."""
    model = build("deit_base_distilled_patch16_224")
    x = images()
    with torch.no_grad():
        expected = model(x)
        copy.deepcopy(tokenprune.apply(model, "tome", keep=1.0))
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_hooks_on_the_block_sequence_run_at_keep_1_as_in_the_stock_model(checkpointing):
    """timm calls its block sequence as one module where nothing is masked: a hook on ``model.blocks`` (feature
    extraction, a profiler) runs there. At keep=1.0 the patched model calls it as timm does."""
    torch.manual_seed(0)
    model = VisionTransformer(**TINY).eval()
    model.set_grad_checkpointing(checkpointing)
    seen = []
    model.blocks.register_forward_hook(lambda module, args, output: seen.append(output.clone()))
    x = images()
    with torch.no_grad():
        expected = model(x)
        stock_calls = len(seen)  # timm's checkpointing runs the blocks one by one: no call of the sequence
        tokenprune.apply(model, "tome", keep=1.0)
        assert torch.equal(model(x), expected)
    assert stock_calls == (0 if checkpointing else 1) and len(seen) == 2 * stock_calls
    assert all(torch.equal(output, seen[0]) for output in seen)
    assert list(tokenprune.last_forward(model).token_counts) == [65] * len(model.blocks)  # 64 + class
