"""Prefill cost of a VLM with and without visual-token reduction: counted FLOPs and measured time, as
ratios, on a small random-init LLaVA-1.5-shaped model (no weights can be downloaded here); and the
FLOPs formula on LLaVA-1.5-7B's real shapes beside the HiPrune paper's Table 5.

Times are medians of interleaved repeats (unpruned, pruned, unpruned, ...), batch 1, fp32, CPU.
"""
from __future__ import annotations

import copy
import functools

import torch

import tokenprune
from tokenprune.flops import count_flops, llava_prefill_flops
from tokenprune.timing import interleaved_medians

PAPER_TABLE5 = {576: 8.63, 192: 3.56, 128: 2.71, 64: 1.87}  # LLaVA-1.5-7B prefill TFLOPs (HiPrune, Table 5)


def small_llava(seed: int = 0):
    """LLaVA-1.5's layout at a CPU-friendly size: a 6-layer CLIP tower (224 px, patch 14: 256 visual
    tokens, layer -2 features) and an 8-layer Llama (width 768)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
                              image_size=224, patch_size=14)
    text = LlamaConfig(vocab_size=1000, hidden_size=768, num_hidden_layers=8, num_attention_heads=12,
                       num_key_value_heads=12, intermediate_size=2048, max_position_embeddings=1024)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=999, vision_feature_layer=-2)
    return LlavaForConditionalGeneration(config).eval()


def llava_7b_config():
    """LLaVA-1.5-7B's shapes (CLIP ViT-L/14 at 336 px, Vicuna-7B), from the published config values."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                              image_size=336, patch_size=14)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008)
    return LlavaConfig(vision_config=vision, text_config=text)


@torch.inference_mode()
def vlm_benchmark(method: str = "hiprune", keeps=(1 / 3, 2 / 9, 1 / 9), text_tokens: int = 48, repeats: int = 15,
                  threads: int = 2, object_layer: int = 3) -> list[dict]:
    torch.set_num_threads(threads)
    base = small_llava()
    visual = (base.config.vision_config.image_size // base.config.vision_config.patch_size) ** 2
    ids = torch.tensor([[1] + [base.config.image_token_id] * visual + list(range(2, 2 + text_tokens))])
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids, pixel_values=pixels, logits_to_keep=1)  # a prefill: logits for the last token
    base_flops = count_flops(base, inputs=inputs).flops
    rows = []
    for keep in keeps:
        options = {"object_layer": object_layer} if method == "hiprune" else {}
        pruned = tokenprune.apply(copy.deepcopy(base), method, keep=keep, **options)
        flops = count_flops(pruned, inputs=inputs).flops
        medians, foreign = interleaved_medians({name: functools.partial(m, **inputs)
                                                for name, m in (("base", base), ("pruned", pruned))}, repeats, 1)
        base_ms, pruned_ms = 1000 * medians["base"], 1000 * medians["pruned"]
        kept = tokenprune.last_forward(pruned).visual_tokens[0]
        formula = llava_prefill_flops(base.config, kept, text_tokens + 1)["total"]
        rows.append(dict(method=method, keep=keep, visual_tokens=f"{visual}->{kept}", base_gflops=base_flops / 1e9,
                         pruned_gflops=flops / 1e9, flops_ratio=flops / base_flops,
                         formula_ratio=formula / llava_prefill_flops(base.config, visual, text_tokens + 1)["total"],
                         base_ms=base_ms, pruned_ms=pruned_ms, time_ratio=pruned_ms / base_ms,
                         foreign_load=foreign))
    return rows


def paper_comparison(text_tokens: int = 48) -> list[dict]:
    """The formula on LLaVA-1.5-7B's shapes, beside HiPrune's Table 5. The paper does not state its prompt;
    48 text tokens reproduce its vanilla row to 1%, and the differences between budgets do not depend on it."""
    config = llava_7b_config()
    return [dict(visual_tokens=k, formula_tflops=llava_prefill_flops(config, k, text_tokens)["total"] / 1e12,
                 language_only_tflops=llava_prefill_flops(config, k, text_tokens)["language"] / 1e12,
                 paper_tflops=paper) for k, paper in PAPER_TABLE5.items()]


def format_tables(rows: list[dict], paper: list[dict]) -> str:
    lines = ["| method | keep | visual tokens | prefill GFLOPs (counted) | FLOPs ratio | formula ratio | "
             "prefill ms | time ratio | foreign load |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        foreign = "n/a" if r["foreign_load"] is None else f"{r['foreign_load']:.0%}"
        lines.append(f"| {r['method']} | {r['keep']:.3f} | {r['visual_tokens']} | {r['base_gflops']:.1f} -> "
                     f"{r['pruned_gflops']:.1f} | {r['flops_ratio']:.3f} | {r['formula_ratio']:.3f} | "
                     f"{r['base_ms']:.1f} -> {r['pruned_ms']:.1f} | {r['time_ratio']:.3f} | {foreign} |")
    lines += ["", "| LLaVA-1.5-7B visual tokens | formula TFLOPs (vision + projector + LLM) | LLM only | "
              "HiPrune Table 5 |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {p['visual_tokens']} | {p['formula_tflops']:.2f} | {p['language_only_tflops']:.2f} | "
              f"{p['paper_tflops']:.2f} |" for p in paper]
    return "\n".join(lines)
