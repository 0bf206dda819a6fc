"""The timm adapter: exactness, schedules, restore, re-entrancy, copying, compiling."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from conftest import assert_threads_get_what_each_gets_alone, images, tiny_timm
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block
from tokenprune.patches import timm_vit
from tokenprune.patches.timm_vit import ReducingBlock, TimmAttention

import tokenprune
from tokenprune import extension, ops
from tokenprune.block import AttentionRequest, attend
from tokenprune.registry import Needs

METHODS = ["tome", "random"]  # the every-block methods
ALL_METHODS = ["tome", "random", "zero-tprune", "mctf"]


def run(model, x):
    with torch.inference_mode():
        return model(x)


def op_names(model, x) -> list[str]:
    with torch.profiler.profile() as prof, torch.inference_mode():
        model(x)
    return [e.name for e in prof.events()]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_keep_one_is_bit_identical_with_the_same_kernels(family, method):
    model, x = tiny_timm(family), images()
    expected = run(model, x)
    stock_ops = op_names(model, x)
    tokenprune.apply(model, method, keep=1.0)
    assert torch.equal(run(model, x), expected)
    assert tokenprune.last_forward(model).token_counts == [model.num_prefix_tokens + 64] * 4
    patched_ops = op_names(model, x)
    sdpa = [n for n in stock_ops if "scaled_dot_product" in n]
    assert sdpa and [n for n in patched_ops if "scaled_dot_product" in n] == sdpa
    assert "aten::softmax" not in patched_ops


@pytest.mark.parametrize("method", ["tome", "random", "mctf"])
def test_r_zero_is_bit_identical(method):
    model, x = tiny_timm(), images()
    expected = run(model, x)
    tokenprune.apply(model, method, r=0)
    assert torch.equal(run(model, x), expected)


def test_merging_keeps_fused_attention():
    model, x = tiny_timm(), images()
    tokenprune.apply(model, "tome", keep=0.3)
    names = op_names(model, x)
    assert sum("_scaled_dot_product" in n and "for_cpu" in n for n in names) == 4
    assert "aten::softmax" not in names


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("keep", [0.9, 0.5, 0.33, 0.1])
def test_token_counts_follow_the_planned_schedule(family, method, keep):
    model, x = tiny_timm(family), images()
    tokenprune.apply(model, method, keep=keep)
    out = run(model, x)
    assert out.shape == (2, 10)
    report = tokenprune.last_forward(model)
    prefix = model.num_prefix_tokens
    schedule = ops.plan_removals(64, 4, ops.final_patch_count(64, keep))
    expected, n = [], 64
    for step in schedule:
        expected.append(prefix + n)
        n -= step
    assert report.token_counts == expected
    assert report.output_tokens == prefix + max(1, round(keep * 64))
    assert report.num_prefix_tokens == prefix


def test_native_r_overrides_keep_and_matches_tome_counts():
    model = tiny_timm(depth=12, img_size=224, patch_size=16)  # DeiT's 197 tokens
    tokenprune.apply(model, "tome", keep=0.9, r=13)
    run(model, images(1, 224))
    counts = tokenprune.last_forward(model).token_counts
    assert counts == [197 - 13 * i for i in range(12)]
    assert tokenprune.last_forward(model).output_tokens == 41
    tokenprune.apply(model, "tome", r=16)  # the 50% cap bites in the last two blocks
    run(model, images(1, 224))
    assert tokenprune.last_forward(model).token_counts + [tokenprune.last_forward(model).output_tokens] == \
        [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]
    tokenprune.apply(model, "tome", r=[8] * 6)  # per-layer list, zero-padded
    run(model, images(1, 224))
    assert tokenprune.last_forward(model).output_tokens == 197 - 48
    tokenprune.apply(model, "tome", r=(8, -1))  # decreasing schedule: 16 .. 0
    run(model, images(1, 224))
    counts = tokenprune.last_forward(model).token_counts
    steps = [a - b for a, b in zip(counts, counts[1:])]
    assert steps[0] == 16 and steps == sorted(steps, reverse=True)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_remove_restores_outputs_state_dict_and_classes(family, method):
    model, x = tiny_timm(family), images()
    expected, state = run(model, x), copy.deepcopy(model.state_dict())
    model_class = type(model)
    tokenprune.apply(model, method, keep=0.4)
    assert not torch.equal(run(model, x), expected)
    tokenprune.remove(model)
    assert type(model) is model_class and all(type(b) is Block for b in model.blocks)
    assert not hasattr(model, "tokenprune_reducer")
    assert torch.equal(run(model, x), expected)
    restored = model.state_dict()
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="not patched"):
        tokenprune.remove(model)


def test_apply_twice_reconfigures_without_patching_twice():
    model, x = tiny_timm(), images()
    tokenprune.apply(model, "random", keep=0.5)
    patched_class = type(model)
    tokenprune.apply(model, "tome", keep=0.25)
    assert type(model) is patched_class
    assert all(type(b) is ReducingBlock for b in model.blocks)
    run(model, x)
    assert tokenprune.last_forward(model).method == "tome"
    assert tokenprune.last_forward(model).output_tokens == 1 + 16
    tokenprune.remove(model)
    assert type(model).__name__ == "VisionTransformer"


def test_dynamic_img_size_schedules_each_input():
    model = tiny_timm(dynamic_img_size=True)
    tokenprune.apply(model, "tome", keep=0.5)
    for size, patches in [(32, 64), (48, 144), (24, 36)]:
        run(model, images(2, size))
        assert tokenprune.last_forward(model).token_counts[0] == 1 + patches
        assert tokenprune.last_forward(model).output_tokens == 1 + round(0.5 * patches)


def test_threads_get_what_each_would_get_alone():
    model = tiny_timm(dynamic_img_size=True)
    tokenprune.apply(model, "tome", keep=0.3)
    inputs = [images(3, 32, seed=1), images(1, 48, seed=2), images(2, 40, seed=3)]
    assert_threads_get_what_each_gets_alone(lambda x: run(model, x), inputs, rounds=5)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_deepcopy_and_pickle_of_a_patched_model(method):
    model, x = tiny_timm("deit_small_distilled_patch16_224"), images()
    tokenprune.apply(model, method, keep=0.4)
    expected = run(model, x)
    twin = copy.deepcopy(model)
    revived = pickle.loads(pickle.dumps(model))
    for other in (twin, revived):
        assert type(other) is type(model)
        assert torch.equal(run(other, x), expected)
        assert tokenprune.last_forward(other).output_tokens == 2 + 26
    run(twin, images(1))  # the copy's forwards are its own
    assert tokenprune.last_forward(model).size is None or tokenprune.last_forward(model).size.shape[0] == 2
    tokenprune.remove(revived)
    assert type(revived).__name__ == "VisionTransformerDistilled"


# mctf: its attention map is computed into the forward's scratch buffer (out=, softmax in place)
@pytest.mark.parametrize("method, keep", [("tome", 0.3), ("mctf", 0.5)])
def test_torch_compile_matches_eager(method, keep):
    model, x = tiny_timm(depth=2), images()
    tokenprune.apply(model, method, keep=keep)
    eager = run(model, x)
    compiled = torch.compile(model)
    torch.testing.assert_close(run(compiled, x), eager, atol=1e-5, rtol=1e-5)


# every method a compiled encoder runs is one graph: a graph break (a data-dependent shape, a query dynamo cannot
# trace) splits each block into pieces compiled one by one, and past dynamo's recompile limit the blocks run eager
@pytest.mark.parametrize("method", ["tome", "mctf", "zero-tprune", "random"])
def test_a_patched_model_traces_as_one_graph(method):
    model, x = tiny_timm(depth=4), images()
    tokenprune.apply(model, method, keep=0.5)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_a_compiled_forward_writes_into_no_scratch_buffer():
    """The eager forward reuses one scratch buffer for every block's attention map (``out=``); traced, each write
    into a view of it is functionalised into a copy of the whole buffer (MCTF compiled ran 16x slower than eager
    at batch 256). The graph dynamo hands the compiler must hold no ``out=`` call."""
    model, x = tiny_timm(depth=4), images()
    tokenprune.apply(model, "mctf", keep=0.5)
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch._dynamo.reset()
        torch.compile(model, backend=keep_graph)(x)
    calls = [node for gm in graphs for node in gm.graph.nodes if node.op in ("call_function", "call_method")]
    assert any("softmax" in str(node.target) for node in calls)  # MCTF's map is in the graph
    assert not [node for node in calls if "out" in node.kwargs]


def traced_calls(model, x) -> list[str]:
    """The functions the graph dynamo hands the compiler calls, by name (a fresh trace)."""
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=keep_graph)(x)
    return [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("setting, calls_kernels", [("auto", True), ("off", False)])
def test_compiled_mctf_calls_the_cpu_builds_matching_and_merges(monkeypatch, setting, calls_kernels):
    """Inductor's code for MCTF's matching (sorts) and merges (atomic scatter-adds) ran slower than the CPU build's
    one call each: a compiled CPU forward calls the build's ops (registered with torch.library), unless
    TOKENPRUNE_EXT=off, with the eager forward's output."""
    monkeypatch.setenv(extension.ENV, setting)
    model, x = tiny_timm(depth=4), images()
    tokenprune.apply(model, "mctf", keep=0.5)
    with torch.no_grad():
        calls = traced_calls(model, x)
    ours = sorted({c for c in calls if "tokenprune" in c})
    assert ours == (["tokenprune.mctf_plan", "tokenprune.weighted_merge"] if calls_kernels else []), ours
    torch._dynamo.reset()
    torch.testing.assert_close(run(torch.compile(model), x), run(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("setting, calls_kernels", [("auto", True), ("off", False)])
def test_compiled_tome_calls_the_cpu_builds_one_call_step(monkeypatch, setting, calls_kernels):
    """ToMe's whole step (matching and merge) as the CPU build's one call ran 2-5% faster a forward than inductor's
    code for it (its sorts, max and scatter-add; docs/performance.md, session 30): a compiled CPU forward calls it,
    every block, unless TOKENPRUNE_EXT=off, with the eager forward's output."""
    monkeypatch.setenv(extension.ENV, setting)
    model, x = tiny_timm(depth=4), images()
    tokenprune.apply(model, "tome", r=2)
    with torch.no_grad():
        calls = [c for c in traced_calls(model, x) if "tokenprune" in c]
    assert calls == (["tokenprune.bipartite_merge"] * len(model.blocks) if calls_kernels else []), calls
    torch._dynamo.reset()
    torch.testing.assert_close(run(torch.compile(model), x), run(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("setting, calls_kernels", [("auto", True), ("off", False)])
def test_compiled_zero_tprune_calls_the_cpu_builds_s_stage(monkeypatch, setting, calls_kernels):
    """Zero-TPrune's I'- and S-stage as the CPU build's one call ran 4-5% faster a forward than inductor's code for
    it at batch 1 on the small models (docs/performance.md, session 30): a compiled CPU forward calls it at each
    pruning layer, unless TOKENPRUNE_EXT=off, with the eager forward's output (which calls it too)."""
    monkeypatch.setenv(extension.ENV, setting)
    model, x = tiny_timm(depth=4), images()
    tokenprune.apply(model, "zero-tprune", keep=0.5)
    with torch.no_grad():
        calls = [c for c in traced_calls(model, x) if "tokenprune" in c]
        pruning_layers = sum(count < before for before, count in zip(
            tokenprune.last_forward(model).token_counts, tokenprune.last_forward(model).token_counts[1:]))
    assert pruning_layers > 0
    assert calls == (["tokenprune.similarity_prune"] * pruning_layers if calls_kernels else []), calls
    torch._dynamo.reset()
    torch.testing.assert_close(run(torch.compile(model), x), run(model, x), atol=1e-5, rtol=1e-5)


def test_a_frozen_compiled_mctf_model_calls_the_kernels_without_no_grad():
    """What keeps the kernels out of a graph is a gradient asked of the tokens, not autograd being on: a model
    whose parameters ask none, run without ``torch.no_grad``, calls them."""
    model, x = tiny_timm(depth=3), images()
    tokenprune.apply(model, "mctf", keep=0.5)
    model.requires_grad_(False)
    assert torch.is_grad_enabled()
    assert sorted({c for c in traced_calls(model, x) if "tokenprune" in c}) == ["tokenprune.mctf_plan",
                                                                                "tokenprune.weighted_merge"]


def test_compiled_mctf_in_float64_keeps_the_pytorch_ops():
    """The kernels take float32 and half precision: a float64 model's compiled graph calls none of them."""
    model, x = tiny_timm(depth=3), images()
    tokenprune.apply(model.double(), "mctf", keep=0.5)
    with torch.no_grad():
        assert not [c for c in traced_calls(model, x.double()) if "tokenprune" in c]


def test_compiled_mctf_trains_through_the_pytorch_ops():
    """The kernels have no backward: a compiled forward that records gradients keeps the PyTorch ops, and its
    gradients are the eager forward's."""
    model, x = tiny_timm(depth=3), images()
    tokenprune.apply(model, "mctf", keep=0.5)
    model.train()
    assert not [c for c in traced_calls(model, x) if "tokenprune" in c]
    grads = []
    for forward in (model, torch.compile(model)):
        model.zero_grad()
        forward(x).sum().backward()
        grads.append(model.blocks[1].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)


def test_compiled_graphs_hand_the_kernels_to_cpu_tensors_of_kernel_dtypes_only():
    """Inside a traced function ``for_tensor`` hands over the CPU build's graph ops for a CPU tensor of a dtype the
    kernels take, when the caller says its op is one of them; not for another device (a meta tensor here, as a
    CUDA one: the CPU build's ops would run on it) or dtype, nor for other ops."""
    def asks(t, **kwargs):
        def probe(u):
            return extension.for_tensor(u, floating=True, cpu_kernel_pays=True, **kwargs) is not None
        torch._dynamo.reset()
        return torch.compile(probe, backend="eager", fullgraph=True)(t)

    assert asks(torch.ones(2, 3), in_compiled_graphs=True)
    assert not asks(torch.ones(2, 3, device="meta"), in_compiled_graphs=True)
    assert not asks(torch.ones(2, 3, dtype=torch.float64), in_compiled_graphs=True)
    assert not asks(torch.ones(2, 3))


def test_the_ops_compiled_graphs_call_are_sound_custom_ops():
    """torch.library's own checks of the four ops a compiled graph calls: schema, fake (meta) shapes and dtypes
    against the real outputs, no aliasing; and their CPU kernels are the CPU build's (registered from C++ when
    it loads): the same outputs as its module's functions."""
    from tokenprune.methods import mctf

    build = extension.load(cuda=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 8, generator=g)
    received, size = torch.rand(2, 9, generator=g) + 0.01, torch.ones(2, 9)
    dest, n_out = mctf.merge_plan(x, received, size, (1.0, 20.0, 40.0), (True,) * 3, 3, 1, True)
    for half in (torch.float32, torch.bfloat16):
        args = (x.to(half), received, dest, n_out)
        torch.library.opcheck(torch.ops.tokenprune.weighted_merge, args)
        for op_out, module_out in zip(torch.ops.tokenprune.weighted_merge(*args), build.weighted_merge(*args)):
            assert torch.equal(op_out, module_out)
    keys = torch.randn(2, 3, 9, 4, generator=g)
    sizes = size[..., None]
    for half, token_size in ((torch.float32, None), (torch.bfloat16, sizes + 1), (torch.float32, sizes)):
        args = (keys, x.to(half), token_size, 3, 1)
        torch.library.opcheck(torch.ops.tokenprune.bipartite_merge, args)
        for op_out, module_out in zip(torch.ops.tokenprune.bipartite_merge(*args), build.bipartite_merge(*args)):
            assert torch.equal(op_out, module_out)
    probs = torch.softmax(torch.randn(2, 3, 9, 9, generator=g), dim=-1)
    for prune_args in ((probs, keys, 1, 3, 0, True), (probs, keys.bfloat16(), 0, 2, -1, False)):
        torch.library.opcheck(torch.ops.tokenprune.similarity_prune, prune_args)
        assert torch.equal(torch.ops.tokenprune.similarity_prune(*prune_args), build.similarity_prune(*prune_args))
    plan_args = (x, received, size, [1.0, 20.0, 40.0], [False, True, True], 1, 3, True)
    torch.library.opcheck(torch.ops.tokenprune.mctf_plan, plan_args)
    assert torch.equal(torch.ops.tokenprune.mctf_plan(*plan_args), build.mctf_plan(*plan_args)[0])
    assert not torch.equal(build.mctf_plan(*plan_args)[0], dest)  # the criteria reach the kernel


@pytest.mark.parametrize("method", ["zero-tprune", "random"])
def test_compiled_matches_eager(method):
    model, x = tiny_timm(depth=4), images()
    tokenprune.apply(model, method, keep=0.5)
    eager = run(model, x)
    torch.testing.assert_close(run(torch.compile(model), x), eager, atol=1e-5, rtol=1e-5)


def test_pooling_counts_merged_tokens_by_size():
    for name in ("vit_base_patch16_siglip_gap_224", "vit_base_patch16_siglip_224"):
        model, x = tiny_timm(name), images()
        tokenprune.apply(model, "tome", keep=0.25)
        with torch.inference_mode():
            logits = model(x)
            size = tokenprune.last_forward(model).size
            feats = model.forward_features(x)
            if model.attn_pool is None:
                pooled = (feats * size).sum(1) / size.sum(1)  # size-weighted average
                assert not torch.allclose(pooled, feats.mean(1))
            else:
                pooled = model.attn_pool(feats, attn_mask=size.log()[:, None, None, :, 0])
            expected = model.head(model.fc_norm(pooled))
        torch.testing.assert_close(logits, expected)


def test_forward_intermediates_runs_unreduced():
    model, x = tiny_timm(), images()
    stock = model.forward_intermediates(x, intermediates_only=True)
    tokenprune.apply(model, "tome", keep=0.3)
    patched = model.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(stock, patched))


def test_attn_mask_is_refused_while_reducing():
    model = tiny_timm()
    tokenprune.apply(model, "tome", keep=0.5)
    with pytest.raises(ValueError, match="attn_mask"):
        model(images(), attn_mask=torch.zeros(1, 1, 65, 65))


@pytest.mark.parametrize("method", ["tome", "mctf", "zero-tprune", "random"])
def test_attn_mask_and_is_causal_at_keep_1_give_the_stock_model_s_output(method):
    """Nothing is removed, so the caller's mask still fits every block: the stock model's answer, not a refusal."""
    model, x = tiny_timm(), images()
    hidden = torch.rand(65, 65, generator=torch.Generator().manual_seed(0)) < 0.3
    mask = torch.zeros(65, 65).masked_fill(hidden, float("-inf")).fill_diagonal_(0.0)[None, None]
    with torch.inference_mode():
        stock = model(x, attn_mask=mask), model(x, is_causal=True), model.forward_features(x, attn_mask=mask)
        tokenprune.apply(model, method, keep=1.0)
        patched = model(x, attn_mask=mask), model(x, is_causal=True), model.forward_features(x, attn_mask=mask)
        report = tokenprune.last_forward(model)  # of the masked call
    assert all(torch.equal(a, b) for a, b in zip(stock, patched))
    assert not torch.equal(stock[0], model(x)) and report.token_counts == [65] * 4 and report.output_tokens == 65


def attention_with_taps(attn, x, bias, keep_probabilities=False):
    """The shared attention step on timm's attention, asking for q/k (and probabilities)."""
    request = AttentionRequest(needs=Needs.PROBABILITIES if keep_probabilities else Needs.QUERIES_KEYS)
    return attend(TimmAttention(attn), x, bias, request)[0], request.taps


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("variant", [{}, {"qk_norm": True}, {"scale_norm": True, "norm_layer": torch.nn.LayerNorm},
                                     {"gated": True}])
def test_attention_with_taps_is_timms_attention(fused, variant):
    from timm.layers import Attention
    torch.manual_seed(0)
    attn = Attention(48, num_heads=3, **({"norm_layer": torch.nn.LayerNorm} if "qk_norm" in variant else {}),
                     **variant).eval()
    attn.fused_attn = fused
    x, bias = torch.randn(2, 17, 48), torch.rand(2, 1, 1, 17).log()
    with torch.inference_mode():
        for mask in (None, bias):
            out, taps = attention_with_taps(attn, x, mask)
            assert torch.equal(out, attn(x, attn_mask=mask))
            assert torch.equal(attend(TimmAttention(attn), x, mask, AttentionRequest())[0], attn(x, attn_mask=mask))
            assert taps.q.shape == taps.k.shape == (2, 3, 17, 16)


def test_taps_keep_the_probabilities_they_were_asked_for():
    from timm.layers import Attention

    torch.manual_seed(0)
    attn = Attention(48, num_heads=3).eval()
    x, bias = torch.randn(2, 17, 48), torch.rand(2, 1, 1, 17).log()
    with torch.inference_mode():
        out, taps = attention_with_taps(attn, x, bias, keep_probabilities=True)
        torch.testing.assert_close(out, attn(x, attn_mask=bias), atol=1e-6, rtol=1e-5)
        without = attention_with_taps(attn, x, bias)[1]
        assert without.probs is None
        torch.testing.assert_close(taps.probs, without.probabilities())
        torch.testing.assert_close(taps.probs.sum(-1), torch.ones(2, 3, 17))


@pytest.mark.parametrize("method", ["tome", "mctf"])
def test_reset_classifier_gives_the_size_weighted_embeddings_of_an_average_pooled_model(method):
    """The README's way to size-weighted embeddings of an ``avg``-pooled model after merging: ``reset_classifier(0)``
    then ``model(x)`` is the normed mean of the output tokens, each weighted by the patches it absorbed."""
    model = tokenprune.apply(tiny_timm("vit_base_patch16_224", class_token=False, global_pool="avg"), method, keep=0.5)
    x = images(2)
    with torch.inference_mode():
        tokens = model.forward_features(x)
        size = tokenprune.last_forward(model).size
        model.reset_classifier(0)
        embeddings = model(x)
    assert size is not None and size.max() > 1
    torch.testing.assert_close(embeddings, model.fc_norm((tokens * size).sum(1) / size.sum(1)), rtol=1e-6, atol=1e-6)


def test_timm_gradient_checkpointing_at_keep_1_is_the_stock_checkpointed_forward(monkeypatch):
    """Where nothing is removed (keep=1.0) the blocks run as timm runs them, checkpointed (its memory, no warning),
    with the stock model's outputs and gradients, and the report's counts."""
    stock, x = tiny_timm(depth=3), images()
    model = copy.deepcopy(stock)
    tokenprune.apply(model, "tome", keep=1.0)
    calls = []
    monkeypatch.setattr(timm_vit, "checkpoint_seq", lambda blocks, t: calls.append(1) or checkpoint_seq(blocks, t),
                        raising=False)
    for m in (stock, model):
        m.set_grad_checkpointing(True)
        m.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(x)
        out.sum().backward()
    expected = stock(x)
    expected.sum().backward()
    assert calls == [1]
    assert torch.equal(out, expected)
    for (name, p), q in zip(model.named_parameters(), stock.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert tokenprune.last_forward(model).token_counts == [model.patch_embed.num_patches + 1] * 3
    model.set_grad_checkpointing(False)  # off: neither checkpointed nor warned of, reducing or not
    for keep in (1.0, 0.5):
        tokenprune.apply(model, "tome", keep=keep)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(x).sum().backward()
    assert calls == [1]


def test_timm_gradient_checkpointing_is_not_applied_and_says_so():
    """The patched forward runs the blocks itself: timm's checkpointing is skipped (the same gradients, more memory),
    with a warning, only where it would have applied (training, gradients on)."""
    model, x = tiny_timm(depth=3), images()
    tokenprune.apply(model, "tome", keep=0.5)
    model.set_grad_checkpointing(True)
    model.train()
    with pytest.warns(RuntimeWarning, match="gradient checkpointing is not applied") as caught:
        model(x).sum().backward()
    assert {w.filename for w in caught} == {__file__}  # it points at the caller's line, not into timm or torch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(x)
        model.eval()(x)


class LowRankUpdated(torch.nn.Linear):
    """A linear whose output carries a low-rank update outside its ``weight``, as peft's unmerged LoRA layers
    do (theirs expose the base layer's weight as ``weight``)."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(7)
        self.down = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=g))
        self.up = torch.nn.Parameter(torch.randn(base.out_features, rank, generator=g) * 0.1)

    def forward(self, x):
        return super().forward(x) + x @ self.down.T @ self.up.T

    def folded(self) -> torch.nn.Linear:
        plain = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(self.weight + self.up @ self.down)
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_wrapped_qkv_projection_computes_what_the_module_computes(method):
    """A qkv that computes more than its weight (LoRA) gives, reduced, what the same update folded into a plain
    linear gives: MCTF's q/k-only and v-only projections must not read the weight past the module."""
    wrapped, x = tiny_timm(qkv_bias=True), images()
    for block in wrapped.blocks:
        block.attn.qkv = LowRankUpdated(block.attn.qkv)
    folded = copy.deepcopy(wrapped)
    for block in folded.blocks:
        block.attn.qkv = block.attn.qkv.folded()
    for model in (wrapped, folded):
        tokenprune.apply(model, method, keep=0.5, seed=0) if method == "random" else \
            tokenprune.apply(model, method, keep=0.5)
    torch.testing.assert_close(run(wrapped, x), run(folded, x), atol=1e-5, rtol=1e-5)
    assert tokenprune.last_forward(wrapped).token_counts == tokenprune.last_forward(folded).token_counts


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_hooks_on_the_qkv_projection_see_every_token_it_projects(kind):
    """Hooks on ``attn.qkv`` run in every reducing block, MCTF's included, on the tokens projected there: all of
    a merging block's input tokens (its q and k), then its merged tokens (their v)."""
    model, x = tiny_timm(), images()
    tokenprune.apply(model, "mctf", keep=0.5)
    seen = []
    for i, block in enumerate(model.blocks):
        register = getattr(block.attn.qkv, f"register_{kind}_hook")
        register(lambda module, args, *out, i=i: seen.append((i, args[0].shape[1])))
    expected = run(model, x)
    report = tokenprune.last_forward(model)
    leaving = report.token_counts[1:] + [report.output_tokens]
    expected_calls = [(i, n) for i, (entering, left) in enumerate(zip(report.token_counts, leaving))
                      for n in ((entering, left) if left < entering else (entering,))]
    assert len(expected_calls) > len(model.blocks)  # some block merged: the test reads something
    assert seen == expected_calls
    torch.testing.assert_close(run(model, x), expected)
