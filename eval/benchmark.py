"""Throughput benchmark: patched against unpatched, side by side in one run.

Both models are built from the same random-init weights. For each batch size, the
two are timed alternately (unpatched first on even repeats, patched first on odd
ones), so that drift in machine load hits both; the result is the median of each.
It prints the measured speedup beside the FLOPs-ideal one (unpatched FLOPs over
patched FLOPs, counted on the real forward), the "ceiling" (a zero-cost truncation
to the same token counts, timed in the same interleave: what any method could reach
on this machine, since small matrix products run below peak), and how much of the
machine other processes used meanwhile, since a shared machine can spoil any timing.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
from dataclasses import asdict, dataclass

import torch

import tokenprune
from tokenprune import extension
from tokenprune.adapters import find_adapter
from tokenprune.cli import DTYPES, torch_dtype
from tokenprune.flops import count_flops, default_input_size, random_model
from tokenprune.methods.mctf import apply_attention
from tokenprune.registry import EncoderReducer, Reduction, Stage, config_label
from tokenprune.speed import never_eager_fallback, verify_compiled
from tokenprune.timing import interleaved_medians

DTYPE_NAMES = {torch_dtype(name): name for name in DTYPES}


class _OnInnersSchedule(EncoderReducer):
    """A measuring device that removes the tokens ``inner`` removes, block by block."""

    def __init__(self, inner: EncoderReducer):
        super().__init__(keep=inner.keep)
        self.inner = inner

    def schedule(self, num_patches, depth, num_prefix=0):
        return self.inner.schedule(num_patches, depth, num_prefix)


class ZeroCostTruncation(_OnInnersSchedule):
    """The ceiling for any method: the same token counts as ``inner``, reached by simply
    dropping the last tokens (no scoring, no merging). Not registered: a measuring device."""

    name, summary = "truncate", "zero-cost truncation on another method's schedule"

    def after_attention(self, x, remove, taps, state):
        return Reduction(x[:, : x.shape[1] - remove])


class ZeroCostStep(_OnInnersSchedule):
    """A method's floor: what ``inner`` asks of each reducing block's attention, with its scoring, matching and
    merging at no cost (the last tokens dropped, as ``ZeroCostTruncation``). Not registered: a measuring device.

    What stays is what the method's definition costs whatever its step does: the q and k or the explicit attention
    map its ``needs`` ask for, and the log-size bias of proportional attention (its sizes kept, all 1). For a method
    that reduces before attention (MCTF) that is the map of the un-reduced tokens (its informativeness criterion and
    its one-step-ahead reuse read it) and the split projection (q and k of the un-reduced tokens, v of the reduced
    ones), the map's block of the kept tokens applied to their values. A method slower than its floor loses the
    difference in its own step; a floor slower than the unpatched model means no implementation of the method can
    pay there (docs/performance.md, fifteenth round). ``zero_cost_step`` builds one."""

    name, summary = "floor", "a method's attention needs with a zero-cost step"

    def __init__(self, inner: EncoderReducer):
        super().__init__(inner)
        self.needs = inner.needs

    @property
    def proportional_attention(self) -> bool:
        return self.inner.proportional_attention

    def drop(self, x: torch.Tensor, remove: int, state) -> torch.Tensor:
        kept = x.shape[1] - remove
        if self.proportional_attention:  # sizes kept (all 1): the log-size bias runs as the method's does
            state.size = (x.new_ones(x.shape[0], kept, 1, dtype=torch.float32) if state.size is None
                          else state.size[:, :kept])
        return x[:, :kept]


class _ZeroCostStepAfterAttention(ZeroCostStep):
    def after_attention(self, x, remove, taps, state):
        return Reduction(self.drop(x, remove, state))


class _ZeroCostStepBeforeAttention(ZeroCostStep):
    def before_attention(self, x, remove, taps, state):
        probs = taps.probabilities(state)  # the map of the N un-reduced tokens
        x = self.drop(x, remove, state)
        kept = x.shape[1]
        return Reduction(x, functools.partial(apply_attention, probs[:, :, :kept, :kept]))


def zero_cost_step(inner: EncoderReducer) -> ZeroCostStep:
    """``inner``'s floor (``ZeroCostStep``), reducing where ``inner`` does (before or after attention)."""
    if inner.stage is Stage.BEFORE_ATTENTION:
        return _ZeroCostStepBeforeAttention(inner)
    return _ZeroCostStepAfterAttention(inner)


