"""``tokenprune.check_speed``: a short calibration run, patched against unpatched, before committing.

No timing is asserted (the machine is shared): what is checked is that the two models timed are the ones
asked for, that the caller's model is left alone, and that the verdict follows the figures.
"""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from conftest import images, tiny_timm

import tokenprune
from tokenprune import speed
from tokenprune.budget import fit_flops_budget


def test_it_times_an_unpatched_and_a_patched_copy_and_leaves_the_model_alone(monkeypatch):
    model = tiny_timm()
    x = images(2)
    with torch.no_grad():
        before = model(x)
    seen = {}

    def fake_medians(calls, repeats, warmup, device):
        for name, call in calls.items():
            out = call()
            seen[name] = out.shape
        seen["repeats"], seen["device"], seen["warmup"] = repeats, device, warmup
        return {"baseline": 0.004, "patched": 0.002}, 0.01
    monkeypatch.setattr(speed, "interleaved_medians", fake_medians)
    check = tokenprune.check_speed(model, "tome", keep=0.5, batch_size=3, repeats=4)
    assert seen["baseline"] == seen["patched"] == (3, 10) and seen["repeats"] == 4
    assert check.speedup == 2.0 and check.pays and check.method == "tome" and check.keep == 0.5
    assert check.input_size == (3, 32, 32) and check.batch_size == 3
    assert 0 < check.flops_ratio < 1
    assert "pays" in str(check) and "NOT" not in str(check)
    assert f"FLOPs-ideal {1 / check.flops_ratio:.2f}x" in str(check) and "2.00x" in str(check)
    assert seen["warmup"] == 2  # the default warm-up
    tokenprune.check_speed(model, "tome", keep=0.5, warmup=0)
    assert seen["warmup"] == 0  # eager: no warm-up if asked
    assert not tokenprune.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_the_timed_copies_run_none_of_the_callers_hooks_and_the_model_keeps_them():
    model, calls = tiny_timm(), []
    model.blocks[0].register_forward_hook(lambda module, args, out: calls.append("block"))
    model.register_forward_pre_hook(lambda module, args: calls.append("model"))
    tokenprune.check_speed(model, "tome", keep=0.5, repeats=2, warmup=1)
    assert calls == []
    with torch.no_grad():
        model(images(1))
    assert calls == ["model", "block"]


def test_a_slower_configuration_is_said_not_to_pay(monkeypatch):
    monkeypatch.setattr(speed, "interleaved_medians", lambda calls, *a: ({"baseline": 0.002, "patched": 0.003}, None))
    check = tokenprune.check_speed(tiny_timm(), "mctf", keep=0.5)
    assert not check.pays and check.speedup == pytest.approx(2 / 3)
    assert "does NOT pay here" in str(check) and "torch.compile (compile=True)" in str(check)
    compiled = dataclasses.replace(check, compiled=True)  # already compiled: compiling is not offered as the remedy
    assert "does NOT pay here" in str(compiled) and "(try a larger batch or a lower keep)" in str(compiled)
    assert "torch.compile" not in str(compiled)


def test_the_verdict_names_the_option_that_decides_the_token_counts(monkeypatch):
    # with r= the reducer's keep (the default 0.33) decides nothing: the line said "tome keep=0.33"
    monkeypatch.setattr(speed, "interleaved_medians", lambda calls, *a: ({"baseline": 0.002, "patched": 0.001}, None))
    assert str(tokenprune.check_speed(tiny_timm(), "tome", r=3)).startswith("tome r=3 at batch 1 on cpu (eager): ")
    check = tokenprune.check_speed(tiny_timm(), "tome", keep=0.5, prop_attn=False)
    assert check.config == "keep=0.5, prop_attn=False"
    assert str(check).startswith("tome keep=0.5, prop_attn=False at batch 1")


