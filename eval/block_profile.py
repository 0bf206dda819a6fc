"""Where a method's time goes: block by block against the zero-cost truncation, then op by op.

``python -m tokenprune.eval.block_profile --model deit_small_patch16_224 --method mctf --keep 0.5 --batch 1``

1. Per block: the wall time of each block of the patched model and of the ceiling model (the same token
   counts reached by dropping the last tokens, at no cost: ``benchmark.ZeroCostTruncation``), timed
   with forward hooks, interleaved over repeats, medians. The difference is what the method's scoring,
   matching and merging cost in that block (and what its different token layout costs downstream).
2. Per op: ``torch.profiler``'s self CPU time per aten op over the same forwards, patched minus ceiling:
   the ops the method adds (or makes slower), largest first.
3. Per hook (``--hooks``): the wall time, inside the forward, of the method's own step (its
   ``before_attention`` / ``after_attention``: scoring, matching, merging) and of the attention core it
   hands the block (MCTF's one-step-ahead attention), beside the three models' forward times. Timed
   where they run, so they include what cold caches cost there (a call can cost twice what it costs
   in a tight loop: docs/performance.md).
4. The method's floor (``--floor``, and ``--compile`` to compile all four models with ``tokenprune.compiled``): the
   forwards of the unpatched model, the zero-cost truncation, the method's floor (what the method asks of each
   reducing block's attention, its scoring, matching and merging at no cost: ``benchmark.ZeroCostStep``) and the
   method, interleaved. A floor slower than the unpatched model: no implementation of the method pays there.

Timings are of this machine, at the moment they run: compare the two columns of one run, not runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from tokenprune.eval.benchmark import floor_of, patched_and_ceiling

import tokenprune
from tokenprune.flops import default_input_size, random_model
from tokenprune.timing import interleaved_medians


@dataclass
class BlockRow:
    block: int
    tokens_in: int
    ceiling_ms: float
    patched_ms: float

    @property
    def overhead_ms(self) -> float:
        return self.patched_ms - self.ceiling_ms


class BlockTimer:
    """Wall time of each block of ``model.blocks`` in the forwards run while attached (CPU: no sync)."""

    def __init__(self, blocks):
        self.times = defaultdict(list)
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._start(i)))
            self.handles.append(block.register_forward_hook(self._stop(i)))
        self._began = {}

    def _start(self, i):
        def hook(module, args):
            self._began[i] = time.perf_counter()
        return hook

    def _stop(self, i):
        def hook(module, args, out):
            self.times[i].append(time.perf_counter() - self._began.pop(i))
        return hook

    def detach(self):
        for h in self.handles:
            h.remove()


def _models(model_name: str, method: str, keep: float, options: dict, seed: int):
    baseline = random_model(model_name, seed)
    if not hasattr(baseline, "blocks"):
        raise ValueError(f"{model_name}: the block profile reads a timm ViT's .blocks")
    return patched_and_ceiling(baseline, method, keep, options)


@torch.inference_mode()
def profile_blocks(model_name: str = "deit_small_patch16_224", method: str = "tome", keep: float = 0.5,
                   options: dict | None = None, batch: int = 1, repeats: int = 21, threads: int = 2,
                   seed: int = 0) -> list[BlockRow]:
    torch.set_num_threads(threads)
    patched, ceiling = _models(model_name, method, keep, options or {}, seed)
    x = torch.randn(batch, *default_input_size(patched))
    timers = {"patched": BlockTimer(patched.blocks), "ceiling": BlockTimer(ceiling.blocks)}
    models = {"patched": patched, "ceiling": ceiling}
    for _ in range(2):  # warm-up
        for m in models.values():
            m(x)
    for t in timers.values():
        t.times.clear()
    for i in range(repeats):
        for name in (("patched", "ceiling") if i % 2 == 0 else ("ceiling", "patched")):
            models[name](x)
    for t in timers.values():
        t.detach()
    counts = tokenprune.last_forward(patched).token_counts
    return [BlockRow(i, counts[i], 1000 * statistics.median(timers["ceiling"].times[i]),
                     1000 * statistics.median(timers["patched"].times[i])) for i in range(len(patched.blocks))]


@torch.inference_mode()
def profile_ops(model_name: str = "deit_small_patch16_224", method: str = "tome", keep: float = 0.5,
                options: dict | None = None, batch: int = 1, repeats: int = 11, threads: int = 2,
                seed: int = 0) -> list[tuple[str, float, float]]:
    """(aten op, patched ms per forward, ceiling ms per forward), by the difference, largest first."""
    torch.set_num_threads(threads)
    patched, ceiling = _models(model_name, method, keep, options or {}, seed)
    x = torch.randn(batch, *default_input_size(patched))
    per_op = {}
    for name, model in (("patched", patched), ("ceiling", ceiling)):
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                model(x)
        per_op[name] = {e.key: e.self_cpu_time_total / 1000 / repeats for e in prof.key_averages()}
    ops = set(per_op["patched"]) | set(per_op["ceiling"])
    rows = [(op, per_op["patched"].get(op, 0.0), per_op["ceiling"].get(op, 0.0)) for op in ops]
    return sorted(rows, key=lambda r: r[2] - r[1])


@dataclass
class HookRow:
    part: str
    calls_per_forward: float
    ms_per_forward: float


@torch.inference_mode()
def profile_hooks(model_name: str = "deit_small_patch16_224", method: str = "tome", keep: float = 0.5,
                  options: dict | None = None, batch: int = 1, repeats: int = 21, threads: int = 2,
                  seed: int = 0) -> list[HookRow]:
    """The three models' forward times (unpatched, zero-cost truncation, patched; medians, interleaved), then the
    method's hook and attention core as timed inside the patched forwards (totals per forward)."""
    torch.set_num_threads(threads)
    baseline = random_model(model_name, seed)
    patched, ceiling = patched_and_ceiling(baseline, method, keep, options or {})
    reducer = tokenprune.reducer_of(patched)
    spent = defaultdict(list)

    def timed(name, fn):
        def call(*args, **kwargs):
            began = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name].append(time.perf_counter() - began)
            return out
        return call

    hook = reducer.stage.value
    step = timed(f"{hook} (the method's step)", getattr(reducer, hook))

    def with_timed_core(*args, **kwargs):
        reduced = step(*args, **kwargs)
        if reduced.attention_core is None:
            return reduced
        return dataclasses.replace(reduced, attention_core=timed("attention core it hands the block",
                                                                 reduced.attention_core))

    setattr(reducer, hook, with_timed_core)  # on the instance: the class (and so the stage) is untouched
    x = torch.randn(batch, *default_input_size(patched))
    calls = {name: functools.partial(m, x) for name, m in
             (("unpatched", baseline), ("zero-cost truncation", ceiling), ("patched", patched))}
    for call in calls.values():  # warm-up, outside the hook totals
        call(), call()
    spent.clear()
    medians, _ = interleaved_medians(calls, repeats, warmup=0)
    rows = [HookRow(f"forward: {name}", 1, 1000 * seconds) for name, seconds in medians.items()]
    return rows + [HookRow(name, len(t) / repeats, 1000 * sum(t) / repeats) for name, t in spent.items()]


