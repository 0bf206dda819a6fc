"""A sweep of transformers' vision encoders against the adapter's promises (what the family sweep checked).

* Families tokenprune does not patch (Swin, ConvNeXt, BEiT, DINOv3, SigLIP2, AIMv2, ...) are refused at ``apply``
  with one error and nothing changed (classes, hooks, attributes).
* Models built around a supported encoder beyond the ones ``test_hf_patch`` builds (CLIP/SigLIP classifiers and
  dual encoders, ``get_image_features``, VisionTextDualEncoder, VisionEncoderDecoder): keep=1.0 gives every output
  field bit for bit (hidden states and eager attention maps too, ``return_dict=False`` too), keep<1 runs reduced
  with finite outputs whose hidden states follow ``last_forward``, and ``remove`` restores outputs and state_dict.
* A pruning layer (random, Zero-TPrune: no merging) computes, for the tokens it keeps, exactly what the stock
  layer computes on its input: the per-family parts (layer scale, drop path, dropout, norms) are the stock ones.
"""
from __future__ import annotations

import pytest
import torch
import transformers as T
from tokenprune.patches import hf_vision

import tokenprune

METHODS = ["tome", "mctf", "zero-tprune", "random"]
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=4)  # 64 patch tokens
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50)
IDS = torch.tensor([[1, 2, 3, 4]] * 2)


def _images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _snapshot(model: torch.nn.Module):
    return ([type(m) for m in model.modules()],
            [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()],
            [sorted(k for k in vars(m) if "tokenprune" in k) for m in model.modules()])


def _tensors(out, name="out"):
    """Every tensor of an output (ModelOutput, tuple, tensor), by field path; lengths of tuples too."""
    if isinstance(out, torch.Tensor):
        return [(name, out)]
    if hasattr(out, "to_tuple"):
        return [item for key in out.keys() for item in _tensors(out[key], f"{name}.{key}")]
    if isinstance(out, (tuple, list)):
        return [(f"{name}.len", len(out))] + [item for i, v in enumerate(out) for item in _tensors(v, f"{name}[{i}]")]
    return []


def _assert_same(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert [n for n, _ in ta] == [n for n, _ in tb]
    for (name, x), (_, y) in zip(ta, tb):
        assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), name


# ---------------------------------------------------------------- refused families

UNSUPPORTED = [
    ("SwinConfig", "SwinForImageClassification"), ("Swinv2Config", "Swinv2Model"),
    ("ConvNextConfig", "ConvNextForImageClassification"), ("BeitConfig", "BeitForImageClassification"),
    ("Data2VecVisionConfig", "Data2VecVisionModel"), ("DINOv3ViTConfig", "DINOv3ViTModel"),
    ("Siglip2VisionConfig", "Siglip2VisionModel"), ("Aimv2VisionConfig", "Aimv2VisionModel"),
    ("PixtralVisionConfig", "PixtralVisionModel"), ("ViTMAEConfig", "ViTMAEModel"),
    ("ViTMSNConfig", "ViTMSNForImageClassification"), ("IJepaConfig", "IJepaModel"), ("HieraConfig", "HieraModel"),
    ("PvtConfig", "PvtForImageClassification"), ("AltCLIPConfig", "AltCLIPModel"),
    ("BlipVisionConfig", "BlipVisionModel"),
    ("Idefics3VisionConfig", "Idefics3VisionTransformer"), ("MetaClip2VisionConfig", "MetaClip2VisionModel"),
    ("Dinov2Config", "Dinov2Backbone"),  # reads the tokens as feature maps (DPT, Depth Anything)
]


@pytest.mark.parametrize(("config_name", "model_name"), UNSUPPORTED, ids=[m for _, m in UNSUPPORTED])
@pytest.mark.parametrize("method", ["tome", "mctf"])
def test_an_unsupported_family_is_refused_and_left_untouched(config_name, model_name, method):
    config_cls, model_cls = getattr(T, config_name, None), getattr(T, model_name, None)
    if config_cls is None or model_cls is None:
        pytest.skip(f"this transformers has no {model_name}")
    with torch.device("meta"):  # refused before any forward: no weights needed
        model = model_cls(config_cls())
    before = _snapshot(model)
    for keep in (1.0, 0.5):
        with pytest.raises(TypeError, match="tokenprune"):
            tokenprune.apply(model, method, keep=keep)
    assert _snapshot(model) == before
    assert not tokenprune.is_patched(model)


# ---------------------------------------------------------------- containers of a supported encoder