def test_a_patched_model_is_compared_with_its_unpatched_self_and_a_budget_is_accepted():
    model = tokenprune.apply(tiny_timm(), "random", keep=0.3)
    check = tokenprune.check_speed(model, "tome", flops=0.7, repeats=1, warmup=0)
    assert check.method == "tome" and 0.68 <= check.flops_ratio <= 0.7
    assert tokenprune.reducer_of(model).name == "random"  # the caller's configuration is kept
    assert check.baseline_ms > 0 and check.patched_ms > 0


def test_a_budget_is_fitted_at_the_size_the_check_times(monkeypatch):
    """A budget fitted at the model's own size ran over it at another timed size (0.607 for flops=0.6)."""
    monkeypatch.setattr(speed, "interleaved_medians", lambda calls, *a: ({"baseline": 0.002, "patched": 0.001}, None))
    model = tiny_timm(img_size=64, dynamic_img_size=True)
    check = tokenprune.check_speed(model, "tome", flops=0.6, input_size=(3, 32, 32))
    assert check.keep == fit_flops_budget(model, "tome", flops=0.6, input_size=(3, 32, 32)).keep
    assert check.keep != fit_flops_budget(model, "tome", flops=0.6).keep and check.flops_ratio <= 0.6


def test_a_dual_encoder_is_timed_by_its_image_tower(monkeypatch):
    """CLIPModel takes text first (a random image cannot run it whole) and pruning changes its image tower only:
    the tower is what is timed and counted, patched against unpatched, as a FLOPs budget counts it."""
    from test_hf_patch import TEXT, TINY
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=TINY)).eval()
    seen = {}

    def fake_medians(calls, repeats, warmup, device):
        for name, call in calls.items():
            seen[name] = call().last_hidden_state.shape[1]  # the tower's output tokens
        return {"baseline": 0.004, "patched": 0.002}, None
    monkeypatch.setattr(speed, "interleaved_medians", fake_medians)
    check = tokenprune.check_speed(model, "tome", keep=0.25)
    assert seen == {"baseline": 65, "patched": 17} and check.method == "tome" and check.keep == 0.25
    tower = tokenprune.count_flops(model.vision_model).flops
    patched = tokenprune.apply(model, "tome", keep=0.25)
    assert check.flops_ratio == tokenprune.count_flops(patched.vision_model).flops / tower


def test_compiled_against_compiled(monkeypatch):
    compiled, warmups = [], []
    monkeypatch.setattr(torch, "compile", lambda m, **kwargs: compiled.append(kwargs) or m)
    real = speed.interleaved_medians
    flags = []
    monkeypatch.setattr(speed, "interleaved_medians", lambda calls, repeats, warmup, device:
                        warmups.append(warmup) or flags.append(torch._dynamo.config.fail_on_recompile_limit_hit)
                        or real(calls, repeats, warmup, device))
    check = tokenprune.check_speed(tiny_timm(), "tome", keep=0.5, compile=True, repeats=1, warmup=0)
    # a forward recompiled past dynamo's limit would run eagerly without a word: timed so that it raises instead
    assert flags == [True] and torch._dynamo.config.fail_on_recompile_limit_hit is False
    # both through tokenprune.compiled: on CPU with inductor's C++ wrapper
    assert compiled == [{"options": {"cpp_wrapper": True}}] * 2 and check.compiled and "(compiled)" in str(check)
    assert warmups == [1]  # compiled: at least one untimed call, which compiles


def test_the_compile_check_of_an_encoder_without_a_head_compares_its_tokens_by_their_mean(monkeypatch):
    """A Hugging Face encoder without a head (CLIPVisionModel) gives its tokens, fewer when reduced than the unpatched
    model's: a moved sample is measured against the reduction's move on their mean (it raised a shape error before)."""
    from test_hf_patch import tiny_hf

    def compile_moving_the_first_sample_by(by):
        def compile(model, **kwargs):
            def forward(t):
                out = model(t)
                out.last_hidden_state = out.last_hidden_state.clone()
                out.last_hidden_state[0] += by if len(calls) == 0 else 0.0
                calls.append(t)
                return out
            return forward
        return compile
    calls = []
    monkeypatch.setattr(torch, "compile", compile_moving_the_first_sample_by(1e-3))
    check = tokenprune.check_speed(tiny_hf("clip"), "tome", keep=0.5, compile=True, batch_size=2, repeats=1)
    assert check.compiled
    calls.clear()
    monkeypatch.setattr(torch, "compile", compile_moving_the_first_sample_by(10.0))
    with pytest.raises(speed.CompiledOutputChanged, match="sample 0 of 16 moved 1.00e\\+01: the reduction moved it"):
        tokenprune.check_speed(tiny_hf("clip"), "tome", keep=0.5, compile=True, batch_size=2, repeats=1)