@torch.inference_mode()
def profile_floor(model_name: str = "deit_small_patch16_224", method: str = "tome", keep: float = 0.5,
                  options: dict | None = None, batch: int = 1, repeats: int = 21, threads: int = 2,
                  seed: int = 0, compile: bool = False) -> dict[str, float]:
    """Median ms a forward (interleaved) of the unpatched model, the zero-cost truncation, the method's floor
    (``benchmark.ZeroCostStep``) and the method; ``compile``: each through ``tokenprune.compiled``, compiled (and
    so warmed up) before the timing."""
    torch.set_num_threads(threads)
    baseline = random_model(model_name, seed)
    patched, ceiling = patched_and_ceiling(baseline, method, keep, options or {})
    models = {"unpatched": baseline, "zero-cost truncation": ceiling,
              "the method's floor": floor_of(baseline, patched), "the method": patched}
    if compile:
        models = {name: tokenprune.compiled(model) for name, model in models.items()}
    x = torch.randn(batch, *default_input_size(baseline))
    medians, _ = interleaved_medians({name: functools.partial(m, x) for name, m in models.items()}, repeats)
    return {name: 1000 * seconds for name, seconds in medians.items()}


def format_floor(ms: dict[str, float]) -> str:
    lines = ["| forward | ms | speedup | of the truncation's |", "| --- | ---: | ---: | ---: |"]
    base, ceiling = ms["unpatched"], ms["zero-cost truncation"]
    lines += [f"| {name} | {t:.2f} | {base / t:.3f}x | {ceiling / t:.3f} |" for name, t in ms.items()]
    return "\n".join(lines)


