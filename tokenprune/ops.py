"""Pure tensor functions for token reduction.

Nothing here knows about any model: every function takes token tensors shaped
``(batch, tokens, channels)`` whose first ``num_prefix`` tokens (class, distillation,
register tokens) are protected, and returns new tensors. The framework adapters in
``tokenprune.patches`` call these; so do the methods in ``tokenprune.methods``.

Indexing follows two measured rules for CPU speed (see docs/design.md):
advanced indexing ``t[batch, idx]`` instead of ``torch.gather`` with an expanded
index (3-4x faster), and a single ``index_add`` into the destinations instead of
strided ``scatter_reduce`` (ToMe's original formulation; 3x slower).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MergePlan:
    """Which patch tokens merge where, for one bipartite matching step.

    Patch tokens (prefix excluded) are split by alternating position into set A
    (patch positions 0, 2, 4, ...) and set B (1, 3, 5, ...). ``src`` tokens of A merge
    into ``dst`` tokens of B; the ``unmerged`` tokens of A stay. All indices are
    per sample, shaped ``(batch, k)``, and index into A or B respectively.
    """

    unmerged: Tensor  # (B, |A| - r), ascending, indices into A
    src: Tensor  # (B, r), indices into A
    dst: Tensor  # (B, r), indices into B

    @property
    def removed(self) -> int:
        return self.src.shape[1]


def _batch_index(t: Tensor) -> Tensor:
    return torch.arange(t.shape[0], device=t.device)[:, None]


def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int) -> MergePlan:
    """ToMe's matching: merge the ``r`` A-tokens most similar to some B-token.

    ``metric`` is ``(B, N, d)`` for all tokens (prefix included; the prefix rows are
    ignored). Similarity is cosine. ``r`` is clamped to half the patch tokens.
    """
    patches = metric[:, num_prefix:]
    r = min(r, patches.shape[1] // 2)
    patches = patches / patches.norm(dim=-1, keepdim=True)
    a, b = patches[:, ::2], patches[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    best_score, best_dst = scores.max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True)
    src = order[:, :r]
    unmerged = order[:, r:].sort(dim=-1).values
    dst = best_dst.gather(1, src)
    return MergePlan(unmerged=unmerged, src=src, dst=dst)


def _split(t: Tensor, num_prefix: int) -> tuple[Tensor, Tensor, Tensor]:
    """Prefix tokens, set A (even patch positions) and set B (odd patch positions)."""
    return t[:, :num_prefix], t[:, num_prefix::2], t[:, num_prefix + 1::2]


def _add_sources(b: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """A new tensor: ``b`` (B, nb, ...) with each row of ``src`` (B, r, ...) added into row ``dst``."""
    batch, n_b, rest = b.shape[0], b.shape[1], b.shape[2:]
    flat_dst = (dst + torch.arange(batch, device=b.device)[:, None] * n_b).reshape(-1)
    # index_add (not index_add_): b may be a view of the caller's tensor.
    return b.reshape(batch * n_b, *rest).index_add(0, flat_dst, src.reshape(-1, *rest)).view(b.shape)


def merge_sum(t: Tensor, plan: MergePlan, num_prefix: int) -> Tensor:
    """Apply ``plan`` by summing each source token into its destination.

    Output order: ``[prefix, unmerged A (in original order), all of B]``. Summing is
    right for token sizes and for 0/1 source maps.
    """
    prefix, a, b = _split(t, num_prefix)
    batch = _batch_index(t)
    return torch.cat([prefix, a[batch, plan.unmerged], _add_sources(b, a[batch, plan.src], plan.dst)], dim=1)


def merge_mean(x: Tensor, size: Tensor | None, plan: MergePlan, num_prefix: int) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge (ToMe's ``merge_wavg``); returns ``(x, size)``, same order as ``merge_sum``.

    ``size`` is ``(B, N, 1)`` token sizes, or None when every token has size 1. Only the
    destination set B is reweighted; unmerged tokens are copied as they are.
    """
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    prefix, a, b = _split(x, num_prefix)
    prefix_size, a_size, b_size = _split(size, num_prefix)
    batch = _batch_index(x)
    src_size = a_size[batch, plan.src]
    merged_size = _add_sources(b_size, src_size, plan.dst)
    merged = _add_sources(b * b_size, a[batch, plan.src] * src_size, plan.dst) / merged_size
    unmerged = plan.unmerged
    return (torch.cat([prefix, a[batch, unmerged], merged], dim=1),
            torch.cat([prefix_size, a_size[batch, unmerged], merged_size], dim=1))


def keep_tokens(t: Tensor, keep_idx: Tensor, num_prefix: int) -> Tensor:
    """Keep the prefix and the patch tokens at ``keep_idx`` ``(B, k)`` (indices into the patches)."""
    patches = t[:, num_prefix:]
    return torch.cat([t[:, :num_prefix], patches[_batch_index(t), keep_idx]], dim=1)


def random_keep_indices(batch: int, num_patches: int, keep: int, generator: torch.Generator | None,
                        device: torch.device) -> Tensor:
    """``keep`` random patch indices per sample, ascending (so the spatial order survives)."""
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    return noise.argsort(dim=-1)[:, :keep].sort(dim=-1).values