def test_compiled_is_checked_against_eager_before_it_is_timed(monkeypatch):
    """compile=True: the compiled patched model must give the eager one's output (``speed.verify_compiled``, under
    the recompile guard, on the patched model and the very input timed), or nothing is timed."""
    checked = []
    real_verify = speed.verify_compiled

    def verify(compiled, eager, x, what, *, stock):
        checked.append((compiled, eager, stock, x, what, torch._dynamo.config.fail_on_recompile_limit_hit))
        return real_verify(compiled, eager, x, what, stock=stock)
    monkeypatch.setattr(speed, "verify_compiled", verify)
    seen = []  # every input a "compiled" model got: torch.compile returns the model, recording its inputs
    monkeypatch.setattr(torch, "compile", lambda m, **kwargs: (lambda t: seen.append(t) or m(t)))
    timed = []  # how many inputs had been seen when the timing began
    real = speed.interleaved_medians
    monkeypatch.setattr(speed, "interleaved_medians", lambda calls, *a: timed.append(len(seen)) or real(calls, *a))
    model = tiny_timm()
    tokenprune.check_speed(model, "tome", keep=0.5, compile=True, batch_size=2, repeats=1)
    (compiled, eager, stock, x, what, guarded), = checked
    assert guarded and what == "the patched model (tome)" and x.shape[0] == 2
    assert tokenprune.is_patched(eager) and not tokenprune.is_patched(model)
    assert not tokenprune.is_patched(stock) and stock is not model  # the unpatched copy the check times
    with torch.inference_mode():
        assert torch.equal(stock(x), model(x))
    with torch.inference_mode():  # the compiled patched model, checked against its own eager self
        assert torch.equal(compiled(x), eager(x))
    start, = timed  # after the check (x and seven seeded probes of batch 2), the timed calls: on x itself
    assert start == 8 and seen[0] is x and len(seen) > start + 2 and all(t is x for t in seen[start:-1])

    # a compile that changes the output: refused, never timed
    checked.clear(), timed.clear()
    monkeypatch.setattr(torch, "compile", lambda m, **kwargs: (lambda t: m(t) + 1.0))
    with pytest.raises(speed.CompiledOutputChanged, match=r"torch.compile changed the patched model \(tome\)'s "
                                                           r"output .* in 16 of 16 samples"):
        tokenprune.check_speed(model, "tome", keep=0.5, compile=True, repeats=1)
    assert len(checked) == 1 and timed == []
    tokenprune.check_speed(model, "tome", keep=0.5, repeats=1)  # eager: nothing to verify
    assert len(checked) == 1 and len(timed) == 1


@pytest.mark.parametrize("kwargs,match", [(dict(batch_size=0), "batch_size must be an int >= 1"),
                                          (dict(batch_size=True), "batch_size"),
                                          (dict(repeats=0), "repeats must be an int >= 1"),
                                          (dict(warmup=-1), "warmup must be an int >= 0, got -1"),
                                          (dict(warmup=1.5), "warmup must be an int >= 0"),
                                          (dict(keep=2.0), r"keep must be in \(0, 1\]")])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tokenprune.check_speed(tiny_timm(), "tome", **kwargs)


