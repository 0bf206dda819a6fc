"""Pure tensor functions for token reduction.

Nothing here knows about any model: every function takes token tensors shaped
``(batch, tokens, channels)`` whose first ``num_prefix`` tokens (class, distillation,
register tokens) are protected, and returns new tensors. The framework adapters in
``tokenprune.patches`` call these; so do the methods in ``tokenprune.methods``.

Conventions of the bipartite matching (ToMe, MCTF), the official code's so that our outputs
are the official implementations' outputs (docs/methods.md):

* set A is every even position and set B every odd position of the *whole* sequence, prefix
  included (the class token is A's first token);
* prefix tokens are protected: one in A is never a source, one in B never a destination
  (``protect_prefix``); the official code masks the class token (and the distillation token,
  B's first) the same way, and this extends it to no prefix (SigLIP) or registers (DINOv2);
* every output starts with all prefix tokens in their original order (adapters and heads read
  them there); the other tokens follow in the order each method defines.

Indexing follows two measured rules for CPU speed (see docs/design.md):
advanced indexing ``t[batch, idx]`` instead of ``torch.gather`` with an expanded
index (3-4x faster), and a single ``index_add`` into the destinations instead of
strided ``scatter_reduce`` (ToMe's original formulation; 3x slower).

Half precision (fp16, bf16): averages accumulate in float32 (``accumulation_dtype``) and come back in the
tokens' dtype; token sizes stay float32 (bf16 counts exactly only to 256, fp16 overflows a sum of large
features). For float32 and float64 tokens every function here computes exactly what it did before.

These functions are the reference. Where ``tokenprune.extension.for_tensor`` returns the compiled
extension (CUDA tensors by default; see that module), ``keep_tokens``, ``merge_mean``, ``assign_mean``
and ``received_attention`` hand their work to its kernels, which the tests hold equal to the code here;
on CPU by default ``bipartite_merge`` (ToMe's matching and merge in one call, bit-identical), ``assign_mean``
(one weighted merge, bit-identical), ``keep_tokens`` (a row copy) and ``top_k_ascending`` (the same indices) do so
too.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from tokenprune import extension


@dataclass(frozen=True)
class MergePlan:
    """Which tokens merge where, for one bipartite matching step.

    All tokens, prefix included, are split by alternating position from position 0 into set A
    (positions 0, 2, 4, ...) and set B (1, 3, 5, ...), as the official ToMe code does; prefix
    tokens are protected (see ``protect_prefix``). ``src`` tokens of A merge into ``dst`` tokens of
    B; the ``unmerged`` non-prefix tokens of A stay. All indices are per sample, shaped ``(batch, k)``,
    and index into A or B respectively.
    """

    unmerged: Tensor  # (B, |A| - prefix in A - r), ascending, indices into A; prefix A tokens excluded
    src: Tensor  # (B, r), indices into A
    dst: Tensor  # (B, r), indices into B

    @property
    def removed(self) -> int:
        return self.src.shape[1]


def prefix_in_sets(num_prefix: int) -> tuple[int, int]:
    """How many prefix tokens fall in set A (even positions) and in set B (odd positions)."""
    return (num_prefix + 1) // 2, num_prefix // 2


def protect_prefix(scores: Tensor, num_prefix: int) -> Tensor:
    """Mask A x B pair scores ``(B, |A|, |B|)`` in place so that no prefix token takes part in a pair.

    Prefix A tokens (rows) can never be a source and prefix B tokens (columns) never a destination;
    a bidirectional matching that reads the scores transposed gets the same protection. For one
    class token this is the official code's mask of row 0 (and of column 0 for a distillation token).
    """
    in_a, in_b = prefix_in_sets(num_prefix)
    scores[:, :in_a, :] = -math.inf
    scores[:, :, :in_b] = -math.inf
    return scores


def without_autocast(fn):
    """``fn`` with autocast off (CPU and CUDA) while it runs: for the scores that choose tokens, which are float32
    under autocast as for half-precision models (autocast would run their products in bf16/fp16 and change the
    matching), and for the CPU kernels, whose ATen products autocast would hand back in bf16 where they read
    float32. Free when autocast is off."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return run


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision tokens, else their own dtype: where sums, means and scores are computed."""
    return torch.promote_types(dtype, torch.float32)


def _batch_index(t: Tensor) -> Tensor:
    return torch.arange(t.shape[0], device=t.device)[:, None]


@without_autocast
def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int) -> MergePlan:
    """ToMe's matching: merge the ``r`` A-tokens most similar to some B-token.

    ``metric`` is ``(B, N, d)`` for all tokens, prefix included: the A/B alternation runs over the
    whole sequence (the official code's), so the prefix changes which patch tokens are in A. Prefix
    tokens never merge. Similarity is cosine. ``r`` is clamped to half the non-prefix tokens.
    """
    r = min(r, (metric.shape[1] - num_prefix) // 2)
    if r <= 0:  # nothing merges (and a single patch token leaves B empty: no scores to take a max over)
        a_patches = torch.arange(prefix_in_sets(num_prefix)[0], (metric.shape[1] + 1) // 2, device=metric.device)
        none = a_patches.new_empty(metric.shape[0], 0)
        return MergePlan(unmerged=a_patches.expand(metric.shape[0], -1), src=none, dst=none)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = protect_prefix(unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2), num_prefix)
    best_score, best_dst = scores.max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True)
    src = order[:, :r]
    # prefix A rows score -inf, so they are never sources and sort first among the rest
    unmerged = order[:, r:].sort(dim=-1).values[:, prefix_in_sets(num_prefix)[0]:]
    dst = best_dst.gather(1, src)
    return MergePlan(unmerged=unmerged, src=src, dst=dst)


def head_mean(keys: Tensor) -> Tensor:
    """ToMe's similarity metric: keys ``(B, H, N, D)`` averaged over heads, ``(B, N, D)`` (float32 for half-precision
    keys, so that rounding does not decide which tokens are most similar)."""
    return keys.mean(dim=1, dtype=accumulation_dtype(keys.dtype))


@without_autocast
def bipartite_merge(keys: Tensor, x: Tensor, size: Tensor | None, r: int, num_prefix: int) -> tuple[Tensor, Tensor]:
    """ToMe's whole step: ``bipartite_soft_matching`` on the head-mean ``keys`` (B, H, N, D), then ``merge_mean``
    of ``x`` (B, N, C) with token sizes ``size`` (B, N, 1) or None; returns ``(x, size)``.

    On CPU the extension's CPU build does it in one call, bit-identical to the two functions (the default: about
    thirty small ops become one, which is what decides whether merging pays at batch 1; docs/performance.md)."""
    r = min(r, (x.shape[1] - num_prefix) // 2)
    # the kernel (CPU only) scores in float32: keys of any dtype but float64 (under autocast they may differ from
    # x's); checked before the extension is asked for, which may compile it
    float32_scores = accumulation_dtype(keys.dtype) == torch.float32
    if not x.is_cuda and r > 0 and float32_scores and (size is None or size.dtype == torch.float32):
        kernels = extension.for_tensor(x, size, floating=True, cpu_kernel_pays=True, in_compiled_graphs=True)
        if kernels is not None:
            return kernels.bipartite_merge(keys, x, size, r, num_prefix)
    return merge_mean(x, size, bipartite_soft_matching(head_mean(keys), r, num_prefix), num_prefix)


def _add_sources(b: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """A new tensor: ``b`` (B, nb, ...) with each row of ``src`` (B, r, ...) added into row ``dst``."""
    batch, n_b, rest = b.shape[0], b.shape[1], b.shape[2:]
    flat_dst = (dst + torch.arange(batch, device=b.device)[:, None] * n_b).reshape(-1)
    # index_add (not index_add_): b may be a view of the caller's tensor.
    return b.reshape(batch * n_b, *rest).index_add(0, flat_dst, src.reshape(-1, *rest)).view(b.shape)


def merge_sum(t: Tensor, plan: MergePlan, num_prefix: int) -> Tensor:
    """Apply ``plan`` by summing each source token into its destination.

    Output order: ``[prefix (original order), unmerged non-prefix A (position order), non-prefix B
    (position order)]``: for one class token (or class + distillation) the official ToMe order.
    Summing is right for token sizes and for 0/1 source maps.
    """
    a, b = t[:, ::2], t[:, 1::2]
    batch = _batch_index(t)
    merged = _add_sources(b, a[batch, plan.src], plan.dst)[:, prefix_in_sets(num_prefix)[1]:]
    return torch.cat([t[:, :num_prefix], a[batch, plan.unmerged], merged], dim=1)


def merge_mean(x: Tensor, size: Tensor | None, plan: MergePlan, num_prefix: int) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge (ToMe's ``merge_wavg``); returns ``(x, size)``, same order as ``merge_sum``.

    ``size`` is ``(B, N, 1)`` token sizes, or None when every token has size 1 (the returned sizes are
    then float32, or x's dtype if wider). Only the destinations are reweighted; unmerged tokens are copied
    as they are. The weighted sum is accumulated in float32 for half-precision ``x`` and cast back.
    """
    acc = accumulation_dtype(x.dtype)
    # the kernel sums the sizes in float32: float64 sizes (summed in float64 below) keep the PyTorch ops
    wide_size = size is not None and size.dtype == torch.float64
    kernels = None if wide_size else extension.for_tensor(x, size, floating=True)
    if kernels is not None:  # one weighted merge over the plan's destinations (fp32 sums, like below)
        dest, n_out = merge_destinations(plan, x.shape[1], num_prefix)
        weight = size[..., 0] if size is not None else x.new_ones(x.shape[:2], dtype=torch.float32)
        merged, merged_size = kernels.weighted_merge(x, weight, dest, n_out)
        return merged, merged_size[..., None].to(acc if size is None else accumulation_dtype(size.dtype))
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1, dtype=acc)
    size = size.to(accumulation_dtype(size.dtype))
    merged_size = merge_sum(size, plan, num_prefix)
    merged = merge_sum(x.to(acc) * size, plan, num_prefix) / merged_size
    return merged.to(x.dtype), merged_size


