"""The extension's kernels against the PyTorch ops they replace, at real models' shapes.

For each shape (DeiT-S, ViT-L, CLIP-L/336: tokens, width, heads) and batch size it times, interleaved,
the PyTorch reference in ``tokenprune.ops`` and the extension's op on the same inputs, and checks that
they agree first:

* gather: the prefix and half of the patch tokens (``keep_tokens``);
* merge: a ToMe step removing a quarter of the tokens (``merge_mean``: plan to destinations, one kernel);
* received attention: the attention each token receives, from q and k (HiPrune's scores).

On ``--device cuda`` it times the CUDA build with CUDA events (``tokenprune.timing``); on the CPU it
times the CPU build, which exists to be tested, not to be fast (the PyTorch ops are the CPU path).
End-to-end throughput of each method is ``tokenprune bench`` (with ``--device cuda --dtype bf16`` and
``--compile`` on a GPU).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass

import torch

from tokenprune import extension, ops
from tokenprune.cli import DTYPES, torch_dtype
from tokenprune.timing import interleaved_medians

# name -> (tokens incl. class token, width, heads)
SHAPES = {"deit_small": (197, 384, 6), "vit_large": (197, 1024, 16), "clip_large_336": (577, 1024, 16)}


@dataclass
class KernelRow:
    op: str
    shape: str
    batch: int
    dtype: str
    device: str
    torch_ms: float
    kernel_ms: float
    speedup: float
    max_abs_diff: float


def _cases(batch: int, tokens: int, width: int, heads: int, dtype: torch.dtype, device: torch.device, seed: int):
    """(op name, reference call, kernel call) for one shape; each call returns the op's main tensor."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, tokens, width, generator=g, device=device).to(dtype)
    patches = tokens - 1
    keep = torch.rand(batch, patches, generator=g, device=device).argsort(-1)[:, :patches // 2].sort(-1).values
    plan = ops.bipartite_soft_matching(x.float(), tokens // 4, 1)
    size = torch.ones(batch, tokens, 1, device=device)
    q, k = (torch.randn(batch, heads, tokens, width // heads, generator=g, device=device).to(dtype)
            for _ in range(2))
    scale = (width // heads) ** -0.5
    kernels = extension.load(cuda=device.type == "cuda")

    def kernel_merge():
        dest, n_out = ops.merge_destinations(plan, tokens, 1)
        return kernels.weighted_merge(x, size[..., 0], dest, n_out)[0]

    def reference_merge():
        return ops.merge_mean(x.float(), size, plan, 1)[0].to(dtype)  # the reference accumulates in fp32 too
    return [
        ("gather", lambda: ops.keep_tokens(x, keep, 1), lambda: kernels.gather_kept(x, keep, 1)),
        ("merge", reference_merge, kernel_merge),
        ("received_attention", lambda: ops.received_attention(q, k, scale),
         lambda: kernels.received_attention(q, k, scale)),
    ]


@torch.inference_mode()
def bench_kernels(shapes=tuple(SHAPES), batch_sizes=(1, 32), dtype: str = "fp32", device: str = "cpu",
                  repeats: int = 21, seed: int = 0) -> list[KernelRow]:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch here")
    with extension.pytorch_ops_only():  # the reference calls must not dispatch to the kernels
        rows = []
        for name in shapes:
            tokens, width, heads = SHAPES[name]
            for batch in batch_sizes:
                for op, reference, kernel in _cases(batch, tokens, width, heads, torch_dtype(dtype), dev, seed):
                    diff = (reference().float() - kernel().float()).abs().max().item()
                    medians, _ = interleaved_medians({"torch": reference, "kernel": kernel}, repeats, device=dev)
                    rows.append(KernelRow(op, name, batch, dtype, device, 1000 * medians["torch"],
                                          1000 * medians["kernel"], medians["torch"] / medians["kernel"], diff))
    return rows


def format_rows(rows: list[KernelRow]) -> str:
    lines = ["| op | shape | batch | dtype | device | torch ms | kernel ms | kernel speedup | max abs diff |",
             "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.op} | {r.shape} | {r.batch} | {r.dtype} | {r.device} | {r.torch_ms:.3f} | {r.kernel_ms:.3f} | "
              f"{r.speedup:.2f}x | {r.max_abs_diff:.1e} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenprune.eval.kernel_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--device", default="cpu", help="cpu (the CPU build) or cuda[:N] (the CUDA build)")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--json", help="also write the rows as JSON lines here")
    args = parser.parse_args(argv)
    try:
        rows = bench_kernels(args.shapes, args.batch_sizes, args.dtype, args.device, args.repeats)
    except ValueError as error:
        print(f"kernel_bench: error: {error}", file=sys.stderr)
        return 2
    print(format_rows(rows))
    if args.json:
        import json
        with open(args.json, "w") as f:
            f.writelines(json.dumps(asdict(r)) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