def test_block_profile_times_every_block_of_both_models(monkeypatch, capsys):
    from test_hf_patch import tiny_hf
    from tokenprune.eval import block_profile

    monkeypatch.setattr(block_profile, "random_model",
                        lambda name, seed=0: tiny_hf(name[3:]) if name.startswith("hf:") else tiny_timm(name, seed))
    rows = block_profile.profile_blocks("vit_base_patch16_224", "tome", 0.5, batch=2, repeats=3)
    assert [r.block for r in rows] == [0, 1, 2, 3]
    assert rows[0].tokens_in == 65 and rows[-1].tokens_in < 65  # the patched model's counts
    assert all(r.ceiling_ms > 0 and r.patched_ms > 0 for r in rows)
    assert "| all |" in block_profile.format_blocks(rows)
    ops = block_profile.profile_ops("vit_base_patch16_224", "tome", 0.5, batch=2, repeats=1)
    added = {op for op, patched, ceiling in ops if patched > 0 and ceiling == 0}
    # the matching ToMe adds: its scores (norms, product); its ranking is no ATen op unless scores tie (the CPU build)
    assert {"aten::bmm", "aten::linalg_vector_norm"} <= added
    assert block_profile.main(["--model", "hf:vit"]) == 2
    assert "reads a timm ViT's .blocks" in capsys.readouterr().err


@pytest.mark.parametrize("method, core", [("tome", False), ("mctf", True)])
def test_block_profile_times_the_methods_hook_and_core_inside_the_forward(monkeypatch, capsys, method, core):
    """``--hooks``: the three forwards, then one call of the method's hook per reducing block (and, for a method
    that hands the block an attention core, one core call each), as the schedule plans them."""
    from tokenprune.eval import block_profile

    monkeypatch.setattr(block_profile, "random_model", lambda name, seed=0: tiny_timm(name, seed))
    rows = block_profile.profile_hooks("vit_base_patch16_224", method, 0.5, batch=2, repeats=3)
    planned = tokenprune.reducer_of(tokenprune.apply(tiny_timm(), method, keep=0.5)).schedule(64, 4, 1)
    reducing = sum(1 for step in planned if step)
    assert [r.part for r in rows[:3]] == ["forward: unpatched", "forward: zero-cost truncation", "forward: patched"]
    assert all(r.ms_per_forward > 0 for r in rows)
    hook = "before_attention" if method == "mctf" else "after_attention"
    calls = {r.part.split(" ")[0]: r.calls_per_forward for r in rows[3:]}
    assert calls == {hook: reducing, **({"attention": reducing} if core else {})}
    assert block_profile.main(["--model", "vit_base_patch16_224", "--method", method, "--hooks", "--repeats", "2"]) == 0
    assert f"| {hook} (the method's step) |" in capsys.readouterr().out


class _StepClock:
    """A stand-in for ``time`` in block_profile: every reading is 2**-10 s after the last (exact in binary, so the
    totals and the per-call column are exact), starting at 128 s."""

    def __init__(self):
        self.now, self.reads = 128.0, 0

    def perf_counter(self):
        self.now, self.reads = self.now + 2.0 ** -10, self.reads + 1
        return self.now