def merge_destinations(plan: MergePlan, n: int, num_prefix: int) -> tuple[Tensor, int]:
    """``plan`` as the output slot of each of the ``n`` tokens, ``(B, n)``, and the number of slots: the
    form ``assign_sum``/``assign_mean`` (and the extension's one-kernel merge) take. Slots follow
    ``merge_sum``'s output order: prefix, unmerged A, non-prefix B; each source goes to its destination's."""
    in_a, in_b = prefix_in_sets(num_prefix)
    n_a, n_b = (n + 1) // 2, n // 2
    batch, n_unmerged, device = plan.src.shape[0], plan.unmerged.shape[1], plan.src.device
    b_index = torch.arange(n_b, device=device)
    slot_b = torch.where(b_index < in_b, 2 * b_index + 1, num_prefix + n_unmerged + b_index - in_b)
    slot_b = slot_b.expand(batch, n_b)
    slot_a = torch.empty(batch, n_a, dtype=torch.long, device=device)
    slot_a[:, :in_a] = 2 * torch.arange(in_a, device=device)  # prefix A tokens keep their positions
    slot_a.scatter_(1, plan.unmerged, (num_prefix + torch.arange(n_unmerged, device=device)).expand(batch, -1))
    slot_a.scatter_(1, plan.src, slot_b.gather(1, plan.dst))
    return interleave(slot_a, slot_b), num_prefix + n_unmerged + n_b - in_b


