"""MCTF: multi-criteria token fusion with one-step-ahead attention (Lee, Choi, Kim; CVPR 2024).

At the input of blocks 1..L-1, before attention: the block's own attention is computed on the
un-merged tokens (from its q and k, with the log-size bias); it scores pairs of patch tokens by
three criteria, fuses the best pairs in two directions, and then reuses that attention, merged
(keys summed, queries averaged), instead of recomputing it. Scores follow the official code:

    W = ((cos(x_i, x_j) + 1) / 2) ** (1/tau_sim) * (a~_i a~_j) ** (1/tau_info) * (s~_i s~_j) ** (1/tau_size)

with x the token features entering the block, a the attention a token receives (mean over heads and
queries), s its size, ~ = reciprocal over its max, and (tau_sim, tau_info, tau_size) = (1, 20, 40).
Merged tokens are averaged with weights a * s. The matching follows the official code's conventions
(``tokenprune.ops``): A/B alternate over the whole sequence from position 0, prefix tokens are protected
(never a source, never a destination, in either direction), and the output is the prefix in its
original order, the remaining A tokens in position order, then the remaining B tokens in the order of
their descending second-step score (the official order, which sets the next block's A/B partition).
docs/methods.md records the remaining choices.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from .. import extension, ops
from ..registry import EncoderReducer, Option, Reduction, choice, flag, is_index_list, is_int, is_real, register
from ._scheduled import TRACE_SOURCE, capped, keep_schedule

# ----------------------------------------------------------------------------- pure tensor functions


def attention_received(probs: Tensor) -> Tensor:
    """How much attention each token receives, averaged over heads and queries: ``(B, N)``, never below the
    dtype's smallest normal number (``finfo.tiny``).

    A token whose every probability underflowed (logits ~100 below the row's maximum) receives exactly 0: the
    official code's ``1 / a`` is then inf, every pair score NaN or 0 and the matching arbitrary (here it even sent
    tokens to the class token's slot), and a fused slot of such tokens is 0 / 0. Counting it as receiving
    ``tiny`` keeps every score finite and every weight positive, and changes no value that was not below it.
    """
    return probs.mean(dim=(1, 2)).clamp_min(torch.finfo(probs.dtype).tiny)


@ops.without_autocast
def pair_scores(x: Tensor, received: Tensor, size: Tensor, tau: tuple[float, float, float],
                criteria: tuple[bool, bool, bool], num_prefix: int = 0) -> Tensor:
    """log W for every (A, B) pair of tokens, ``(B, |A|, |B|)``; A = even, B = odd positions of the whole
    sequence, prefix included, with pairs that touch a prefix token at -inf (``ops.protect_prefix``).

    Works in log space, where the exponents 1/tau become weights (same ranking, no underflow).
    """
    a, b = slice(0, None, 2), slice(1, None, 2)
    use_sim, use_info, use_size = criteria
    x = x.to(ops.accumulation_dtype(x.dtype))  # half-precision features: similarities in float32
    log_w = x.new_zeros(x.shape[0], (x.shape[1] + 1) // 2, x.shape[1] // 2)
    if use_sim:
        unit = x / x.norm(dim=-1, keepdim=True)
        cos = unit[:, a] @ unit[:, b].transpose(-1, -2)
        log_w = log_w + ((cos + 1) / 2).clamp_min(1e-12).log() / tau[0]
    for use, value, t in ((use_info, received, tau[1]), (use_size, size, tau[2])):
        if use:  # reciprocal over its max, per image: rare (low-attention, small) tokens attract
            inv = value.reciprocal()
            log_inv = (inv / inv.amax(dim=-1, keepdim=True)).log() / t
            log_w = log_w + log_inv[:, a, None] + log_inv[:, None, b]
    return ops.protect_prefix(log_w, num_prefix)


def bidirectional_assignment(scores: Tensor, remove: int, num_prefix: int = 0,
                             bidirectional: bool = True) -> tuple[Tensor, int]:
    """Slots for the ``n`` tokens after fusing ``remove`` of them; returns ``(dest (B, n), n_out)``.

    ``scores`` come from ``pair_scores`` (prefix pairs at -inf). First ``remove // 2`` A-tokens merge
    into their best B-token; then, reusing the same scores restricted to the A-tokens left, the rest
    of ``remove`` B-tokens (with whatever they absorbed) merge into their best remaining A-token.
    One-directional: all ``remove`` go A to B (ToMe's matching). Slots, the official code's order
    after the prefix: the prefix tokens in their original order, the remaining A-tokens in position
    order, then the remaining B-tokens in the order of their descending best score of the second
    step (position order when one-directional). That order is the next block's A/B partition.
    """
    batch, n_a, n_b = scores.shape
    device = scores.device
    in_a, in_b = ops.prefix_in_sets(num_prefix)
    r1 = remove // 2 if bidirectional else remove
    r2 = remove - r1
    best, best_b = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src1, kept_a = order[:, :r1], order[:, r1:].sort(dim=-1).values  # prefix A rows (-inf) first
    n_kept_a = n_a - in_a - r1
    slot_a = torch.empty(batch, n_a, dtype=torch.long, device=device)
    slot_b = torch.empty(batch, n_b, dtype=torch.long, device=device)
    slot_a[:, :in_a] = 2 * torch.arange(in_a, device=device)  # prefix tokens keep their positions
    slot_b[:, :in_b] = 2 * torch.arange(in_b, device=device) + 1
    # out-of-place scatters (here and below): under torch.func.vmap the indices are batched, the fresh slots not
    slot_a = slot_a.scatter(1, kept_a[:, in_a:], num_prefix + torch.arange(n_kept_a, device=device).expand(batch, -1))
    if bidirectional:
        rows = scores.gather(1, kept_a[..., None].expand(-1, -1, n_b)).transpose(1, 2)  # (B, |B|, |A'|)
        best2, best_a = rows.max(dim=-1)
        order2 = best2.argsort(dim=-1, descending=True)
        # prefix B rows score -inf: they are the last in_b of the order, whatever their tie order
        src2, kept_b = order2[:, :r2], order2[:, r2:n_b - in_b]
    else:
        kept_b = torch.arange(in_b, n_b, device=device).expand(batch, -1)
    kept_b_slots = num_prefix + n_kept_a + torch.arange(n_b - in_b - r2, device=device).expand(batch, -1)
    slot_b = slot_b.scatter(1, kept_b, kept_b_slots)
    if bidirectional:  # a B source lands on its A' token's slot (best_a indexes kept_a, prefix rows first)
        slot_b = slot_b.scatter(1, src2, num_prefix - in_a + best_a.gather(1, src2))
    slot_a = slot_a.scatter(1, src1, slot_b.gather(1, best_b.gather(1, src1)))  # A sources follow their B token
    return ops.interleave(slot_a, slot_b), n_a + n_b - remove


@ops.without_autocast
def merge_plan(x: Tensor, received: Tensor, size: Tensor, tau: tuple[float, float, float],
               criteria: tuple[bool, bool, bool], remove: int, num_prefix: int,
               bidirectional: bool) -> tuple[Tensor, int]:
    """``bidirectional_assignment(pair_scores(...), remove, ...)``: each token's slot ``(B, N)`` and the slot count.

    ``received`` and ``size`` must be positive and finite, as MCTF's are (``attention_received`` floors the attention
    at ``finfo.tiny``; sizes start at 1): a 0 or an infinity scores ordinary pairs -inf, tied with the pairs that
    touch a prefix token, which the matching ranks last (not checked here: a check would wait on the device).

    On CPU the extension's CPU build does it in one call (the default: some fifty small ops, about a third of
    a merging block at batch 1, become one; docs/performance.md), with bit-identical slots: it takes these steps
    in this order, with the same ATen calls where rounding could differ (norms, the cosine product, logarithms),
    and ranks by itself unless two tied scores sit where the order is read: then it calls the same argsort, so
    exact ties (a flat background's identical tokens) order as here.
    """
    if not x.is_cuda and received.dtype == torch.float32 and size.dtype == torch.float32:
        kernels = extension.for_tensor(x, floating=True, cpu_kernel_pays=True, in_compiled_graphs=True)
        if kernels is not None:
            return kernels.mctf_plan(x, received, size, list(tau), list(criteria), num_prefix, remove, bidirectional)
    scores = pair_scores(x, received, size, tau, criteria, num_prefix)
    return bidirectional_assignment(scores, remove, num_prefix, bidirectional)


def merge_attention(probs: Tensor, dest: Tensor, n_out: int, row_weight: Tensor) -> Tensor:
    """One-step-ahead attention for the merged tokens, ``(B, H, n_out, n_out)``.

    Key columns of merged tokens add up (what proportional attention gives a merged key), and
    query rows are averaged with ``row_weight`` (B, N), the fusion weights. Rows still sum to 1.
    """
    by_key = ops.assign_sum(probs.permute(0, 3, 1, 2), dest, n_out)  # (B, n_out keys, H, N queries)
    weighted = by_key * row_weight[:, None, None, :]
    by_query = ops.assign_sum(weighted.permute(0, 3, 2, 1), dest, n_out)  # (B, n_out q, H, n_out k)
    norm = ops.assign_sum(row_weight.unsqueeze(-1), dest, n_out)  # (B, n_out, 1)
    return (by_query / norm[..., None]).permute(0, 2, 1, 3)


def apply_attention(probs: Tensor, v: Tensor) -> Tensor:
    """``probs @ v`` in the map's dtype (float32 for half-precision v), returned in v's dtype."""
    return (probs @ v.to(probs.dtype)).to(v.dtype)


def attend_merged(probs: Tensor, dest: Tensor, n_out: int, row_weight: Tensor, v: Tensor) -> Tensor:
    """``merge_attention(probs, ...) @ v`` without building the merged map: ``(B, H, n_out, D)``.

    Summing key columns then multiplying by the merged values equals multiplying the original
    attention by each key's merged value; the query rows are then pooled with ``row_weight``. One
    matrix product of the original size and two cheap poolings, instead of two passes over
    ``(B, H, N, N)`` (three times faster on CPU, measured).
    """
    # each key's merged value: a row gather on the (B, n_out, H, D) view, which is how timm and transformers
    # lay v out (a quarter faster than torch.gather on (B, H, n_out, D) with an expanded index)
    per_key = v.transpose(1, 2)[torch.arange(v.shape[0], device=v.device)[:, None], dest].transpose(1, 2)
    # the map may be float32 for half-precision v (AttentionTaps.probabilities): applied in its dtype, cast back
    out = (probs @ per_key.to(probs.dtype)).transpose(1, 2)  # (B, N queries, H, D)
    batch, n, heads, dim = out.shape
    merged = ops.assign_mean(out.reshape(batch, n, heads * dim), row_weight[..., None], dest, n_out)
    return merged.view(batch, n_out, heads, dim).transpose(1, 2).to(v.dtype)


# ----------------------------------------------------------------------------- the method


def _is_mctf_r(r) -> bool:
    return (r is None or is_int(r) or (isinstance(r, float) and 0 < r < 1)
            or (isinstance(r, list) and all(is_int(v) for v in r)))


@register
class MCTF(EncoderReducer):
    name = "mctf"
    summary = ("MCTF (CVPR'24): similarity x informativeness x size scores, bidirectional matching, "
               "attention x size fusion, one-step-ahead attention")
    native_options = {
        "r": Option(None, "a non-negative int, a fraction in (0, 1) of the patch tokens left, a list of "
                          "non-negative ints (one per merging block), or None (keep decides)", _is_mctf_r),
        "layers": Option(None, "a non-empty, increasing list of block indices, or None (blocks 1 .. depth-1)",
                         lambda v: v is None or is_index_list(v)),
        "fast": flag(False),  # MCTF-Fast preset: r = 0.35 at blocks 3, 6, 9
        "tau": Option((1.0, 20.0, 40.0), "three positive numbers (tau_sim, tau_info, tau_size)",
                      lambda v: isinstance(v, (list, tuple)) and len(v) == 3
                      and all(is_real(t, 0.0, low_open=True) for t in v)),
        "similarity": flag(True),
        "informativeness": flag(True),
        "size": flag(True),
        "bidirectional": flag(True),
        "one_step_ahead": choice("approximate", "exact"),  # "exact": recompute attention after merging
        "prop_attn": flag(True),
        # never merge below this many patch tokens (the official code: 10 tokens, class token included)
        "min_tokens": Option(10, "a non-negative int (tokens, prefix included)", is_int),
        "trace_source": TRACE_SOURCE,
    }

    @property
    def proportional_attention(self) -> bool:
        return self.options["prop_attn"]

    def schedule(self, num_patches: int, depth: int, num_prefix: int = 0) -> tuple[int, ...]:
        o = self.options
        r = 0.35 if o["fast"] and o["r"] is None else o["r"]
        layers = o["layers"] or ([3, 6, 9] if o["fast"] else list(range(1, depth)))
        if max(layers, default=0) >= depth:
            chosen = "layers" if o["layers"] else "fast=True (blocks 3, 6, 9)"
            raise ValueError(f"mctf: {chosen}: {list(layers)} outside a model of {depth} blocks")
        driver = f"keep={self.keep}" if r is None else "fast=True" if o["r"] is None else f"r={r!r}"
        if not layers and (r or ops.final_patch_count(num_patches, self.keep) < num_patches):
            raise ValueError(f"mctf: {driver} needs a merging block, and a {depth}-block model has none "
                             "(MCTF merges at the input of blocks 1 .. depth-1): pass layers=[0]")
        # min_tokens counts every token, prefix included, as the official code's floor of 10 does
        floor = max(0, o["min_tokens"] - num_prefix)
        if r is None:
            target = ops.final_patch_count(num_patches, self.keep)
            if target < min(num_patches, floor):
                raise ValueError(f"mctf: keep={self.keep} leaves {target + num_prefix} tokens ({target} of "
                                 f"{num_patches} patch tokens), fewer than min_tokens={o['min_tokens']}: pass a "
                                 "larger keep or a smaller min_tokens")
            per_layer = keep_schedule(self, num_patches, len(layers))
        elif isinstance(r, list):
            if len(r) > len(layers):
                raise ValueError(f"mctf: r has {len(r)} entries for {len(layers)} merging blocks")
            per_layer = tuple(r) + (0,) * (len(layers) - len(r))
        else:
            per_layer = (r,) * len(layers)
        # the planned counts are the forward's: min_tokens and the 50% cap are applied here, not in reduce
        per_layer = capped(self, per_layer, num_patches, floor, what=driver)
        steps = [0] * depth
        for layer, step in zip(layers, per_layer):
            steps[layer] = step
        return tuple(steps)

    def before_attention(self, x, remove, taps, state):
        o, p = self.options, state.num_prefix
        probs = taps.probabilities(state)  # used before the next block needs the buffer
        if remove == 0:
            return Reduction(x, partial(apply_attention, probs))
        received = attention_received(probs)
        size = state.size
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1, dtype=ops.accumulation_dtype(x.dtype))
        dest, n_out = merge_plan(x, received, size[..., 0], tuple(o["tau"]),
                                 (o["similarity"], o["informativeness"], o["size"]), remove, p, o["bidirectional"])
        weight = received.unsqueeze(-1) * size  # fuse by attention x size
        x = state.fuse(x, weight, dest, n_out)
        if o["one_step_ahead"] == "exact":
            return Reduction(x)
        return Reduction(x, partial(attend_merged, probs, dest, n_out, weight[..., 0]))
