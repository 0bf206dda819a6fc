"""Every head and pooling path gives what the model's own head gives on the reduced tokens.

The reference is built here from the model's stock head code, on the final tokens of the same forward
(captured by a hook): tokens read as they are (class / distillation token, 'max', no pooling, and every
head after a method that only drops tokens) go straight into the stock ``forward_head`` or head modules.
Where tokens merged, the timm pools that average over tokens are documented as size-weighted (README,
"pooling after reduction"): their reference is the stock ``forward_head`` on the tokens expanded back to
the patches they stand for (``trace_source``), i.e. each merged token repeated once per absorbed patch,
which is what a size-weighted mean and a log-size-biased attention pool compute. The transformers
heads are documented as reading the reduced tokens unweighted: their reference is the stock head
modules on the reduced tokens.
"""
from __future__ import annotations

import pytest
import torch
from conftest import images, tiny_timm
from transformers import (
    CLIPConfig,
    CLIPForImageClassification,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    SiglipConfig,
    SiglipForImageClassification,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import tokenprune

REDUCING = ["tome", "mctf", "zero-tprune", "random"]  # at keep < 1 each of them merges or drops
MERGING = {"tome", "mctf"}
KEEP = 0.25

# ------------------------------------------------------------------------------------------------ timm

# case -> (timm name, overrides)
TIMM_HEADS = {
    "vit cls": ("vit_base_patch16_224", {}),
    "deit": ("deit_small_patch16_224", {}),
    "deit distilled": ("deit_small_distilled_patch16_224", {}),
    "deit3 no_embed_class": ("deit3_small_patch16_224", {}),
    "dinov2 registers": ("vit_small_patch14_reg4_dinov2", {}),
    "clip pre-norm": ("vit_base_patch16_clip_224", {}),
    "siglip map": ("vit_base_patch16_siglip_224", {}),
    "siglip gap": ("vit_base_patch16_siglip_gap_224", {}),
    "avg": ("vit_base_patch16_224", {"global_pool": "avg"}),  # fc_norm by default
    "avg with prefix": ("vit_base_patch16_224", {"global_pool": "avg", "pool_include_prefix": True}),
    "avgmax": ("vit_base_patch16_224", {"global_pool": "avgmax"}),
    "max": ("vit_base_patch16_224", {"global_pool": "max"}),
    "token fc_norm": ("vit_base_patch16_224", {"global_pool": "token", "fc_norm": True}),
    "no pooling": ("vit_base_patch16_224", {"global_pool": ""}),
    "map with register": ("vit_base_patch16_siglip_224", {"reg_tokens": 1, "pool_include_prefix": True}),
}


def _final_tokens(model: torch.nn.Module, x: torch.Tensor):
    """The patched model's output and the final (normed) tokens of that same forward."""
    captured = []
    handle = model.norm.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        out = model(x)
    finally:
        handle.remove()
    assert len(captured) == 1
    return out, captured[0]


def timm_reference(model: torch.nn.Module, tokens: torch.Tensor, report) -> torch.Tensor:
    """The stock head on the reduced tokens; where tokens merged, on the tokens expanded to their patches."""
    if report.size is None or model.global_pool == "":
        return model.forward_head(tokens)  # timm's own forward_head (the patch leaves it alone)
    expanded = report.source.transpose(1, 2) @ tokens  # each original token takes its merged token's value
    assert expanded.shape[1] == report.source.shape[-1]
    return model.forward_head(expanded)


def _assert_same(out, expected):
    if isinstance(expected, tuple):
        assert isinstance(out, tuple) and len(out) == len(expected)
        for o, e in zip(out, expected):
            torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-4)
    else:
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", REDUCING)
@pytest.mark.parametrize("case", sorted(TIMM_HEADS))
def test_timm_head_is_the_stock_head_on_the_reduced_tokens(case, method):
    name, overrides = TIMM_HEADS[case]
    model, x = tiny_timm(name, **overrides), images()
    tokenprune.apply(model, method, keep=KEEP, trace_source=True)
    with torch.no_grad():
        out, tokens = _final_tokens(model, x)
        report = tokenprune.last_forward(model)
        expected = timm_reference(model, tokens, report)
    assert tokens.shape[1] == model.num_prefix_tokens + 16  # the tokens did reduce
    assert (report.size is not None) == (method in MERGING)
    _assert_same(out, expected)