def interleave(a: Tensor, b: Tensor) -> Tensor:
    """The A and B sets' rows back in sequence order: ``a`` (B, n_a) at the even positions, ``b`` (B, n_b) at
    the odd ones, with ``n_a`` = ``n_b`` or ``n_b + 1``; ``(B, n_a + n_b)``. Out of place (a torch.func.vmap
    of it writes no batched values into a fresh tensor)."""
    n_b = b.shape[1]
    return torch.cat((torch.stack((a[:, :n_b], b), dim=-1).flatten(1), a[:, n_b:]), dim=1)  # a's last, if odd


def keep_tokens(t: Tensor, keep_idx: Tensor, num_prefix: int) -> Tensor:
    """Keep the prefix and the patch tokens at ``keep_idx`` ``(B, k)`` (indices into the patches, non-negative:
    the CPU kernel names one outside ``[0, N - num_prefix)``)."""
    # one call where ATen's indexing takes five (faster on CPU at every batch measured; docs/performance.md),
    # for what the kernel takes: (B, N, C) tokens, int64 (B, k) indices (others: PyTorch's indexing)
    takes = t.dim() == 3 and keep_idx.dtype == torch.int64 and keep_idx.dim() == 2 and keep_idx.shape[0] == t.shape[0]
    kernels = extension.for_tensor(t, cpu_kernel_pays=True) if takes else None
    # it copies raw memory: not a conjugate or negative view (asked after for_tensor, which is None under
    # torch.compile, where these queries would break the graph)
    if kernels is not None and not t.is_conj() and not t.is_neg():
        return kernels.gather_kept(t, keep_idx, num_prefix)
    patches = t[:, num_prefix:]
    return torch.cat([t[:, :num_prefix], patches[_batch_index(t), keep_idx]], dim=1)


_TOP_K_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # the CPU kernel's


