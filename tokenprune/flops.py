"""Forward FLOPs of a model, patched or not, with torch's ``FlopCounterMode``.

Counts run the real forward on the real input shape, so a pruned or merged schedule
is counted exactly as it runs, matching overhead included (ToMe's similarity
matmuls). Convention: ``flops`` counts a multiply and an add as two; ``macs`` is
half of that (the fvcore / paper convention, e.g. DeiT-S = 4.6 GMACs).

torch counts CPU SDPA as zero (its CPU kernel is not in the formula registry), which
would drop the attention core, the part that shrinks quadratically with tokens. We
register the standard SDPA formula for it once.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from . import extension

_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _register_cpu_sdpa() -> None:
    if _CPU_SDPA is None or _CPU_SDPA.default in flop_registry or _CPU_SDPA in flop_registry:
        return

    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_sdpa()


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward over ``batch_size`` inputs; ``per_sample`` divides by it."""

    flops: int
    batch_size: int
    by_op: dict[str, int]

    @property
    def macs(self) -> float:
        return self.flops / 2

    @property
    def gflops_per_sample(self) -> float:
        return self.flops / self.batch_size / 1e9

    @property
    def gmacs_per_sample(self) -> float:
        return self.macs / self.batch_size / 1e9


def random_model(name: str, seed: int = 0) -> nn.Module:
    """A random-init model in eval mode: a timm name, or ``hf:<model_type>`` for a transformers
    model built from that type's default config (``hf:vit`` is ViT-B/16 at 224). A type whose config
    has a vision config (dual encoders: ``hf:clip``, ``hf:siglip``; VLMs: ``hf:llava``) gives its vision
    tower, built alone: the part that sees the image, and the only one encoder methods reduce tokens in
    (LLaVA's 7B language model would not fit this machine, and is not what is counted). A transformers
    model tokenprune cannot patch is refused (TypeError) before its weights are allocated."""
    if name.startswith("hf:"):
        from transformers import AutoConfig, AutoModel

        from tokenprune.adapters import adapters, find_adapter

        config = AutoConfig.for_model(name[3:])
        config = getattr(config, "vision_config", None) or config
        with torch.device("meta"):  # shapes only: Qwen2.5-VL's tower alone has 3B parameters
            try:
                model = AutoModel.from_config(config)
            except ValueError as e:  # no AutoModel class for it (Qwen2-VL's vision config): a page-long list
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                families = "; ".join(a.family for a in adapters())
                raise TypeError(f"tokenprune does not support {name}: transformers builds no model from its "
                                f"{type(config).__name__} alone ({reason}); supported: {families}") from e
            find_adapter(model)
        torch.manual_seed(seed)
        return AutoModel.from_config(config).eval()
    torch.manual_seed(seed)
    return create_timm_model(name).eval()


def create_timm_model(name: str, pretrained: bool = False) -> nn.Module:
    """``timm.create_model``, its failures to load a model as a one-line ValueError: a pretrained tag the
    architecture lacks, an ``hf-hub:`` name neither cached nor reachable, a ``local-dir:`` folder without
    a config."""
    import timm

    try:  # the testbed is registered: the package's __init__ imports tokenprune.testbed
        return timm.create_model(name, pretrained=pretrained)
    except (RuntimeError, OSError) as e:  # timm: a bad tag; huggingface_hub / open(): a missing file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"could not create {name!r} ({reason}); give a timm name (timm.list_models()), "
                         f"hf-hub:<repo> in the Hub's local cache or reachable, or local-dir:<folder>") from e


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """(C, H, W) of the model's native input. transformers: from its (vision) config. timm: from its
    data config, but channels from the model's ``in_chans`` and H and W from its patch embedding when it
    has them (the config keeps the pretrained values after an in_chans or img_size override)."""
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", config)
    if config is not None and hasattr(config, "image_size"):
        size = config.image_size
        height, width = (size, size) if isinstance(size, int) else size
        return getattr(config, "num_channels", 3), height, width
    from timm.data import resolve_model_data_config

    channels, height, width = resolve_model_data_config(model)["input_size"]
    channels = getattr(model, "in_chans", None) or channels  # timm's VisionTransformer keeps its in_chans
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        height, width = img_size
    return channels, height, width


def check_input_size(input_size) -> tuple[int, int, int] | None:
    """``input_size``: None (the model's own) or (channels, height, width), three ints >= 1."""
    if input_size is None:
        return None
    if (isinstance(input_size, (str, bytes)) or not hasattr(input_size, "__len__") or len(input_size) != 3
            or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in input_size)):
        raise ValueError(f"input_size must be (channels, height, width), three ints >= 1, got {input_size!r}")
    return tuple(int(n) for n in input_size)