def test_block_profile_hooks_totals_defaults_and_table(monkeypatch, capsys):
    """``profile_hooks``' arithmetic on a clock whose every timed call lasts 2**-10 s: the forward rows are the
    interleaved medians in ms, each hook row its calls and ms per forward over ``repeats`` forwards, the table's last
    column microseconds a call; the warm-up runs before the timing and stays out of the totals; the defaults (keep
    0.5, batch 1, 21 repeats, 2 threads, seed 0) reach the model, the input and the timing."""
    from tokenprune.eval import block_profile

    seeds, clock, seen = [], _StepClock(), {}
    monkeypatch.setattr(block_profile, "random_model", lambda name, seed=0: seeds.append(seed) or tiny_timm(name, seed))
    monkeypatch.setattr(block_profile, "time", clock)
    real_medians = block_profile.interleaved_medians

    def medians(calls, repeats, warmup):
        seen.update(reads_before=clock.reads, repeats=repeats, warmup=warmup,
                    batch=calls["patched"].args[0].shape[0], threads=torch.get_num_threads(),
                    keep=tokenprune.reducer_of(calls["patched"].func).keep)
        return {name: 0.5 + i / 8 for i, name in enumerate(calls)}, None  # what the rows must show, in ms

    monkeypatch.setattr(block_profile, "interleaved_medians", medians)
    threads = torch.get_num_threads()
    try:
        rows = block_profile.profile_hooks("vit_base_patch16_224", "mctf")  # keep 0.5 by default
    finally:
        torch.set_num_threads(threads)
    reducing = sum(1 for step in tokenprune.reducer_of(tokenprune.apply(tiny_timm(), "mctf", keep=0.5))
                   .schedule(64, 4, 1) if step)
    assert seeds == [0] and seen["keep"] == 0.5 and seen["batch"] == 1
    assert seen["threads"] == 2 and seen["repeats"] == 21
    assert seen["warmup"] == 0 and seen["reads_before"] == 2 * 2 * 2 * reducing  # two warm-up forwards, step + core
    assert [(r.calls_per_forward, r.ms_per_forward) for r in rows[:3]] == [(1, 500.0), (1, 625.0), (1, 750.0)]
    assert rows[3:] == []  # the warm-up's calls are not in the totals, and the (stubbed) timing made none

    # the totals over real timed forwards, on the same clock
    monkeypatch.setattr(block_profile, "interleaved_medians", real_medians)
    rows = block_profile.profile_hooks("vit_base_patch16_224", "mctf", 0.5, batch=2, repeats=3, threads=threads)
    assert [(r.calls_per_forward, r.ms_per_forward) for r in rows[3:]] == [(reducing, reducing * 1000 / 1024)] * 2
    table = block_profile.format_hooks(rows)
    assert f"| before_attention (the method's step) | {reducing} | {reducing * 1000 / 1024:.2f} | 976.6 |" in table
    assert block_profile.main(["--model", "vit_base_patch16_224", "--method", "mctf", "--hooks", "--repeats", "2",
                               "--threads", str(threads), "-o", "prop_attn=False"]) == 0
    assert "mctf keep=0.5 {'prop_attn': False}, batch 1" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["tome", "mctf", "zero-tprune", "random"])
def test_a_methods_floor_reaches_its_token_counts_asking_what_it_asks_of_attention(monkeypatch, method):
    """``ZeroCostStep``: the method's schedule, stage and attention needs; an MCTF floor computes the map of the
    un-reduced tokens at each reducing block and applies its kept block to the kept tokens' values (the output the
    core gives is the map's rows, renormalised over every key, times v); proportional attention keeps the bias
    running after the first reduction (sizes all 1), and stays off where the method has it off."""
    from tokenprune.eval.benchmark import ZeroCostStep, floor_of, patched_and_ceiling

    from tokenprune.registry import Stage
    from tokenprune.state import AttentionTaps, ForwardState

    base, x = tiny_timm(), images(2)
    patched, _ = patched_and_ceiling(base, method, 0.5, {})
    floor = floor_of(base, patched)
    inner, reducer = tokenprune.reducer_of(patched), tokenprune.reducer_of(floor)
    assert isinstance(reducer, ZeroCostStep) and reducer.inner is inner
    assert reducer.stage is inner.stage and reducer.needs is inner.needs
    maps, biases = [], []
    real_probabilities, real_bias = AttentionTaps.probabilities, ForwardState.attention_bias
    monkeypatch.setattr(AttentionTaps, "probabilities",
                        lambda taps, state=None: maps.append(taps.q.shape[2]) or real_probabilities(taps, state))
    monkeypatch.setattr(ForwardState, "attention_bias",
                        lambda state, dtype=None: biases.append(real_bias(state, dtype)) or biases[-1])
    with torch.no_grad():
        patched(x)
        counts, maps_patched = tokenprune.last_forward(patched).token_counts, list(maps)
        maps.clear(), biases.clear()
        floor(x)
    assert tokenprune.last_forward(floor).token_counts == counts and counts[-1] < counts[0]
    reducing = [n for n, after in zip(counts, counts[1:] + [tokenprune.last_forward(floor).output_tokens])
                if after < n]
    if inner.stage is Stage.BEFORE_ATTENTION:
        assert maps == maps_patched == reducing  # one map a reducing block, of the tokens entering it
    assert any(b is not None for b in biases) == inner.proportional_attention
    if method == "tome":  # and off where the method's is off
        quiet = floor_of(base, tokenprune.apply(tiny_timm(), "tome", keep=0.5, prop_attn=False))
        biases.clear()
        with torch.no_grad():
            quiet(x)
        assert biases and all(b is None for b in biases)


