"""Half precision (issue 16, part 3): every method in fp16 and bf16 on CPU.

What holds: keep=1.0 is the stock model in that dtype, bit for bit; the output has the input's dtype; merges,
fusions and size-weighted means accumulate in float32 (one rounding at the end); token sizes are float32;
scores that choose tokens are computed in float32 from the half-precision values, so a reducing step in half
precision is the float32 step on the same values, rounded once; and a pruned half-precision model stays
close to the float32 model pruned alike, on the same weights.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import images, tiny_timm
from test_hf_patch import run, tiny_hf
from test_vlm import GREEDY, llava_batch, qwen_batch, tiny_llava, tiny_qwen

import tokenprune
from tokenprune import ops, testbed
from tokenprune.block import AttentionRequest, attend, explicit_probabilities
from tokenprune.registry import Needs, Stage, get_method
from tokenprune.state import AttentionTaps, ForwardState

HALF = [torch.float16, torch.bfloat16]
METHODS = ["tome", "mctf", "zero-tprune", "random"]
MERGING = ("tome", "mctf")  # the methods whose tokens get sizes
SEEDED = {"random": {"seed": 3}}


def _ids(dtype):
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------ the tensor ops accumulate in float32

def _plan_merging_everything_into_one(n: int) -> ops.MergePlan:
    """No prefix, n tokens: A tokens (even positions) all merge into B's first token (position 1)."""
    a, b = (n + 1) // 2, n // 2
    return ops.MergePlan(unmerged=torch.empty(1, 0, dtype=torch.long), src=torch.arange(a)[None],
                         dst=torch.zeros(1, a, dtype=torch.long)), b


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_merge_mean_accumulates_in_float32(dtype):
    """Tokens of sizes 300 and values near 1000: x * size is 3e5, beyond fp16 (65504); bf16 would round every
    partial sum to 8 bits. The merge is the float32 merge of the same values, rounded once."""
    n = 16
    plan, n_b = _plan_merging_everything_into_one(n)
    x = (1000 + torch.randn(1, n, 4, generator=torch.Generator().manual_seed(0))).to(dtype)
    size = torch.full((1, n, 1), 300.0)
    merged, merged_size = ops.merge_mean(x, size, plan, num_prefix=0)
    expected, expected_size = ops.merge_mean(x.float(), size, plan, num_prefix=0)
    assert merged.dtype == dtype and merged_size.dtype == torch.float32
    assert torch.isfinite(merged).all()
    assert torch.equal(merged, expected.to(dtype))
    assert merged_size[0, 0, 0] == 300 * (n // 2 + 1)  # 2700 tokens in one: exact in float32, not in bf16
    # unit sizes (size=None) are float32 too
    assert ops.merge_mean(x, None, plan, num_prefix=0)[1].dtype == torch.float32


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_assign_mean_and_size_weighted_mean_accumulate_in_float32(dtype):
    n = 40
    x = (1000 + torch.randn(2, n, 4, generator=torch.Generator().manual_seed(1))).to(dtype)
    weight = torch.rand(2, n, 1, generator=torch.Generator().manual_seed(2)) * 100 + 50  # float32, up to 150
    dest = torch.zeros(2, n, dtype=torch.long)
    dest[:, n // 2:] = 1
    fused = ops.assign_mean(x, weight, dest, 2)
    assert fused.dtype == dtype and torch.isfinite(fused).all()
    assert torch.equal(fused, ops.assign_mean(x.float(), weight, dest, 2).to(dtype))
    # half-precision weights are summed in float32 too
    half_weight = weight.to(dtype)
    assert torch.equal(ops.assign_mean(x, half_weight, dest, 2),
                       ops.assign_mean(x.float(), half_weight.float(), dest, 2).to(dtype))
    mean = ops.size_weighted_mean(x, weight)
    assert mean.dtype == dtype and torch.isfinite(mean).all()
    assert torch.equal(mean, ops.size_weighted_mean(x.float(), weight).to(dtype))


def test_float32_and_float64_keep_their_dtype():
    for dtype in (torch.float32, torch.float64):
        assert ops.accumulation_dtype(dtype) == dtype
    plan, _ = _plan_merging_everything_into_one(8)
    x = torch.randn(1, 8, 3, dtype=torch.float64)
    merged, size = ops.merge_mean(x, None, plan, 0)
    assert merged.dtype == size.dtype == torch.float64


# ------------------------------------------------------------------ a reducing step: the float32 step, rounded once

def _step(method: str, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor):
    """One reducing block of ``method`` on these values (the first block that removes tokens); returns the
    reduced tokens, the sizes after it and, for MCTF, its attention core applied to ``v``."""
    reducer = get_method(method)(keep=0.5, trace_source=True, **SEEDED.get(method, {}))
    depth, prefix = 4, 1
    state = ForwardState(reducer=reducer, num_prefix=prefix, schedule=reducer.schedule(x.shape[1] - prefix, depth,
                                                                                        prefix))
    state.size = size
    state.start_source_tracking(x)
    remove = 0
    while not remove:
        remove = state.enter_block(x)
    taps = AttentionTaps(q=q, k=k, scale=q.shape[-1] ** -0.5, bias=state.attention_bias())
    core = None
    if reducer.stage is Stage.BEFORE_ATTENTION:
        reduced = reducer.before_attention(x, remove, taps, state)
        core = reduced.attention_core(v) if reduced.attention_core is not None else None
    else:
        reduced = reducer.after_attention(x, remove, taps, state)
    return reduced.tokens, state.size, state.source, core


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("method", METHODS)
def test_a_half_precision_step_is_the_float32_step_rounded_once(method, dtype):
    """Same half-precision values in, half and float32 arithmetic: the same tokens are chosen (scores in
    float32), the same sizes (float32), and the reduced tokens are the float32 ones rounded once."""
    g = torch.Generator().manual_seed(4)
    batch, n, heads, dim = 3, 65, 3, 16
    x = torch.randn(batch, n, heads * dim, generator=g).to(dtype)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g).to(dtype) for _ in range(3))
    size = torch.randint(1, 400, (batch, n, 1), generator=g).float()  # an earlier merge: sizes past bf16's 256
    size[:, 0] = 1
    half = _step(method, x, q, k, v, size)
    full = _step(method, x.float(), q.float(), k.float(), v.float(), size)
    tokens, sizes, source, core = half
    assert tokens.dtype == dtype and tokens.shape == full[0].shape
    assert torch.equal(source.bool(), full[2].bool())  # the same tokens went where they went
    assert sizes.dtype == torch.float32 and torch.equal(sizes, full[1])
    assert torch.equal(tokens, full[0].to(dtype))
    if core is not None:
        assert core.dtype == dtype and torch.equal(core, full[3].to(dtype))


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_explicit_probabilities_reach_the_method_unrounded(dtype):
    """Zero-TPrune's attention map: applied in the query's dtype (as eager attention), handed to the method in
    float32."""
    attention = tiny_timm().blocks[0].attn.to(dtype)
    from tokenprune.patches.timm_vit import TimmAttention

    h = torch.randn(2, 65, 48).to(dtype)
    request = AttentionRequest(needs=Needs.PROBABILITIES)
    out, _ = attend(TimmAttention(attention), h, None, request)
    assert out.dtype == dtype
    assert request.taps.probs.dtype == torch.float32
    torch.testing.assert_close(request.taps.probs.sum(-1), torch.ones(2, 3, 65), atol=1e-6, rtol=0)
    assert request.taps.head_mean_keys().dtype == torch.float32
    # the logits too: the float32 map of the half-precision q and k (not one of logits rounded to the half dtype)
    q, k = request.taps.q, request.taps.k
    expected = (q.float() @ k.float().transpose(-2, -1) * request.taps.scale).softmax(-1)
    torch.testing.assert_close(request.taps.probs, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kernels", ["auto", "off"])
def test_under_cpu_autocast_every_method_scores_in_float32_and_runs_through_the_kernels(monkeypatch, kernels):
    """Under ``torch.autocast("cpu", bfloat16)`` (``tokenprune eval --amp``): the scores that choose tokens are the
    float32 scores of the same tokens, q and k (autocast would run their products in bf16, and hand the CPU kernels
    bf16 products where they read float32: MCTF and Zero-TPrune failed there), and every method runs, the kernels
    and the PyTorch ops alike."""
    monkeypatch.setenv("TOKENPRUNE_EXT", kernels)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 65, 24, generator=g)  # enough tokens that bf16 products change every matching below
    q, k = torch.randn(2, 3, 65, 8, generator=g), torch.randn(2, 3, 65, 8, generator=g)
    received, size = torch.rand(2, 65, generator=g) + 0.1, torch.ones(2, 65)
    attn = (q @ k.transpose(-2, -1)).softmax(-1)
    from tokenprune.methods import mctf, zero_tprune
    scorings = {
        "tome": lambda: ops.bipartite_merge(k, x, None, 16, 1),
        "tome plan": lambda: tuple(ops.bipartite_soft_matching(ops.head_mean(k), 16, 1).__dict__.values()),
        "mctf scores": lambda: mctf.pair_scores(x, received, size, (1.0, 20.0, 40.0), (True, True, True), 1),
        "mctf plan": lambda: mctf.merge_plan(x, received, size, (1.0, 20.0, 40.0), (True, True, True), 20, 1, True),
        "zero-tprune": lambda: zero_tprune.s_stage_keep(attn, k, 1, 16, 0, True),
        "map": lambda: AttentionTaps(q=q, k=k, scale=0.35).probabilities(),
        "explicit map": lambda: explicit_probabilities(q, k, 0.35, None),
    }
    for name, score in scorings.items():
        expected = score()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = score()
        pairs = zip(got, expected) if isinstance(got, tuple) else [(got, expected)]
        assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in pairs), name
    # the wrapped functions keep their names and docstrings (help(), the docs)
    assert mctf.merge_plan.__name__ == "merge_plan" and "bit-identical slots" in mctf.merge_plan.__doc__
    for method in METHODS:
        model = tokenprune.apply(tiny_timm(), method, keep=0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images(2))
        assert out.isfinite().all() and tokenprune.last_forward(model).output_tokens < 65, method


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_a_map_from_half_precision_taps_is_float32_whatever_the_bias_dtype(dtype):
    """``AttentionTaps.probabilities`` (MCTF, or any method asking for a map from q and k) with a bias in the
    query's dtype, as the attention kernel got it: the float32 map of the same values, in the scratch buffer
    and without it."""
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 3, 9, 8, generator=g).to(dtype) for _ in range(2))
    bias = torch.rand(2, 1, 1, 9, generator=g).log().to(dtype)
    state = ForwardState(reducer=get_method("mctf")(keep=0.5), num_prefix=1)
    expected = AttentionTaps(q=q.float(), k=k.float(), scale=0.35, bias=bias.float()).probabilities()
    for s in (None, state):
        got = AttentionTaps(q=q, k=k, scale=0.35, bias=bias).probabilities(s)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ whole models, every method, both dtypes