@dataclass
class BenchRow:
    model: str
    method: str
    config: str
    batch_size: int
    threads: int
    repeats: int
    baseline_ms: float
    patched_ms: float
    measured_speedup: float
    ideal_speedup: float
    fraction_of_ideal: float
    ceiling_speedup: float  # zero-cost truncation to the same token counts
    overhead: float  # (patched - truncation) / patched time: what scoring, matching and merging cost
    baseline_gmacs: float
    patched_gmacs: float
    foreign_load: float | None  # CPU share used by other processes during the timing (0..1)
    compiled: bool = False  # all three models run through tokenprune.compiled (compiled against compiled)
    device: str = "cpu"
    dtype: str = "fp32"
    kernels: str = "pytorch ops"  # the extension's part (extension.kernels_in_use)

    @property
    def images_per_s(self) -> tuple[float, float]:
        return (1000 * self.batch_size / self.baseline_ms, 1000 * self.batch_size / self.patched_ms)


def patched_and_ceiling(baseline, method: str, keep: float, options: dict):
    """Copies of ``baseline``: patched with ``method``, and the zero-cost truncation to its token counts."""
    patched = tokenprune.apply(copy.deepcopy(baseline), method, keep=keep, **options)
    ceiling = copy.deepcopy(baseline)
    find_adapter(ceiling).patch(ceiling, ZeroCostTruncation(tokenprune.reducer_of(patched)))
    return patched, ceiling


def floor_of(baseline, patched):
    """A copy of ``baseline`` patched with the floor (``zero_cost_step``) of ``patched``'s method."""
    floor = copy.deepcopy(baseline)
    find_adapter(floor).patch(floor, zero_cost_step(tokenprune.reducer_of(patched)))
    return floor