def refuse_flex_attention(model: nn.Module) -> None:
    """transformers runs flex attention through a ``torch.compile(fullgraph=True)`` call, which cannot run under
    ``FlopCounterMode`` (a dispatch mode): a page of dynamo's traceback otherwise."""
    if any(getattr(getattr(m, "config", None), "_attn_implementation", None) == "flex_attention"
           for m in model.modules()):
        raise ValueError(f"FLOPs cannot be counted on {type(model).__name__} with attn_implementation="
                         "'flex_attention' (transformers compiles it, and the FLOP counter cannot run a compiled "
                         "call): count or fit a budget on the model loaded with attn_implementation='sdpa' (the "
                         "same FLOPs), then apply keep= to this one")


@torch.inference_mode()
def count_flops(model: nn.Module, input_size: tuple[int, ...] | None = None, batch_size: int = 1,
                inputs: torch.Tensor | Mapping | None = None) -> FlopCount:
    """FLOPs of ``model(inputs)`` (``model(**inputs)`` for a dict of keyword inputs, a processor's
    ``BatchFeature`` too, batch size from its first tensor); by default a zero image of the model's own
    input size.

    Token-reduction methods that choose tokens by content reduce the same number of
    tokens for any input, so a zero image counts exactly. The forward runs the PyTorch reference of the
    extension's kernels (``extension.pytorch_ops_only``): the same tokens, and every product the method
    computes in sight of the counter (Zero-TPrune's CPU kernel takes its I'-stage vote in its own loops,
    which the counter would miss: 0.1% of the testbed's FLOPs at keep 0.33).
    """
    if inputs is not None and (input_size is not None or batch_size != 1):
        raise TypeError("give inputs, or input_size / batch_size for a zero image, not both (inputs fix both)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    refuse_flex_attention(model)
    if inputs is None:
        # A transformers model that takes text first (CLIPModel, SiglipModel: input_ids) would get the zero
        # image as its input_ids and fail deep inside its forward; refuse it here, in one line.
        first_input = getattr(model, "main_input_name", "pixel_values")
        if first_input != "pixel_values":
            raise TypeError(f"count_flops runs the model on a zero image, but {type(model).__name__} takes "
                            f"{first_input} first: count its image tower (e.g. model.vision_model) or give "
                            f"inputs= a dict of its keyword inputs")
        size = check_input_size(input_size) or default_input_size(model)
        param = next(model.parameters())
        inputs = torch.zeros(batch_size, *size, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    # FlopCounterMode's module tracker hooks the backward of every module input that requires grad; a
    # Parameter passed straight into a submodule (timm's attention-pool latent, SigLIP 'map') has no
    # grad_fn there and torch fails. Nothing here needs gradients: switch them off for the count.
    needs_grad = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in needs_grad:
            p.requires_grad_(False)
        with counter, extension.pytorch_ops_only():
            if isinstance(inputs, Mapping):  # a processor's BatchFeature is a Mapping, not a dict
                model(**inputs)
            else:
                try:
                    model(inputs)
                except AssertionError as e:  # timm's fixed-size patch embedding asserts the image's size
                    raise ValueError(f"{type(model).__name__} does not run on an input of size "
                                     f"{tuple(inputs.shape[1:])}: {e}") from e
    finally:
        for p in needs_grad:
            p.requires_grad_(True)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    first = inputs if isinstance(inputs, torch.Tensor) else next(v for v in inputs.values() if torch.is_tensor(v))
    return FlopCount(flops=int(counter.get_total_flops()), batch_size=first.shape[0], by_op=by_op)


def llava_prefill_flops(config, visual_tokens: int, text_tokens: int, images: int = 1) -> dict[str, int]:
    """FLOPs (2 x MACs) of a LLaVA-1.5 prefill from its config alone: the vision tower (every layer runs),
    the projector on each image's features, and the language model on ``text_tokens + visual_tokens``,
    with logits for the last position only (as ``generate`` computes them). Counts what
    ``FlopCounterMode`` counts (matrix products, convolutions and attention; attention in full, as SDPA's
    formula does even for causal masks). ``tests/test_vlm.py`` checks it against a counted forward."""
    v, t = config.vision_config, config.text_config
    side = v.image_size // v.patch_size
    patches = side * side
    vt = patches + 1  # + class token
    vision = 2 * patches * 3 * v.patch_size ** 2 * v.hidden_size
    vision += v.num_hidden_layers * (2 * vt * v.hidden_size * v.hidden_size * 4  # q, k, v, o
                                     + 2 * vt * v.hidden_size * v.intermediate_size * 2  # MLP
                                     + 4 * vt * vt * v.hidden_size)  # q k^T and attention @ v
    projector = 2 * patches * (v.hidden_size * t.hidden_size + t.hidden_size * t.hidden_size)
    n, d = text_tokens + visual_tokens, t.hidden_size
    head_dim = getattr(t, "head_dim", None) or d // t.num_attention_heads
    kv = t.num_key_value_heads * head_dim
    language = t.num_hidden_layers * (2 * n * d * (2 * d + 2 * kv) + 2 * n * d * t.intermediate_size * 3
                                      + 4 * n * n * t.num_attention_heads * head_dim)
    language += 2 * d * t.vocab_size
    return {"vision": images * vision, "projector": images * projector, "language": language,
            "total": images * (vision + projector) + language}