def log_size_bias(size: Tensor) -> Tensor:
    """Proportional attention: ``log(size)`` as an additive key bias shaped ``(B, 1, 1, N)``."""
    return size.log()[:, None, None, :, 0]


def size_weighted_mean(x: Tensor, size: Tensor) -> Tensor:
    """Mean over tokens where each token counts as many patches as it has absorbed."""
    return (x * size).sum(dim=1) / size.sum(dim=1)


def final_patch_count(num_patches: int, keep: float) -> int:
    """How many patch tokens leave the encoder for a given ``keep`` fraction."""
    return max(1, round(keep * num_patches))


def plan_removals(num_patches: int, depth: int, target: int, max_fraction: float = 0.5) -> tuple[int, ...]:
    """Tokens to remove at each of ``depth`` layers so that ``target`` patch tokens remain.

    The removal is spread as evenly as possible (a constant r, as ToMe uses). A
    method may remove at most ``floor(max_fraction * t)`` of the ``t`` patch tokens
    a layer sees (ToMe's bipartite cap is one half). When an even spread would hit
    that cap in the late layers, the constant r grows (the smallest one that still
    reaches the target) so that the early layers take more.
    """
    if not 1 <= target <= num_patches:
        raise ValueError(f"target must be in [1, {num_patches}], got {target}")
    total = num_patches - target
    if total == 0 or depth == 0:
        return (0,) * depth

    def fits(steps) -> bool:
        t = num_patches
        for step in steps:
            if step > math.floor(max_fraction * t):
                return False
            t -= step
        return True

    # Even spread; the early layers take the remainder (fewer FLOPs).
    base, extra = divmod(total, depth)
    even_spread = tuple(base + (1 if i < extra else 0) for i in range(depth))
    if fits(even_spread):
        return even_spread

    def greedy(r: int) -> tuple[list[int], int]:
        steps, left, t = [], total, num_patches
        for _ in range(depth):
            step = min(r, math.floor(max_fraction * t), left)
            steps.append(step)
            left -= step
            t -= step
        return steps, left

    even = math.ceil(total / depth)
    lo, hi = even, num_patches
    while lo < hi:  # smallest constant r that reaches the target under the cap
        mid = (lo + hi) // 2
        if greedy(mid)[1] == 0:
            hi = mid
        else:
            lo = mid + 1
    steps, left = greedy(lo)
    if left:
        raise ValueError(
            f"cannot reduce {num_patches} patch tokens to {target} in {depth} layers when each layer "
            f"removes at most {max_fraction:.0%} of its tokens")
    return tuple(steps)


def tome_r_schedule(r: int | tuple[int, float] | list[int], depth: int) -> tuple[int, ...]:
    """ToMe's native ``r``: an int (constant), ``(r, inflection)`` (linear), or a per-layer list.

    ``(r, inflection)`` runs linearly from ``int(r * (1 - inflection))`` to twice r minus
    that, so the mean stays r; ``(r, -1)`` is the paper's decreasing schedule. A list
    shorter than ``depth`` is padded with zeros.
    """
    if isinstance(r, list):
        if len(r) > depth:
            raise ValueError(f"r has {len(r)} entries but the model has {depth} blocks")
        return tuple(r) + (0,) * (depth - len(r))
    if isinstance(r, tuple):
        r, inflection = r
        start = int(r * (1.0 - inflection))
        end = 2 * r - start
        step = (end - start) / max(depth - 1, 1)
        return tuple(max(0, int(start + step * i)) for i in range(depth))
    return (r,) * depth


def assign_sum(t: Tensor, dest: Tensor, n_out: int) -> Tensor:
    """Sum the tokens of ``t`` (B, N, ...) into ``n_out`` slots; ``dest`` (B, N) is each token's slot."""
    batch, n, rest = t.shape[0], t.shape[1], t.shape[2:]
    flat = (dest + torch.arange(batch, device=t.device)[:, None] * n_out).reshape(-1)
    out = t.new_zeros(batch * n_out, *rest)
    return out.index_add_(0, flat, t.reshape(batch * n, *rest)).view(batch, n_out, *rest)


def assign_mean(t: Tensor, weight: Tensor, dest: Tensor, n_out: int) -> Tensor:
    """Weighted mean of the tokens sharing a slot; ``weight`` is (B, N, 1)."""
    return assign_sum(t * weight, dest, n_out) / assign_sum(weight, dest, n_out)


def received_attention(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None,
                       chunk: int = 512) -> Tensor:
    """Attention each key receives, averaged over heads and queries: ``(B, N_k)`` from q ``(B, H, N_q, D)``
    and k ``(B, H, N_k, D)``. Queries go in chunks, so memory is O(chunk * N_k) per head, never N_q * N_k."""
    total = q.new_zeros(q.shape[0], k.shape[-2], dtype=torch.float32)
    for start in range(0, q.shape[-2], chunk):
        logits = (q[..., start:start + chunk, :] @ k.transpose(-2, -1)) * scale
        if bias is not None:
            logits = logits + (bias if bias.shape[-2] == 1 else bias[..., start:start + chunk, :])
        total += logits.softmax(dim=-1, dtype=torch.float32).sum(dim=(1, 2))
    return total / (q.shape[1] * q.shape[-2])