@torch.inference_mode()
def benchmark(model_name: str = "deit_small_patch16_224", method: str = "tome", keep: float = 0.33,
              options: dict | None = None, batch_sizes=(32, 1), repeats: int = 11, warmup: int = 2,
              threads: int = 2, seed: int = 0, compile: bool = False, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> list[BenchRow]:
    """Time ``model_name`` (a timm name or ``hf:<model_type>``; random init) with and without ``method``,
    on ``device`` with weights and inputs in ``dtype``. ``compile``: the unpatched, patched and truncated
    models all run through ``tokenprune.compiled`` (``torch.compile``; on CPU with inductor's C++ wrapper), a
    fair ratio: compiled against compiled; the compiled patched model must give the eager patched model's
    output first, and the compile time (the first call per batch size) is printed, not timed."""
    options = options or {}
    for what, values in (("batch_sizes", list(batch_sizes)), ("repeats", [repeats]), ("threads", [threads])):
        if not values or any(type(v) is not int or v < 1 for v in values):
            raise ValueError(f"{what} must be integers >= 1, got {values if what == 'batch_sizes' else values[0]}")
    if type(warmup) is not int or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    torch.set_num_threads(threads)
    device = torch.device(device)
    baseline = random_model(model_name, seed)
    input_size = default_input_size(baseline)
    check_inputs_fit(batch_sizes, input_size, dtype, device)
    baseline = baseline.to(device=device, dtype=dtype)
    patched, ceiling = patched_and_ceiling(baseline, method, keep, options)
    base_flops, patched_flops = count_flops(baseline, input_size), count_flops(patched, input_size)
    ideal = base_flops.flops / patched_flops.flops
    # a FLOPs budget (the Python API's options={"flops": 0.6}, keep=None): labelled with the keep it was fitted to
    config = config_label(tokenprune.reducer_of(patched).keep if keep is None else keep, options)
    eager = {"baseline": baseline, "patched": patched, "ceiling": ceiling}
    kernels = extension.kernels_in_use(device, compiled=compile)
    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, *input_size).to(device=device, dtype=dtype)
        models = eager
        if compile:
            # a fresh dynamo for each batch size. Every patched model runs the same patched forward, so a process that
            # benchmarks several configurations (python -m tokenprune.eval.speed_table) would otherwise reach dynamo's
            # recompile limit after a few, and dynamo then runs the forward eagerly, without a word: eager times
            # labelled compiled. And a second batch size would be compiled as a dynamic-shape graph: static graphs
            # for each, as a deployment with a fixed batch size compiles them
            torch._dynamo.reset()
            models = {name: tokenprune.compiled(m) for name, m in eager.items()}
            with never_eager_fallback():
                check_compiled(models["patched"], patched, baseline, x, model_name)
        # Small batches are quick and noisier: more repeats, about the same time in all (up to 60; never fewer
        # than asked)
        n = max(repeats, min(repeats * 32 // batch, 60))
        try:  # should a compiled model still reach the recompile limit (many recompiles in one batch size): an error
            with never_eager_fallback():
                # compiled: at least one untimed call, which compiles the unpatched and truncated models (the check
                # above compiled the patched one only), so that no compile is timed
                medians, foreign = interleaved_medians({name: functools.partial(m, x) for name, m in models.items()},
                                                       n, max(warmup, 1 if compile else 0), device)
        except RuntimeError as e:  # the input fit, the forward's activations did not
            if not isinstance(e, torch.OutOfMemoryError) and "can't allocate" not in str(e):
                raise
            raise ValueError(f"batch size {batch}: the forward ran out of {device.type} memory; give smaller "
                             f"batch sizes") from e
        b, p, c = (medians[name] for name in models)
        rows.append(BenchRow(
            model=model_name, method=method, config=config, batch_size=batch, threads=threads, repeats=n,
            baseline_ms=1000 * b, patched_ms=1000 * p, measured_speedup=b / p, ideal_speedup=ideal,
            fraction_of_ideal=(b / p) / ideal, ceiling_speedup=b / c, overhead=(p - c) / p,
            baseline_gmacs=base_flops.gmacs_per_sample, patched_gmacs=patched_flops.gmacs_per_sample,
            foreign_load=foreign, compiled=compile, device=str(device), dtype=DTYPE_NAMES[dtype], kernels=kernels))
    return rows



def device_memory(device: torch.device) -> int | None:
    """Bytes of memory ``device`` has in all (None where the system does not say)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def check_inputs_fit(batch_sizes, input_size: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before anything is timed, a batch whose input alone is larger than the device's
    memory: torch would fail in its allocator, or overflow its sizes (C++ frames in the message)."""
    memory = device_memory(device)
    if memory is None:
        return
    per_sample = math.prod(input_size) * torch.empty((), dtype=dtype).element_size()
    for batch in batch_sizes:
        if batch * per_sample > memory:
            raise ValueError(f"batch size {batch}: its input alone ({batch} x {' x '.join(map(str, input_size))} "
                             f"{DTYPE_NAMES[dtype]}, {batch * per_sample / 2**30:.3g} GiB) is more than the "
                             f"{memory / 2**30:.3g} GiB of memory this {device.type} device has; give smaller "
                             f"batch sizes")


def check_compiled(compiled, eager, stock, x: torch.Tensor, model_name: str) -> None:
    """``tokenprune.speed.verify_compiled`` for the patched model (``stock``: the unpatched one), its verdict printed
    (with the compile's time)."""
    print(verify_compiled(compiled, eager, x, f"the patched {model_name}", stock=stock))


def format_rows(rows: list[BenchRow]) -> str:
    # the text columns and the two "before->after" columns fit their longest entry (zero-tprune, a config with
    # options, 100 GMACs and more, 10,000 img/s and more): a longer one would shift every number after it under the
    # next column's header
    gmacs = [f"{r.baseline_gmacs:.2f}->{r.patched_gmacs:.2f}" for r in rows]
    ips = ["{:.1f}->{:.1f}".format(*r.images_per_s) for r in rows]
    mw, tw, cw, gw, iw = (max([width, *(len(text) for text in texts)]) for width, texts in (
        (24, [r.model for r in rows]), (7, [r.method for r in rows]), (14, [_config_label(r) for r in rows]),
        (12, gmacs), (14, ips)))
    head = (f"{'model':<{mw}} {'method':<{tw}} {'config':<{cw}} {'batch':>5} {'GMACs':>{gw}} {'base ms':>9} "
            f"{'patched ms':>10} {'img/s':>{iw}} {'speedup':>7} {'ideal':>6} {'of ideal':>8} {'ceiling':>7} "
            f"{'overhead':>8} {'foreign':>7}")
    lines = [head, "-" * len(head)]
    for r, gmac, ip in zip(rows, gmacs, ips):
        foreign = "n/a" if r.foreign_load is None else f"{r.foreign_load:.1%}"
        lines.append(
            f"{r.model:<{mw}} {r.method:<{tw}} {_config_label(r):<{cw}} {r.batch_size:>5} "
            f"{gmac:>{gw}} {r.baseline_ms:>9.1f} {r.patched_ms:>10.1f} "
            f"{ip:>{iw}} {r.measured_speedup:>6.2f}x {r.ideal_speedup:>5.2f}x "
            f"{r.fraction_of_ideal:>8.3f} {r.ceiling_speedup:>6.2f}x {r.overhead:>8.1%} {foreign:>7}")
    return "\n".join(lines)


def _config_label(row: BenchRow) -> str:
    """The configuration, then what differs from the default eager fp32 CPU run."""
    # eager without the extension's kernels (off, or a failed build) is slower at small batches: say so
    extras = ([" compiled"] * row.compiled + [" no-ext"] * (not row.compiled and row.kernels.startswith("pytorch"))
              + [f" {row.dtype}"] * (row.dtype != "fp32"))
    return row.config + "".join(extras + [f" {row.device}"] * (row.device != "cpu"))


def rows_to_json(rows: list[BenchRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)