@pytest.mark.parametrize("method", REDUCING)
def test_timm_distilled_training_returns_both_heads(method):
    """DeiT distilled in train mode with distilled_training: the stock head returns (class, distillation)."""
    model, x = tiny_timm("deit_small_distilled_patch16_224"), images()
    model.set_distilled_training(True)
    model.train()
    tokenprune.apply(model, method, keep=KEEP, trace_source=True)
    with torch.no_grad():
        out, tokens = _final_tokens(model, x)
        expected = timm_reference(model, tokens, tokenprune.last_forward(model))
    assert isinstance(expected, tuple)
    _assert_same(out, expected)
    model.eval()  # and the mean of the two in eval mode
    with torch.no_grad():
        out, tokens = _final_tokens(model, x)
    _assert_same(out, (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2)


def test_timm_distilled_mean_is_measurably_not_the_class_head():
    """Guards the test above against a tiny head: the class head alone is far from the stock mean."""
    model, x = tiny_timm("deit_small_distilled_patch16_224"), images()
    tokenprune.apply(model, "tome", keep=KEEP)
    with torch.no_grad():
        out, tokens = _final_tokens(model, x)
    assert (out - model.head(tokens[:, 0])).abs().max() > 1e-2


def test_timm_unweighable_pools_are_refused_at_apply():
    model = tiny_timm("vit_base_patch16_224", global_pool="prr")
    with pytest.raises(TypeError, match="global_pool='prr'"):
        tokenprune.apply(model, "tome", keep=KEEP)
    assert not tokenprune.is_patched(model)


# ------------------------------------------------------------------------------------------ transformers

TINY = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96, image_size=32,
            patch_size=4)


def _vision(cls, config_cls, **kw):
    return lambda: cls(config_cls(**TINY, **kw))


def _clip_cls(cls, config_cls, vision_cls, **kw):
    return lambda: cls(config_cls(vision_config=vision_cls(**TINY).to_dict(), num_labels=5, **kw))


