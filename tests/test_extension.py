"""The compiled extension (cuda/csrc) against the PyTorch reference in tokenprune.ops, and its dispatch.

The CPU build is compiled here (about 30 s, cached by torch afterwards) and must equal the reference over
random shapes: B = 1 and B > 1, odd token counts, prefix counts 0/1/2/5, fp32/fp16/bf16; gathers exactly,
merges and attention within fp32-accumulation error. The CUDA build is compiled with nvcc where nvcc
exists (no GPU needed); its CPU path is held to the same reference, and its CUDA path runs only on a GPU
(``-m cuda``).
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import warnings
from unittest import mock

import pytest
import timm
import torch
from conftest import images, tiny_timm
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import tokenprune
from tokenprune import extension, ops

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PREFIXES = (0, 1, 2, 5)


@pytest.fixture(scope="module")
def cpu_build():
    return extension.load(cuda=False)


@pytest.fixture(scope="module")
def cuda_build():
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: the CUDA build cannot be compiled here")
    return extension.load(cuda=True)


def builds(request) -> list:
    """The extension modules to hold to the reference: the CPU build, and the CUDA build's CPU path."""
    found = [request.getfixturevalue("cpu_build")]
    if shutil.which("nvcc") is not None:
        found.append(request.getfixturevalue("cuda_build"))
    return found


def fp32_tolerance(dtype: torch.dtype) -> dict:
    """A result summed in fp32 and rounded once to ``dtype``: one rounding of that dtype, plus fp32 noise."""
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
            torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}[dtype]


@st.composite
def token_batches(draw):
    batch = draw(st.sampled_from((1, 3)))
    prefix = draw(st.sampled_from(PREFIXES))
    patches = draw(st.integers(1, 21))  # odd and even
    channels = draw(st.integers(1, 9))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    x = torch.randn(batch, prefix + patches, channels, generator=g).to(dtype)
    return x, prefix, g


def test_the_cpu_build_is_not_the_cuda_build(cpu_build):
    assert cpu_build.with_cuda is False


def test_is_built_finds_a_build_in_torchs_cache_and_says_nothing(cpu_build, capsys):
    assert extension._is_built(extension.build_name(cuda=False))
    assert not extension._is_built("tokenprune_no_such_build")
    assert capsys.readouterr().out == ""


def test_each_torch_version_has_its_own_build(monkeypatch):
    """torch's cache keys a build by sources and flags only: the name must tell two torch versions apart."""
    monkeypatch.setattr(torch, "__version__", "2.14.1+cpu")
    assert extension.build_name(cuda=False) == "tokenprune_ext_cpu_torch2_14_1_cpu"
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    assert extension.build_name(cuda=True) == "tokenprune_ext_cuda_torch2_13_0"


@settings(max_examples=40, deadline=None, derandomize=True)
@given(token_batches(), st.data())
def test_gather_equals_keep_tokens_exactly(request, data, draw):
    x, prefix, g = data
    patches = x.shape[1] - prefix
    kept = draw.draw(st.integers(0, patches))
    keep = torch.rand(x.shape[0], patches, generator=g).argsort(-1)[:, :kept]  # any order, not only ascending
    # written out here: ops.keep_tokens itself runs the CPU build by default
    expected = torch.stack([torch.cat([sample[:prefix], sample[prefix:][kept]]) for sample, kept in zip(x, keep)])
    for build in builds(request):
        out = build.gather_kept(x, keep, prefix)
        assert out.dtype == x.dtype
        assert torch.equal(out, expected)


def slow_top_k_ascending(row: list[float], k: int, largest: bool) -> list[int]:
    """The definition: by value (NaN above every number), ties to the lower index; the k first, ascending."""
    def rank(i):
        v = row[i]
        if math.isnan(v):
            return (0 if largest else 1, 0.0, i)
        return (1 if largest else 0, -v if largest else v, i)
    return sorted(sorted(range(len(row)), key=rank)[:k])


@settings(max_examples=80, deadline=None, derandomize=True)
@given(st.integers(1, 3), st.integers(1, 40), st.booleans(), st.sampled_from(DTYPES + (torch.float64,)), st.data())
def test_top_k_ascending_ranks_by_value_then_index_in_every_path(request, batch, n, largest, dtype, draw):
    """The CPU build, and ops.top_k_ascending through the PyTorch ops and by default, give the definition's
    indices, ties (few distinct values), infinities and NaN included."""
    values = st.sampled_from((0.0, 1.0, -1.0, 0.5, float("inf"), float("-inf"), float("nan")))
    scores = torch.tensor(draw.draw(st.lists(st.lists(values, min_size=n, max_size=n), min_size=batch,
                                             max_size=batch))).to(dtype)
    k = draw.draw(st.integers(0, n))
    expected = torch.tensor([slow_top_k_ascending(row, k, largest) for row in scores.double().tolist()],
                            dtype=torch.long).view(batch, k)
    for build in builds(request):
        assert torch.equal(build.top_k_ascending(scores, k, largest), expected)
    for setting in ("off", "auto"):
        with mock.patch.dict(os.environ, {extension.ENV: setting}):
            assert torch.equal(ops.top_k_ascending(scores, k, largest), expected), setting


def test_top_k_ascending_is_one_kernel_call_on_cpu_by_default(monkeypatch, cpu_build):
    counting = Counting(cpu_build)
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: counting)
    monkeypatch.setenv(extension.ENV, "auto")
    scores = torch.tensor([[3.0, 1.0, 2.0, 5.0]])
    assert ops.top_k_ascending(scores, 2).tolist() == [[0, 3]]
    assert ops.top_k_ascending(scores, 2, largest=False).tolist() == [[1, 2]]
    assert counting.calls == {"top_k_ascending": 2}
    assert ops.top_k_ascending(torch.tensor([[3, 1, 2]]), 1).tolist() == [[0]]  # integers: the PyTorch ops
    assert counting.calls == {"top_k_ascending": 2}


def test_assign_mean_takes_the_kernel_for_tokens_in_the_kernels_dtypes_only(monkeypatch, cpu_build):
    """By default on CPU: (B, N, C) tokens with one float32 weight per token are one ``weighted_merge`` call;
    float64 tokens or weights, weights per channel (the kernel takes one per token) and tokens of other ranks keep
    the PyTorch ops. Every case gives the weighted mean by its definition."""
    counting = Counting(cpu_build)
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: counting)
    g = torch.Generator().manual_seed(2)
    dest = torch.tensor([[0, 1, 0, 2, 1], [2, 2, 0, 1, 0]])
    for t, weight_shape, weight_dtype, calls in (
            (torch.randn(2, 5, 3, generator=g), (2, 5, 1), torch.float32, 1),
            (torch.randn(2, 5, 3, generator=g, dtype=torch.float64), (2, 5, 1), torch.float32, 0),
            (torch.randn(2, 5, 3, generator=g), (2, 5, 1), torch.float64, 0),
            (torch.randn(2, 5, 3, generator=g), (2, 5, 3), torch.float32, 0),  # a weight per channel
            (torch.randn(2, 5, generator=g), (2, 5), torch.float32, 0),
            (torch.randn(2, 5, 2, 3, generator=g), (2, 5, 1, 1), torch.float32, 0)):
        w = (torch.rand(*weight_shape, generator=g) + 0.5).to(weight_dtype)
        expected = torch.stack([torch.stack([(t[b][dest[b] == j] * w[b][dest[b] == j]).sum(0)
                                             / w[b][dest[b] == j].sum(0) for j in range(3)]) for b in range(2)])
        counting.calls.clear()
        got = ops.assign_mean(t, w, dest, 3)
        assert got.shape == (2, 3, *t.shape[2:]) and got.dtype == t.dtype
        torch.testing.assert_close(got, expected.to(t.dtype), rtol=1e-5, atol=1e-6)
        assert counting.calls.get("weighted_merge", 0) == calls, (t.shape, weight_shape, t.dtype, weight_dtype)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(token_batches(), st.data())