# every method on a class-token ViT; the pools that take sizes ('map': the log-size bias, 'avg': the
# size-weighted mean) with a merging method
TIMM_CASES = [("vit_base_patch16_224", m) for m in METHODS] + [("vit_base_patch16_siglip_224", "tome"),
                                                               ("vit_base_patch16_siglip_gap_224", "mctf")]


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("name, method", TIMM_CASES)
def test_timm_every_method_in_half_precision(name, method, dtype):
    """keep=1.0 is the stock model in that dtype; pruned: the input's dtype, float32 sizes, the float32
    model's token counts."""
    stock, x = tiny_timm(name).to(dtype), images().to(dtype)
    with torch.inference_mode():
        expected = stock(x)
        model = tokenprune.apply(copy.deepcopy(stock), method, keep=1.0)
        assert torch.equal(model(x), expected)
        tokenprune.apply(model, method, keep=0.3, **SEEDED.get(method, {}))
        out = model(x)
        full = tokenprune.apply(tiny_timm(name), method, keep=0.3, **SEEDED.get(method, {}))
        full(x.float())
    assert out.dtype == dtype and torch.isfinite(out).all()
    report = tokenprune.last_forward(model)
    assert report.token_counts == tokenprune.last_forward(full).token_counts
    assert (report.size is not None) == (method in MERGING)
    if report.size is not None:
        assert report.size.dtype == torch.float32
        assert torch.equal(report.size[:, report.num_prefix_tokens:].sum(dim=1), torch.full((2, 1), 64.0))


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["vit", "siglip"])
def test_hf_every_method_in_half_precision(family, method, dtype):
    stock, x = tiny_hf(family).to(dtype), images().to(dtype)
    expected = run(stock, x)
    model = tokenprune.apply(copy.deepcopy(stock), method, keep=1.0)
    assert torch.equal(run(model, x), expected)
    tokenprune.apply(model, method, keep=0.3, **SEEDED.get(method, {}))
    out = run(model, x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    full = tokenprune.apply(tiny_hf(family), method, keep=0.3, **SEEDED.get(method, {}))
    run(full, x.float())
    report = tokenprune.last_forward(model)
    assert report.token_counts == tokenprune.last_forward(full).token_counts
    if method in MERGING:
        assert report.size.dtype == torch.float32


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("method", METHODS)
def test_hf_pruned_half_precision_is_close_to_float32(method, dtype):
    """The class-token logits of a pruned half-precision HF ViT against the float32 model pruned alike."""
    model = tiny_hf("vit")
    x = images(4)
    full = run(tokenprune.apply(copy.deepcopy(model), method, keep=0.5, **SEEDED.get(method, {})), x)
    half = run(tokenprune.apply(model.to(dtype), method, keep=0.5, **SEEDED.get(method, {})), x.to(dtype))
    assert ((half.float() - full).norm() / full.norm()) < 0.05


@pytest.fixture(scope="module")
def testbed_batch():
    images_, labels = testbed.load_fashion_mnist("test")
    model = timm.create_model("vit_testbed_fmnist", pretrained=True).eval()
    return model, testbed.normalize_images(images_[:24])


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("method", METHODS)
def test_pruned_half_precision_testbed_agrees_with_float32(testbed_batch, method, dtype):
    """The trained testbed (12 blocks, 196 patches) pruned to half its tokens in half precision against the
    same weights pruned in float32: logits within a few percent, the same top-1 on (nearly) every image.
    Measured (256 images, keep 0.5): relative logit error 0.005-0.029, top-1 agreement 99-100%."""
    model, x = testbed_batch
    options = dict(keep=0.5, trace_source=True, **SEEDED.get(method, {}))
    with torch.inference_mode():
        full = tokenprune.apply(copy.deepcopy(model), method, **options)
        expected = full(x)
        half = tokenprune.apply(copy.deepcopy(model).to(dtype), method, **options)
        got = half(x.to(dtype))
    assert got.dtype == dtype
    assert ((got.float() - expected).norm() / expected.norm()) < 0.06
    assert int((got.argmax(-1) == expected.argmax(-1)).sum()) >= len(x) - 1
    same = (tokenprune.last_forward(half).source.bool() == tokenprune.last_forward(full).source.bool()).all(dim=(1, 2))
    if method == "random":  # nothing to score: exactly the same tokens
        assert same.all()
    if method == "tome" and dtype == torch.float16:
        # Where ToMe's scores are well separated, fp16 merges what float32 merges: its similarities come from
        # float32 head-mean keys. (Keys averaged and compared in fp16: 3 of 256 images kept the float32 choice;
        # with float32 scores, 179 of 256.)
        assert int(same.sum()) >= len(x) // 2


# ------------------------------------------------------------------ VLMs: HiPrune; an encoder method on LLaVA

def _half_inputs(inputs: dict, dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("build, batch, method", [(tiny_llava, llava_batch, "hiprune"),
                                                  (tiny_llava, llava_batch, "tome"),
                                                  (tiny_qwen, qwen_batch, "hiprune")],
                         ids=["llava-hiprune", "llava-tome", "qwen-hiprune"])
def test_vlm_in_half_precision(build, batch, method, dtype):
    full, inputs = build(), batch()
    model, half_inputs = copy.deepcopy(full).to(dtype), _half_inputs(inputs, dtype)
    options = {"object_layer": 2} if method == "hiprune" else {}
    with torch.no_grad():
        expected, logits = model.generate(**half_inputs, **GREEDY), model(**half_inputs).logits
        tokenprune.apply(model, method, keep=1.0, **options)
        assert torch.equal(model.generate(**half_inputs, **GREEDY), expected)
        assert torch.equal(model(**half_inputs).logits, logits)
        tokenprune.apply(model, method, keep=0.25, **options)
        out = model(**half_inputs).logits
        tokenprune.apply(full, method, keep=0.25, **options)
        full(**inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    report, reference = tokenprune.last_forward(model), tokenprune.last_forward(full)
    assert report.visual_tokens == reference.visual_tokens
    for kept, kept_full in zip(report.kept, reference.kept):  # a near tie may flip a token or two
        assert (kept == kept_full).float().mean() >= 0.9