def test_the_mctf_floor_applies_the_kept_block_of_the_un_reduced_map():
    """One merging block (``layers=[1]``): the floor's output is the stock model's with block 1's attention taken as
    softmax over all N keys of the un-reduced tokens, its first n rows and columns applied to v of the first n."""
    import copy

    from tokenprune.eval.benchmark import floor_of

    base, x = tiny_timm(), images(2)
    patched = tokenprune.apply(copy.deepcopy(base), "mctf", r=6, layers=[1])
    floor = floor_of(base, patched)

    def reference(model, x):
        h = model.patch_embed(x)
        h = model._pos_embed(h)
        for i, block in enumerate(model.blocks):
            if i == 1:
                attn, n = block.attn, h.shape[1] - 6
                a = block.norm1(h)
                q, k, _ = attn.qkv(a).reshape(a.shape[0], a.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
                probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, :n, :n]
                h = h[:, :n]
                a = block.norm1(h)
                v = attn.qkv(a).reshape(a.shape[0], n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[2]
                out = (probs @ v).transpose(1, 2).reshape(a.shape[0], n, -1)
                h = h + block.ls1(attn.proj(out))
                h = h + block.ls2(block.mlp(block.norm2(h)))
            else:
                h = block(h)
        return model.forward_head(model.norm(h))

    with torch.no_grad():
        torch.testing.assert_close(floor(x), reference(base, x), rtol=1e-5, atol=1e-5)


def test_block_profile_floor_times_four_forwards_and_reports_ratios(monkeypatch, capsys):
    """``--floor``: the unpatched, truncated, floor and patched forwards in one interleave (each model the one its
    name says), their ratios to the unpatched and the truncated times; ``--compile`` compiles all four with
    ``tokenprune.compiled`` and is refused without ``--floor``."""
    from tokenprune.eval import block_profile
    from tokenprune.eval.benchmark import ZeroCostStep, ZeroCostTruncation

    seeds, seen, compiled = [], {}, []
    monkeypatch.setattr(block_profile, "random_model", lambda name, seed=0: seeds.append(seed) or tiny_timm(name, seed))

    def medians(calls, repeats):
        seen.update(repeats=repeats, batch=calls["unpatched"].args[0].shape[0], threads=torch.get_num_threads(),
                    keep=tokenprune.reducer_of(calls["the method"].func).keep,
                    reducers={name: type(tokenprune.reducer_of(call.func)) if tokenprune.is_patched(call.func)
                              else None for name, call in calls.items()})
        return dict(zip(calls, (0.010, 0.008, 0.0125, 0.020))), None

    monkeypatch.setattr(block_profile, "interleaved_medians", medians)
    monkeypatch.setattr(tokenprune, "compiled", lambda model: compiled.append(model) or model)
    threads = torch.get_num_threads()
    try:  # the defaults: keep 0.5, batch 1, 21 repeats, 2 threads, seed 0, eager
        block_profile.profile_floor("vit_base_patch16_224", "mctf")
    finally:
        torch.set_num_threads(threads)
    assert seeds == [0] and not compiled
    assert (seen["keep"], seen["batch"], seen["repeats"], seen["threads"]) == (0.5, 1, 21, 2)
    ms = block_profile.profile_floor("vit_base_patch16_224", "tome", 0.5, batch=3, repeats=5, threads=threads,
                                     compile=True)
    assert seen["repeats"] == 5 and seen["batch"] == 3 and len(compiled) == 4
    assert seen["reducers"]["unpatched"] is None and seen["reducers"]["zero-cost truncation"] is ZeroCostTruncation
    assert issubclass(seen["reducers"]["the method's floor"], ZeroCostStep)
    assert seen["reducers"]["the method"].name == "tome"
    assert ms == {"unpatched": 10.0, "zero-cost truncation": 8.0, "the method's floor": 12.5, "the method": 20.0}
    table = block_profile.format_floor(ms)
    assert "| the method's floor | 12.50 | 0.800x | 0.640 |" in table
    assert "| the method | 20.00 | 0.500x | 0.400 |" in table
    assert block_profile.main(["--model", "vit_base_patch16_224", "--method", "mctf", "--floor", "--compile"]) == 0
    assert "mctf keep=0.5 , batch 1, 2 threads, compiled" in capsys.readouterr().out and len(compiled) == 8
    with pytest.raises(SystemExit) as stop:
        block_profile.main(["--compile"])
    assert stop.value.code == 2 and "--compile times the --floor forwards only" in capsys.readouterr().err


def test_compiled_is_torch_compile_with_the_cpp_wrapper_on_cpu(monkeypatch):
    """tokenprune.compiled: inductor's C++ wrapper for a CPU model (or one without parameters); the caller's
    options win; with a ``mode`` (torch.compile takes no options beside one) or off the CPU, torch's defaults."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda m, **kwargs: calls.append(kwargs) or m)
    cpu, meta = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta")
    assert tokenprune.compiled(cpu) is cpu and calls.pop() == {"options": {"cpp_wrapper": True}}
    tokenprune.compiled(torch.nn.ReLU())
    assert calls.pop() == {"options": {"cpp_wrapper": True}}
    tokenprune.compiled(cpu, dynamic=False, options={"cpp_wrapper": False, "max_autotune": True})
    assert calls.pop() == {"dynamic": False, "options": {"cpp_wrapper": False, "max_autotune": True}}
    tokenprune.compiled(cpu, mode="reduce-overhead")
    assert calls.pop() == {"mode": "reduce-overhead"}
    tokenprune.compiled(meta, fullgraph=True)
    assert calls.pop() == {"fullgraph": True}

    class OnCuda(torch.nn.Module):  # what a CUDA model's parameters say, without a GPU
        def parameters(self, recurse=True):
            yield types.SimpleNamespace(device=torch.device("cuda", 0))
    tokenprune.compiled(OnCuda())
    assert calls.pop() == {}


def test_a_reached_recompile_limit_is_a_clear_error_not_eager_times():
    """Under ``never_eager_fallback`` (check_speed's and the benchmark's timings) a forward past dynamo's recompile
    limit raises ``RecompileLimitReached``, a ``RuntimeError`` saying what happened and what to do, instead of
    dynamo's "Hard failure due to fail_on_recompile_limit_hit" (a setting the caller never chose)."""
    torch._dynamo.reset()
    double = torch.compile(lambda t: t * 2, backend="eager", dynamic=False)  # each new shape: a recompile
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            double(torch.ones(2))
            with pytest.raises(speed.RecompileLimitReached, match=r"recompile limits \(torch._dynamo.config."
                                                                  r"recompile_limit = 1, .*torch._dynamo.reset\(\)"
                               ) as raised:
                with speed.never_eager_fallback():
                    double(torch.ones(3))
            assert isinstance(raised.value.__cause__, torch._dynamo.exc.FailOnRecompileLimitHit)
            assert issubclass(speed.RecompileLimitReached, RuntimeError)
            assert torch.equal(double(torch.ones(4)), torch.full((4,), 2.0))  # outside it: dynamo's own way, eager
            with pytest.raises(ValueError, match="not dynamo's"):  # other errors pass through as they are
                with speed.never_eager_fallback():
                    raise ValueError("not dynamo's")
    finally:
        torch._dynamo.reset()
