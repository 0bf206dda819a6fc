"""Measure before committing: ``tokenprune.check_speed(model, "tome", keep=0.5, batch_size=1)``.

A short calibration run on this machine, at this input size and batch size: a patched copy of the model
and an unpatched one, timed in turn (``tokenprune.timing``), medians. The caller's model is not touched.
Token reduction pays where the FLOPs it saves outweigh the fixed cost of its scoring and merging ops:
on CPU, at small batches and on small models, it may not (docs/performance.md); this says which, for
the configuration at hand, before it is used.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .budget import image_part
from .flops import check_input_size, count_flops, default_input_size
from .registry import config_label
from .timing import interleaved_medians


def never_eager_fallback():
    """A context in which a compiled forward that reaches dynamo's recompile limit raises, where dynamo would run it
    eagerly without a word: every patched model runs the same patched forward, so a process that compiles several
    configurations reaches the limit (8) after a few, and eager times would be reported as compiled ones."""
    return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)


def compiled(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile(model, **compile_kwargs)`` as tokenprune times it (``check_speed``, ``tokenprune bench`` and
    ``tokenprune eval --compile``): for a model on the CPU with inductor's C++ wrapper (``cpp_wrapper``), which
    calls the graph's kernels from C++ instead of from Python. A forward calls 600-1000 of them, and at batch 1 on
    a small model those Python calls cost more than pruning saves (docs/performance.md, ninth round). Compiling
    takes as long. Elsewhere (CUDA), or with a ``mode`` (which torch.compile takes without options): inductor's
    defaults. ``compile_kwargs["options"]`` wins over this one."""
    param = next(model.parameters(), None)
    if "mode" not in compile_kwargs and (param is None or param.device.type == "cpu"):
        compile_kwargs["options"] = {"cpp_wrapper": True, **compile_kwargs.get("options", {})}
    return torch.compile(model, **compile_kwargs)


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
        verdict = ("pays" if self.pays else
                   "does NOT pay here: the unpatched model is faster (try a larger batch, torch.compile "
                   "(compile=True), or a lower keep)")
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
    figures). A model that takes text first (CLIPModel, SiglipModel) is timed by its image tower, all that
    pruning changes. Returns a ``SpeedCheck``; ``print`` it for the verdict."""
    from .api import apply, is_patched, reducer_of, remove

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    input_size = check_input_size(input_size)
    baseline = copy.deepcopy(model)
    if is_patched(baseline):
        remove(baseline)
    patched = patched_whole = apply(copy.deepcopy(baseline), method, keep, **options)
    # a model that takes text first (CLIPModel, SiglipModel): its image tower, all that pruning changes, is timed
    baseline, patched = image_part(baseline), image_part(patched)
    size = tuple(input_size or default_input_size(baseline))
    param = next(baseline.parameters())
    x = torch.randn(batch_size, *size, device=param.device, dtype=param.dtype)
    ratio = count_flops(patched, size).flops / count_flops(baseline, size).flops
    runs = {"baseline": baseline, "patched": patched}
    if compile:
        runs = {name: compiled(m) for name, m in runs.items()}
    with never_eager_fallback():  # a reached limit is an error, not eager times (torch._dynamo.reset() clears it)
        medians, foreign = interleaved_medians({name: (lambda m=m: m(x)) for name, m in runs.items()}, repeats,
                                               max(warmup, 1 if compile else 0), param.device)
    reducer = reducer_of(patched_whole)
    return SpeedCheck(method=reducer.name, keep=reducer.keep, config=config_label(reducer.keep, options),
                      batch_size=batch_size, input_size=size,
                      device=str(param.device), compiled=compile, baseline_ms=1000 * medians["baseline"],
                      patched_ms=1000 * medians["patched"], flops_ratio=ratio, repeats=repeats,
                      foreign_load=foreign)
