"""Why does Zero-TPrune choose well on one testbed and badly on another? Measure each stage.

For a testbed and a split, on the unpruned model's own attention at each default pruning layer:

* **sinks**: the share of all attention that the two most-attended patch tokens receive, how much
  larger their feature norm is than the median token's, and whether they lie on the background;
* **what each score ranks first**: for the I'-stage score (one WPR round), the full WPR score
  (EIR + VHF), the raw received attention and the class token's attention, the AUC of the score
  separating foreground patches (any garment pixel) from background ones (1.0: every foreground
  patch above every background one; 0.5: chance; below 0.5: background ranked first);
* **the S-stage**: the share of its dropped tokens that are foreground, against the foreground share
  of the candidates it chose among;
* **what survives** the whole pruned forward (``trace_source``): the foreground share of the kept
  patch tokens per method, against random's, and the share of the garment left with no survivor
  nearby (a hole in the object).

Usage::

    python -m tokenprune.eval.zero_tprune_diagnose --model vit_testbed_fmnist_plain --keep 0.5 \\
        [--images 512] [--split val]

Foreground is measured on pixels, so it is exact for a plain patch embedding and a close proxy for
the conv stem (whose receptive field spills a pixel or two over the patch). On the mosaic testbed the
"foreground" is the framed cell, the quarter of the image that holds the answer.
"""
from __future__ import annotations

import argparse
import json

import timm
import torch

import tokenprune
from tokenprune import testbed as tb
from tokenprune.methods import zero_tprune as zt


def foreground(images: torch.Tensor, grid: int, threshold: int = 12) -> torch.Tensor:
    """(B, grid*grid) bool: the patch holds a pixel brighter than ``threshold`` (of 255)."""
    b, h, w = images.shape
    p = h // grid
    patches = images.view(b, grid, p, grid, p).permute(0, 1, 3, 2, 4).reshape(b, grid * grid, p * p)
    return patches.amax(dim=-1) > threshold


def framed_cell(images: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, grid*grid) bool: the patch lies in the mosaic's framed cell (the one that holds the answer)."""
    b, h, _ = images.shape
    side = h // tb.MOSAIC_GRID
    f = tb.MOSAIC_FRAME
    cells = images.view(b, tb.MOSAIC_GRID, side, tb.MOSAIC_GRID, side).permute(0, 1, 3, 2, 4)
    framed = (cells[..., :f, :] == 255).flatten(-2).all(-1)  # (B, 2, 2): the top edge is a full frame
    per_patch = grid // tb.MOSAIC_GRID
    return framed.repeat_interleave(per_patch, 1).repeat_interleave(per_patch, 2).flatten(1)


def auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Mean over samples of the probability that a positive outranks a negative (ties count half)."""
    values = []
    for s, pos in zip(score, positive):
        if pos.all() or (~pos).all():
            continue
        a, b = s[pos], s[~pos]
        values.append(((a[:, None] > b[None]).float().mean() + 0.5 * (a[:, None] == b[None]).float().mean()).item())
    return sum(values) / max(1, len(values))


def block_attention(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention (B, H, N, N) and head-mean keys (B, N, C/H) of a timm ``Block`` on input ``x``."""
    attn = block.attn
    b, n, c = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1), k.mean(dim=1)


def frame_patches(images: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, grid*grid) bool: the patches on the edge of the mosaic's framed cell (the marker itself)."""
    per_patch = grid // tb.MOSAIC_GRID
    edge = torch.ones(per_patch, per_patch, dtype=torch.bool)
    edge[1:-1, 1:-1] = False
    edges = edge.repeat(tb.MOSAIC_GRID, tb.MOSAIC_GRID).flatten()
    return framed_cell(images, grid) & edges


def positives(images: torch.Tensor, grid: int) -> torch.Tensor:
    """The patches a good pruner keeps: the garment (one garment per image), or the framed cell (mosaics)."""
    return framed_cell(images, grid) if images.shape[-1] == 28 * tb.MOSAIC_GRID else foreground(images, grid)