# case -> (builder, backbone attribute ("" = the model), {output field: stock head on the reduced tokens})
HF_HEADS = {
    "ViTForImageClassification": (
        _vision(ViTForImageClassification, ViTConfig, num_labels=5), "vit",
        {"logits": lambda m, t: m.classifier(t[:, 0])}),
    "ViTModel": (
        _vision(ViTModel, ViTConfig), "",
        {"pooler_output": lambda m, t: m.pooler(t)}),
    "DeiTForImageClassification": (
        _vision(DeiTForImageClassification, DeiTConfig, num_labels=5), "deit",
        {"logits": lambda m, t: m.classifier(t[:, 0])}),
    "DeiTForImageClassificationWithTeacher": (
        _vision(DeiTForImageClassificationWithTeacher, DeiTConfig, num_labels=5), "deit",
        {"logits": lambda m, t: (m.cls_classifier(t[:, 0]) + m.distillation_classifier(t[:, 1])) / 2,
         "cls_logits": lambda m, t: m.cls_classifier(t[:, 0]),
         "distillation_logits": lambda m, t: m.distillation_classifier(t[:, 1])}),
    "DeiTModel": (
        _vision(DeiTModel, DeiTConfig), "",
        {"pooler_output": lambda m, t: m.pooler(t)}),
    "CLIPVisionModel": (
        _vision(CLIPVisionModel, CLIPVisionConfig), "",
        {"pooler_output": lambda m, t: m.post_layernorm(t[:, 0])}),
    "CLIPVisionModelWithProjection": (
        _vision(CLIPVisionModelWithProjection, CLIPVisionConfig), "vision_model",
        {"image_embeds": lambda m, t: m.visual_projection(m.vision_model.post_layernorm(t[:, 0]))}),
    "CLIPForImageClassification": (
        _clip_cls(CLIPForImageClassification, CLIPConfig, CLIPVisionConfig), "vision_model",
        {"logits": lambda m, t: m.classifier(t[:, 1:].mean(dim=1))}),
    "SiglipVisionModel": (
        _vision(SiglipVisionModel, SiglipVisionConfig), "",
        {"pooler_output": lambda m, t: m.head(t)}),
    "SiglipForImageClassification": (
        _clip_cls(SiglipForImageClassification, SiglipConfig, SiglipVisionConfig), "vision_model",
        {"logits": lambda m, t: m.classifier(t.mean(dim=1))}),
    "Dinov2Model": (
        _vision(Dinov2Model, Dinov2Config), "",
        {"pooler_output": lambda m, t: t[:, 0]}),
    "Dinov2ForImageClassification": (
        _vision(Dinov2ForImageClassification, Dinov2Config, num_labels=5), "dinov2",
        {"logits": lambda m, t: m.classifier(torch.cat([t[:, 0], t[:, 1:].mean(dim=1)], dim=1))}),
    "Dinov2WithRegistersModel": (
        _vision(Dinov2WithRegistersModel, Dinov2WithRegistersConfig, num_register_tokens=4), "",
        {"pooler_output": lambda m, t: t[:, 0]}),
    "Dinov2WithRegistersForImageClassification": (
        _vision(Dinov2WithRegistersForImageClassification, Dinov2WithRegistersConfig, num_labels=5,
                num_register_tokens=4), "dinov2_with_registers",
        {"logits": lambda m, t: m.classifier(torch.cat([t[:, 0], t[:, 5:].mean(dim=1)], dim=1))}),
}
HF_PREFIX = {"ViT": 1, "DeiT": 2, "CLIP": 1, "Siglip": 0, "Dinov2Model": 1, "Dinov2For": 1, "Dinov2With": 5}


def _hf_prefix(case: str) -> int:
    return next(n for key, n in sorted(HF_PREFIX.items(), key=lambda kv: -len(kv[0])) if case.startswith(key))


@pytest.mark.parametrize("method", REDUCING)
@pytest.mark.parametrize("case", sorted(HF_HEADS))
def test_transformers_heads_are_the_stock_heads_on_the_reduced_tokens(case, method):
    build, backbone_name, heads = HF_HEADS[case]
    torch.manual_seed(0)
    model, x = build().eval(), images()
    backbone = model.get_submodule(backbone_name) if backbone_name else model
    captured = []
    backbone.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
    tokenprune.apply(model, method, keep=KEEP)
    with torch.no_grad():
        out = model(x)
        tokens = captured[-1]
        assert tokens.shape[1] == _hf_prefix(case) + 16  # the tokens did reduce
        assert torch.equal(out.last_hidden_state if "last_hidden_state" in out else tokens, tokens)
        for field, head in heads.items():
            torch.testing.assert_close(out[field], head(model, tokens), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------- TorchScript, torch.export

@pytest.mark.parametrize("kind", ["script", "trace"])
def test_torchscript_is_refused_with_a_pointer_to_compile_and_export(kind):
    model, x = tiny_timm("vit_base_patch16_224"), images()
    tokenprune.apply(model, "tome", keep=KEEP)
    with pytest.warns(FutureWarning), pytest.raises(RuntimeError, match=rf"torch\.jit\.{kind} is not supported.*"
                                                                         r"torch\.compile.*torch\.export"):
        torch.jit.script(model) if kind == "script" else torch.jit.trace(model, x)
    tokenprune.remove(model)  # the stock model still scripts
    with pytest.warns(FutureWarning):
        torch.jit.script(model)


@pytest.mark.parametrize("method", ["mctf", "random"])  # a merging and a dropping method (export takes seconds)
def test_torch_export_of_a_patched_timm_model(method):
    model, x = tiny_timm("deit_small_distilled_patch16_224"), images()
    tokenprune.apply(model, method, keep=KEEP)
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(exported.module()(x), tiny_timm("deit_small_distilled_patch16_224")(x))
