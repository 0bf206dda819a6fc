"""MCTF's merging block at batch 32, piece by piece, and two bit-identical rewrites timed in the forward
(docs/performance.md, session 29: neither paid, so neither is in the package).

    .venv/bin/python docs/experiments/mctf_batch32.py deit_small_patch16_224 32 10
    .venv/bin/python docs/experiments/mctf_batch32.py vit_testbed_fmnist 32 20

1. The pieces alone at the first merging block's shapes (medians of 21 calls, ms): the logits, the softmax, the
   attention received, the plan, the one-step-ahead core and its product, and fused attention for comparison.
2. The forward with each rewrite swapped in, interleaved with the current code over ROUNDS rounds (medians): the
   one-step-ahead product head by head into the tokens' layout, and the map, softmax and attention received computed
   four samples at a time. Each must give the current forward's output bit for bit.
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import tokenprune
from tokenprune import ops
from tokenprune import state as forward_state
from tokenprune.flops import default_input_size, random_model
from tokenprune.methods import mctf

TAU, CRITERIA = (1.0, 20.0, 40.0), (True, True, True)


def median_ms(f, calls: int = 21) -> float:
    f()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def pieces(batch: int, heads: int, dim: int, n: int = 197, remove: int = 9) -> None:
    qkv = torch.randn(batch, n, 3, heads, dim).permute(2, 0, 3, 1, 4)  # q, k, v as a qkv projection leaves them
    q, k, v = qkv.unbind(0)
    bias, scale = torch.randn(batch, 1, 1, n), dim ** -0.5
    x, size = torch.randn(batch, n, heads * dim), torch.ones(batch, n)
    probs = torch.empty(batch, heads, n, n)
    ops.head_products(q, k.transpose(-2, -1), alpha=scale, add=bias, out=probs)
    torch.softmax(probs, dim=-1, out=probs)
    received = mctf.attention_received(probs)
    dest, n_out = mctf.merge_plan(x, received, size, TAU, CRITERIA, remove, 1, True)
    weight = received * size
    merged_v = torch.randn(batch, n_out, heads * dim).view(batch, n_out, heads, dim).transpose(1, 2)
    print(f"(B, H, N, D) = ({batch}, {heads}, {n}, {dim}), ms:")
    print("  logits with bias %.2f" % median_ms(lambda: ops.head_products(q, k.transpose(-2, -1), alpha=scale, add=bias,
                                                                         out=probs)))
    print("  softmax in place %.2f" % median_ms(lambda: torch.softmax(probs, dim=-1, out=probs)))
    print("  attention received %.2f" % median_ms(lambda: mctf.attention_received(probs)))
    print("  plan %.2f" % median_ms(lambda: mctf.merge_plan(x, received, size, TAU, CRITERIA, remove, 1, True)))
    print("  attend_merged %.2f" % median_ms(lambda: mctf.attend_merged(probs, dest, n_out, weight, merged_v)))
    print("  its product alone %.2f" % median_ms(lambda: probs @ v))
    print("  fused attention at N %.2f" % median_ms(lambda: F.scaled_dot_product_attention(q, k, v)))


def attend_merged_per_head(probs, dest, n_out, row_weight, v):
    """attend_merged with the product head by head, written in the (B, N, H, D) layout the pooling reads."""
    batch, heads, _, dim = v.shape
    n = dest.shape[1]
    per_key = v.transpose(1, 2)[torch.arange(batch)[:, None], dest]  # (B, N, H, D), contiguous
    out = per_key.new_empty(batch, n, heads, dim)
    for h in range(heads):
        torch.bmm(probs[:, h], per_key[:, :, h], out=out[:, :, h])
    merged = ops.assign_mean(out.view(batch, n, heads * dim), row_weight[..., None], dest, n_out)
    return merged.view(batch, n_out, heads, dim).transpose(1, 2)


def chunked(chunk: int):
    """The map, its softmax and the attention received, ``chunk`` samples at a time (each chunk's map in cache)."""
    received = {}

    def probabilities(taps, state=None):
        q, k, bias = taps.q, taps.k, taps.bias
        batch, heads, n = q.shape[:3]
        out = state.scratch(batch * heads * n * n, q).view(batch, heads, n, n)
        got = q.new_empty(batch, n)
        for s in range(0, batch, chunk):
            part = slice(s, s + chunk)
            logits = ops.head_products(q[part], k[part].transpose(-2, -1), alpha=taps.scale,
                                       add=None if bias is None else bias[part], out=out[part])
            got[part] = torch.softmax(logits, dim=-1, out=logits).mean(dim=(1, 2))
        received["last"] = got
        return out

    def attention_received(probs):
        return received["last"].clamp_min(torch.finfo(probs.dtype).tiny)

    return probabilities, attention_received


def forward_ab(model_name: str, batch: int, rounds: int) -> None:
    model = tokenprune.apply(random_model(model_name, 0).eval(), "mctf", 0.5)
    x = torch.randn(batch, *default_input_size(model))
    current = (mctf.attend_merged, forward_state.AttentionTaps.probabilities, mctf.attention_received)
    per_head = (attend_merged_per_head, current[1], current[2])
    variants = {"current": current, "product per head": per_head, "map in chunks of 4": (current[0], *chunked(4))}

    def install(parts):
        mctf.attend_merged, forward_state.AttentionTaps.probabilities, mctf.attention_received = parts

    times = {name: [] for name in variants}
    with torch.inference_mode():
        outputs = {}
        for name, parts in variants.items():
            install(parts)
            outputs[name] = model(x)
        for name in variants:
            print(f"{name}: output equal to the current code's: {torch.equal(outputs[name], outputs['current'])}")
        for r in range(rounds):
            for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                install(variants[name])
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    install(current)
    base = statistics.median(times["current"])
    for name, t in times.items():
        print(f"{name}: {1e3 * statistics.median(t):.1f} ms, {statistics.median(t) / base:.3f} of the current time")


if __name__ == "__main__":
    torch.set_num_threads(2)
    name, batch_size, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model_for_shapes = random_model(name, 0)
    block = model_for_shapes.blocks[0].attn
    pieces(batch_size, block.num_heads, block.head_dim)
    forward_ab(name, batch_size, repeat)