def test_weighted_merge_is_the_reference_bit_for_bit(request, data, draw):
    x, prefix, g = data
    n = x.shape[1]
    n_out = draw.draw(st.integers(1, n))
    # every slot gets at least one token (an empty slot is 0/0 in both), the rest land anywhere
    dest = torch.cat([torch.arange(n_out).expand(x.shape[0], -1),
                      torch.randint(0, n_out, (x.shape[0], n - n_out), generator=g)], dim=1)
    dest = dest.gather(1, torch.rand(x.shape[0], n, generator=g).argsort(-1))
    weight = torch.rand(x.shape[0], n, generator=g) * 5
    with mock.patch.dict(os.environ, {extension.ENV: "off"}):
        reference = ops.assign_mean(x, weight[..., None], dest, n_out)
    with mock.patch.dict(os.environ, {extension.ENV: "auto"}):  # the default on CPU: the kernel
        assert torch.equal(ops.assign_mean(x, weight[..., None], dest, n_out), reference)
    for build in builds(request):
        merged, summed = build.weighted_merge(x, weight, dest, n_out)
        assert merged.dtype == x.dtype and summed.dtype == torch.float32
        assert torch.equal(merged, reference)  # the same products summed in the same order: bit for bit
        assert torch.equal(summed, ops.assign_sum(weight[..., None], dest, n_out)[..., 0])


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_merge_splits_channels_over_threads_bit_for_bit(cpu_build, dtype, threads):
    """Fewer samples than threads: each thread takes a block of channels (a tail block narrower than the rest),
    in parallel where the work is large enough; the same sums as the reference's, and the summed weights once."""
    g = torch.Generator().manual_seed(3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch, n, channels in ((1, 577, 1000), (2, 577, 1000), (1, 40, 37), (5, 40, 37)):
            x = torch.randn(batch, n, channels, generator=g).to(dtype)
            weight = torch.rand(batch, n, generator=g) * 5
            dest = torch.randint(0, n // 2, (batch, n), generator=g)
            dest[:, : n // 2] = torch.arange(n // 2)
            with mock.patch.dict(os.environ, {extension.ENV: "off"}):
                reference = ops.assign_mean(x, weight[..., None], dest, n // 2)
            merged, summed = cpu_build.weighted_merge(x, weight, dest, n // 2)
            assert torch.equal(merged, reference), (batch, n, channels)
            assert torch.equal(summed, ops.assign_sum(weight[..., None], dest, n // 2)[..., 0])
    finally:
        torch.set_num_threads(before)


def test_weighted_merge_accumulates_in_fp32(cpu_build):
    """4096 tokens of 1.0 and one of 2048 merged in fp16: an fp16 running sum stalls at 2048 + 2 k steps
    (spacing 2 above 2048) and would land far from the true mean; the fp32 sum gets it."""
    x = torch.ones(1, 4097, 1, dtype=torch.float16)
    x[0, 0, 0] = 2048
    weight = torch.ones(1, 4097)
    dest = torch.zeros(1, 4097, dtype=torch.long)
    merged, summed = cpu_build.weighted_merge(x, weight, dest, 1)
    assert summed.item() == 4097
    assert merged.item() == pytest.approx((2048 + 4096) / 4097, rel=1e-3)
    half_sum = torch.zeros((), dtype=torch.float16)
    for value in x[0, :, 0]:  # what an fp16 running sum gives: 2048 + 1 rounds back to 2048
        half_sum += value
    assert half_sum.item() == 2048


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.sampled_from((1, 2)), st.integers(1, 3), st.integers(1, 13), st.integers(1, 13), st.integers(1, 8),
       st.sampled_from(DTYPES), st.sampled_from(("none", "key", "full", "masked", "infinite")),
       st.integers(0, 2 ** 31))
def test_received_attention_equals_the_chunked_reference(request, batch, heads, n_q, n_k, dim, dtype, bias_kind,
                                                        seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_q, dim, generator=g).to(dtype)
    k = torch.randn(batch, heads, n_k, dim, generator=g).to(dtype)
    bias = {"none": None, "key": torch.randn(batch, 1, 1, n_k, generator=g),
            "full": torch.randn(batch, heads, n_q, n_k, generator=g),
            "masked": torch.zeros(batch, 1, 1, n_k), "infinite": torch.randn(batch, heads, n_q, n_k, generator=g)}[
        bias_kind]
    if bias_kind == "masked":  # a masked key (as transformers' padding masks give), never all of them
        bias[..., 0] = -torch.inf if n_k > 1 else 0.0
    if bias_kind == "infinite":  # a +inf logit (as an overflowed fp16 dot product gives) in some rows: NaN rows
        bias[0, 0, -1, n_k // 2] = torch.inf
    scale = dim ** -0.5
    reference = ops.received_attention(q, k, scale, bias)  # half q, k: scored in float32 too
    torch.testing.assert_close(ops.received_attention(q.float(), k.float(), scale, bias), reference, rtol=0, atol=0,
                               equal_nan=True)
    for build in builds(request):
        got = build.received_attention(q, k, scale, bias)
        assert got.dtype == torch.float32 and got.shape == (batch, n_k)
        # the kernel takes the dot products in fp32 from the stored values, the reference from their fp32 copy
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-6, equal_nan=True)
        if bias_kind == "infinite":
            assert got[0].isnan().all()
        if bias_kind == "masked" and n_k > 1:
            assert torch.all(got[:, 0] == 0)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 13), st.integers(0, 13), st.integers(1, 8),
       st.sampled_from(("qkv", "plain")), st.sampled_from(("none", "row", "shared", "sizes", "masked", "infinite")),
       st.sampled_from((1, 2)), st.integers(0, 2 ** 31))
def test_attention_probabilities_is_the_reference_bit_for_bit(request, batch, heads, n, n_k, dim, layout, bias_kind,
                                                             threads, seed):
    """The CPU build's map, sample by sample (the product, the bias added in a loop, the softmax), is the PyTorch
    ops' over the whole map bit for bit: q and k as a qkv projection's strided views or contiguous, a bias per sample
    or shared, the log sizes of proportional attention, a masked key, a +inf logit (a NaN row in both), no token
    at all, one thread or two. Both are softmax(scale * q k^T + bias) by its definition, to float rounding."""
    g = torch.Generator().manual_seed(seed)
    if layout == "qkv":  # heads between tokens, as timm's qkv projection leaves them
        q = torch.randn(batch, n, 3, heads, dim, generator=g).permute(2, 0, 3, 1, 4)[0]
        k = torch.randn(batch, n_k, 3, heads, dim, generator=g).permute(2, 0, 3, 1, 4)[1]
    else:
        q, k = torch.randn(batch, heads, n, dim, generator=g), torch.randn(batch, heads, n_k, dim, generator=g)
    bias = {"none": None, "row": torch.randn(batch, 1, 1, n_k, generator=g),
            "shared": torch.randn(1, 1, 1, n_k, generator=g),
            "sizes": torch.randint(1, 6, (batch, 1, 1, n_k), generator=g).float().log(),
            "masked": torch.zeros(batch, 1, 1, n_k), "infinite": torch.zeros(batch, 1, 1, n_k)}[bias_kind]
    if bias_kind == "masked" and n_k > 1:
        bias[..., 0] = -torch.inf
    if bias_kind == "infinite" and n_k:
        bias[0, ..., n_k // 2] = torch.inf  # every row of sample 0: inf - inf, NaN rows
    scale = dim ** -0.5
    with mock.patch.dict(os.environ, {extension.ENV: "off"}):
        reference = ops.attention_probabilities(q, k, scale, bias)
        into_buffer = ops.attention_probabilities(q, k, scale, bias, out=torch.empty(batch, heads, n, n_k))
    torch.testing.assert_close(into_buffer, reference, rtol=0, atol=0, equal_nan=True)
    logits = scale * q.double() @ k.double().transpose(-2, -1) + (0 if bias is None else bias.double())
    torch.testing.assert_close(reference, logits.softmax(-1).float(), rtol=1e-5, atol=1e-6, equal_nan=True)
    if bias_kind == "infinite" and n_k and n:
        assert reference[0].isnan().all() and not reference[1:].isnan().any()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for build in builds(request):
            out = torch.full((batch, heads, n, n_k), 7.0)  # whatever the buffer held before
            assert build.attention_probabilities(q, k, bias, scale, out) is out
            torch.testing.assert_close(out, reference, rtol=0, atol=0, equal_nan=True)
        with mock.patch.dict(os.environ, {extension.ENV: "auto"}):  # the default: the CPU build from batch 2
            torch.testing.assert_close(ops.attention_probabilities(q, k, scale, bias), reference, rtol=0, atol=0,
                                       equal_nan=True)
    finally:
        torch.set_num_threads(before)


def test_attention_probabilities_takes_the_kernel_where_it_pays_and_applies(monkeypatch, cpu_build):
    """By default on CPU, a batch of float32 q and k with a bias of one row per sample (or none) is one call of the
    CPU build; batch 1 (its map is in cache either way) or 0, float64, a bias per head or per query, a bias in another
    dtype or of three dimensions, a gradient asked of q, a buffer that is not contiguous: the PyTorch ops. Every case
    gives the reference's map."""
    counting = Counting(cpu_build)
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: counting)
    monkeypatch.setenv(extension.ENV, "auto")
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 6, 4, generator=g)
    row = torch.randn(2, 1, 1, 6, generator=g)
    cases = {"row bias": (q, k, row, None, 1), "no bias": (q, k, None, None, 1),
             "shared row": (q, k, row[:1], None, 1), "into a buffer": (q, k, row, torch.empty(2, 3, 5, 6), 1),
             "batch 1": (q[:1], k[:1], row[:1], None, 0), "no sample": (q[:0], k[:0], None, None, 0),
             "float64": (q.double(), k.double(), row.double(), None, 0),
             "a bias per head": (q, k, torch.randn(2, 3, 1, 6, generator=g), None, 0),
             "a bias per query": (q, k, torch.randn(2, 1, 5, 6, generator=g), None, 0),
             "a float16 bias": (q, k, row.half(), None, 0),
             "a 3-D bias": (q, k, torch.randn(1, 1, 1, generator=g), None, 0),
             "a gradient": (q.clone().requires_grad_(), k, row, None, 0),
             "a strided buffer": (q, k, row, torch.empty(2, 3, 6, 5).transpose(-2, -1), 0)}
    for case, (queries, keys, bias, out, calls) in cases.items():
        with mock.patch.dict(os.environ, {extension.ENV: "off"}):
            expected = ops.attention_probabilities(queries, keys, 0.5, bias).detach()
        counting.calls.clear()
        got = ops.attention_probabilities(queries, keys, 0.5, bias, out=out)
        torch.testing.assert_close(got.detach(), expected, rtol=0, atol=0, msg=case)
        assert counting.calls.get("attention_probabilities", 0) == calls, case
        if out is not None:
            assert got.data_ptr() == out.data_ptr(), case  # in place


UNDER_A_DISPATCH_MODE = """
import torch
from torch.utils.flop_counter import FlopCounterMode
from tokenprune import extension, ops
torch.set_num_threads(2)
build = extension.load(cuda=False)
q, k, bias = torch.randn(4, 2, 5, 3), torch.randn(4, 2, 6, 3), torch.randn(4, 1, 1, 6)
expected = build.attention_probabilities(q, k, bias, 0.5, torch.empty(4, 2, 5, 6))
with FlopCounterMode(display=False) as counter:
    got = build.attention_probabilities(q, k, bias, 0.5, torch.empty(4, 2, 5, 6))
assert torch.equal(got, expected)
assert counter.get_total_flops() == 2 * 4 * 2 * 5 * 6 * 3, counter.get_total_flops()
print("ok")
"""


def test_attention_probabilities_under_a_dispatch_mode_runs_on_the_callers_thread(cpu_build):
    """A dispatch mode (torch.utils.flop_counter's) runs Python for each ATen call, which needs the GIL the caller
    holds: the CPU build then does every sample on the calling thread, and the mode sees each product. On the
    threads, the first ATen call waited for the GIL forever (the suite hung, session 29): in a process of its own."""
    result = subprocess.run([sys.executable, "-c", UNDER_A_DISPATCH_MODE], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_attention_probabilities_keeps_the_pytorch_ops_under_a_dispatch_mode(monkeypatch, cpu_build):
    """count_flops and the FLOPs budgets count under torch.utils.flop_counter's mode: the map's product is counted
    from the PyTorch ops, as the rest of the forward is."""
    from torch.utils.flop_counter import FlopCounterMode
    counting = Counting(cpu_build)
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: counting)
    monkeypatch.setenv(extension.ENV, "auto")
    q, k = torch.randn(4, 2, 5, 3), torch.randn(4, 2, 6, 3)
    expected = ops.attention_probabilities(q, k, 0.5)
    assert counting.calls == {"attention_probabilities": 1}
    with FlopCounterMode(display=False) as counter:
        got = ops.attention_probabilities(q, k, 0.5)
    assert torch.equal(got, expected) and counting.calls == {"attention_probabilities": 1}
    assert counter.get_total_flops() == 2 * 4 * 2 * 5 * 6 * 3


def test_attention_probabilities_refuses_what_it_cannot_take_in_one_line(cpu_build):
    q, k, out = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4), torch.empty(2, 3, 5, 6)
    with pytest.raises(RuntimeError, match=r"q and k must be \(batch, heads, tokens, head_dim\) alike"):
        cpu_build.attention_probabilities(q, k[:, :2], None, 0.5, out)
    with pytest.raises(RuntimeError, match="takes float32 q, k and out"):
        cpu_build.attention_probabilities(q.double(), k.double(), None, 0.5, out)
    with pytest.raises(RuntimeError, match=r"out must be a contiguous \(2, 3, 5, 6\)"):
        cpu_build.attention_probabilities(q, k, None, 0.5, torch.empty(2, 3, 6, 5).transpose(-2, -1))
    with pytest.raises(RuntimeError, match=r"bias must be float32 \(2 or 1, 1, 1, 6\)"):
        cpu_build.attention_probabilities(q, k, torch.zeros(2, 3, 1, 6), 0.5, out)


def test_received_attention_is_the_reference_for_infinite_logits_and_no_query(request, monkeypatch):
    """A +inf logit makes the reference's softmax row NaN (it subtracts the row's maximum, inf - inf), so every key
    of that sample receives NaN: the kernel gave the other keys 0 (its online softmax counted the new maximum as
    exp(0) = 1). No query (or no head) at all is a mean over nothing, 0 / 0: the kernel returned zeros."""
    monkeypatch.setenv(extension.ENV, "off")
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(2, 2, 3, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g)
    overflowed = q.clone()
    overflowed[0, 1, 2, 0] = torch.inf  # one infinite feature (an fp16 overflow): +inf logits in one row
    bias = torch.zeros(2, 1, 1, 5)
    bias[1, ..., 3] = torch.inf
    cases = {"an infinite bias": (q, k, bias), "an infinite query": (overflowed, k.abs(), None),
             "no query": (q[:, :, :0], k, None), "no head": (q[:, :0], k[:, :0], None)}
    for case, (queries, keys, b) in cases.items():
        expected = ops.received_attention(queries, keys, 0.5, b)
        assert expected.isnan().any(), case
        for build in builds(request):
            got = build.received_attention(queries, keys, 0.5, b)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7, equal_nan=True, msg=case)


@given(st.data())
@settings(max_examples=40, deadline=None, derandomize=True)
def test_merge_destinations_turn_a_plan_into_the_same_merge(data):
    """The one-kernel merge gets ToMe's plan as destinations; assign_mean over them must be merge_mean."""
    batch, prefix = data.draw(st.sampled_from((1, 3))), data.draw(st.sampled_from(PREFIXES))
    n = prefix + data.draw(st.integers(2, 25))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31)))
    x = torch.randn(batch, n, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (batch, n, 1), generator=g).double()
    plan = ops.bipartite_soft_matching(torch.randn(batch, n, 3, generator=g), data.draw(st.integers(0, 13)), prefix)
    dest, n_out = ops.merge_destinations(plan, n, prefix)
    merged, merged_size = ops.merge_mean(x, size, plan, prefix)
    assert n_out == merged.shape[1]
    torch.testing.assert_close(ops.assign_mean(x, size, dest, n_out), merged)
    torch.testing.assert_close(ops.assign_sum(size, dest, n_out), merged_size)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(token_batches(), st.data())
