"""Zero-TPrune (Wang, Dedhia, Jha; CVPR 2024): attention-graph importance and similarity pruning.

At each pruning layer, from the attention of the block being run (its probabilities computed
from the block's own q and k, at that layer only):

1. I'-stage: one round of weighted-PageRank voting ranks the patch tokens (prunes nothing).
2. S-stage: the less important half (by I') are candidates; each finds its most similar token in
   the more important half (cosine of head-mean keys); the most redundant candidates are dropped.
3. I-stage: weighted PageRank (s <- A^T s, per head) on the attention among the survivors,
   aggregated over heads by root-mean-square (EIR) over the heads whose score variance is in range
   (VHF); the least important patch tokens are dropped.

Tokens are dropped, never merged. Reduction happens between the block's attention and its MLP:
the MLP acts on each token alone, so this drops exactly the tokens a pruning layer after the block
would, without running the MLP on them. Every choice the paper leaves open is an option here;
docs/methods.md records what we chose and the measurements behind it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import extension, ops
from ..registry import EncoderReducer, Needs, Option, Reduction, choice, flag, is_index_list, is_int, is_real, register
from ._scheduled import SEED, TRACE_SOURCE
from .random_drop import drop_at_random

# ----------------------------------------------------------------------------- pure tensor functions


def initial_scores(batch: int, heads: int, n: int, emphasize: int | None, device, dtype) -> Tensor:
    """Uniform start, with token ``emphasize`` (the class token) given sqrt(n) times the score; sums to 1."""
    s = torch.ones(batch, heads, n, device=device, dtype=dtype)
    if emphasize is not None:
        s[..., emphasize] = n ** 0.5
    return s / s.sum(dim=-1, keepdim=True)


@ops.without_autocast
def weighted_pagerank(attn: Tensor, start: Tensor, iterations: int | None = None, tol: float | None = None,
                      alive: Tensor | None = None, renormalize: bool = True, max_iterations: int = 200) -> Tensor:
    """Each token votes for the tokens it attends to, weighted by its own score: ``s <- A^T s``.

    ``attn`` is row-stochastic ``(..., N, N)`` and ``start`` ``(..., N)``; every iterate sums to 1.
    Runs ``iterations`` rounds, or, with ``tol``, each graph (``attn[..., :, :]``: a head of an image) until its
    largest change is below ``tol``. ``alive`` (bool,
    broadcastable to ``start``) restricts the graph to those tokens, exactly as if the others' rows
    and columns were cut out (and, with ``renormalize``, each row re-normalised over the survivors),
    without copying the sub-matrix; the others score 0.
    """
    mask = None if alive is None else alive.to(attn.dtype)
    row_scale = None
    if mask is not None:
        start = start * mask
        if renormalize:  # 1 / (attention each row keeps on the survivors)
            kept_mass = (attn @ mask.expand_as(start).unsqueeze(-1)).squeeze(-1)
            # a row whose every probability on the survivors underflowed to 0 casts no vote (1 / 0 made its
            # 0 x inf a NaN, and every score of the head with it)
            row_scale = torch.where(kept_mass > 0, 1.0 / kept_mass, torch.zeros_like(kept_mass))
    s = start / start.sum(dim=-1, keepdim=True)
    # With a mask and no renormalisation, mass leaks to the cut tokens at every round: rescale
    # then (the ranking is scale-free; only the stopping test and the result need unit sum).
    leaks = mask is not None and not renormalize
    # With ``tol``, each graph (one head of one image) stops on its own once it has converged: a test over the whole
    # batch made an image's scores, and its kept tokens, depend on the other images in its batch.
    done = None if tol is None else torch.zeros(s.shape[:-1], dtype=torch.bool, device=s.device)
    for _ in range(iterations if iterations is not None else max_iterations):
        votes = s if row_scale is None else s * row_scale
        nxt = (votes.unsqueeze(-2) @ attn).squeeze(-2)  # row vector times A reads A contiguously
        if mask is not None:
            nxt = nxt * mask
        if leaks:  # (a graph whose every vote leaked stays at 0, not 0 / 0)
            nxt = nxt / nxt.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(nxt.dtype).tiny)
        if done is not None:
            converged = (nxt - s).abs().amax(dim=-1) < tol
            nxt = torch.where(done.unsqueeze(-1), s, nxt)  # a graph that converged earlier keeps its scores
            done = done | converged
            if bool(done.all()):
                return nxt
        s = nxt
    return s


def aggregate_heads(scores: Tensor, rms: bool = True, variance_range: tuple[float, float] | None = None,
                    alive: Tensor | None = None) -> Tensor:
    """Per-token importance from per-head scores ``(B, H, n)``.

    Scores are rescaled to mean 1 per head (so 0 variance = uniform, n-1 = one-hot, whatever
    n is). With ``variance_range`` (VHF), only heads whose variance lies in it take part (all
    heads where none does). ``rms`` (EIR) aggregates by root-mean-square, else by the mean.
    ``alive`` (B, n) limits means and variances to those tokens; the others get -inf.
    """
    mask = torch.ones_like(scores[:, 0]) if alive is None else alive.to(scores.dtype)
    mask = mask.unsqueeze(1)
    count = mask.sum(dim=-1, keepdim=True)
    # a head whose scores are all 0 (every vote lost) stays at 0, not 0 / 0
    head_mean = (scores * mask).sum(dim=-1, keepdim=True) / count
    scaled = scores * mask / head_mean.clamp_min(torch.finfo(scores.dtype).tiny)
    weight = torch.ones(scaled.shape[:2], device=scores.device, dtype=scores.dtype)
    if variance_range is not None:
        var = ((scaled - 1).square() * mask).sum(dim=-1) / count.squeeze(-1)
        inside = (var >= variance_range[0]) & (var <= variance_range[1])
        inside |= ~inside.any(dim=-1, keepdim=True)  # never filter out every head
        weight = inside.to(scores.dtype)
    weight = (weight / weight.sum(dim=-1, keepdim=True)).unsqueeze(-1)
    importance = (weight * scaled.square()).sum(dim=1).sqrt() if rms else (weight * scaled).sum(dim=1)
    return importance if alive is None else importance.masked_fill(~alive, float("-inf"))


@ops.without_autocast
def redundant_tokens(importance: Tensor, metric: Tensor, remove: int) -> Tensor:
    """S-stage: indices ``(B, remove)`` of the most redundant patch tokens, ascending.

    The less important half (by ``importance``, unimportant first; ties: the lower index first) are
    candidates; each is scored by its cosine similarity to the most similar token of the more important
    half. Ties in similarity drop the less important candidate.
    """
    n = importance.shape[-1]
    order = importance.argsort(dim=-1, stable=True)
    candidates, anchors = order[:, : n // 2], order[:, n // 2:]
    batch = torch.arange(metric.shape[0], device=metric.device)[:, None]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    similarity = (unit[batch, candidates] @ unit[batch, anchors].transpose(-1, -2)).amax(dim=-1)
    return candidates.gather(1, ops.top_k_ascending(similarity, remove)).sort(dim=-1).values


@ops.without_autocast
def s_stage_keep(attn: Tensor, keys: Tensor, num_prefix: int, remove: int, emphasize: int | None,
                 rms: bool) -> Tensor:
    """The I'- and S-stage of a pruning layer: the patch tokens ``(B, n - remove)``, ascending, left once the
    ``remove`` most redundant (``redundant_tokens``) are dropped, ranked by one weighted-PageRank round from
    ``initial_scores`` (``emphasize``: the class token, or None) aggregated over heads (``aggregate_heads``, by
    root-mean-square with ``rms``, else the mean).

    ``attn`` (B, H, N, N) are the attention probabilities and ``keys`` (B, H, N, D) the keys the attention used
    (their head mean is the similarity metric). On CPU the extension's CPU build does it in one call for float32
    maps (the default: some twenty small ops, most of what a pruning layer costs at batch 1, become one;
    docs/performance.md); its sums run in another order, so a ranking can differ where two scores agree to
    float rounding.
    """
    batch, heads, total = attn.shape[:3]
    n = total - num_prefix
    # the kernel takes float32 maps and keys in its dtypes (a float64 model's map is float64 too; this is for
    # a caller that mixes them)
    if attn.dtype == torch.float32 and keys.dtype in extension.KERNEL_DTYPES and not attn.is_cuda:
        kernels = extension.for_tensor(attn, cpu_kernel_pays=True, in_compiled_graphs=True)
        if kernels is not None:
            return kernels.similarity_prune(attn, keys, num_prefix, remove, -1 if emphasize is None else emphasize,
                                            rms)
    start = initial_scores(batch, heads, total, emphasize, attn.device, attn.dtype)
    rough = aggregate_heads(weighted_pagerank(attn, start, iterations=1)[..., num_prefix:], rms=rms)
    dropped = redundant_tokens(rough, ops.head_mean(keys)[:, num_prefix:], remove)
    # the survivors, ascending: the dropped positions marked past the end and sorted away (a fixed-shape op, where
    # a boolean mask's indexing would have a data-dependent shape and break a torch.compile graph)
    marked = torch.arange(n, device=attn.device).expand(batch, -1).scatter(1, dropped, n)
    return marked.sort(dim=-1).values[:, : n - remove]


# ----------------------------------------------------------------------------- the method


@register
class ZeroTPrune(EncoderReducer):
    name = "zero-tprune"
    summary = ("Zero-TPrune (CVPR'24): weighted-PageRank importance (EIR, VHF) and similarity pruning, "
               "I'->S->I at a few pruning layers")
    native_options = {
        # block indices that prune; None: depth/4 - 1, depth/2 - 1, 3*depth/4 - 1 (2, 5, 8 of 12)
        "layers": Option(None, "a non-empty, increasing list of block indices, or None",
                         lambda v: v is None or is_index_list(v)),
        # fraction of patch tokens each pruning layer keeps (overrides keep)
        "keep_rates": Option(None, "a non-empty list of fractions in (0, 1], one per pruning layer, or None",
                             lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) > 0
                                                     and all(is_real(f, 0.0, 1.0, low_open=True) for f in v))),
        # WPR rounds: int, per-layer list, or None (paper's rule by depth)
        "iterations": Option(None, "a positive int, a list of them (one per pruning layer), or None",
                             lambda v: v is None or is_int(v, 1) or (isinstance(v, (list, tuple)) and len(v) > 0
                                                                     and all(is_int(i, 1) for i in v))),
        # stop WPR once no score moves more than this (overrides iterations)
        "tol": Option(None, "a positive number or None", lambda v: v is None or is_real(v, 0.0, low_open=True)),
        "uniform_start": flag(False),  # Zero-TPrune-uni: no class-token emphasis
        "eir": flag(True),  # root-mean-square over heads (else mean)
        "vhf": flag(True),  # variance-based head filter
        # on scores rescaled to mean 1 per head
        "vhf_range": Option((0.01, 0.7), "(low, high), numbers with 0 <= low < high",
                            lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and is_real(v[0], 0.0)
                            and is_real(v[1]) and v[0] < v[1]),
        "s_stage": flag(True),
        # share of each layer's removal done by the S-stage (the rest: I-stage)
        "s_fraction": Option(1.0, "a number in [0, 1]", lambda v: is_real(v, 0.0, 1.0)),
        "renormalize": flag(True),  # row-renormalise the survivors' attention before the I-stage
        "importance": choice("wpr", "random"),  # "random": the ablation's random-drop floor
        "seed": SEED,
        "trace_source": TRACE_SOURCE,
    }
    needs = Needs.PROBABILITIES

    def validate(self) -> None:
        o = self.options
        for key in ("keep_rates", "iterations"):
            if isinstance(o[key], (list, tuple)) and o["layers"] is not None and len(o[key]) != len(o["layers"]):
                raise ValueError(f"zero-tprune: {key} needs one entry per pruning layer: {len(o[key])} for "
                                 f"layers {list(o['layers'])}")

    def pruning_layers(self, depth: int) -> list[int]:
        layers = self.options["layers"] or [max(0, depth // 4 - 1), max(0, depth // 2 - 1), max(0, 3 * depth // 4 - 1)]
        if max(layers) >= depth:
            raise ValueError(f"zero-tprune: layers {list(layers)} outside a model of {depth} blocks")
        layers = sorted(set(layers))  # the default collapses on shallow models
        for key in ("keep_rates", "iterations"):
            if isinstance(self.options[key], (list, tuple)) and len(self.options[key]) != len(layers):
                raise ValueError(f"zero-tprune: {key} has {len(self.options[key])} entries for {len(layers)} pruning "
                                 f"layers {layers}")
        return layers

    def schedule(self, num_patches: int, depth: int, num_prefix: int = 0) -> tuple[int, ...]:
        layers = self.pruning_layers(depth)
        rates = self.options["keep_rates"]
        counts, n = [], num_patches
        if rates is not None:
            for rate in rates:
                n = max(1, round(n * rate))
                counts.append(n)
        else:  # a geometric schedule that ends exactly at the requested count
            final = ops.final_patch_count(num_patches, self.keep)
            for i in range(1, len(layers) + 1):
                counts.append(max(final, round(num_patches * (final / num_patches) ** (i / len(layers)))))
        steps = [0] * depth
        previous = num_patches
        for layer, count in zip(layers, counts):
            steps[layer] = previous - count
            previous = count
        return tuple(steps)

    def iterations_at(self, layer: int, depth: int, index: int) -> int | None:
        its = self.options["iterations"]
        if self.options["tol"] is not None:
            return None
        if isinstance(its, (list, tuple)):
            return its[index]
        if its is not None:
            return its
        # The paper's rule: many rounds early (scores still near uniform), one in the last three blocks.
        return 30 if layer < 3 else 1 if layer >= depth - 3 else 5

    def after_attention(self, x, remove, taps, state):
        o, p = self.options, state.num_prefix
        n = x.shape[1] - p
        if o["importance"] == "random":
            return Reduction(drop_at_random(x, remove, o["seed"], state))

        attn = taps.probabilities()  # (B, H, N, N)
        batch, heads, total = attn.shape[:3]
        # the class token's emphasis; none without one (a timm model of register tokens only: no register is it)
        cls = 0 if p > 0 and state.class_token and not o["uniform_start"] else None
        variance_range = tuple(o["vhf_range"]) if o["vhf"] else None
        # the S-stage drops from the less important half only; whatever exceeds it goes to the I-stage
        s_remove = min(round(remove * o["s_fraction"]), n // 2) if o["s_stage"] else 0
        alive = None  # patch tokens the S-stage leaves to the I-stage (None: all)
        if s_remove:
            kept = s_stage_keep(attn, taps.k, p, s_remove, cls, rms=o["eir"])
            if s_remove == remove:  # the S-stage did all the pruning (the default): the I-stage has nothing to drop
                return Reduction(state.keep(x, kept))
            alive = torch.zeros(batch, n, dtype=torch.bool, device=x.device).scatter_(1, kept, True)
        graph_alive = None if alive is None else torch.cat([alive.new_ones(batch, p), alive], dim=1)[:, None]
        depth = len(state.schedule)
        index = self.pruning_layers(depth).index(state.layer)
        start = initial_scores(batch, heads, total, cls, x.device, attn.dtype)
        scores = weighted_pagerank(attn, start, iterations=self.iterations_at(state.layer, depth, index),
                                   tol=o["tol"], alive=graph_alive, renormalize=o["renormalize"])
        importance = aggregate_heads(scores[..., p:], rms=o["eir"], variance_range=variance_range, alive=alive)
        kept = ops.top_k_ascending(importance, n - remove)
        return Reduction(state.keep(x, kept))