def top_k_ascending(scores: Tensor, k: int, largest: bool = True) -> Tensor:
    """Indices ``(B, k)`` of the ``k`` largest (``largest=False``: smallest) of each row of ``scores`` ``(B, n)``,
    ascending (so the spatial order survives). NaN ranks above every number (as in ``torch.sort``); ties go to
    the lower index. On CPU the extension's CPU build does it in one call (the default), the same indices."""
    if scores.dtype in _TOP_K_DTYPES and not scores.is_cuda:  # the kernel names a shape that is not (B, n)
        kernels = extension.for_tensor(scores, cpu_kernel_pays=True)
        if kernels is not None:
            return kernels.top_k_ascending(scores, k, largest)
    return scores.argsort(dim=-1, descending=largest, stable=True)[:, :k].sort(dim=-1).values


_MASK31 = 2 ** 31 - 1


def _mix31(h):
    """A bijection of ``[0, 2**31)`` that scrambles the bits of ``h`` (an int, or an int64 tensor of such): xorshifts
    and odd multipliers modulo 2**31, whose products stay below 2**62, so int64 never overflows on any backend."""
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & _MASK31
    return h ^ (h >> 16)


def random_keys(batch: int, num_patches: int, stream: int, device: torch.device | str) -> Tensor:
    """Random ranking keys ``(B, n)``, int64, all distinct (for ``batch * num_patches <= 2**31``): a hash of the
    counter ``b * n + j`` from a start drawn from ``stream`` (any non-negative int). A pure function of its
    arguments, in integer ops that are exact everywhere: the same keys on every device, under ``torch.compile``
    (no generator object for dynamo to refuse) and from any thread."""
    start = _mix31((stream ^ (stream >> 31)) & _MASK31)
    counter = (torch.arange(batch * num_patches, device=device) + start) & _MASK31
    return _mix31(counter).view(batch, num_patches)


def random_keep_indices(batch: int, num_patches: int, keep: int, stream: int, device: torch.device | str) -> Tensor:
    """``keep`` random patch indices per sample, ascending (so the spatial order survives): those with the
    smallest ``random_keys`` of ``stream``. Eager calls are memoised (the draw is a pure function of the arguments;
    a reducing forward asks the same draws every call); the returned tensor is shared, so read it, never write it."""
    # traced, or inside a torch.func transform (whose tensors would outlive it in the memo): drawn afresh
    if torch.compiler.is_compiling() or extension.under_torch_func():
        return _keep_smallest_keys(batch, num_patches, keep, stream, torch.device(device))
    return _memoised_keep_indices(batch, num_patches, keep, stream, torch.device(device))


def _keep_smallest_keys(batch: int, num_patches: int, keep: int, stream: int, device: torch.device) -> Tensor:
    # float64 holds every 31-bit key exactly (and is a dtype the top-k kernel takes)
    keys = random_keys(batch, num_patches, stream, device).to(torch.float64)
    return top_k_ascending(keys, keep, largest=False)


@functools.lru_cache(maxsize=64)  # at most 64 draws (25 MB at batch 256 and 196 patches)
def _memoised_keep_indices(batch: int, num_patches: int, keep: int, stream: int, device: torch.device) -> Tensor:
    # a normal tensor even when first asked under inference_mode: an inference tensor cannot index tokens that
    # autograd records, so a later training forward would fail on the memoised draw
    with torch.inference_mode(False):
        return _keep_smallest_keys(batch, num_patches, keep, stream, device)


def log_size_bias(size: Tensor) -> Tensor:
    """Proportional attention: ``log(size)`` as an additive key bias shaped ``(B, 1, 1, N)``, in ``size``'s
    dtype (attention kernels want it in the query's: callers cast)."""
    return size.log()[:, None, None, :, 0]