def test_bipartite_merge_is_the_reference_bit_for_bit(request, data, draw):
    """ToMe's one-call step equals bipartite_soft_matching + merge_mean exactly (the same scores, each
    destination summing its sources in rank order), sizes given or not, for every r that merges; duplicated
    tokens (tied scores, as in a flat image background) rank as the reference ranks them."""
    x, prefix, g = data
    patches = x.shape[1] - prefix
    if patches < 2:
        return
    # head counts and dims on both sides of where ATen's mean changes how it adds the heads (one after the other for
    # H <= 3, or H < 16 with head_dim a multiple of 64 in a qkv-style layout): the kernel adds them in a loop there,
    # and calls that mean elsewhere (test_the_kernels_head_mean_is_atens_bit_for_bit)
    heads, head_dim = draw.draw(st.sampled_from(((1, 4), (2, 4), (3, 4), (6, 64), (8, 4), (12, 128), (16, 64))))
    keys = torch.randn(x.shape[0], heads, x.shape[1], head_dim, generator=g).to(draw.draw(st.sampled_from(DTYPES)))
    ties = draw.draw(st.sampled_from(("none", "background", "a few")))
    if ties == "background":  # tied scores: every patch token's key is one of three (a flat background)
        keys[:, :, prefix:] = keys[:, :, prefix + torch.arange(patches) % 3].clone()
    if ties == "a few":  # a few equal tokens: ties wherever they rank (read as an order, as a set, or not at all)
        copies = prefix + torch.tensor(draw.draw(st.lists(st.integers(0, patches - 1), min_size=2, max_size=5)))
        keys[:, :, copies[1:]] = keys[:, :, copies[:1]]
    if draw.draw(st.booleans()):
        keys = keys.transpose(1, 2).contiguous().transpose(1, 2)  # strided, as a qkv projection's view is
    size = torch.randint(1, 6, (x.shape[0], x.shape[1], 1), generator=g).float() if draw.draw(st.booleans()) else None
    r = draw.draw(st.integers(1, patches // 2))
    reference = ops.merge_mean(x, size, ops.bipartite_soft_matching(ops.head_mean(keys), r, prefix), prefix)
    for build in builds(request):
        merged, merged_size = build.bipartite_merge(keys, x, size, r, prefix)
        assert merged.dtype == x.dtype and merged_size.dtype == torch.float32
        assert torch.equal(merged, reference[0]) and torch.equal(merged_size, reference[1])


def _key_layouts(batch, heads, tokens, dim, g):
    """Keys (B, H, N, D) in the layouts models hand ToMe, and others: contiguous, a qkv projection's view, heads
    interleaved, D strided, the batch innermost of the rows. Values of mixed magnitudes and signs, with -0 and a
    NaN, so that any other order of adding the heads rounds differently somewhere."""
    scale = 10.0 ** torch.randint(-3, 4, (batch, tokens, 3, heads, dim), generator=g)
    qkv = torch.randn(batch, tokens, 3, heads, dim, generator=g) * scale
    qkv[0, 0, 1, :, 0] = -0.0
    qkv[-1, -1, 1, -1, -1] = float("nan")
    k = qkv[:, :, 1].transpose(1, 2).contiguous()
    return {"contiguous": k, "qkv view": qkv.permute(2, 0, 3, 1, 4)[1],
            "heads interleaved": k.transpose(1, 2).contiguous().transpose(1, 2),
            "dim strided": k.transpose(-1, -2).contiguous().transpose(-1, -2),
            "batch inner": k.permute(2, 1, 0, 3).contiguous().permute(2, 1, 0, 3)}


@pytest.mark.parametrize("heads, dim", [(1, 5), (2, 64), (3, 32), (4, 64), (6, 64), (6, 48), (8, 4), (12, 128),
                                        (15, 64), (16, 64), (24, 64)])
def test_the_kernels_head_mean_is_atens_bit_for_bit(cpu_build, heads, dim):
    """bipartite_merge's head mean adds the heads in a loop where ATen's mean is known to add them one after the
    other (H <= 3; H < 16 with a head dim of a multiple of 64 in a qkv view) and calls that mean elsewhere: either
    way ToMe's metric is the reference's to the last bit, and so are its norms, in every layout and key dtype, at 1
    and 2 threads."""
    g = torch.Generator().manual_seed(heads * 1000 + dim)
    threads = torch.get_num_threads()
    try:
        for batch, tokens in ((1, 37), (3, 11)):
            for layout, keys in _key_layouts(batch, heads, tokens, dim, g).items():
                for dtype in (torch.float32, torch.bfloat16):
                    k = keys.to(dtype)
                    for t in (1, 2):
                        torch.set_num_threads(t)
                        got, want = cpu_build.head_mean(k), ops.head_mean(k)
                        assert got.dtype == torch.float32 and got.shape == want.shape, layout
                        assert torch.equal(got.nan_to_num(), want.nan_to_num()), (layout, dtype, t)
                        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.signbit(), want.signbit())
                        # and the norms ToMe takes next (ATen's, whose order depends on the layout)
                        norms = [torch.linalg.vector_norm(m, dim=-1).nan_to_num() for m in (got, want)]
                        assert torch.equal(*norms), (layout, dtype, t)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match=r"k must be \(batch, heads, tokens, dim\)"):
        cpu_build.head_mean(torch.ones(2, 3, 4))
    with pytest.raises(RuntimeError, match="k must be float32, float16 or bfloat16"):
        cpu_build.head_mean(torch.ones(1, 2, 3, 4, dtype=torch.float64))


