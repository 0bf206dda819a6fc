"""A FLOPs budget turned into a ``keep``: ``apply(model, method, flops=0.6)`` or ``gflops=2.5``.

The FLOPs are counted on the real forward (``count_flops``: one forward of a zero image at the model's
input size, matching and merging included), on a copy of the model patched at each candidate; the
caller's model is not touched. A method keeps a whole number of patch tokens, so the candidates are the
final counts 1..N; the FLOPs of a schedule grow with its final count, and a bisection finds the largest
count whose forward fits the budget (about log2(N) counted forwards: 8 for 196 patches). A model that
takes text first (CLIPModel, SiglipModel) is counted by its image tower, which is all the budget can change.
"""
from __future__ import annotations

import copy
import inspect
import math
import numbers
import warnings
from dataclasses import dataclass

from torch import nn

from .flops import check_input_size, count_flops


@dataclass(frozen=True)
class BudgetFit:
    """The keep chosen for a budget, and what it gives, in FLOPs per forward of one image."""

    keep: float
    final_patches: int
    num_patches: int
    flops: int  # of the patched forward at that keep
    baseline_flops: int  # of the unpatched model
    budget_flops: float

    @property
    def fraction(self) -> float:
        """The patched FLOPs over the unpatched ones."""
        return self.flops / self.baseline_flops


def fit_flops_budget(model: nn.Module, method: str | None = None, *, flops: float | None = None,
                     gflops: float | None = None, input_size: tuple[int, ...] | None = None,
                     **options) -> BudgetFit:
    """The largest ``keep`` at which ``method`` (with ``options``) runs ``model`` within the budget:
    ``flops``, a fraction in (0, 1] of the unpatched model's FLOPs, or ``gflops``, GFLOPs (2 x GMACs)
    per image. An unreachable budget is an error naming the least the method reaches."""
    from .adapters import EncoderAdapter, find_adapter
    from .api import apply, is_patched, last_forward, remove

    if not isinstance(find_adapter(model), EncoderAdapter):
        raise TypeError(f"a FLOPs budget fits image encoders (timm ViTs, transformers encoders), not "
                        f"{type(model).__name__}: give keep")
    check_budget(flops, gflops)
    input_size = check_input_size(input_size)
    if "keep" in options:
        raise TypeError("give keep or a FLOPs budget (flops= / gflops=), not both")
    probe = copy.deepcopy(model)
    if is_patched(probe):
        remove(probe)
    without_forward_hooks(probe)
    counted = image_part(probe)
    baseline = count_flops(counted, input_size).flops
    budget = flops * baseline if flops is not None else gflops * 1e9
    cost: dict[int, int | None] = {}

    def flops_at(final: int, num_patches: int) -> int | None:
        """FLOPs with ``final`` patch tokens out of the encoder; None where the method cannot get there."""
        if final not in cost:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a clamp note once per candidate says nothing here
                    apply(probe, method, keep=final / num_patches, **options)
                cost[final] = count_flops(counted, input_size).flops
            except ValueError:  # too few tokens for the method's schedule (e.g. ToMe's cap of half per block)
                cost[final] = None
        return cost[final]

    apply(probe, method, keep=1.0, **options)
    full = count_flops(counted, input_size)
    report = last_forward(probe)
    num_patches = report.token_counts[0] - report.num_prefix_tokens
    # at keep=1.0 only a schedule given as options reduces anything, in any block: the last block's reduction
    # shows only in the tokens leaving it
    if len(set(report.token_counts + [report.output_tokens])) > 1:
        raise TypeError(f"{schedule_given(options)} fix the token schedule themselves, so a FLOPs budget (which "
                        "chooses keep) cannot apply: give one or the other")
    cost[num_patches] = full.flops
    if full.flops <= budget:
        return BudgetFit(1.0, num_patches, num_patches, full.flops, baseline, budget)
    # Largest final count that fits: counts below a method's reach (None) sit at the low end, so they
    # steer the bisection up like a fitting count would.
    low, high = 1, num_patches  # invariant: high does not fit; the answer is in [low - 1, high)
    while low < high:
        mid = (low + high) // 2
        spent = flops_at(mid, num_patches)
        if spent is None or spent <= budget:
            low = mid + 1
        else:
            high = mid
    best = low - 1
    if best < 1 or flops_at(best, num_patches) is None:
        least = least_reachable(lambda final: flops_at(final, num_patches), num_patches)
        # a smaller keep ran and changed nothing: the options' schedule removes nothing (r=0, r=[])
        if any(spent == full.flops for final, spent in cost.items() if final < num_patches):
            raise TypeError(f"{schedule_given(options)} fix the token schedule themselves (it reduces nothing here), "
                            "so a FLOPs budget (which chooses keep) cannot apply: give one or the other")
        whole = "model" if counted is probe else "image tower"
        raise ValueError(f"a FLOPs budget of {budget / 1e9:.3g} GFLOPs ({budget / baseline:.1%} of the {whole}'s "
                         f"{baseline / 1e9:.3g}) is out of {method or 'the default method'}'s reach on this model: "
                         f"the least it runs is {least / 1e9:.3g} GFLOPs ({least / baseline:.1%})")
    return BudgetFit(best / num_patches, best, num_patches, cost[best], baseline, budget)


def without_forward_hooks(model: nn.Module) -> None:
    """Drops every forward hook and pre-hook from ``model``, a deep copy that tokenprune runs to count or time (a
    budget's probe, ``check_speed``'s models). A copy's hooks are the caller's functions: a hook recording features
    would record each of those forwards into the caller's lists."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_hooks_with_kwargs, module._forward_hooks_always_called,
                      module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs):
            hooks.clear()


def schedule_given(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def check_budget(flops: float | None, gflops: float | None) -> None:
    """Exactly one budget, and a valid one: ``flops`` in (0, 1], or ``gflops`` positive (before any model work)."""
    if (flops is None) == (gflops is None):
        raise TypeError("give one FLOPs budget: flops= (a fraction of the unpatched model's) or gflops= "
                        "(GFLOPs per image)")
    for name, value in (("flops", flops), ("gflops", gflops)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not math.isfinite(value) or value <= 0 or (name == "flops" and value > 1)):
            accepted = "a number in (0, 1]" if name == "flops" else "a positive number of GFLOPs per image"
            raise ValueError(f"{name} must be {accepted}, got {value!r}")


def image_part(model: nn.Module) -> nn.Module:
    """What a budget counts: ``model``, or for a model that takes text first (CLIPModel, SiglipModel: a zero
    image would be its input_ids) the innermost module around its encoder that takes ``pixel_values`` first,
    its image tower (the text tower's FLOPs do not change with keep, and depend on the text)."""
    from .adapters import find_adapter

    if getattr(model, "main_input_name", "pixel_values") == "pixel_values":
        return model
    encoder = find_adapter(model).anchor(model)
    towers = [m for m in model.modules() if next(iter(inspect.signature(m.forward).parameters), None) == "pixel_values"
              and any(sub is encoder for sub in m.modules())]
    return towers[-1] if towers else model  # modules() lists outer before inner; none: count_flops refuses it


def least_reachable(flops_at, num_patches: int) -> int:
    """The FLOPs at the smallest final count a method reaches (reach only grows with the count)."""
    low, high = 1, num_patches  # flops_at(num_patches) is known to exist
    while low < high:
        mid = (low + high) // 2
        if flops_at(mid) is None:
            low = mid + 1
        else:
            high = mid
    return flops_at(low)
