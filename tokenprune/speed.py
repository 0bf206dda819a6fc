"""Measure before committing: ``tokenprune.check_speed(model, "tome", keep=0.5, batch_size=1)``.

A short calibration run on this machine, at this input size and batch size: a patched copy of the model
and an unpatched one, timed in turn (``tokenprune.timing``), medians. The caller's model is not touched.
Token reduction pays where the FLOPs it saves outweigh the fixed cost of its scoring and merging ops:
on CPU, at small batches and on small models, it may not (docs/performance.md); this says which, for
the configuration at hand, before it is used.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from .budget import image_part, without_forward_hooks
from .flops import check_input_size, count_flops, default_input_size
from .registry import config_label
from .timing import interleaved_medians, timed


class RecompileLimitReached(RuntimeError):
    """A compiled forward reached dynamo's recompile limit while being timed or evaluated: from there dynamo would run
    it eagerly."""


@contextlib.contextmanager
def never_eager_fallback():
    """A context in which a compiled forward that reaches dynamo's recompile limit raises ``RecompileLimitReached``,
    where dynamo would run it eagerly without a word: every patched model runs the same patched forward, so a
    process that compiles several configurations reaches the limit (8) after a few, and eager times would be
    reported as compiled ones."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        try:
            yield
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:  # dynamo's own words name a setting we chose
            config = torch._dynamo.config
            raise RecompileLimitReached(
                "torch.compile reached one of dynamo's recompile limits (torch._dynamo.config.recompile_limit = "
                f"{config.recompile_limit}, accumulated_recompile_limit = {config.accumulated_recompile_limit}): "
                "this forward was compiled again for more shapes, models or configurations in this process than "
                "that, and from here dynamo would run it eagerly: stopped here. torch._dynamo.reset() discards "
                "this process's compiled graphs and starts afresh; or raise the limit, and measure again") from e


