"""Review of the speed guard and the benchmark's figures: which model, input and configuration each figure of a
``tokenprune bench`` row comes from, that no compile is timed, that repeats are never fewer than asked, and what
``tokenprune.compiled`` hands another backend. No timing is asserted (the machine is shared): the medians are
stubbed, or the timed calls are recorded."""
from __future__ import annotations

import json

import pytest
import tokenprune.eval.benchmark as bench
import torch
from conftest import tiny_timm

import tokenprune
from tokenprune import timing


@pytest.fixture
def tiny(monkeypatch):
    """``bench.random_model`` builds the named architecture tiny (64 patches, 4 blocks); threads restored after."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(bench, "random_model", lambda name, seed=0: tiny_timm(name, seed))
    yield
    torch.set_num_threads(threads)


def test_a_rows_ratios_come_from_the_right_medians_and_counts(monkeypatch, tiny):
    """speedup = unpatched / patched, ceiling = unpatched / truncation, overhead = (patched - truncation) / patched,
    FLOPs-ideal = unpatched / patched FLOPs counted at the size timed; each timed call is the model its name says,
    on one input of the batch and size asked; the JSON holds the same figures."""
    seen = {}

    def medians(calls, repeats, warmup, device):
        seen.update({name: (call.func, call.args[0].shape) for name, call in calls.items()})
        return {"ceiling": 0.004, "baseline": 0.010, "patched": 0.005}, 0.25  # another order than the calls'
    monkeypatch.setattr(bench, "interleaved_medians", medians)
    [row] = bench.benchmark("vit_base_patch16_224", "tome", keep=0.5, options={"prop_attn": False},
                            batch_sizes=(3,), repeats=1)
    size = (3, 32, 32)
    assert {name: shape for name, (_, shape) in seen.items()} == dict.fromkeys(("baseline", "patched", "ceiling"),
                                                                              (3, *size))
    base, patched, ceiling = (seen[name][0] for name in ("baseline", "patched", "ceiling"))
    assert not tokenprune.is_patched(base)
    reducer = tokenprune.reducer_of(patched)
    assert reducer.name == "tome" and reducer.options["prop_attn"] is False
    assert isinstance(tokenprune.reducer_of(ceiling), bench.ZeroCostTruncation)
    assert tokenprune.reducer_of(ceiling).inner is tokenprune.reducer_of(patched)  # the same schedule
    base_flops, patched_flops = tokenprune.count_flops(base, size), tokenprune.count_flops(patched, size)
    assert (row.baseline_ms, row.patched_ms) == (10.0, 5.0)
    assert row.measured_speedup == 2.0 and row.ceiling_speedup == 2.5 and row.overhead == pytest.approx(0.2)
    assert row.ideal_speedup == base_flops.flops / patched_flops.flops > 1
    assert row.fraction_of_ideal == pytest.approx(2.0 / row.ideal_speedup)
    assert (row.baseline_gmacs, row.patched_gmacs) == (base_flops.gmacs_per_sample, patched_flops.gmacs_per_sample)
    assert row.config == "keep=0.5, prop_attn=False" and row.batch_size == 3 and row.foreign_load == 0.25
    assert json.loads(bench.rows_to_json([row]))[0]["ceiling_speedup"] == 2.5
    line = bench.format_rows([row]).splitlines()[-1]
    assert " 2.00x " in line and " 2.50x " in line and "20.0%" in line and line.endswith("25.0%")


@pytest.mark.parametrize("method, options", [("tome", {}), ("tome", {"r": 5}), ("mctf", {}),
                                             ("mctf", {"layers": [1, 2]}), ("zero-tprune", {}),
                                             ("zero-tprune", {"keep_rates": [0.7, 0.7, 0.7]}), ("random", {})])
def test_the_ceiling_reaches_the_patched_models_token_counts(method, options):
    """The ceiling is a truncation "to the same token counts": block by block, whatever option sets the schedule."""
    patched, ceiling = bench.patched_and_ceiling(tiny_timm(depth=6), method, 0.5, options)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        patched(x), ceiling(x)
    ours, its = tokenprune.last_forward(patched), tokenprune.last_forward(ceiling)
    assert (its.token_counts, its.output_tokens) == (ours.token_counts, ours.output_tokens)
    assert ours.output_tokens < ours.token_counts[0]


def test_a_compiled_benchmark_times_no_compile_even_without_a_warm_up(monkeypatch, tiny):
    """The compile check compiles the patched model only: with ``warmup=0`` the unpatched and truncated models were
    compiled inside the first timed repeat (compile seconds in their medians; with one repeat, all of them)."""
    first_calls = []  # for each call of a "compiled" model: whether it is that model's first (the one that compiles)

    def fake_compiled(model):
        calls = []

        def run(x):
            calls.append(1)
            first_calls.append(len(calls) == 1)
            return model(x)
        return run
    monkeypatch.setattr(tokenprune, "compiled", fake_compiled)
    timed_firsts = []
    real_timed = timing.timed

    def timed(call, device=torch.device("cpu")):
        before = len(first_calls)
        result = real_timed(call, device)
        timed_firsts.extend(first_calls[before:])
        return result
    monkeypatch.setattr(timing, "timed", timed)  # interleaved_medians' timer (verify_compiled's is speed.timed)
    [row] = bench.benchmark("vit_base_patch16_224", "random", keep=0.5, batch_sizes=(1,), repeats=1, warmup=0,
                            compile=True)
    assert len(timed_firsts) == 3 * row.repeats and not any(timed_firsts)


def test_repeats_are_never_fewer_than_asked(monkeypatch, tiny):
    """Small batches get more repeats (up to 60); a request above 60 was cut to 60 at every batch size."""
    seen = []

    def medians(calls, repeats, warmup, device):
        seen.append(repeats)
        return dict.fromkeys(calls, 0.001), None
    monkeypatch.setattr(bench, "interleaved_medians", medians)
    rows = bench.benchmark("vit_base_patch16_224", "tome", keep=0.5, batch_sizes=(1, 8, 32, 256), repeats=5)
    assert seen == [r.repeats for r in rows] == [60, 20, 5, 5]
    seen.clear()
    rows = bench.benchmark("vit_base_patch16_224", "tome", keep=0.5, batch_sizes=(1, 32, 256), repeats=80)
    assert seen == [r.repeats for r in rows] == [80, 80, 80]


@pytest.mark.parametrize("warmup", [-1, 1.5, True, None])
def test_a_bad_warm_up_is_refused(warmup, tiny):
    with pytest.raises(ValueError, match="warmup must be an integer >= 0"):
        bench.benchmark("vit_base_patch16_224", "tome", keep=0.5, batch_sizes=(1,), repeats=1, warmup=warmup)


def test_compiled_gives_inductors_option_to_inductor_only(monkeypatch):
    """Another backend (``aot_eager``, ``eager``) ignored ``cpp_wrapper`` with a warning at every compile."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda m, **kwargs: calls.append(kwargs) or m)
    model = torch.nn.Linear(2, 2)
    tokenprune.compiled(model, backend="aot_eager")
    assert calls.pop() == {"backend": "aot_eager"}
    tokenprune.compiled(model, backend="inductor")
    assert calls.pop() == {"backend": "inductor", "options": {"cpp_wrapper": True}}
