"""How many operations a forward launches, unpatched, patched, and as the zero-cost truncation to the same counts.

``python -m tokenprune.eval.op_count --model deit_small_patch16_224 --method tome mctf zero-tprune random``

On a GPU at small batches an eager forward is bound by the host, which issues one kernel per operation: on the
H200 measured on 2026-12-04 (docs/performance.md) DeiT-S at batch 1 took 32-47 us per operation counted here,
unpatched and under every method alike, so a method that adds operations is slower there whatever it saves in
FLOPs. The count needs no GPU: every ATen operation the forward dispatches is seen (``TorchDispatchMode``), and
those that only describe memory (views, transposes, slices, size queries) are left out, since they launch nothing.
The PyTorch ops are counted (``TOKENPRUNE_EXT=off``, the reference path; on a GPU the CUDA build takes the gather
and the merge, a few operations fewer per step, and ``ops.head_products`` adds an attention bias in the product, one
operation fewer per biased map than on the CPU, where it adds it after).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass

import torch
from tokenprune.eval.benchmark import patched_and_ceiling
from torch.utils._python_dispatch import TorchDispatchMode

from tokenprune import extension
from tokenprune.flops import default_input_size, random_model

#: ATen operations that make a view or answer a question about a tensor's layout: no kernel runs
METADATA = frozenset({
    "alias", "as_strided", "chunk", "detach", "diagonal", "dim", "expand", "expand_as", "flatten", "is_contiguous",
    "is_same_size", "lift_fresh", "narrow", "permute", "promote_types", "reshape", "select", "size", "slice", "split",
    "split_with_sizes", "squeeze", "stride", "sym_numel", "sym_size", "sym_storage_offset", "sym_stride", "t",
    "transpose", "unbind", "unflatten", "unsqueeze", "view", "view_as", "_reshape_alias", "_unsafe_view",
})


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while it is active, by name (``counts``)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def launching(self) -> int:
        """The operations that run a kernel (``METADATA`` left out)."""
        return sum(n for name, n in self.counts.items() if name not in METADATA)


@torch.no_grad()  # not inference_mode, under which composite ops (linear, dropout) reach the mode undecomposed
def count_ops(model: torch.nn.Module, x: torch.Tensor) -> OpCounter:
    """The operations one forward of ``model`` on ``x`` dispatches (after one forward that is not counted, so
    that what a first call caches is not counted)."""
    with extension.pytorch_ops_only():
        model(x)
        with OpCounter() as counter:
            model(x)
    return counter


@dataclass
class OpRow:
    model: str
    method: str
    keep: float
    batch: int
    blocks: int
    unpatched: int
    patched: int
    ceiling: int

    @property
    def added_per_block(self) -> float:
        return (self.patched - self.unpatched) / self.blocks


def op_rows(model_name: str, methods, keep: float, batch: int, seed: int = 0) -> list[OpRow]:
    baseline = random_model(model_name, seed)
    x = torch.randn(batch, *default_input_size(baseline))
    unpatched = count_ops(baseline, x).launching
    blocks = len(getattr(baseline, "blocks", None) or [None])
    rows = []
    for method in methods:
        patched, ceiling = patched_and_ceiling(baseline, method, keep, {})
        rows.append(OpRow(model_name, method, keep, batch, blocks, unpatched, count_ops(patched, x).launching,
                          count_ops(ceiling, x).launching))
    return rows


def format_rows(rows: list[OpRow]) -> str:
    lines = ["| model | method | keep | batch | ops unpatched | ops patched | ops, zero-cost truncation "
             "| added per block |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.model} | {r.method} | {r.keep:g} | {r.batch} | {r.unpatched} | {r.patched} | {r.ceiling} | "
              f"{r.added_per_block:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenprune.eval.op_count", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--method", nargs="+", default=["tome", "mctf", "zero-tprune", "random"])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        rows = op_rows(args.model, args.method, args.keep, args.batch)
    except (ValueError, TypeError, RuntimeError) as error:
        print(f"op_count: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