@pytest.mark.parametrize("case, prefix, r, sorts", [
    ("untied", 1, 6, 0),
    ("prefix ties", 5, 6, 0),  # three prefix A tokens tie at -inf, past the r sources
    ("two tied past the sources", 1, 1, 0),  # the tie is read as a set (the unmerged A tokens), not as an order
    ("two tied among the sources", 1, 6, 1),  # which of them adds first into a shared destination is read
    ("ties everywhere", 1, 6, 1),
])
def test_bipartite_merge_ranks_by_itself_unless_a_tie_it_reads_asks_for_argsort(request, case, prefix, r, sorts):
    """ToMe's step ranks the A tokens itself (no ATen sort) unless two equal scores sit where their order is read
    (the r sources, in the order they add, and the first token after them), and equals the reference either way."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 2, prefix + 30, 8, generator=g)
    x = torch.randn(2, prefix + 30, 16, generator=g)
    a = list(range(prefix + prefix % 2, prefix + 30, 2))  # A tokens: even positions
    if case.startswith("two tied"):  # two A tokens equal to each other; at the top with a B token equal to them
        keys[:, :, a[3]] = keys[:, :, a[7]]
        if case.endswith("among the sources"):
            keys[:, :, a[3] + 1] = keys[:, :, a[7]]
    if case == "ties everywhere":
        keys[:, :, prefix:] = keys[:, :, prefix + torch.arange(30) % 3]
    reference = ops.merge_mean(x, None, ops.bipartite_soft_matching(ops.head_mean(keys), r, prefix), prefix)
    for build in builds(request):
        found = []
        assert sorts_in(lambda: found.append(build.bipartite_merge(keys, x, None, r, prefix))) == sorts, case
        assert torch.equal(found[0][0], reference[0]) and torch.equal(found[0][1], reference[1]), case


def slow_s_stage_keep(attn: torch.Tensor, keys: torch.Tensor, prefix: int, remove: int, emphasize: int | None,
                      rms: bool) -> tuple[list[list[int]], float]:
    """Zero-TPrune's I'- and S-stage by the definition, in float64 loops: one voting round from the start vector
    (token ``emphasize`` sqrt(N) times the others), each head rescaled to mean 1 over the patch tokens, summed
    (squared for rms); the less important half (ties: the lower index) are candidates; the ``remove`` most similar
    to an anchor (cosine of head-mean keys; ties: the less important) go. Returns the kept patch tokens per sample
    and the smallest margin at the two decisions (the half split, the removal cut), where rounding could decide."""
    batch, heads, total, _ = attn.shape
    n, a, k = total - prefix, attn.double().tolist(), keys.double().tolist()
    kept, margin = [], math.inf
    for b in range(batch):
        start = [math.sqrt(total) if t == emphasize else 1.0 for t in range(total)]
        importance = [0.0] * n
        for h in range(heads):
            votes = [sum(start[i] * a[b][h][i][prefix + j] for i in range(total)) for j in range(n)]
            mean = sum(votes) / n
            for j in range(n):
                importance[j] += (votes[j] / mean) ** 2 if rms else votes[j] / mean
        order = sorted(range(n), key=lambda j: (importance[j], j))
        candidates, anchors = order[: n // 2], order[n // 2:]
        if candidates:
            margin = min(margin, importance[anchors[0]] - importance[candidates[-1]])
        unit = []
        for t in range(n):
            metric = [sum(k[b][h][prefix + t][d] for h in range(heads)) / heads for d in range(len(k[b][0][0]))]
            norm = math.sqrt(sum(v * v for v in metric))
            unit.append([v / norm for v in metric])
        redundancy = [max(sum(u * v for u, v in zip(unit[c], unit[x])) for x in anchors) for c in candidates]
        ranked = sorted(range(len(candidates)), key=lambda i: (-redundancy[i], i))
        if 0 < remove < len(candidates):
            margin = min(margin, redundancy[ranked[remove - 1]] - redundancy[ranked[remove]])
        dropped = {candidates[i] for i in ranked[:remove]}
        kept.append([j for j in range(n) if j not in dropped])
    return kept, margin


def s_stage_paths(request, attn, keys, prefix, remove, emphasize, rms) -> dict:
    """similarity_prune of every build, and zt.s_stage_keep through the PyTorch ops and by default."""
    from tokenprune.methods import zero_tprune as zt

    found = {f"build {i}": build.similarity_prune(attn, keys, prefix, remove, -1 if emphasize is None else emphasize,
                                                  rms) for i, build in enumerate(builds(request))}
    for setting in ("off", "auto"):
        with mock.patch.dict(os.environ, {extension.ENV: setting}):
            found[setting] = zt.s_stage_keep(attn, keys, prefix, remove, emphasize, rms)
    return found


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 3), st.integers(1, 4), st.sampled_from(PREFIXES), st.integers(2, 30), st.integers(1, 8),
       st.sampled_from(DTYPES), st.booleans(), st.booleans(), st.data())
def test_similarity_prune_keeps_what_the_definition_keeps(request, batch, heads, prefix, patches, dim, key_dtype,
                                                          emphasize, rms, draw):
    """Zero-TPrune's one-call S-stage and its PyTorch path keep the definition's tokens, over shapes, prefixes,
    start vectors, aggregations and key dtypes (where the definition's decisions are not within rounding)."""
    g = torch.Generator().manual_seed(draw.draw(st.integers(0, 2 ** 31)))
    total = prefix + patches
    attn = (torch.randn(batch, heads, total, total, generator=g) * 2).softmax(-1)
    keys = torch.randn(batch, heads, total, dim, generator=g).to(key_dtype)
    remove = draw.draw(st.integers(0, patches // 2))
    emphasize = 0 if emphasize and prefix else None
    expected, margin = slow_s_stage_keep(attn, keys, prefix, remove, emphasize, rms)
    assume(margin > 1e-4)
    for path, kept in s_stage_paths(request, attn, keys, prefix, remove, emphasize, rms).items():
        assert kept.tolist() == expected, path


def test_similarity_prune_breaks_ties_as_the_definition_does(request):
    """Uniform attention ties every importance (candidates: the lower indices); duplicated keys tie similarities
    (the less important candidate goes); a zero key's NaN similarity goes first, as topk ranks NaN."""
    # a power of two: uniform attention's votes are exact, so they tie exactly; 63 patch tokens, enough for an
    # unstable sort to reorder ties (candidates: 0 .. 30, anchors: 31 .. 62)
    total, prefix = 64, 1
    attn = torch.full((1, 2, total, total), 1.0 / total)
    keys = torch.randn(1, 2, total, 4, generator=torch.Generator().manual_seed(0))
    keys[:, :, prefix + 2] = keys[:, :, prefix + 5] = keys[:, :, prefix + 40]  # candidates 2 and 5 copy anchor 40
    expected, _ = slow_s_stage_keep(attn, keys, prefix, 1, 0, True)
    assert expected == [[j for j in range(63) if j != 2]]
    for path, kept in s_stage_paths(request, attn, keys, prefix, 1, 0, True).items():
        assert kept.tolist() == expected, path
    keys[:, :, prefix + 4] = 0.0  # candidate 4: no direction, NaN similarity
    for path, kept in s_stage_paths(request, attn, keys, prefix, 2, None, False).items():
        assert kept.tolist() == [[j for j in range(63) if j not in (2, 4)]], path


def calls_off_and_auto(monkeypatch, model, x, counting, op: str) -> dict:
    """How often the kernel ``op`` ran in one forward under TOKENPRUNE_EXT=off and =auto (outputs must be equal)."""
    calls, outputs = {}, {}
    for setting in ("off", "auto"):
        monkeypatch.setenv(extension.ENV, setting)
        counting.calls.clear()
        with torch.no_grad():
            outputs[setting] = model(x)
        calls[setting] = counting.calls.get(op, 0)
    assert torch.equal(outputs["auto"], outputs["off"])
    return calls


def calls_in_float64(model, x, counting, method: str, op: str) -> int:
    """How often the kernel ``op`` ran in a forward of the model converted to float64 (kernels take fp32, half)."""
    tokenprune.apply(model.double(), method, keep=0.4)
    counting.calls.clear()
    with torch.no_grad():
        model(x.double())
    return counting.calls.get(op, 0)


def test_similarity_prune_is_what_zero_tprune_runs_on_cpu_by_default(monkeypatch, cpu_build):
    """auto: every pruning layer's S-stage is one kernel call (also when the I-stage prunes the rest), with the
    PyTorch ops' output; off, no S-stage, or a float64 model: the PyTorch ops."""
    model, x = tiny_timm("deit_small_distilled_patch16_224"), images(2)
    counting = Counting(cpu_build)
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: counting)
    for options, calls in (({}, 3), ({"s_fraction": 0.5}, 3), ({"s_stage": False}, 0)):
        tokenprune.apply(model, "zero-tprune", keep=0.4, **options)
        assert calls_off_and_auto(monkeypatch, model, x, counting, "similarity_prune") == {"off": 0, "auto": calls}
    assert calls_in_float64(model, x, counting, "zero-tprune", "similarity_prune") == 0


@settings(max_examples=80, deadline=None, derandomize=True)
@given(token_batches(), st.booleans(), st.data())
def test_mctf_plan_is_the_reference_bit_for_bit(request, data, bidirectional, draw):
    """MCTF's one-call matching gives pair_scores + bidirectional_assignment's slots exactly, over shapes, prefixes,
    criteria, directions, feature dtypes and every removal the schedule allows (half the patch tokens); tied
    scores (every patch token one of three, as in a flat background) order as the reference orders them."""
    from tokenprune.methods import mctf

    x, prefix, g = data
    patches = x.shape[1] - prefix
    if patches < 2:
        return
    if draw.draw(st.booleans()):
        x[:, prefix:] = x[:, prefix + torch.arange(patches) % 3].clone()
    received = torch.rand(x.shape[:2], generator=g) + 0.01
    size = torch.randint(1, 6, x.shape[:2], generator=g).float()
    criteria = tuple(draw.draw(st.lists(st.booleans(), min_size=3, max_size=3)))
    tau = tuple(draw.draw(st.sampled_from(((1.0, 20.0, 40.0), (0.5, 3.0, 7.0)))))
    remove = draw.draw(st.integers(1, patches // 2))
    expected = mctf.bidirectional_assignment(mctf.pair_scores(x, received, size, tau, criteria, prefix), remove,
                                             prefix, bidirectional)
    for build in builds(request):
        dest, n_out = build.mctf_plan(x, received, size, list(tau), list(criteria), prefix, remove, bidirectional)
        assert torch.equal(dest, expected[0]) and n_out == expected[1]
    for setting in ("off", "auto"):
        with mock.patch.dict(os.environ, {extension.ENV: setting}):
            dest, n_out = mctf.merge_plan(x, received, size, tau, criteria, remove, prefix, bidirectional)
            assert torch.equal(dest, expected[0]) and n_out == expected[1], setting


@pytest.mark.parametrize("patches", [8, 37, 196])
def test_mctf_plan_is_the_reference_with_nonfinite_features_and_ties(request, patches):
    """Rows with a NaN score take the kernel's scalar scans, the rest its four-wide ones: per sample, so one batch
    mixes both. NaN and infinite features, exact ties (repeated tokens) and long rows (a vector body and a tail)
    give the reference's slots."""
    from tokenprune.methods import mctf

    g = torch.Generator().manual_seed(patches)
    x = torch.randn(4, 1 + patches, 24, generator=g)
    x[0, 1:] = x[0, 1 + torch.arange(patches) % 5].clone()  # ties everywhere
    x[1, 3, 2] = float("nan")
    x[2, 4] = float("inf")
    half = patches // 2
    x[3, 1 + half:] = x[3, 1:1 + patches - half].clone()  # each token twice
    received = torch.rand(x.shape[:2], generator=g) + 0.01
    size = torch.randint(1, 4, x.shape[:2], generator=g).float()
    for bidirectional in (True, False):
        expected = mctf.bidirectional_assignment(
            mctf.pair_scores(x, received, size, (1.0, 20.0, 40.0), (True, True, True), 1), patches // 2, 1,
            bidirectional)
        for build in builds(request):
            dest, n_out = build.mctf_plan(x, received, size, [1.0, 20.0, 40.0], [True] * 3, 1, patches // 2,
                                          bidirectional)
            assert torch.equal(dest, expected[0]) and n_out == expected[1], (bidirectional, build.with_cuda)


def sorts_in(call) -> int:
    """How many ATen sorts ``call()`` dispatches (C++ calls included: a dispatch mode sees them)."""
    from tokenprune.eval.op_count import OpCounter

    with OpCounter() as counter:
        call()
    return counter.counts["sort"]


@pytest.mark.parametrize("case, remove, prefix, sorts", [
    ("untied", 8, 1, 0),
    ("prefix ties", 8, 5, 0),  # three A and two B prefix tokens tie at -inf, past every position read
    ("top two tied, inside the sources", 8, 1, 0),  # r1 = 4: the tie is not at the sources' boundary
    ("top two tied, at the boundary", 3, 1, 1),  # r1 = 1: which of the two is the source is argsort's choice
    ("ties everywhere", 8, 1, 2),
])
def test_mctf_plan_ranks_by_itself_unless_a_tie_it_reads_asks_for_argsort(request, case, remove, prefix, sorts):
    """The kernel ranks the scores itself (no ATen sort) where no two equal scores are ordered by what it reads (which
    r1 A tokens come first; the order of the B tokens after the r2 sources, up to the prefix ones), and calls the
    reference's argsort where a tie is read: the slots are the reference's in every case."""
    from tokenprune.methods import mctf

    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, prefix + 30, 16, generator=g)
    if case.startswith("top two"):  # two A tokens (even positions) equal to a B token: their best scores tie at the top
        x[:, [2, 4]] = x[:, 7:8]
    if case == "ties everywhere":
        x[:, prefix:] = x[:, prefix + torch.arange(30) % 3]
    received, size = torch.rand(x.shape[:2], generator=g) + 0.01, torch.ones(x.shape[:2])
    criteria = (True, False, False)  # similarity alone: equal tokens score equal
    expected = mctf.bidirectional_assignment(mctf.pair_scores(x, received, size, (1.0, 20.0, 40.0), criteria, prefix),
                                             remove, prefix)
    for build in builds(request):
        found = []
        call = lambda: found.append(build.mctf_plan(x, received, size, [1.0, 20.0, 40.0], list(criteria), prefix,  # noqa: E731
                                                    remove, True))
        assert sorts_in(call) == sorts, case
        assert torch.equal(found[0][0], expected[0]) and found[0][1] == expected[1], case


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(2, 40), st.integers(0, 2 ** 31), st.lists(st.integers(0, 39), min_size=2, max_size=6), st.data())
def test_mctf_plan_is_the_reference_where_a_few_tokens_tie(request, patches, seed, copies, draw):
    """A few tokens made equal (their scores tie wherever they rank: inside a set the kernel reads as a set, at its
    boundary, or in the order it reads) give the reference's slots, in both directions."""
    from tokenprune.methods import mctf

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1 + patches, 8, generator=g)
    copies = [1 + c % patches for c in copies]
    x[:, copies[1:]] = x[:, copies[:1]]
    received = torch.rand(x.shape[:2], generator=g) + 0.01
    received[:, copies[1:]] = received[:, copies[:1]]
    size = torch.ones(x.shape[:2])
    criteria = tuple(draw.draw(st.lists(st.booleans(), min_size=3, max_size=3)))
    remove = draw.draw(st.integers(1, patches // 2))
    for bidirectional in (True, False):
        expected = mctf.bidirectional_assignment(
            mctf.pair_scores(x, received, size, (1.0, 20.0, 40.0), criteria, 1), remove, 1, bidirectional)
        for build in builds(request):
            dest, n_out = build.mctf_plan(x, received, size, [1.0, 20.0, 40.0], list(criteria), 1, remove,
                                          bidirectional)
            assert torch.equal(dest, expected[0]) and n_out == expected[1], bidirectional


def test_mctf_plan_leaves_float64_to_the_pytorch_ops(monkeypatch, cpu_build):
    """The kernel scores in float32: features, attention received or sizes in float64 (any one of them) keep the
    PyTorch ops, with their output; all three in float32 take the kernel."""
    from tokenprune.methods import mctf

    g = torch.Generator().manual_seed(5)
    x, received = torch.randn(2, 9, 6, generator=g), torch.rand(2, 9, generator=g) + 0.01
    size = torch.randint(1, 4, (2, 9), generator=g).float()
    counting = Counting(cpu_build)
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: counting)
    for wide in ("x", "received", "size", None):
        args = {"x": x, "received": received, "size": size}
        if wide is not None:
            args[wide] = args[wide].double()
        counting.calls.clear()
        scores = mctf.pair_scores(**args, tau=(1.0, 20.0, 40.0), criteria=(True, True, True), num_prefix=1)
        expected = mctf.bidirectional_assignment(scores, 3, 1, True)
        dest, n_out = mctf.merge_plan(**args, tau=(1.0, 20.0, 40.0), criteria=(True, True, True), remove=3,
                                      num_prefix=1, bidirectional=True)
        assert torch.equal(dest, expected[0]) and n_out == expected[1], wide
        assert counting.calls.get("mctf_plan", 0) == (wide is None), wide


def test_mctf_plan_is_what_mctf_runs_on_cpu_by_default(monkeypatch, cpu_build):
    """auto: every merging block's matching is one kernel call (blocks 1 .. L-1), with the PyTorch ops' output
    exactly; off or a float64 model: the PyTorch ops."""
    model, x = tiny_timm("deit_small_distilled_patch16_224"), images(2)
    tokenprune.apply(model, "mctf", keep=0.4)
    counting = Counting(cpu_build)
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: counting)
    calls = calls_off_and_auto(monkeypatch, model, x, counting, "mctf_plan")
    assert calls == {"off": 0, "auto": len(model.blocks) - 1}
    assert calls_in_float64(model, x, counting, "mctf", "mctf_plan") == 0


def tome_through_the_pytorch_ops(monkeypatch, name: str, batch: int):
    """A tiny ToMe-patched model, an input, and the model's output through the PyTorch ops (TOKENPRUNE_EXT=off)."""
    model, x = tiny_timm(name), images(batch)
    tokenprune.apply(model, "tome", keep=0.4)
    monkeypatch.setenv(extension.ENV, "off")
    with torch.no_grad():
        return model, x, model(x)


def test_bipartite_merge_is_what_tome_runs_on_cpu_by_default(monkeypatch, cpu_build):
    """auto: a ToMe forward on CPU goes through the one-call kernel and gives the PyTorch ops' output exactly;
    off: the PyTorch ops; with source tracing (which needs the plan): the PyTorch ops."""
    model, x, reference = tome_through_the_pytorch_ops(monkeypatch, "deit_small_distilled_patch16_224", 2)
    counting = Counting(cpu_build)
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: counting)
    for setting, calls in (("auto", len(model.blocks)), ("off", 0)):
        monkeypatch.setenv(extension.ENV, setting)
        counting.calls.clear()
        with torch.no_grad():
            assert torch.equal(model(x), reference)
        assert counting.calls.get("bipartite_merge", 0) == calls, (setting, counting.calls)
    monkeypatch.setenv(extension.ENV, "auto")
    tokenprune.apply(model, "tome", keep=0.4, trace_source=True)
    counting.calls.clear()
    with torch.no_grad():
        assert torch.equal(model(x), reference)
    assert counting.calls == {}