def format_hooks(rows: list[HookRow]) -> str:
    lines = ["| part | calls a forward | ms a forward | us a call |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r.part} | {r.calls_per_forward:g} | {r.ms_per_forward:.2f} | "
              f"{1000 * r.ms_per_forward / r.calls_per_forward:.1f} |" for r in rows]
    return "\n".join(lines)


def format_blocks(rows: list[BlockRow]) -> str:
    lines = ["| block | tokens in | ceiling ms | patched ms | overhead ms | overhead |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.block} | {r.tokens_in} | {r.ceiling_ms:.2f} | {r.patched_ms:.2f} | {r.overhead_ms:+.2f} | "
                     f"{r.overhead_ms / r.patched_ms:+.1%} |")
    total_c, total_p = sum(r.ceiling_ms for r in rows), sum(r.patched_ms for r in rows)
    lines.append(f"| all | | {total_c:.2f} | {total_p:.2f} | {total_p - total_c:+.2f} | "
                 f"{(total_p - total_c) / total_p:+.1%} |")
    return "\n".join(lines)


def format_ops(rows, top: int = 12, saved: int = 3) -> str:
    """The ``top`` ops the method adds most time to, then the ``saved`` it saves most on (e.g. the fused
    attention an explicit map replaces)."""
    lines = ["| aten op | patched ms | ceiling ms | difference ms |", "| --- | ---: | ---: | ---: |"]
    shown = rows[:top] + [r for r in rows[::-1][:saved] if r[1] < r[2] and r not in rows[:top]]
    lines += [f"| `{op}` | {p:.3f} | {c:.3f} | {p - c:+.3f} |" for op, p, c in shown]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from tokenprune.cli import add_option_argument

    parser = argparse.ArgumentParser(prog="python -m tokenprune.eval.block_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--method", default="tome")
    parser.add_argument("--keep", type=float, default=0.5)
    add_option_argument(parser)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hooks", action="store_true",
                        help="time the method's step and attention core inside the forward instead of blocks and ops")
    parser.add_argument("--floor", action="store_true",
                        help="time the method's floor (its attention needs, a zero-cost step) beside the forwards")
    parser.add_argument("--compile", action="store_true", help="with --floor: all four models compiled")
    args = parser.parse_args(argv)
    options = dict(args.option)
    heading = (f"{args.model}, {args.method} keep={args.keep} {options or ''}, batch {args.batch}, "
               f"{args.threads} threads")
    if args.compile and not args.floor:
        parser.error("--compile times the --floor forwards only")
    try:
        if args.floor:
            ms = profile_floor(args.model, args.method, args.keep, options, args.batch, args.repeats, args.threads,
                               compile=args.compile)
            print(f"{heading}{', compiled' if args.compile else ''}\n")
            print(format_floor(ms))
            return 0
        if args.hooks:
            hooks = profile_hooks(args.model, args.method, args.keep, options, args.batch, args.repeats,
                                  args.threads)
            print(f"{heading}\n")
            print(format_hooks(hooks))
            return 0
        blocks = profile_blocks(args.model, args.method, args.keep, options, args.batch, args.repeats, args.threads)
        ops = profile_ops(args.model, args.method, args.keep, options, args.batch, max(3, args.repeats // 2),
                          args.threads)
    except (ValueError, TypeError) as error:
        print(f"block_profile: error: {error}", file=sys.stderr)
        return 2
    print(f"{heading}\n")
    print(format_blocks(blocks) + "\n\n" + format_ops(ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