def size_weighted_mean(x: Tensor, size: Tensor) -> Tensor:
    """Mean over tokens where each token counts as many patches as it has absorbed (accumulated in float32
    for half-precision ``x``; returned in ``x``'s dtype)."""
    acc = accumulation_dtype(x.dtype)
    return ((x.to(acc) * size).sum(dim=1) / size.sum(dim=1)).to(x.dtype)


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
    if total == 0:
        return (0,) * depth
    if depth == 0:
        raise ValueError(f"cannot reduce {num_patches} patch tokens to {target} without a reducing layer")

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
    """Weighted mean of the tokens of ``t`` (B, N, ...) sharing a slot; ``weight`` is (B, N, 1, ...), one per token
    (or broadcastable to ``t``: a weight per channel). Accumulated in float32 for half-precision ``t``; returned in
    ``t``'s dtype. On CPU the extension's CPU build does it in one call for (B, N, C) tokens with one float32 or
    half-precision weight per token (the default; bit-identical: the same products summed in the same order)."""
    one_per_token = weight.shape == (*t.shape[:2], 1)
    slots = dest.dtype == torch.int64 and dest.shape == t.shape[:2]  # the kernel's; index_add broadcasts, casts
    kernels = (extension.for_tensor(t, weight, floating=True, cpu_kernel_pays=True, in_compiled_graphs=True)
               if t.dim() == 3 and one_per_token and slots and weight.dtype != torch.float64 else None)
    if kernels is not None:
        return kernels.weighted_merge(t, weight[..., 0], dest, n_out)[0]
    weight = weight.to(accumulation_dtype(weight.dtype))
    total = assign_sum(t.to(accumulation_dtype(t.dtype)) * weight, dest, n_out)
    return (total / assign_sum(weight, dest, n_out)).to(t.dtype)


@without_autocast
def received_attention(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None,
                       chunk: int = 512) -> Tensor:
    """Attention each key receives, averaged over heads and queries: ``(B, N_k)`` from q ``(B, H, N_q, D)``
    and k ``(B, H, N_k, D)``. Queries go in chunks, so memory is O(chunk * N_k) per head, never N_q * N_k."""
    same_heads = k.dtype == q.dtype and k.shape[:2] == q.shape[:2]  # the kernel's; the ops below promote, broadcast
    # on a GPU the kernel (one thread per key column, each re-reading every query) measured 13-56x slower than
    # the products and softmax below (H200, bf16, DeiT-S to CLIP-L/336 shapes; docs/performance.md): not by default
    kernels = extension.for_tensor(q, floating=True, cuda_kernel_pays=False) if same_heads else None
    if kernels is not None:  # no map at all: row statistics, then each key's column
        return kernels.received_attention(q, k, scale, bias)
    # half-precision q and k: the scores in float32, as the kernel computes them (they only rank tokens)
    q, k = q.to(accumulation_dtype(q.dtype)), k.to(accumulation_dtype(k.dtype))
    total = q.new_zeros(q.shape[0], k.shape[-2], dtype=torch.promote_types(q.dtype, k.dtype))  # float64 stays
    # scores that only rank tokens, never differentiated: each chunk's map is scaled, biased and normalised in
    # place, in the one buffer the product allocates (bit-identical; 1.1-1.8x faster on this machine's CPU,
    # where filling fresh maps costs as much as the arithmetic)
    with torch.no_grad():
        for start in range(0, q.shape[-2], chunk):
            logits = q[..., start:start + chunk, :] @ k.transpose(-2, -1)
            logits.mul_(scale)
            if bias is not None:
                logits.add_(bias if bias.shape[-2] == 1 else bias[..., start:start + chunk, :])
            total += torch.softmax(logits, dim=-1, out=logits).sum(dim=(1, 2))
    return total / (q.shape[1] * q.shape[-2])


def _heads_as_batch(t: Tensor) -> Tensor | None:
    """``t`` (B, H, n, m) as (B*H, n, m) where that is a view, else None (a reshape would copy it)."""
    batch, heads = t.shape[:2]
    if batch == 1 or heads == 1 or t.stride(0) == heads * t.stride(1):
        return t.reshape(batch * heads, *t.shape[2:])
    return None


def _per_sample_products_pay(device: torch.device) -> bool:
    """Whether ``head_products`` multiplies sample by sample where (B, H) does not fold into a view: on the CPU
    (BLAS takes each sample's heads as they lie, sparing a copy). Elsewhere one batched product of copies: a
    product per sample is a kernel launch per sample, and launches bound a forward on a GPU (MCTF at batch 256 on
    an H200 spent some 110 of its 150 ms in them; docs/performance.md)."""
    return device.type == "cpu"