@pytest.mark.parametrize("method,options,calls", [
    ("random", {}, lambda blocks: blocks),  # one removal per block
    ("zero-tprune", {"trace_source": True}, lambda blocks: 3 * 2),  # three pruning layers: tokens and sources
])
def test_the_kept_token_gather_is_what_cpu_pruning_runs_by_default(monkeypatch, cpu_build, method, options, calls):
    """auto: dropping tokens on CPU copies the kept rows through the CPU build, with the PyTorch ops' output
    exactly (a copy); off: the PyTorch ops."""
    model, x = tiny_timm("deit_small_distilled_patch16_224"), images(2)
    tokenprune.apply(model, method, keep=0.4, **options)
    monkeypatch.setenv(extension.ENV, "off")
    with torch.no_grad():
        reference, reference_source = model(x), tokenprune.last_forward(model).source
    counting = Counting(cpu_build)
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: counting)
    for setting, expected in (("auto", calls(len(model.blocks))), ("off", 0)):
        monkeypatch.setenv(extension.ENV, setting)
        counting.calls.clear()
        with torch.no_grad():
            assert torch.equal(model(x), reference)
        assert counting.calls.get("gather_kept", 0) == expected, (setting, counting.calls)
        source = tokenprune.last_forward(model).source
        assert (source is None and reference_source is None) or torch.equal(source, reference_source)


def test_keep_tokens_takes_other_than_three_dimensions_through_the_pytorch_ops(monkeypatch, cpu_build):
    """The kernel takes (B, N, C); per-token tensors of other shapes (B, N) or (B, N, H, D) keep the PyTorch ops."""
    counting = Counting(cpu_build)
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: counting)
    monkeypatch.setenv(extension.ENV, "auto")
    t = torch.arange(12.0).view(2, 6)
    keep = torch.tensor([[0, 4], [2, 3]])
    assert torch.equal(ops.keep_tokens(t, keep, 1), torch.tensor([[0.0, 1.0, 5.0], [6.0, 9.0, 10.0]]))
    heads = torch.arange(48.0).view(2, 6, 2, 2)
    assert torch.equal(ops.keep_tokens(heads, keep, 1), torch.stack([heads[0, [0, 1, 5]], heads[1, [0, 3, 4]]]))
    # indices the kernel does not take (int32, one row for the whole batch): PyTorch's indexing, as before
    tokens = torch.arange(24.0).view(2, 6, 2)
    expected = torch.stack([tokens[0, [0, 1, 5]], tokens[1, [0, 3, 4]]])
    assert torch.equal(ops.keep_tokens(tokens, keep.int(), 1), expected)
    assert torch.equal(ops.keep_tokens(tokens, torch.tensor([[1, 2]]), 1), tokens[:, [0, 2, 3]])
    assert torch.equal(ops.keep_tokens(tokens, torch.tensor([1, 2]), 1), tokens[:, [0, 2, 3]])
    assert counting.calls == {}
    assert torch.equal(ops.keep_tokens(tokens, keep, 1), expected) and counting.calls == {"gather_kept": 1}
    with pytest.raises(RuntimeError, match=r"scores must be \(batch, n\)"):
        ops.top_k_ascending(torch.randn(2, 3, 4), 1)  # the kernel's check: no silent wrong dimension


def test_tome_under_cpu_autocast_runs_the_kernel_and_matches_the_pytorch_ops(monkeypatch, cpu_build):
    """bf16 autocast: the projections (keys) are bf16, the residual stream float32; the kernel takes both."""
    model, x, _ = tome_through_the_pytorch_ops(monkeypatch, "vit_base_patch16_224", 2)
    outputs = {}
    counting = Counting(cpu_build)
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: counting)
    for setting in ("off", "auto"):
        monkeypatch.setenv(extension.ENV, setting)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[setting] = model(x)
    assert torch.equal(outputs["auto"], outputs["off"])
    assert counting.calls.get("bipartite_merge", 0) == len(model.blocks)