@torch.inference_mode()
def stage_report(model, images: torch.Tensor, x: torch.Tensor, reducer_options: dict) -> list[dict]:
    """Per default pruning layer: sink, score and S-stage statistics on the unpruned forward."""
    prefix = model.num_prefix_tokens
    grid = model.patch_embed.grid_size[0]
    fg = positives(images, grid)
    depth = len(model.blocks)
    layers = zt.ZeroTPrune(keep=0.5, **reducer_options).pruning_layers(depth)
    rows = []
    h = model._pos_embed(model.patch_embed(x))
    h = model.norm_pre(model.patch_drop(h))
    for index, block in enumerate(model.blocks):
        if index in layers:
            attn, keys = block_attention(block, h)
            batch, heads, total, _ = attn.shape
            received = attn.mean(dim=(1, 2))[:, prefix:]  # mean over heads and queries
            top2 = received.topk(2, dim=-1).indices
            norms = h[:, prefix:].norm(dim=-1)
            cls = None if prefix == 0 else 0
            start = zt.initial_scores(batch, heads, total, cls, h.device, attn.dtype)
            rough = zt.aggregate_heads(zt.weighted_pagerank(attn, start, iterations=1)[..., prefix:])
            its = zt.ZeroTPrune(keep=0.5).iterations_at(index, depth, layers.index(index))
            full = zt.aggregate_heads(zt.weighted_pagerank(attn, start, iterations=its)[..., prefix:],
                                      variance_range=(0.01, 0.7))
            n = total - prefix
            dropped = zt.redundant_tokens(rough, keys[:, prefix:], n // 4)
            candidates = rough.argsort(dim=-1)[:, : n // 2]
            row = dict(
                layer=index,
                sink_share=round(received.gather(1, top2).sum(-1).mean().item(), 4),
                sink_norm_ratio=round((norms.gather(1, top2).mean(-1) / norms.median(-1).values).mean().item(), 2),
                sink_on_background=round((~fg.gather(1, top2)).float().mean().item(), 3),
                foreground_share=round(fg.float().mean().item(), 3),
                auc_rough_wpr=round(auc(rough, fg), 3),
                auc_full_wpr=round(auc(full, fg), 3),
                auc_received=round(auc(received, fg), 3),
                s_stage_candidates_fg=round(fg.gather(1, candidates).float().mean().item(), 3),
                s_stage_dropped_fg=round(fg.gather(1, dropped).float().mean().item(), 3),
            )
            if cls is not None:
                row["auc_cls_attention"] = round(auc(attn[:, :, 0, prefix:].mean(1), fg), 3)
            rows.append(row)
        h = block(h)
    return rows


@torch.inference_mode()
def survivors(model, images: torch.Tensor, x: torch.Tensor, keep: float, configs: dict) -> dict:
    """Per method configuration, on the patch tokens that reach the head: the foreground share of them, and
    the share of foreground patches left *uncovered* (no survivor among the patch and its 8 neighbours:
    a region of the garment of which nothing remains)."""
    grid = model.patch_embed.grid_size[0]
    fg = positives(images, grid).float()
    prefix = model.num_prefix_tokens
    out = {}
    for name, (method, options) in configs.items():
        tokenprune.apply(model, method, keep=keep, trace_source=True, **options)
        try:
            model(x)
            source = tokenprune.last_forward(model).source[:, prefix:, prefix:]  # (B, kept, N0)
        finally:
            tokenprune.remove(model)
        kept = source.sum(dim=1).clamp(max=1)  # original patches that reached the end (dropped: 0)
        near = torch.nn.functional.max_pool2d(kept.view(-1, 1, grid, grid), 3, stride=1, padding=1).flatten(1)
        out[name] = dict(foreground_share=round(((kept * fg).sum() / kept.sum()).item(), 3),
                         uncovered_foreground=round((((1 - near) * fg).sum() / fg.sum()).item(), 3))
        if images.shape[-1] == 28 * tb.MOSAIC_GRID:  # how much of the marker that names the answer survives
            frame = frame_patches(images, grid).float()
            out[name]["frame_kept"] = round(((kept * frame).sum() / frame.sum()).item(), 3)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_testbed_fmnist", choices=sorted(tb.TESTBEDS))
    p.add_argument("--weights", help="a .safetensors file instead of the packaged weights")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--data-root", help="Fashion-MNIST folder (the validation split is in train)")
    args = p.parse_args(argv)
    spec = tb.TESTBEDS[args.model]
    model = timm.create_model(args.model, pretrained=args.weights is None).eval()
    if args.weights:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(args.weights))
    images, _ = tb.testbed_split(spec.task, args.split, args.data_root)
    images = images[: args.images]
    x = tb.normalize_images(images)
    for row in stage_report(model, images, x, {}):
        print(json.dumps(row))
    configs = {  # the pruning methods: a merging one keeps every token's content in some token
        "zero-tprune": ("zero-tprune", {}),
        "zero-tprune, I-stage only": ("zero-tprune", {"s_stage": False}),
        "random": ("random", {}),
    }
    shares = survivors(model, images, x, args.keep, configs)
    print(json.dumps({"keep": args.keep, "survivors": shares}))


if __name__ == "__main__":
    main()