def _containers():
    yield "CLIPVisionModelWithProjection", lambda: T.CLIPVisionModelWithProjection(
        T.CLIPVisionConfig(**TINY, projection_dim=16)), None
    yield "CLIPForImageClassification", lambda: T.CLIPForImageClassification(
        T.CLIPConfig(vision_config=TINY, text_config=TEXT, num_labels=5)), None
    yield "CLIPModel.get_image_features", lambda: T.CLIPModel(
        T.CLIPConfig(vision_config=TINY, text_config=TEXT, projection_dim=16)), "get_image_features"
    yield "CLIPModel", lambda: T.CLIPModel(
        T.CLIPConfig(vision_config=TINY, text_config=TEXT, projection_dim=16)), "text"
    yield "SiglipForImageClassification", lambda: T.SiglipForImageClassification(
        T.SiglipConfig(vision_config=TINY, text_config=TEXT, num_labels=5)), None
    yield "SiglipModel", lambda: T.SiglipModel(T.SiglipConfig(vision_config=TINY, text_config=TEXT)), "text"
    yield "Dinov2WithRegistersForImageClassification", lambda: T.Dinov2WithRegistersForImageClassification(
        T.Dinov2WithRegistersConfig(**TINY, num_register_tokens=2, num_labels=5)), None
    yield "VisionTextDualEncoderModel", lambda: T.VisionTextDualEncoderModel(
        T.VisionTextDualEncoderConfig.from_vision_text_configs(T.ViTConfig(**TINY), T.BertConfig(**TEXT),
                                                               projection_dim=16)), "text"
    yield "VisionEncoderDecoderModel", lambda: T.VisionEncoderDecoderModel(
        T.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
            T.ViTConfig(**TINY), T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, add_cross_attention=True,
                                               is_decoder=True))), "decoder"


CONTAINERS = list(_containers())


def _call(model, how, x, **kwargs):
    with torch.no_grad():
        if how == "get_image_features":
            return model.get_image_features(pixel_values=x, **kwargs)
        if how == "text":
            return model(input_ids=IDS[: x.shape[0]], pixel_values=x, **kwargs)
        if how == "decoder":
            return model(pixel_values=x, decoder_input_ids=IDS[: x.shape[0]], **kwargs)
        return model(x, **kwargs)


def _vision_hidden_states(out):
    for name in ("vision_model_output", "encoder_hidden_states"):
        if getattr(out, name, None) is not None:
            inner = getattr(out, name)
            return inner if isinstance(inner, tuple) else inner.hidden_states
    return getattr(out, "hidden_states", None)


@pytest.mark.parametrize(("name", "build", "how"), CONTAINERS, ids=[c[0] for c in CONTAINERS])
@pytest.mark.parametrize("method", METHODS)
def test_a_model_built_on_a_supported_encoder_keeps_its_promises(name, build, how, method):
    torch.manual_seed(0)
    model = build().eval()
    model.set_attn_implementation("eager")
    x = _images()
    calls = [dict()] if how == "get_image_features" else [dict(output_hidden_states=True, output_attentions=True),
                                                           dict(return_dict=False)]
    stock = [_call(model, how, x, **kw) for kw in calls]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _snapshot(model)

    tokenprune.apply(model, method, keep=1.0)
    for kw, expected in zip(calls, stock):
        _assert_same(_call(model, how, x, **kw), expected)

    tokenprune.apply(model, method, keep=0.5)
    out = _call(model, how, x, **calls[0])
    report = tokenprune.last_forward(model)
    assert report.output_tokens < report.token_counts[0]
    floats = [t for _, t in _tensors(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert floats and all(torch.isfinite(t).all() for t in floats)
    hidden = _vision_hidden_states(out) if how != "get_image_features" else None
    if hidden is not None:
        assert [h.shape[1] for h in hidden] == report.token_counts + [report.output_tokens]

    tokenprune.remove(model)
    for kw, expected in zip(calls, stock):
        _assert_same(_call(model, how, x, **kw), expected)
    assert _snapshot(model) == before
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


# ---------------------------------------------------------------- a pruning layer is the stock layer on its tokens

FAMILIES = {
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(**TINY, num_labels=5)),
    "deit": lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**TINY, num_labels=5)),
    "clip": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**TINY)),
    "siglip": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**TINY)),
    "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(**TINY, layerscale_value=0.5, use_swiglu_ffn=True)),
    "dinov2-reg": lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**TINY, num_register_tokens=2,
                                                                                      layerscale_value=0.5)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", ["random", "zero-tprune"])
def test_a_pruning_layer_computes_the_stock_layer_on_the_tokens_it_keeps(family, method):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    enc = hf_vision._encoder(model)
    tokenprune.apply(model, method, keep=0.25)
    seen = []

    def record(layer, args, kwargs, output):
        seen.append((layer, kwargs.get("hidden_states", args[0] if args else None), output))

    handles = [layer.register_forward_hook(record, with_kwargs=True) for layer in enc.layers]
    with torch.no_grad():
        model(_images(3))
    for handle in handles:
        handle.remove()
    prefix = enc.stack.tokenprune_num_prefix
    assert any(y.shape[1] < x.shape[1] for _, x, y in seen)
    for layer, x, y in seen:
        with torch.no_grad():
            stock = type(layer)._tokenprune_base.forward(layer, x, None)
        torch.testing.assert_close(y[:, :prefix], stock[:, :prefix], atol=1e-6, rtol=1e-5)  # prefix stays in place
        nearest = torch.cdist(y, stock, compute_mode="donot_use_mm_for_euclid_dist").min(dim=-1).values
        assert nearest.max() <= 1e-5 * stock.norm(dim=-1).mean()  # every kept token is a stock output token
