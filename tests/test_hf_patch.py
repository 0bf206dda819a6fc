"""The transformers adapter: every family and method, exactness, restore, heads, pipelines."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import timm
import torch
from conftest import images
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    ViTModel,
)

import tokenprune

ALL_METHODS = ["tome", "random", "zero-tprune", "mctf"]
TINY = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96, image_size=32,
            patch_size=4)  # 8x8 = 64 patch tokens, as the timm tests


def tiny_hf(family: str, **overrides):
    torch.manual_seed(0)
    kw = {**TINY, **overrides}
    build = {
        "vit": lambda: ViTForImageClassification(ViTConfig(**kw, num_labels=5)),
        "deit": lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**kw, num_labels=5)),
        "clip": lambda: CLIPVisionModel(CLIPVisionConfig(**kw)),
        "siglip": lambda: SiglipVisionModel(SiglipVisionConfig(**kw)),
        "dinov2": lambda: Dinov2ForImageClassification(Dinov2Config(**kw, num_labels=5)),
        "dinov2-reg": lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**kw, num_register_tokens=4)),
    }[family]
    return build().eval()


PREFIX = {"vit": 1, "deit": 2, "clip": 1, "siglip": 0, "dinov2": 1, "dinov2-reg": 5}


@pytest.fixture(params=sorted(PREFIX))
def hf_family(request) -> str:
    return request.param


def run(model, x, **kwargs):
    with torch.inference_mode():
        out = model(x, **kwargs)
    if isinstance(out, torch.Tensor):  # timm
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("method", ALL_METHODS)
def test_keep_one_is_bit_identical_and_remove_restores(hf_family, method):
    model, x = tiny_hf(hf_family), images()
    expected = run(model, x)
    tokenprune.apply(model, method, keep=1.0)
    assert torch.equal(run(model, x), expected)
    assert tokenprune.last_forward(model).token_counts == [PREFIX[hf_family] + 64] * 4
    tokenprune.apply(model, method, keep=0.25)
    assert not torch.equal(run(model, x), expected)
    tokenprune.remove(model)
    assert torch.equal(run(model, x), expected)
    assert not tokenprune.is_patched(model)
    assert model.config._attn_implementation == "sdpa"
    assert all("TokenPruned" not in type(m).__name__ for m in model.modules())
    assert all(not any(fn.__module__.startswith("tokenprune") for fn in m._forward_pre_hooks.values())
               for m in model.modules())


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_reaches_the_budget_in_batches(hf_family, method):
    model, x = tiny_hf(hf_family), images(batch=3)
    tokenprune.apply(model, method, keep=0.25)
    out = run(model, x)
    report = tokenprune.last_forward(model)
    assert report.output_tokens == PREFIX[hf_family] + 16
    assert report.token_counts[0] == PREFIX[hf_family] + 64
    assert torch.isfinite(out).all()
    if method != "random":  # content-based methods treat each sample on its own
        torch.testing.assert_close(run(model, x[1:2]), out[1:2], atol=1e-5, rtol=1e-4)


def test_hidden_states_have_the_reduced_lengths():
    model = tiny_hf("clip")
    tokenprune.apply(model, "tome", keep=0.25)
    with torch.inference_mode():
        out = model(images(), output_hidden_states=True)
    # embeddings, then each layer's output
    assert [h.shape[1] for h in out.hidden_states] == [65, 53, 41, 29, 17]
    assert out.last_hidden_state.shape[1] == 17
    assert out.pooler_output.shape == (2, 48)


def _copy_vit_weights_to_timm(hf: ViTModel, timm_vit) -> None:
    sd = {"cls_token": hf.embeddings.cls_token, "pos_embed": hf.embeddings.position_embeddings,
          "patch_embed.proj.weight": hf.embeddings.patch_embeddings.projection.weight,
          "patch_embed.proj.bias": hf.embeddings.patch_embeddings.projection.bias,
          "norm.weight": hf.layernorm.weight, "norm.bias": hf.layernorm.bias}
    for i, layer in enumerate(hf.layers):
        a = layer.attention
        sd |= {f"blocks.{i}.norm1.weight": layer.layernorm_before.weight,
               f"blocks.{i}.norm1.bias": layer.layernorm_before.bias,
               f"blocks.{i}.attn.qkv.weight": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
               f"blocks.{i}.attn.qkv.bias": torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
               f"blocks.{i}.attn.proj.weight": a.o_proj.weight, f"blocks.{i}.attn.proj.bias": a.o_proj.bias,
               f"blocks.{i}.norm2.weight": layer.layernorm_after.weight,
               f"blocks.{i}.norm2.bias": layer.layernorm_after.bias,
               f"blocks.{i}.mlp.fc1.weight": layer.mlp.fc1.weight, f"blocks.{i}.mlp.fc1.bias": layer.mlp.fc1.bias,
               f"blocks.{i}.mlp.fc2.weight": layer.mlp.fc2.weight, f"blocks.{i}.mlp.fc2.bias": layer.mlp.fc2.bias}
    timm_vit.load_state_dict(sd, strict=True)


def hf_and_timm_vit():
    """A tiny transformers ViT (seed 0) and a timm ViT carrying the same weights."""
    torch.manual_seed(0)
    hf = ViTModel(ViTConfig(**TINY, layer_norm_eps=1e-6), add_pooling_layer=False).eval()
    tv = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=48,
                           depth=4, num_heads=3, mlp_ratio=2, num_classes=0, global_pool="").eval()
    _copy_vit_weights_to_timm(hf, tv)
    return hf, tv


@pytest.mark.parametrize("method", ALL_METHODS)
def test_same_reduction_as_the_timm_adapter_on_the_same_weights(method):
    """The HF path reproduces the timm path (tested against the papers' semantics) on a shared ViT."""
    hf, tv = hf_and_timm_vit()
    x = images()
    torch.testing.assert_close(run(hf, x), run(tv, x), atol=1e-5, rtol=1e-5)
    for model in (hf, tv):
        tokenprune.apply(model, method, keep=0.25, **({"seed": 3} if method == "random" else {}))
    torch.testing.assert_close(run(hf, x), run(tv, x), atol=1e-5, rtol=1e-5)
    assert tokenprune.last_forward(hf).token_counts == tokenprune.last_forward(tv).token_counts


def test_eager_attention_is_kept_and_exact():
    model, x = tiny_hf("vit"), images()
    model.set_attn_implementation("eager")
    expected = run(model, x)
    tokenprune.apply(model, "zero-tprune", keep=1.0)
    assert torch.equal(run(model, x), expected)
    tokenprune.apply(model, "zero-tprune", keep=0.25)
    assert tokenprune.last_forward(model) is None
    run(model, x)
    assert tokenprune.last_forward(model).output_tokens == 17
    tokenprune.remove(model)
    assert model.config._attn_implementation == "eager"


def test_unsupported_attention_and_masks_fail_clearly():
    model = tiny_hf("vit")
    model.config._attn_implementation_internal = "no_such_attention"  # flash and flex: test_attention_impls.py
    with pytest.raises(TypeError, match="set_attn_implementation"):
        tokenprune.apply(model, keep=0.5)
    assert not tokenprune.is_patched(model)
    model = ViTModel(ViTConfig(**TINY)).eval()
    tokenprune.apply(model, keep=0.5)
    mask = torch.ones(2, 65, dtype=torch.long)
    mask[0, -3:] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        model(images(), attention_mask=mask)


@pytest.mark.parametrize("method", ["tome", "mctf", "zero-tprune", "random"])
def test_an_attention_mask_at_keep_1_gives_the_stock_model_s_output(method):
    """Nothing is removed, so the caller's mask still fits every layer: the stock model's answer, not a refusal."""
    model, x = ViTModel(ViTConfig(**TINY)).eval(), images()
    mask = torch.ones(2, 65, dtype=torch.long)
    mask[0, -3:] = 0
    with torch.inference_mode():
        stock = model(x, attention_mask=mask).last_hidden_state
        tokenprune.apply(model, method, keep=1.0)
        patched = model(x, attention_mask=mask).last_hidden_state
        report = tokenprune.last_forward(model)
        assert not torch.equal(stock, model(x).last_hidden_state)  # the mask matters
    assert torch.equal(stock, patched) and report.token_counts == [65] * 4 and report.output_tokens == 65


def test_unreachable_keep_and_two_encoders_fail_before_patching():
    model = tiny_hf("vit")
    with pytest.raises(ValueError, match="cannot reduce 64 patch tokens"):
        tokenprune.apply(model, "tome", keep=0.001)
    assert not tokenprune.is_patched(model)
    pair = torch.nn.ModuleList([tiny_hf("vit"), tiny_hf("clip")])
    with pytest.raises(TypeError, match="found 2 vision encoders"):
        tokenprune.apply(pair, keep=0.5)


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_masked_image_modeling_heads_are_refused(family):
    """``*ForMaskedImageModeling`` reshapes the encoder's patch tokens into the patch grid for its decoder: after
    reduction they are no grid, and a square count (16 of 64) gave a 16x16 "reconstruction" of 32x32 images
    without an error. Refused at ``apply``, nothing patched."""
    from transformers import DeiTForMaskedImageModeling, ViTForMaskedImageModeling

    classes = {"vit": (ViTForMaskedImageModeling, ViTConfig), "deit": (DeiTForMaskedImageModeling, DeiTConfig)}
    cls, config = classes[family]
    model = cls(config(**TINY, encoder_stride=4)).eval()
    with pytest.raises(TypeError, match=f"cannot patch {cls.__name__}.*patch grid"):
        tokenprune.apply(model, "tome", keep=0.25)
    assert not tokenprune.is_patched(model)
    assert not any(type(m).__name__.startswith("TokenPruned") for m in model.modules())
    with torch.inference_mode():
        assert model(images()).reconstruction.shape == (2, 3, 32, 32)


def test_a_vlm_tokenprune_does_not_prune_as_one_is_refused():
    """PaliGemma holds one SigLIP tower, which the encoder adapter would patch; its language model then found 32
    image features for 64 placeholders deep in transformers at the first forward. Refused at ``apply``."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    config = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", **TINY),
        text_config=dict(model_type="gemma", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16),
        image_token_index=299, projection_dim=32)
    model = PaliGemmaForConditionalGeneration(config).eval()
    with pytest.raises(TypeError, match="cannot patch the vision tower of PaliGemma.*image placeholder token.*LLaVA"):
        tokenprune.apply(model, "tome", keep=0.5)
    assert not tokenprune.is_patched(model)
    assert not any(type(m).__name__.startswith("TokenPruned") for m in model.modules())


def test_copies_pickles_and_reconfigures():
    model, x = tiny_hf("dinov2"), images()
    tokenprune.apply(model, "mctf", keep=0.25)
    expected = run(model, x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(run(clone, x), expected)
        assert tokenprune.reducer_of(clone).name == "mctf"
    tokenprune.apply(model, "tome", keep=0.5)
    run(model, x)
    assert tokenprune.last_forward(model).method == "tome"


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>", "a", "photo", "of", "cat", "dog", "This", "is", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", model_max_length=64)


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((40, 40, 3)) * 255).astype("uint8"))


TEXT = dict(vocab_size=10, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_zero_shot_pipeline_reduces_only_the_vision_tower(kind):
    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=TINY, projection_dim=16))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = SiglipModel(SiglipConfig(text_config=TEXT, vision_config=TINY))
        processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    pipe = tokenprune.pipeline("zero-shot-image-classification", model=model.eval(), tokenizer=_tiny_tokenizer(),
                               image_processor=processor, method="tome", keep=0.25)
    result = pipe(_image(), candidate_labels=["cat", "dog"])
    assert sorted(r["label"] for r in result) == ["cat", "dog"]
    assert all(isinstance(r["score"], float) for r in result)
    assert tokenprune.last_forward(pipe.model).output_tokens == PREFIX[kind] + 16
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"  # encoder methods keep the implementation


@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    labels = {0: "cat", 1: "dog", 2: "fish"}
    ViTForImageClassification(ViTConfig(**TINY, num_labels=3, id2label=labels,
                                         label2id={v: k for k, v in labels.items()})).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def test_image_classification_pipeline_keeps_its_output_format(saved_vit):
    from transformers import pipeline

    images_in = [_image(0), _image(1)]
    stock = pipeline("image-classification", model=saved_vit)(images_in)
    pipe = tokenprune.pipeline("image-classification", model=saved_vit, keep=1.0)
    assert pipe(images_in) == stock  # keep=1.0: the same labels and scores
    assert isinstance(pipe, type(pipeline("image-classification", model=saved_vit)))
    tokenprune.apply(pipe.model, "zero-tprune", keep=0.25)  # apply works on an existing pipeline
    result = pipe(images_in)
    assert [sorted(r["label"] for r in per_image) for per_image in result] == [["cat", "dog", "fish"]] * 2
    assert tokenprune.last_forward(pipe.model).output_tokens == 17


def test_feature_extraction_pipeline_returns_the_reduced_tokens(saved_vit):
    pipe = tokenprune.pipeline("image-feature-extraction", model=saved_vit, method="mctf", keep=0.25)
    assert np.array(pipe(_image())).shape == (1, 17, 48)


def test_pipeline_checks_arguments_before_loading(saved_vit):
    with pytest.raises(ValueError, match="keep"):
        tokenprune.pipeline("image-classification", model="no/such-model", keep=2.0)
    with pytest.raises(TypeError, match="unknown option"):
        tokenprune.pipeline("image-classification", model="no/such-model", method="tome", options={"rr": 3})
    with pytest.raises(ValueError, match=r"flops must be a number in \(0, 1\], got 1.5"):
        tokenprune.pipeline("image-classification", model="no/such-model", flops=1.5)
    with pytest.raises(TypeError, match="give keep or a FLOPs budget"):
        tokenprune.pipeline("image-classification", model="no/such-model", keep=0.5, gflops=1.0)
    with pytest.raises(TypeError, match="give one FLOPs budget"):
        tokenprune.pipeline("image-classification", model="no/such-model", flops=0.5, gflops=1.0)
    for selector in ("hiprune", "random-select"):  # VLM methods: refused by apply only after loading (a download)
        with pytest.raises(TypeError, match=f"^{selector} is a visual-token selector .*: the image-classification "
                                            "pipeline takes mctf, random, tome, zero-tprune$"):
            tokenprune.pipeline("image-classification", model="no/such-model", method=selector)
    with pytest.raises(TypeError, match="^tome is a vision-encoder method .*: the image-text-to-text pipeline takes "
                                        "hiprune, random-select$"):
        tokenprune.pipeline("image-text-to-text", model="no/such-model", method="tome")
    with pytest.raises(TypeError, match="^a FLOPs budget fits image encoders: the image-text-to-text pipeline"):
        tokenprune.pipeline("image-text-to-text", model="no/such-model", flops=0.5)
    with pytest.raises(TypeError, match="^positions applies to vision-language models .*, not to image-classif"):
        tokenprune.pipeline("image-classification", model="no/such-model", positions="original")
    with pytest.raises(ValueError, match="^tokenprune.pipeline serves the tasks image-classification, "
                                         ".*image-text-to-text; got 'depth-estimation'$"):
        tokenprune.pipeline("depth-estimation", model="no/such-model")
    # apply's keywords given to pipeline went on to transformers.pipeline, which refused them after loading
    with pytest.raises(TypeError, match=r"^r given to tokenprune.pipeline, .*: method options go in options=\{...\}$"):
        tokenprune.pipeline("image-classification", model="no/such-model", method="tome", r=2)
    with pytest.raises(TypeError, match="^input_size, prop_attn given .*; a budget is counted at the size the image "):
        tokenprune.pipeline("image-classification", model="no/such-model", flops=0.5, input_size=(3, 32, 32),
                            prop_attn=False)


def test_a_task_inferred_from_the_model_is_checked_after_loading(saved_vit, monkeypatch):
    """task=None: transformers asks the hub for the model's task (stood in for here), so the task is known only
    after loading; a task tokenprune does not serve, or a method of the other kind, is refused then."""
    import transformers.pipelines

    monkeypatch.setattr(transformers.pipelines, "get_task", lambda model, token=None, **kwargs: "depth-estimation")
    with pytest.raises(ValueError, match="^tokenprune.pipeline serves the tasks .*; ViTForImageClassification runs "
                                         "'depth-estimation'$"):
        tokenprune.pipeline(model=saved_vit)
    monkeypatch.setattr(transformers.pipelines, "get_task", lambda model, token=None, **kwargs: "image-classification")
    with pytest.raises(TypeError, match="^hiprune is a visual-token selector .*: the image-classification pipeline"):
        tokenprune.pipeline(model=saved_vit, method="hiprune")
    assert tokenprune.is_patched(tokenprune.pipeline(model=saved_vit, method="tome").model)


@pytest.mark.parametrize("budget", [{"flops": 0.6}, {"gflops": 0.01}])
def test_a_pipeline_takes_a_flops_budget_as_apply_does(saved_vit, budget):
    from transformers import AutoModelForImageClassification

    from tokenprune.budget import fit_flops_budget

    pipe = tokenprune.pipeline("image-classification", model=saved_vit, method="mctf", **budget)
    expected = fit_flops_budget(AutoModelForImageClassification.from_pretrained(saved_vit).eval(), "mctf", **budget)
    assert tokenprune.reducer_of(pipe.model).keep == expected.keep < 1.0
    assert tokenprune.count_flops(pipe.model).flops == expected.flops
    assert sorted(r["label"] for r in pipe(_image())) == ["cat", "dog", "fish"]
    default = tokenprune.pipeline("image-classification", model=saved_vit)  # no budget: keep 0.33
    assert tokenprune.reducer_of(default.model).keep == 0.33


def test_a_pipeline_budget_is_counted_at_the_size_its_processor_feeds(tmp_path):
    """DINOv2's config says 518 px and its processor crops 224: the budget holds at what the pipeline runs."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from tokenprune.budget import fit_flops_budget

    torch.manual_seed(0)
    stock = Dinov2Model(Dinov2Config(**{**TINY, "image_size": 64})).eval()
    stock.save_pretrained(tmp_path)
    BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    pipe = tokenprune.pipeline("image-feature-extraction", model=str(tmp_path), method="tome", flops=0.6)
    inputs = dict(pipe.image_processor(_image(), return_tensors="pt"))
    assert inputs["pixel_values"].shape[2:] == (32, 32)
    fed = fit_flops_budget(stock, "tome", flops=0.6, input_size=(3, 32, 32))
    assert tokenprune.reducer_of(pipe.model).keep == fed.keep != fit_flops_budget(stock, "tome", flops=0.6).keep
    ratio = tokenprune.count_flops(pipe.model, inputs=inputs).flops / tokenprune.count_flops(stock, inputs=inputs).flops
    assert ratio <= 0.6


def test_another_kinds_option_goes_to_transformers_pipeline(saved_vit, monkeypatch):
    """size= is MCTF's option and an image processor's keyword: an image-text-to-text pipeline (whose methods do not
    take it) hands it to transformers.pipeline, as the stock pipeline takes it."""
    import transformers

    seen = {}

    def stand_in(task, model=None, **kwargs):  # what transformers.pipeline is given; loading a VLM is not the point
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(transformers, "pipeline", stand_in)
    with pytest.raises(RuntimeError, match="stop"):
        tokenprune.pipeline("image-text-to-text", model="no/such-model", size={"shortest_edge": 32})
    assert seen == {"size": {"shortest_edge": 32}}
    with pytest.raises(TypeError, match="^size given to tokenprune.pipeline"):
        tokenprune.pipeline("image-classification", model="no/such-model", size={"shortest_edge": 32})


def test_flops_of_a_flex_attention_model_are_refused_in_one_line():
    model = ViTForImageClassification(ViTConfig(**TINY, num_labels=3, attn_implementation="flex_attention")).eval()
    for count in (lambda: tokenprune.count_flops(model), lambda: tokenprune.apply(model, "tome", flops=0.6)):
        with pytest.raises(ValueError, match="^FLOPs cannot be counted on ViTForImageClassification with "
                                             "attn_implementation='flex_attention' .*attn_implementation='sdpa'"):
            count()
    assert not tokenprune.is_patched(model)


def test_gradient_checkpointing_at_keep_1_is_the_stock_checkpointed_forward(monkeypatch):
    """Where nothing is removed (keep=1.0) a checkpointed layer is the stock one: the stock outputs and gradients,
    and the report's counts (taken before a replay in the backward pass records its count again)."""
    from tokenprune.patches import hf_vision

    monkeypatch.setattr(hf_vision, "run_block", lambda *a: pytest.fail("a checkpointed layer ran the reducing block"))
    stock = tiny_hf("vit").train()
    model = copy.deepcopy(stock)
    tokenprune.apply(model, "tome", keep=1.0)
    for m in (stock, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x = torch.randn(2, 3, 32, 32)
    out = model(pixel_values=x).logits
    out.sum().backward()
    expected = stock(pixel_values=x).logits
    expected.sum().backward()
    assert torch.equal(out, expected)
    for (name, p), q in zip(model.named_parameters(), stock.parameters()):
        assert torch.equal(p.grad, q.grad), name
    tokens = stock.vit.embeddings.patch_embeddings.num_patches + 1
    assert tokenprune.last_forward(model).token_counts == [tokens] * stock.config.num_hidden_layers


def test_gradient_checkpointing_is_refused_while_reducing():
    """transformers' checkpointing replays a layer's forward in the backward pass, from a state the forward has moved
    on (the backward failed on a size mismatch, or on a different number of saved tensors): refused in the forward,
    with what to do; without gradients, or once disabled, the patched model runs."""
    model = tiny_hf("vit").train()
    tokenprune.apply(model, "tome", keep=0.5)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="gradient checkpointing cannot be combined with token reduction"):
        model(pixel_values=x)
    with torch.no_grad():
        model(pixel_values=x)
    model.gradient_checkpointing_disable()
    model(pixel_values=x).logits.sum().backward()


def test_an_image_text_to_text_pipeline_prunes_the_visual_tokens(monkeypatch):
    """The VLM task takes the visual-token selectors: keep=1.0 answers as the stock pipeline does, a keep gives
    the language model that share of the image's tokens, and positions reaches apply."""
    from PIL import Image
    from transformers import LlavaForConditionalGeneration
    from transformers import pipeline as hf_pipeline

    from tokenprune import vlm_testbed

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(vlm_testbed.vlm_testbed_config()).eval()
    processor = vlm_testbed.vlm_testbed_processor()
    image = Image.fromarray((np.random.default_rng(0).random((56, 56, 3)) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what?"}]}]

    def answer(pipe):
        return pipe(text=messages, generate_kwargs={"max_new_tokens": 4, "do_sample": False})[0]["generated_text"]

    stock = answer(hf_pipeline("image-text-to-text", model=model, processor=processor))
    for method in ("hiprune", "random-select"):
        pipe = tokenprune.pipeline("image-text-to-text", model=model, processor=processor, method=method, keep=1.0)
        assert answer(pipe) == stock
        tokenprune.remove(pipe.model)
    from tokenprune import pipelines

    applied = []
    monkeypatch.setattr(pipelines, "apply", lambda *args, **kwargs: applied.append(kwargs)
                        or tokenprune.apply(*args, **kwargs))
    pipe = tokenprune.pipeline("image-text-to-text", model=model, processor=processor, keep=0.25,
                               positions="original")
    answer(pipe)
    assert applied == [{"keep": 0.25, "positions": "original"}]
    assert repr(tokenprune.reducer_of(pipe.model)) == "HiPrune(keep=0.25)"  # the family's default method
    assert tokenprune.last_forward(pipe.model).visual_tokens == [49]  # round(0.25 * 196)
    tokenprune.remove(pipe.model)


def test_a_pipeline_given_where_a_model_goes_is_pointed_to_its_model(saved_vit):
    """is_patched(pipe) said False although pipe.model was patched; apply, remove, last_forward, reducer_of and
    is_patched now refuse what is not an nn.Module alike, and point a pipeline to its .model."""
    pipe = tokenprune.pipeline("image-classification", model=saved_vit, method="tome", keep=0.5)
    for call in (tokenprune.is_patched, tokenprune.remove, tokenprune.last_forward, tokenprune.reducer_of,
                 lambda p: tokenprune.apply(p, "tome")):
        with pytest.raises(TypeError, match="^tokenprune patches torch.nn.Module models, got "
                                            "ImageClassificationPipeline: pass its .model$"):
            call(pipe)
    with pytest.raises(TypeError, match="^tokenprune patches torch.nn.Module models, got str$"):
        tokenprune.is_patched("vit")
    assert tokenprune.is_patched(pipe.model)