def compiled(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile(model, **compile_kwargs)`` as tokenprune times it (``check_speed``, ``tokenprune bench`` and
    ``tokenprune eval --compile``): for a model on the CPU with inductor's C++ wrapper (``cpp_wrapper``), which
    calls the graph's kernels from C++ instead of from Python. A forward calls 600-1000 of them, and at batch 1 on
    a small model those Python calls cost more than pruning saves (docs/performance.md, ninth round). Compiling
    takes as long. Elsewhere (CUDA), or with a ``mode`` (which torch.compile takes without options): inductor's
    defaults. ``compile_kwargs["options"]`` wins over this one; another ``backend`` gets none (it is inductor's)."""
    param = next(model.parameters(), None)
    inductor = compile_kwargs.get("backend", "inductor") == "inductor"
    if inductor and "mode" not in compile_kwargs and (param is None or param.device.type == "cpu"):
        compile_kwargs["options"] = {"cpp_wrapper": True, **compile_kwargs.get("options", {})}
    return torch.compile(model, **compile_kwargs)


#: how far a compiled model's output may be from eager's: fused kernels round differently
COMPILE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
#: the fewest samples the compile check compares: with an eighth of them allowed to move, at least two (a near-tie
#: flip moved 1 in 30-60 samples of the random-init testbed and DeiT-S under MCTF: docs/performance.md, session 28)
CHECK_SAMPLES = 16
#: how far a near-tie token choice may move a sample, as a share of how far the reduction itself moved it from the
#: unpatched model's output: the flips measured moved samples up to 0.59 of it (docs/performance.md, session 28), and a
#: sample the compiled graph did not reduce at all would move all of it
NEAR_TIE_SHARE = 0.8
#: the probe batches' seed (a constant unlike the usual 0, so a probe is not the caller's own input again)
CHECK_SEED = 20_241_205


class CompiledOutputChanged(RuntimeError):
    """The compiled patched model does not give the eager one's output: it is neither timed nor evaluated."""


def _output_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def verify_compiled(compiled, eager, x: torch.Tensor, what: str, compute_dtype: torch.dtype | None = None, *,
                    stock) -> str:
    """That ``compiled`` gives ``eager``'s output (to the dtype's rounding), or a clear error
    (``CompiledOutputChanged``); returns one line saying so, and how long compiling took (the first call).

    Inductor reorders float sums, so a score that was a near-tie (common in random-init models) can pick the
    other token in a sample, and in a small model that choice moved the output by up to 0.59 of how far the whole
    reduction moved it (docs/performance.md, session 28). So up to an eighth of the samples may move, each by less
    than ``NEAR_TIE_SHARE`` of how far the reduction moved it from ``stock``'s output (``stock``: the unpatched model,
    eager, called only when a sample moved); the line gives the count. An encoder's tokens, fewer when reduced, are
    compared by their mean for that. A sample whose output is not finite where eager's is, or that moved about as far
    as skipping the reduction would, is not a near tie; nor is any move where nothing was reduced. At least
    ``CHECK_SAMPLES`` samples are compared: ``x``, then as many further random batches of its shape and dtype as that
    takes (seeded with ``CHECK_SEED``; the caller's random stream untouched), through the same compiled graph.
    ``what`` names the model in the messages ("the patched deit_tiny_patch16_224"). ``compute_dtype``: the dtype the
    forward computes in, where it is not ``x``'s (under autocast: the autocast dtype), for the tolerance."""
    first, seconds = timed(lambda: _output_tensor(compiled(x)).clone(), x.device)  # clone: a later call may reuse it
    generator = torch.Generator(x.device).manual_seed(CHECK_SEED)
    inputs = [x] + [torch.randn(x.shape, generator=generator, device=x.device).to(x.dtype)
                    for _ in range(math.ceil(CHECK_SAMPLES / len(x)) - 1)]
    got = torch.cat([first] + [_output_tensor(compiled(t)).clone() for t in inputs[1:]])
    expected = torch.cat([_output_tensor(eager(t)) for t in inputs])
    scale = expected.abs().masked_fill(~expected.isfinite(), 0).max().item()  # an infinity would allow any move
    tolerance = COMPILE_TOLERANCE.get(compute_dtype or x.dtype, 1e-4) * max(1.0, scale)
    per_sample = per_sample_distance(got, expected)
    moved = per_sample > tolerance
    samples, count = len(per_sample), int(moved.sum())
    if count > samples // 8:
        raise CompiledOutputChanged(f"torch.compile changed {what}'s output (max difference "
                                    f"{per_sample.max().item():.2e} in {count} of {samples} samples; near-tie token "
                                    "choices move at most an eighth of them); not using it")
    if count:
        unpruned = torch.cat([_output_tensor(stock(t)) for t in inputs])
        # an encoder's tokens, fewer where reduced: compared by their mean
        view = (lambda t: t.mean(dim=1)) if unpruned.shape != expected.shape else (lambda t: t)
        move, reduction = (per_sample_distance(view(t), view(expected)) for t in (got, unpruned))
        too_far = moved & ~(move < NEAR_TIE_SHARE * reduction)
        if too_far.any():
            k = int(too_far.nonzero()[0])
            why = ("nothing was reduced in it, so no token choice could flip" if reduction[k] == 0 else
                   f"the reduction moved it {reduction[k].item():.2e} from the unpatched model's output, and a "
                   f"near-tie token choice moves a sample less than {NEAR_TIE_SHARE} of that")
            raise CompiledOutputChanged(f"torch.compile changed {what}'s output (sample {k} of {samples} moved "
                                        f"{move[k].item():.2e}: {why}); not using it")
    note = f" ({count} sample(s) within {per_sample.max().item():.1e}: a near-tie token choice)" if count else ""
    return (f"compiled {what} for batch {x.shape[0]} in {seconds:.1f} s; output equals eager on "
            f"{samples} samples{note}")


def per_sample_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The largest absolute difference between ``a`` and ``b`` in each sample (the first dimension), in float32 at
    least (a half-precision difference keeps 3-4 digits): equal values (infinities included) and NaN in both are 0
    apart, NaN in one only is infinitely far."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a, b = a.to(dtype), b.to(dtype)
    both_nan = a.isnan() & b.isnan()
    difference = torch.where((a == b) | both_nan, 0.0, (a - b).abs().nan_to_num(nan=math.inf, posinf=math.inf))
    return difference.flatten(1).amax(dim=1)


@dataclass(frozen=True)
class SpeedCheck:
    """What a configuration measured: medians of ``repeats`` interleaved forwards."""

    method: str
    keep: float  # the reducer's keep: unused where an option decides the token counts (see config)
    config: str  # keep and the options, as bench labels them ("keep=0.5", "r=13")
    batch_size: int
    input_size: tuple[int, ...]
    device: str
    compiled: bool
    baseline_ms: float
    patched_ms: float
    flops_ratio: float  # patched FLOPs over unpatched FLOPs (counted on the real forward)
    repeats: int
    foreign_load: float | None  # CPU share other processes used meanwhile (0..1): a busy machine spoils it

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.patched_ms

    @property
    def pays(self) -> bool:
        """Whether the patched model ran faster than the unpatched one."""
        return self.speedup > 1.0

    def __str__(self) -> str:
        mode = "compiled" if self.compiled else "eager"
        remedies = "a larger batch or a lower keep" if self.compiled else \
            "a larger batch, torch.compile (compile=True), or a lower keep"
        verdict = "pays" if self.pays else f"does NOT pay here: the unpatched model is faster (try {remedies})"
        load = "" if self.foreign_load is None else f"; other processes used {self.foreign_load:.0%} of the CPUs"
        return (f"{self.method} {self.config} at batch {self.batch_size} on {self.device} ({mode}): "
                f"{self.baseline_ms:.1f} ms -> {self.patched_ms:.1f} ms, {self.speedup:.2f}x "
                f"(FLOPs-ideal {1 / self.flops_ratio:.2f}x); {verdict}{load}")


@torch.inference_mode()
def check_speed(model: nn.Module, method: str | None = None, keep: float | None = None, *, batch_size: int = 1,
                input_size: tuple[int, ...] | None = None, repeats: int = 7, warmup: int = 2,
                compile: bool = False, **options) -> SpeedCheck:
    """Time ``apply(copy, method, keep, **options)`` against the unpatched model, on the model's device
    and dtype, at ``batch_size`` and ``input_size`` (default: the model's own); ``options`` may also be a
    FLOPs budget (``flops=`` / ``gflops=``). ``compile``: both run through ``compiled`` (``torch.compile``; compiled
    against compiled; the compile itself, tens of seconds per model on CPU, is in the warm-up, not in the
    figures), after ``verify_compiled`` found the compiled patched model's output equal to eager's
    (``CompiledOutputChanged`` where not). A model that takes text first (CLIPModel, SiglipModel) is timed by its
    image tower, all that pruning changes. The model's forward hooks do not run (the copies would run the caller's
    functions: a hook recording features would record every timed forward). Returns a ``SpeedCheck``; ``print`` it
    for the verdict."""
    from .api import apply, is_patched, reducer_of, remove

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    input_size = check_input_size(input_size)
    baseline = copy.deepcopy(model)
    if is_patched(baseline):
        remove(baseline)
    without_forward_hooks(baseline)  # the copies' hooks are the caller's: they would record every timed forward
    # a budget is fitted at the size the check times (apply's default is the model's own)
    at_size = {"input_size": input_size} if input_size is not None and {"flops", "gflops"} & set(options) else {}
    patched = patched_whole = apply(copy.deepcopy(baseline), method, keep, **at_size, **options)
    reducer = reducer_of(patched_whole)
    # a model that takes text first (CLIPModel, SiglipModel): its image tower, all that pruning changes, is timed
    baseline, patched = image_part(baseline), image_part(patched)
    size = tuple(input_size or default_input_size(baseline))
    param = next(baseline.parameters())
    x = torch.randn(batch_size, *size, device=param.device, dtype=param.dtype)
    ratio = count_flops(patched, size).flops / count_flops(baseline, size).flops
    runs = {"baseline": baseline, "patched": patched}
    with never_eager_fallback():  # a reached limit is an error, not eager times (torch._dynamo.reset() clears it)
        if compile:
            runs = {name: compiled(m) for name, m in runs.items()}
            verify_compiled(runs["patched"], patched, x, f"the patched model ({reducer.name})",  # compiles it, too
                            stock=baseline)
        medians, foreign = interleaved_medians({name: (lambda m=m: m(x)) for name, m in runs.items()}, repeats,
                                               max(warmup, 1 if compile else 0), param.device)
    return SpeedCheck(method=reducer.name, keep=reducer.keep, config=config_label(reducer.keep, options),
                      batch_size=batch_size, input_size=size,
                      device=str(param.device), compiled=compile, baseline_ms=1000 * medians["baseline"],
                      patched_ms=1000 * medians["patched"], flops_ratio=ratio, repeats=repeats,
                      foreign_load=foreign)