def test_bipartite_merge_keeps_the_pytorch_ops_where_the_kernel_does_not_apply(monkeypatch, cpu_build):
    counting = Counting(cpu_build)
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: counting)
    monkeypatch.delenv(extension.ENV, raising=False)
    g = torch.Generator().manual_seed(0)
    x, keys = torch.randn(2, 6, 3, generator=g), torch.randn(2, 2, 6, 5, generator=g)

    def reference(keys, x, size, r, prefix):
        plan = ops.bipartite_soft_matching(ops.head_mean(keys), r, prefix)
        return ops.merge_mean(x, size, plan, prefix)
    # one patch token: r clamps to 0, nothing merges (the kernel takes r >= 1 only)
    for got, want in zip(ops.bipartite_merge(keys[:, :, :2], x[:, :2], None, 3, 1),
                         reference(keys[:, :, :2], x[:, :2], None, 0, 1)):
        assert torch.equal(got, want)
    wide = torch.ones(2, 6, 1, dtype=torch.float64)  # sizes wider than the kernel's float32
    for got, want in zip(ops.bipartite_merge(keys, x, wide, 2, 1), reference(keys, x, wide, 2, 1)):
        assert torch.equal(got, want) and got.dtype == want.dtype
    for got, want in zip(ops.bipartite_merge(x.double()[:, None], x.double(), None, 2, 1),
                         reference(x.double()[:, None], x.double(), None, 2, 1)):
        assert torch.equal(got, want)
    for got, want in zip(ops.bipartite_merge(keys.double(), x, None, 2, 1),  # float64 scores: the kernel's are float32
                         reference(keys.double(), x, None, 2, 1)):
        assert torch.equal(got, want)
    for got, want in zip(ops.bipartite_merge(keys, x.double(), None, 2, 1),  # float32 scores, float64 tokens
                         reference(keys, x.double(), None, 2, 1)):
        assert torch.equal(got, want) and got.dtype == torch.float64
    assert counting.calls == {}
    for r, clamped in ((9, 2), (1, 1)):  # the kernel from r = 1, r clamped to half the patch tokens
        for got, want in zip(ops.bipartite_merge(keys, x, None, r, 1), reference(keys, x, None, clamped, 1)):
            assert torch.equal(got, want)
    # autocast: bf16 keys from the projections, a float32 residual stream
    half_keys = keys.bfloat16()
    for got, want in zip(ops.bipartite_merge(half_keys, x, None, 2, 1), reference(half_keys, x, None, 2, 1)):
        assert torch.equal(got, want) and got.dtype == torch.float32
    assert counting.calls == {"bipartite_merge": 3}


def test_the_extension_names_bad_input(cpu_build):
    x = torch.randn(2, 6, 3)
    with pytest.raises(RuntimeError, match=r"keep must lie in \[0, 5\)"):
        cpu_build.gather_kept(x, torch.tensor([[0, 5], [1, 2]]), 1)
    with pytest.raises(RuntimeError, match="keep must be int64"):
        cpu_build.gather_kept(x, torch.tensor([[0, 1], [1, 2]], dtype=torch.int32), 1)
    with pytest.raises(RuntimeError, match=r"dest must lie in \[0, 2\)"):
        cpu_build.weighted_merge(x, torch.ones(2, 6), torch.full((2, 6), 2), 2)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        cpu_build.weighted_merge(x.double(), torch.ones(2, 6), torch.zeros(2, 6, dtype=torch.long), 1)
    with pytest.raises(RuntimeError, match=r"k must lie in \[0, 6\], got 7"):
        cpu_build.top_k_ascending(torch.randn(2, 6), 7, True)
    with pytest.raises(RuntimeError, match="scores must be"):
        cpu_build.top_k_ascending(torch.randn(6), 1, True)
    with pytest.raises(RuntimeError, match="num_prefix must lie"):
        cpu_build.gather_kept(x, torch.zeros(2, 1, dtype=torch.long), 7)
    with pytest.raises(RuntimeError, match="disagree"):
        cpu_build.received_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5), 1.0)
    keys = torch.randn(2, 3, 6, 4)
    with pytest.raises(RuntimeError, match=r"r must lie in \[1, 2\], got 3"):
        cpu_build.bipartite_merge(keys, x, None, 3, 1)
    with pytest.raises(RuntimeError, match=r"r must lie in \[1, 2\], got 0"):
        cpu_build.bipartite_merge(keys, x, None, 0, 1)
    with pytest.raises(RuntimeError, match=r"k must be \(2, heads, 6, dim\)"):
        cpu_build.bipartite_merge(keys[:, :, :5], x, None, 1, 1)
    with pytest.raises(RuntimeError, match="size must be float32"):
        cpu_build.bipartite_merge(keys, x, torch.ones(2, 6, 1, dtype=torch.float64), 1, 1)
    with pytest.raises(RuntimeError, match="k must be float32, float16 or bfloat16"):
        cpu_build.bipartite_merge(keys.double(), x, None, 1, 1)
    probs = torch.randn(2, 3, 6, 6).softmax(-1)
    with pytest.raises(RuntimeError, match="probs must be float32"):
        cpu_build.similarity_prune(probs.double(), keys, 1, 1, 0, True)
    with pytest.raises(RuntimeError, match=r"probs must be \(batch, heads, tokens, tokens\)"):
        cpu_build.similarity_prune(probs[..., :5], keys, 1, 1, 0, True)
    with pytest.raises(RuntimeError, match=r"k must be \(2, 3, 6, dim\)"):
        cpu_build.similarity_prune(probs, keys[:, :2], 1, 1, 0, True)
    with pytest.raises(RuntimeError, match=r"remove must lie in \[0, 2\], got 3"):
        cpu_build.similarity_prune(probs, keys, 1, 3, 0, True)
    with pytest.raises(RuntimeError, match=r"num_prefix must lie in \[0, 6\], got 7"):
        cpu_build.similarity_prune(probs, keys, 7, 0, 0, True)
    with pytest.raises(RuntimeError, match=r"emphasize must lie in \[-1, 6\), got 6"):
        cpu_build.similarity_prune(probs, keys, 1, 1, 6, True)
    ones = torch.ones(2, 6)
    with pytest.raises(RuntimeError, match=r"received and size must be float32 \(2, 6\)"):
        cpu_build.mctf_plan(x, ones.double(), ones, [1.0, 20.0, 40.0], [True] * 3, 1, 1, True)
    with pytest.raises(RuntimeError, match="cannot fuse 4 of 5 patch tokens"):
        cpu_build.mctf_plan(x, ones, ones, [1.0, 20.0, 40.0], [True] * 3, 1, 4, True)
    with pytest.raises(RuntimeError, match="tau and criteria take three entries each"):
        cpu_build.mctf_plan(x, ones, ones, [1.0, 20.0], [True] * 3, 1, 1, True)


# ----------------------------------------------------------------------------- dispatch and fallback


class Counting:
    """Wraps an extension module and counts the calls of each op."""

    def __init__(self, module):
        self.module, self.calls = module, {}

    def __getattr__(self, name):
        op = getattr(self.module, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return op(*args, **kwargs)
        return counted


@pytest.mark.parametrize("method,options", [("tome", {}), ("mctf", {}), ("random", {}), ("zero-tprune", {})])
def test_whole_models_run_through_the_kernels_and_match_the_reference(monkeypatch, cpu_build, method, options):
    """TOKENPRUNE_EXT=all sends CPU tensors through the CPU build: the model gives the reference's output."""
    model = tiny_timm("vit_base_patch16_224")
    x = images(3)
    tokenprune.apply(model, method, keep=0.4, **options)
    monkeypatch.setenv(extension.ENV, "off")
    with torch.no_grad():
        reference = model(x)
    counting = Counting(cpu_build)
    monkeypatch.setenv(extension.ENV, "all")
    monkeypatch.setattr(extension, "load", lambda cuda, verbose=False: counting)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)
    expected = {"tome": "bipartite_merge", "mctf": "weighted_merge", "random": "gather_kept",
                "zero-tprune": "gather_kept"}[method]
    assert counting.calls.get(expected, 0) > 0, counting.calls


def test_hiprune_scores_run_through_the_kernel(monkeypatch, cpu_build):
    from test_vlm import llava_batch, tiny_llava  # the VLM suite's tiny model and inputs

    model, processor_inputs = tiny_llava(), llava_batch()
    tokenprune.apply(model, "hiprune", keep=0.3, object_layer=2)
    monkeypatch.setenv(extension.ENV, "off")
    with torch.no_grad():
        reference = model(**processor_inputs).logits
    counting = Counting(cpu_build)
    monkeypatch.setenv(extension.ENV, "all")
    monkeypatch.setattr(extension, "load", lambda cuda, verbose=False: counting)
    with torch.no_grad():
        got = model(**processor_inputs).logits
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)
    assert counting.calls.get("received_attention", 0) > 0


def test_keep_one_is_bit_identical_through_the_kernels(monkeypatch):
    model = tiny_timm("deit_small_distilled_patch16_224")
    x = images(2)
    with torch.no_grad():
        stock = model(x)
    monkeypatch.setenv(extension.ENV, "all")
    tokenprune.apply(model, "tome", keep=1.0)
    with torch.no_grad():
        assert torch.equal(model(x), stock)


class FakeCuda:
    """Stands for a CUDA tensor where there is no GPU: for_tensor reads only these attributes."""
    is_cuda, requires_grad = True, False
    device, dtype = torch.device("cuda"), torch.float32


