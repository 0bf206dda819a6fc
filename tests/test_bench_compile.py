"""`tokenprune bench --compile`: compiled against compiled, after checking the compiled patched model
gives the eager one's output."""
from __future__ import annotations

import pytest
import torch
from tokenprune.eval.benchmark import benchmark, check_compiled, format_rows

from tokenprune import extension


def test_check_compiled_refuses_a_compiled_model_that_changes_the_output(capsys):
    x = torch.randn(2, 3)
    eager = torch.nn.Linear(3, 4)
    check_compiled(eager, eager, x, "linear")  # equal: passes and says so
    assert "output equals eager" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="torch.compile changed the patched linear's output"):
        check_compiled(lambda t: eager(t) + 1e-3, eager, x, "linear")


def test_bench_compile_times_compiled_models(capsys, monkeypatch):
    import tokenprune

    real, calls = tokenprune.compiled, []
    monkeypatch.setattr(tokenprune, "compiled", lambda m: calls.append(m) or real(m))
    rows = benchmark("vit_testbed_fmnist", "random", keep=0.5, batch_sizes=(1,), repeats=1, warmup=1,
                     compile=True)
    assert len(calls) == 3  # the unpatched, patched and truncated models, all through tokenprune.compiled
    # inductor traces the PyTorch ops; compiled CPU graphs may call the CPU build's MCTF ops (a method-blind label)
    assert [(r.compiled, r.kernels) for r in rows] == [(True, extension.kernels_in_use("cpu", compiled=True))]
    assert rows[0].kernels in ("CPU build: MCTF's matching and merges", "pytorch ops (the CPU build failed)")
    assert rows[0].baseline_ms > 0 and rows[0].patched_ms > 0 and rows[0].ceiling_speedup > 0
    assert "output equals eager" in capsys.readouterr().out
    assert "keep=0.5 compiled " in format_rows(rows)  # not marked no-ext: compiled runs never use it


def test_each_compiled_benchmark_starts_a_fresh_dynamo_and_never_times_eager_fallbacks(monkeypatch):
    """Several compiled benchmarks in one process (the speed table) compile one patched forward again and again:
    without a reset, dynamo's recompile limit was reached after a few configurations and the rest timed eager
    forwards as compiled ones. Each benchmark resets dynamo, and times with a hit of the limit made an error."""
    import tokenprune.eval.benchmark as bench

    resets, flags = [], []
    real_reset, real_medians = torch._dynamo.reset, bench.interleaved_medians
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1) or real_reset())
    monkeypatch.setattr(bench, "interleaved_medians", lambda *a: flags.append(
        torch._dynamo.config.fail_on_recompile_limit_hit) or real_medians(*a))
    for method in ("random", "tome"):
        benchmark("vit_testbed_fmnist", method, keep=0.5, batch_sizes=(1,), repeats=1, warmup=1, compile=True)
    assert resets == [1, 1] and flags == [True, True]
    assert torch._dynamo.config.fail_on_recompile_limit_hit is False  # the caller's setting, after
    benchmark("vit_testbed_fmnist", "random", keep=0.5, batch_sizes=(1,), repeats=1, warmup=1)
    assert resets == [1, 1]  # eager: nothing of dynamo's is touched


def test_the_cli_flag_reaches_the_benchmark(monkeypatch, capsys):
    import tokenprune.eval.benchmark as bench

    from tokenprune.cli import main

    seen = []
    monkeypatch.setattr(bench, "benchmark", lambda *args, **kwargs: seen.append(kwargs["compile"]) or [])
    for flags in ([], ["--compile"]):
        assert main(["bench", "--model", "vit_testbed_fmnist", "--batch-sizes", "1", *flags]) == 0
    assert seen == [False, True]


def test_a_near_tie_flip_in_a_few_samples_is_allowed_and_reported(capsys):
    """Up to an eighth of the samples may move (within 100x the tolerance: a near-tie token choice that
    compiling's reordered sums flip); more samples, or a larger move, is refused."""
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    eager = torch.nn.Linear(3, 4)  # outputs up to about 1.4: the tolerance is 1e-4 of that

    def moved(samples, by):
        def compiled(t):
            out = eager(t).clone()
            out[:samples] += by
            return out
        return compiled
    check_compiled(moved(2, 5e-4), eager, x, "linear")  # 2 of 16: allowed
    assert "2 sample(s) within 5.0e-04: a near-tie token choice" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="in 3 of 16 samples"):
        check_compiled(moved(3, 5e-4), eager, x, "linear")
    with pytest.raises(RuntimeError, match="in 1 of 16 samples"):
        check_compiled(moved(1, 1.0), eager, x, "linear")  # beyond 100x the tolerance