def head_products(a: Tensor, b: Tensor, alpha: float = 1.0, add: Tensor | None = None,
                  out: Tensor | None = None) -> Tensor:
    """``alpha * a @ b + add`` per head: ``a`` (B, H, n, m), ``b`` (B, H, m, p), ``add`` 4-D broadcastable to
    (B, H, n, p) (an additive attention bias) or None; written into ``out`` (B, H, n, p, contiguous) where given.

    For attention logits, ``q k^T``: one product over B*H where ``a`` and ``b`` are views of that, else on the CPU
    one per sample (elsewhere one over B*H of copies: ``_per_sample_products_pay``). q and k as a qkv projection
    leaves them (heads between tokens) are what BLAS takes as they are for one sample's heads, where one product
    over B*H first copies them; and ``alpha`` rides in the product. At DeiT-S batch 32 a block's explicit
    probabilities took 21 ms instead of 29-32 (scaled q, k copied, a separate add); the logits into a buffer 4.7 ms
    instead of 5.3. (For probabilities @ v the per-sample products measured slower than matmul's copy: not used
    there.) On the CPU ``add`` is added after the product, in place: the sums baddbmm gives with it (measured bit for
    bit, and no slower: it copies a broadcast bias into the output first), and what the CPU build's
    ``attention_probabilities`` does sample by sample, whatever BLAS does with a bias. Under autograd, forward-mode
    AD or a ``torch.func`` transform (``out=`` takes no part in them): ``torch.matmul``."""
    batch, heads, n = a.shape[:3]
    p = b.shape[-1]
    if extension.differentiated(a, b, add):
        product = torch.matmul(a, b) * alpha
        return product if add is None else product + add
    if out is None:
        out = a.new_empty(batch, heads, n, p, dtype=torch.promote_types(a.dtype, b.dtype))
    if add is not None:  # its rows stay broadcast (one bias row for every query: no (B, H, n, p) copy)
        add = add.to(out.dtype).expand(batch, heads, add.shape[2], p)
    flat = _heads_as_batch(a), _heads_as_batch(b), out.view(batch * heads, n, p)
    if (flat[0] is None or flat[1] is None) and not _per_sample_products_pay(a.device):
        flat = a.reshape(batch * heads, n, a.shape[-1]), b.reshape(batch * heads, *b.shape[2:]), flat[2]
    if flat[0] is not None and flat[1] is not None:
        pieces = [(*flat, None if add is None else add.reshape(batch * heads, add.shape[2], p))]
    else:
        pieces = [(a[i], b[i], out[i], None if add is None else add[i]) for i in range(batch)]
    for x, y, target, bias in pieces:
        if bias is None or out.device.type == "cpu":
            torch.baddbmm(target, x, y, beta=0, alpha=alpha, out=target)
            if bias is not None:
                target.add_(bias)
        else:  # one launch on a GPU, the bias in the product's epilogue
            torch.baddbmm(bias, x, y, alpha=alpha, out=target)
    return out


def attention_probabilities(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None,
                            out: Tensor | None = None) -> Tensor:
    """softmax(scale * q k^T + bias) over the keys, ``(B, H, N, N_k)``, from q ``(B, H, N, D)`` and k ``(B, H, N_k, D)``
    of one dtype, ``bias`` broadcastable to that (or None); written in place into ``out`` (contiguous, that shape) where
    given. The logits are ``head_products``'.

    On the CPU, for a batch of float32 q and k and a bias of one row per sample (B or 1, 1, 1, N_k) or none, the CPU
    build does it sample by sample while each sample's map is in cache: the same ATen product and softmax on it, the
    bias added in a loop, so the map is this one bit for bit. Over the whole map at once the bias, the product and the
    softmax each pass over some tens of MB at batch 32 (DeiT-S: 30 MB a merging block of MCTF); sample by sample
    MCTF's forward took 0.99x the time at DeiT-S batch 32, 0.96x at deit_tiny's, 0.93-0.94x on the testbed. One
    sample's map is in cache either way: at batch 1 the PyTorch ops (the CPU build measured 1.005-1.015x there;
    docs/performance.md, session 29)."""
    row_bias = bias is None or (bias.dim() == 4 and bias.shape[1:3] == (1, 1) and bias.dtype == torch.float32)
    # a dispatch mode (torch.utils.flop_counter's: count_flops, budgets) sees the PyTorch ops it counts, one by one
    if (q.device.type == "cpu" and q.dtype == k.dtype == torch.float32 and q.shape[0] > 1 and row_bias
            and (out is None or out.is_contiguous()) and not is_in_torch_dispatch_mode()):
        kernels = extension.for_tensor(q, k, bias, cpu_kernel_pays=True)
        if kernels is not None:
            if out is None:
                out = q.new_empty(*q.shape[:3], k.shape[2])
            return kernels.attention_probabilities(q, k, bias, scale, out)
    logits = head_products(q, k.transpose(-2, -1), alpha=scale, add=bias, out=out)
    return logits.softmax(dim=-1) if out is None else torch.softmax(logits, dim=-1, out=logits)