def test_dispatch_rules(monkeypatch):
    cpu = torch.zeros(2, 3)
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: "cuda build" if cuda else "cpu build")
    monkeypatch.setattr(extension, "load", lambda cuda, verbose=False: "cuda build" if cuda else "cpu build")
    monkeypatch.delenv(extension.ENV, raising=False)
    assert extension.mode() == "auto"
    assert extension.for_tensor(cpu) is None  # CPU tensors keep the PyTorch ops by default
    assert extension.for_tensor(cpu, floating=True) is None
    assert extension.for_tensor(cpu, cpu_kernel_pays=True) == "cpu build"  # ... but where one call replaces many
    assert extension.for_tensor(cpu.double(), floating=True, cpu_kernel_pays=True) is None
    assert extension.for_tensor(torch.empty(2, device="meta"), cpu_kernel_pays=True) is None  # neither build's
    assert extension.for_tensor(FakeCuda()) == "cuda build"
    # a kernel measured slower than the PyTorch ops on a GPU (the attention received) is not used by default ...
    assert extension.for_tensor(FakeCuda(), cuda_kernel_pays=False) is None
    assert extension.for_tensor(cpu, cuda_kernel_pays=False, cpu_kernel_pays=True) == "cpu build"  # (on a GPU)
    for off in ("off", "0", "OFF"):
        monkeypatch.setenv(extension.ENV, off)
        assert extension.for_tensor(FakeCuda()) is None
        assert extension.for_tensor(cpu, cpu_kernel_pays=True) is None
    monkeypatch.setenv(extension.ENV, "all")
    assert extension.for_tensor(cpu) == "cpu build"
    assert extension.for_tensor(torch.empty(2, device="meta")) is None
    assert extension.for_tensor(FakeCuda()) == "cuda build"
    assert extension.for_tensor(FakeCuda(), cuda_kernel_pays=False) == "cuda build"  # ... but `all` runs it
    grad = torch.zeros(2, requires_grad=True)
    assert extension.for_tensor(grad) is None  # the kernels have no backward
    assert extension.for_tensor(cpu, None, grad) is None  # ... for any input the output depends on
    assert extension.for_tensor(cpu, None, cpu) == "cpu build"
    with torch.no_grad():
        assert extension.for_tensor(grad) == "cpu build"
    assert extension.for_tensor(cpu.double()) == "cpu build"  # a gather copies any dtype
    assert extension.for_tensor(cpu.double(), floating=True) is None  # the computing kernels take no float64
    assert extension.for_tensor(cpu.half(), floating=True) == "cpu build"
    monkeypatch.setenv(extension.ENV, "fast")
    with pytest.raises(ValueError, match=r"TOKENPRUNE_EXT='fast'.*auto, off \(or 0\), all"):
        extension.for_tensor(cpu)


def test_kernels_in_use_names_the_build_each_device_would_run(monkeypatch):
    builds_that_load = set()
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: object() if cuda in builds_that_load else None)
    monkeypatch.setattr(extension, "load", lambda cuda, verbose=False: object())
    monkeypatch.setenv(extension.ENV, "auto")
    assert extension.kernels_in_use("cuda") == "pytorch ops (the CUDA build failed)"
    assert extension.kernels_in_use("cpu") == "pytorch ops (the CPU build failed)"
    builds_that_load.update({True, False})
    assert extension.kernels_in_use("cuda:0") == "CUDA build: the merge, the gather"  # not the attention received
    assert extension.kernels_in_use(torch.device("cpu")) == ("CPU build: ToMe's, MCTF's and Zero-TPrune's steps, "
                                                             "the merge, the gather, the top-k, the attention map")
    assert extension.kernels_in_use("meta") == "pytorch ops"
    monkeypatch.setenv(extension.ENV, "all")
    assert extension.kernels_in_use("cuda") == "CUDA build, every kernel"
    monkeypatch.setenv(extension.ENV, "off")
    assert extension.kernels_in_use("cpu") == "pytorch ops"


def test_no_extension_under_forward_mode_ad_or_torch_func(monkeypatch, cpu_build):
    """The kernels have no derivatives and read raw data: a tangent must not be cut off silently, and a vmap
    or jvp must not fail on a wrapped tensor. They run the PyTorch ops, as under autograd."""
    import torch.autograd.forward_ad as fwAD
    counting = Counting(cpu_build)
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: counting)
    monkeypatch.setenv(extension.ENV, "auto")
    x, keep = torch.randn(2, 6, 3), torch.tensor([[0, 4], [2, 3]])
    with fwAD.dual_level():
        out = ops.keep_tokens(fwAD.make_dual(x, torch.ones_like(x)), keep, 1)
        assert torch.equal(fwAD.unpack_dual(out).tangent, torch.ones(2, 3, 3))
    assert torch.equal(torch.func.vmap(lambda t: ops.keep_tokens(t, keep, 1))(x[None])[0], ops.keep_tokens(x, keep, 1))
    _, tangent = torch.func.jvp(lambda t: ops.keep_tokens(t, keep, 1), (x,), (torch.ones_like(x),))
    assert torch.equal(tangent, torch.ones(2, 3, 3))
    assert counting.calls == {"gather_kept": 1}  # only the plain call


@pytest.mark.parametrize("setting", ["auto", "all"])
def test_a_gradient_asked_of_a_weight_or_size_keeps_the_pytorch_ops(monkeypatch, cpu_build, setting):
    """A merge's output depends on its weights (MCTF's attention x size, ToMe's sizes) as well as its tokens: a
    gradient asked of them alone (frozen tokens from a frozen early block, a trainable later block whose attention
    gives the weights) must flow as the reference's does, not be cut by a kernel with no backward."""
    counting = Counting(cpu_build)
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: counting)
    monkeypatch.setattr(extension, "load", lambda cuda, verbose=False: counting)
    g = torch.Generator().manual_seed(0)
    t, keys = torch.randn(2, 9, 3, generator=g), torch.randn(2, 2, 9, 4, generator=g)
    weight = torch.rand(2, 9, 1, generator=g) + 0.5
    dest = torch.tensor([[0, 1, 1, 2, 0, 3, 2, 1, 0], [3, 0, 1, 2, 2, 1, 0, 3, 3]])
    plan = ops.bipartite_soft_matching(ops.head_mean(keys), 3, 1)
    merges = {"assign_mean": lambda w: ops.assign_mean(t, w, dest, 4),
              "bipartite_merge": lambda w: ops.bipartite_merge(keys, t, w, 3, 1)[0],
              "merge_mean": lambda w: ops.merge_mean(t, w, plan, 1)[0]}

    def output_and_gradient(merge):
        w = weight.clone().requires_grad_()
        out = merge(w)
        out.pow(2).sum().backward()
        return out.detach(), w.grad

    for name, merge in merges.items():
        monkeypatch.setenv(extension.ENV, "off")
        expected = output_and_gradient(merge)
        assert expected[1].abs().sum() > 0
        monkeypatch.setenv(extension.ENV, setting)
        counting.calls.clear()
        out, grad = output_and_gradient(merge)
        torch.testing.assert_close(out, expected[0], rtol=0, atol=0)
        torch.testing.assert_close(grad, expected[1], rtol=0, atol=0)
        assert counting.calls == {}, name  # the reference ran
        with torch.no_grad():  # without a gradient the kernel takes it again
            merge(weight)
        assert sum(counting.calls.values()) == (setting == "all" or name != "merge_mean"), name


def test_inputs_a_kernel_does_not_take_keep_the_pytorch_ops(monkeypatch, cpu_build):
    """What the PyTorch ops accept and a kernel does not (found by an adversarial review, 2026-12-03): each gives the
    reference's result, through every kernel setting, instead of the kernel's error or a silently wrong copy."""
    from tokenprune.methods import zero_tprune
    g = torch.Generator().manual_seed(0)
    t, weight = torch.randn(2, 4, 3, generator=g), torch.rand(2, 4, 1, generator=g) + 0.5
    dest = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    attn, keys = torch.randn(2, 3, 9, 9, generator=g).softmax(-1), torch.randn(2, 3, 9, 4, generator=g)
    q, k = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 6, 4, generator=g)
    tokens, idx = torch.randn(2, 5, 3, dtype=torch.complex64, generator=g), torch.tensor([[0, 2], [1, 3]])
    cases = {
        "int32 slots": lambda: ops.assign_mean(t, weight, dest.int(), 2),
        "one row of slots for two samples": lambda: ops.assign_mean(t, weight, dest[:1], 2),
        "float64 keys with a float32 map": lambda: zero_tprune.s_stage_keep(attn, keys.double(), 1, 2, 0, True),
        "bfloat16 k for float32 q": lambda: ops.received_attention(q, k.bfloat16(), 0.5),
        "one key head for three query heads": lambda: ops.received_attention(q, k[:, :1], 0.5),
        "a conjugate view": lambda: ops.keep_tokens(tokens.conj(), idx, 1),
        "a negative view": lambda: ops.keep_tokens(torch._neg_view(tokens), idx, 1),
        "float64 q and k": lambda: ops.received_attention(q.double(), k.double(), 0.5),
        "float64 tokens to merge": lambda: ops.merge_mean(
            t.double(), None, ops.bipartite_soft_matching(t[:, :, :2], 1, 1), 1)[0],
        # the kernel sums sizes in float32: float64 sizes of float32 tokens came back rounded through float32
        "float64 sizes: the tokens": lambda: ops.merge_mean(
            t, weight.double(), ops.bipartite_soft_matching(t[:, :, :2], 1, 1), 1)[0],
        "float64 sizes: the sizes": lambda: ops.merge_mean(
            t, weight.double(), ops.bipartite_soft_matching(t[:, :, :2], 1, 1), 1)[1],
    }
    for name, run in cases.items():
        monkeypatch.setenv(extension.ENV, "off")
        expected = run()
        for setting in ("auto", "all"):
            monkeypatch.setenv(extension.ENV, setting)
            assert torch.equal(run(), expected), (name, setting)
    # ... while q and k of one dtype and head count do reach the kernel (TOKENPRUNE_EXT=all on CPU)
    counting = Counting(cpu_build)
    monkeypatch.setattr(extension, "load", lambda cuda, verbose=False: counting)
    monkeypatch.setenv(extension.ENV, "all")
    ops.received_attention(q, k, 0.5)
    assert counting.calls == {"received_attention": 1}


def test_on_a_gpu_the_attention_received_keeps_the_pytorch_ops_by_default(monkeypatch):
    """Its CUDA kernel measured 13-56x slower than the products and softmax on an H200 (docs/performance.md): the
    op asks for the extension saying so, which keeps CUDA tensors on the PyTorch ops under `auto`."""
    asked = []
    real = extension.for_tensor
    monkeypatch.setattr(extension, "for_tensor", lambda t, *a, **kw: asked.append(kw) or real(t, *a, **kw))
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    ops.received_attention(q, k, 0.5)
    assert [kw.get("cuda_kernel_pays", True) for kw in asked] == [False]


def test_no_extension_under_torch_compile(monkeypatch):
    monkeypatch.setenv(extension.ENV, "all")
    seen = []

    def probe(t):
        seen.append(extension.for_tensor(t))
        return t + 1
    torch.compile(probe, backend="eager")(torch.zeros(2))
    assert seen == [None]


def test_a_failed_cuda_build_falls_back_with_one_warning(monkeypatch, capsys):
    def broken(cuda, verbose=False):
        raise RuntimeError("nvcc: not found\nmore detail")
    monkeypatch.setattr(extension, "load", broken)
    monkeypatch.setattr(extension, "_is_built", lambda name: False)
    extension._load_or_warn.cache_clear()
    monkeypatch.delenv(extension.ENV, raising=False)
    try:
        with pytest.warns(RuntimeWarning, match=r"the CUDA extension could not be built \(nvcc: not found\)") as got:
            assert extension.for_tensor(FakeCuda()) is None
        assert got[0].filename == __file__  # the caller outside tokenprune and torch
        assert capsys.readouterr().err == ""  # the notice of a CPU compile is not this build's
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # only once
            assert extension.for_tensor(FakeCuda()) is None
        monkeypatch.setenv(extension.ENV, "all")  # asked for explicitly: the failure is an error
        with pytest.raises(RuntimeError, match="nvcc: not found"):
            extension.for_tensor(FakeCuda())
    finally:
        extension._load_or_warn.cache_clear()


def test_a_failed_cpu_build_falls_back_to_the_pytorch_ops_with_one_warning(monkeypatch, capsys):
    def broken(cuda, verbose=False):
        raise RuntimeError("c++: not found")
    model, x, reference = tome_through_the_pytorch_ops(monkeypatch, "vit_base_patch16_224", 1)
    monkeypatch.setattr(extension, "load", broken)
    monkeypatch.setattr(extension, "_is_built", lambda name: False)
    extension._load_or_warn.cache_clear()
    monkeypatch.delenv(extension.ENV, raising=False)
    try:
        with pytest.warns(RuntimeWarning, match=r"the CPU extension could not be built \(c\+\+: not found\)") as got:
            with torch.no_grad():
                assert torch.equal(model(x), reference)
        assert got[0].filename == __file__  # the forward's caller, not a line inside torch or tokenprune
        assert "tokenprune: compiling the CPU kernels (once" in capsys.readouterr().err  # said before the wait
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # only once
            with torch.no_grad():
                model(x)
        extension._load_or_warn.cache_clear()
        monkeypatch.setattr(extension, "_is_built", lambda name: name == extension.build_name(cuda=False))  # cached
        with pytest.warns(RuntimeWarning, match="could not be built"):
            extension.for_tensor(x, cpu_kernel_pays=True)
        assert capsys.readouterr().err == ""
    finally:
        extension._load_or_warn.cache_clear()


def test_the_build_tools_import_without_torchs_no_gpu_notice(monkeypatch, tmp_path):
    """ToMe on a CPU-only machine with a CUDA toolkit loads the CPU build: torch's import-time notice that no
    CUDA runtime was found would be noise in every first forward, so it is silenced (and only it)."""
    import logging

    import torch.utils
    from torch.utils import cpp_extension as imported
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("torch.utils.cpp_extension")
    log.addHandler(handler)
    monkeypatch.setattr(torch.utils, "cpp_extension", imported)  # put back afterwards, as is the module entry
    monkeypatch.delattr(torch.utils, "cpp_extension")  # so that the next import runs the module's body
    monkeypatch.delitem(sys.modules, "torch.utils.cpp_extension")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # a toolkit, and no GPU: torch's notice
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        module = extension._cpp_extension()
        assert module.CUDA_HOME == str(tmp_path)
        assert seen == []
        assert log.level == logging.NOTSET  # the logger is left as it was
        log.warning("later messages still reach the handlers")
        assert seen == ["later messages still reach the handlers"]
    finally:
        log.removeHandler(handler)


def test_toolkit_root_is_asked_of_nvcc():
    if shutil.which("nvcc") is None:
        assert extension.toolkit_root() is None
        return
    root = extension.toolkit_root()
    assert root is not None and (__import__("pathlib").Path(root) / "bin" / "nvcc").exists()


def test_the_cuda_build_compiles_and_refuses_nothing_it_should_take(cuda_build):
    """CI's compile check: nvcc builds the kernels for every default architecture (no GPU needed) and the
    module imports; its CPU path is the CPU build's (held to the reference above)."""
    assert cuda_build.with_cuda is True
    x = torch.randn(1, 4, 2)
    keep = torch.tensor([[2, 0]])
    assert torch.equal(cuda_build.gather_kept(x, keep, 1), x[:, [0, 3, 1]])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_equal_the_reference_on_the_gpu(monkeypatch, cuda_build, dtype):
    monkeypatch.setenv(extension.ENV, "off")  # the references: PyTorch's ops on CPU tensors
    g = torch.Generator().manual_seed(0)
    for batch, prefix, patches in [(1, 0, 7), (4, 1, 196), (3, 5, 255), (2, 2, 1)]:
        x = torch.randn(batch, prefix + patches, 384, generator=g).to(dtype)
        keep = torch.rand(batch, patches, generator=g).argsort(-1)[:, :max(1, patches // 3)]
        got = cuda_build.gather_kept(x.cuda(), keep.cuda(), prefix).cpu()
        assert torch.equal(got, ops.keep_tokens(x, keep, prefix))
        for other in (torch.uint8, torch.int64, torch.complex128):  # 1, 8 and 16 bytes (16 was refused)
            t = torch.randn(batch, prefix + patches, 3, generator=g, dtype=torch.complex128)
            t = t if other.is_complex else t.real.mul(50).to(other)
            assert torch.equal(cuda_build.gather_kept(t.cuda(), keep.cuda(), prefix).cpu(),
                               ops.keep_tokens(t, keep, prefix)), other
        n = x.shape[1]
        dest = torch.randint(0, max(1, n // 2), (batch, n), generator=g)
        dest[:, :max(1, n // 2)] = torch.arange(max(1, n // 2))
        weight = torch.randint(1, 6, (batch, n), generator=g).float()
        merged, summed = cuda_build.weighted_merge(x.cuda(), weight.cuda(), dest.cuda(), max(1, n // 2))
        reference = ops.assign_mean(x.float(), weight[..., None], dest, max(1, n // 2)).to(dtype)
        torch.testing.assert_close(merged.cpu().float(), reference.float(), **fp32_tolerance(dtype))
        q, k = (torch.randn(batch, 6, n, 64, generator=g).to(dtype) for _ in range(2))
        torch.testing.assert_close(cuda_build.received_attention(q.cuda(), k.cuda(), 0.125).cpu(),
                                   ops.received_attention(q.float(), k.float(), 0.125), rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_on_the_gpu_uses_the_kernels_and_matches_the_pytorch_ops(monkeypatch):
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval().cuda()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    tokenprune.apply(model, "tome", keep=0.5)
    monkeypatch.setenv(extension.ENV, "off")
    with torch.no_grad():
        reference = model(x)
    monkeypatch.setenv(extension.ENV, "auto")
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-3, atol=1e-4)


def test_kernel_bench_checks_agreement_and_refuses_a_missing_gpu(monkeypatch, capsys):
    from tokenprune.eval import kernel_bench

    monkeypatch.setitem(kernel_bench.SHAPES, "tiny", (9, 16, 2))
    rows = kernel_bench.bench_kernels(["tiny"], [1, 3], "bf16", "cpu", repeats=1)
    assert [(r.op, r.batch) for r in rows] == [(op, b) for b in (1, 3) for op in ("gather", "merge",
                                                                                  "received_attention")]
    assert all(r.max_abs_diff <= 1e-2 and r.torch_ms > 0 and r.kernel_ms > 0 for r in rows)
    assert rows[0].max_abs_diff == 0  # a gather is exact
    if not torch.cuda.is_available():
        assert kernel_bench.main(["--device", "cuda", "--shapes", "deit_small"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("guess", ["/usr/local", "/opt/guess"])  # sorting after and before the real one
def test_the_cuda_build_points_torch_at_the_toolkit_even_after_torch_guessed(monkeypatch, guess):
    """torch reads CUDA_HOME once, at import; a wrong early guess is corrected before the CUDA build."""
    from torch.utils import cpp_extension

    seen = {}
    monkeypatch.setenv("CUDA_HOME", "/the/toolkit")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", guess)  # e.g. the guess from a wrapper-script nvcc
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: seen.update(kwargs, home=cpp_extension.CUDA_HOME))
    extension.load.__wrapped__(cuda=True)
    assert seen["home"] == "/the/toolkit"
    assert seen["name"] == extension.build_name(cuda=True) and "-DTOKENPRUNE_WITH_CUDA" in seen["extra_cflags"]
    assert [p.rsplit("/", 1)[-1] for p in seen["sources"]] == ["ops.cpp", "kernels.cu"]


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("platform, torch_openmp, flagged", [("linux", True, True), ("linux", False, False),
                                                              ("darwin", True, False)])
def test_the_builds_compile_their_parallel_loops_with_openmp_where_torch_does(monkeypatch, cuda, platform,
                                                                               torch_openmp, flagged):
    """``at::parallel_for`` is a header template: the kernels' loops reach torch's threads only when compiled and
    linked with ``-fopenmp`` (torch's Linux builds run on OpenMP); not where torch has no OpenMP, nor on macOS."""
    from torch.utils import cpp_extension

    seen = {}
    monkeypatch.setenv("CUDA_HOME", "/the/toolkit")
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(torch.backends.openmp, "is_available", lambda: torch_openmp)
    monkeypatch.setattr(sys, "platform", platform)
    extension.load.__wrapped__(cuda=cuda)
    assert ("-fopenmp" in seen["extra_cflags"]) == flagged
    assert seen["extra_ldflags"] == (["-fopenmp"] if flagged else [])
    assert "-fopenmp" not in seen["extra_cuda_cflags"]  # nvcc's host compiler is not asked for it


@pytest.mark.skipif(not (torch.backends.openmp.is_available() and sys.platform.startswith("linux")),
                    reason="torch without OpenMP, or not Linux: the build's loops are serial by design")
def test_the_cpu_build_calls_openmp(cpu_build):
    """The built library forks OpenMP threads (its loops run in parallel), and shares torch's runtime: it needs
    GOMP's entry point, and the process holds one ``libgomp.so.1`` (wheels that vendor their own under a mangled
    name, as sentencepiece's ``libgomp-<hash>.so``, link only themselves to it)."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm (binutils) to read the library's symbols")
    import subprocess

    undefined = subprocess.run([nm, "-D", "--undefined-only", cpu_build.__file__], capture_output=True, text=True,
                               check=True).stdout
    assert "GOMP_parallel" in undefined
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if line.split()[-1].rsplit("/", 1)[-1].startswith("libgomp.so")}
    assert len(runtimes) == 1, runtimes


def test_without_the_pip_cuda_headers_no_extra_include(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nvidia.cu13", None)  # import fails: ImportError
    assert extension._pip_cuda_includes() == []
