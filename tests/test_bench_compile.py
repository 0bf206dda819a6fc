"""`tokenprune bench --compile`: compiled against compiled, after checking the compiled patched model
gives the eager one's output."""
from __future__ import annotations

import pytest
import torch
from tokenprune.eval.benchmark import benchmark, check_compiled, format_rows

from tokenprune import extension
from tokenprune.flops import random_model
from tokenprune.speed import CHECK_SAMPLES, CompiledOutputChanged, RecompileLimitReached, verify_compiled


def test_check_compiled_refuses_a_compiled_model_that_changes_the_output(capsys):
    x = torch.randn(2, 3)
    eager = torch.nn.Linear(3, 4)
    check_compiled(eager, eager, x, "linear")  # equal: passes and says so
    assert "output equals eager" in capsys.readouterr().out
    with pytest.raises(CompiledOutputChanged, match="torch.compile changed the patched linear's output"):
        check_compiled(lambda t: eager(t) + 1e-3, eager, x, "linear")
    assert issubclass(CompiledOutputChanged, RuntimeError)  # what callers caught before it had a name


@pytest.fixture
def three_block_testbed(monkeypatch):
    """The testbed with its first 3 blocks: compiling its 12 took most of these tests' minutes, and a block compiles
    the same way whichever it is (the schedules follow the depth)."""
    import tokenprune.eval.benchmark as bench

    def first_blocks(name, seed=0):
        model = random_model(name, seed)
        model.blocks = model.blocks[:3]
        return model
    monkeypatch.setattr(bench, "random_model", first_blocks)


@pytest.mark.usefixtures("three_block_testbed")
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


@pytest.mark.usefixtures("three_block_testbed")
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


def test_each_batch_size_is_compiled_afresh_as_static_graphs(monkeypatch):
    """One compiled model timed at a second batch size is recompiled by dynamo as a dynamic-shape graph, another kind
    of graph than the first's (and than the speed table's, one batch size per benchmark): each batch size gets a fresh
    dynamo and freshly compiled models, so `bench --compile --batch-sizes 1 32` times static graphs at both."""
    import tokenprune

    resets, compiled = [], []
    real_reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1) or real_reset())
    # the models as they are: what is asked here is when compiling happens (compiling itself: the tests above)
    monkeypatch.setattr(tokenprune, "compiled", lambda m: compiled.append((len(resets), m)) or m)
    rows = benchmark("vit_testbed_fmnist", "random", keep=0.5, batch_sizes=(1, 2), repeats=1, warmup=1,
                     compile=True)
    assert [r.batch_size for r in rows] == [1, 2] and len(resets) == 2
    # the same three eager models, compiled after each batch size's reset
    assert [n for n, _ in compiled] == [1, 1, 1, 2, 2, 2]
    assert [m for _, m in compiled[:3]] == [m for _, m in compiled[3:]]


def test_the_cli_flag_reaches_the_benchmark(monkeypatch, capsys):
    import tokenprune.eval.benchmark as bench

    from tokenprune.cli import main

    seen = []
    monkeypatch.setattr(bench, "benchmark", lambda *args, **kwargs: seen.append(kwargs["compile"]) or [])
    for flags in ([], ["--compile"]):
        assert main(["bench", "--model", "vit_testbed_fmnist", "--batch-sizes", "1", *flags]) == 0
    assert seen == [False, True]


@pytest.mark.parametrize("error", [CompiledOutputChanged, RecompileLimitReached])
def test_the_cli_says_why_it_refused_a_compiled_measurement_in_one_line(error, monkeypatch, capsys):
    """What --compile refuses to report (a changed output, dynamo's eager fallback) is one line and exit 1."""
    import tokenprune.eval.benchmark as bench

    from tokenprune.cli import main

    def refuse(*args, **kwargs):
        raise error("what was refused, and why")
    monkeypatch.setattr(bench, "benchmark", refuse)
    assert main(["bench", "--model", "vit_testbed_fmnist", "--batch-sizes", "1", "--compile"]) == 1
    assert capsys.readouterr().err == "tokenprune: what was refused, and why\n"
    # the console script's way in: the arguments after the program's name
    monkeypatch.setattr("sys.argv", ["tokenprune", "bench", "--model", "vit_testbed_fmnist", "--compile"])
    assert main() == 1
    assert capsys.readouterr().err == "tokenprune: what was refused, and why\n"


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


def test_small_batches_are_checked_on_eight_samples_so_one_near_tie_flip_is_allowed(capsys):
    """At batch 1 the eighth allowed no sample: one near-tie flip refused a whole configuration. The compiled graph of
    that batch size is run on further seeded batches until CHECK_SAMPLES samples are compared; the caller's random
    stream is not touched."""
    assert CHECK_SAMPLES == 8
    eager = torch.nn.Linear(3, 4)
    calls = []

    def flips_the_first_call(t):  # the compiled model: one sample (the first call's first) moved by a near tie
        calls.append(t)
        out = eager(t).clone()
        out[0] += 5e-4 if len(calls) == 1 else 0.0
        return out
    for batch, calls_made in ((1, 8), (3, 3), (8, 1), (9, 1)):
        calls.clear()
        x = torch.randn(batch, 3)
        state = torch.random.get_rng_state()
        check_compiled(flips_the_first_call, eager, x, "linear")
        assert torch.equal(torch.random.get_rng_state(), state)
        assert len(calls) == calls_made and calls[0] is x and all(t.shape == x.shape for t in calls)
        assert len({t.sum().item() for t in calls}) == calls_made  # each a different batch
        samples = batch * calls_made
        said = capsys.readouterr().out
        assert f"for batch {batch} in " in said
        assert f"output equals eager on {samples} samples (1 sample(s) within 5.0e-04" in said
    calls.clear()
    with pytest.raises(CompiledOutputChanged, match="in 8 of 8 samples"):  # every probe moved: refused
        check_compiled(lambda t: eager(t) + 5e-4, eager, torch.randn(1, 3), "linear")
    with pytest.raises(CompiledOutputChanged, match="in 2 of 8 samples"):  # two of eight: more than an eighth
        check_compiled(lambda t: calls.append(t) or eager(t) + (5e-4 if len(calls) <= 2 else 0.0), eager,
                       torch.randn(1, 3), "linear")


def test_the_probe_batches_are_seeded_and_of_the_inputs_dtype():
    eager = torch.nn.Linear(3, 4).to(torch.bfloat16)
    seen = []
    x = torch.randn(2, 3).to(torch.bfloat16)
    for _ in range(2):
        check_compiled(lambda t: seen.append(t) or eager(t), eager, x, "linear")
    assert len(seen) == 8 and all(t.dtype == torch.bfloat16 and t.shape == (2, 3) for t in seen)
    assert all(torch.equal(a, b) for a, b in zip(seen[:4], seen[4:]))  # the same probes each time
    torch.manual_seed(0)  # a caller's usual seed: its first batch is not a probe
    assert not torch.equal(torch.randn(2, 3).to(torch.bfloat16), seen[1])


def test_the_tolerance_scales_with_the_output_and_its_limits_are_inclusive():
    """1e-4 of the output's largest magnitude, never less than 1e-4 (outputs below 1), the dtype's own (float64: the
    float32 figure); a move of exactly the tolerance is within it, and a near tie exactly 100 times it is allowed."""
    def check(scale, moves, dtype=torch.float32):  # eager: every output entry `scale`; moves: each sample's move
        moves = torch.tensor(moves, dtype=dtype)
        eager = lambda t: torch.full((len(t), 4), scale, dtype=dtype)  # noqa: E731
        check_compiled(lambda t: eager(t) + moves[:, None], eager, torch.zeros(len(moves), 3, dtype=dtype), "m")

    check(100.0, [5e-3] * 8)  # within 1e-4 x 100
    with pytest.raises(CompiledOutputChanged, match="in 8 of 8"):
        check(100.0, [2e-2] * 8)
    check(0.01, [5e-5] * 8)  # outputs below 1: the tolerance is 1e-4, not 1e-6
    with pytest.raises(CompiledOutputChanged, match="in 8 of 8"):
        check(0.01, [1.5e-4] * 8)
    check(0.0, [1e-4] * 8)  # exactly the tolerance: not a move
    check(0.0, [1e-2] + [0.0] * 7)  # one near tie, exactly 100x the tolerance: allowed
    with pytest.raises(CompiledOutputChanged, match="in 1 of 8"):
        check(0.0, [1.005e-2] + [0.0] * 7)  # beyond 100x
    check(0.0, [5e-5] * 8, torch.float64)
    with pytest.raises(CompiledOutputChanged, match="in 8 of 8"):
        check(0.0, [2e-4] * 8, torch.float64)
    check(0.0, [5e-3] * 8, torch.float16)  # half precision: 1e-2
    with pytest.raises(CompiledOutputChanged, match="in 8 of 8"):
        check(0.0, [2e-2] * 8, torch.float16)
    check(0.0, [3e-2] * 8, torch.bfloat16)  # bfloat16: 5e-2
    with pytest.raises(CompiledOutputChanged, match="in 8 of 8"):
        check(0.0, [1e-1] * 8, torch.bfloat16)
    check(0.0, [5e-4] + [0.0] * 13)  # 1 of 14: an eighth is one sample
    with pytest.raises(CompiledOutputChanged, match="in 2 of 14"):
        check(0.0, [5e-4] * 2 + [0.0] * 12)
    # float32 inputs to a forward computing in bfloat16 (autocast): the tolerance of the dtype it computes in
    eager = lambda t: torch.zeros(len(t), 4)  # noqa: E731
    verify_compiled(lambda t: eager(t) + 3e-2, eager, torch.zeros(8, 3), "m", compute_dtype=torch.bfloat16)
    with pytest.raises(CompiledOutputChanged, match="in 8 of 8"):
        verify_compiled(lambda t: eager(t) + 1e-1, eager, torch.zeros(8, 3), "m", compute_dtype=torch.bfloat16)
    with pytest.raises(CompiledOutputChanged, match="in 8 of 8"):
        verify_compiled(lambda t: eager(t) + 3e-2, eager, torch.zeros(8, 3), "m")


def test_model_outputs_are_compared_by_their_logits_or_else_their_last_hidden_state():
    """Hugging Face models return an output object: a classifier's logits, else an encoder's last hidden state."""
    from types import SimpleNamespace as Output

    eager = torch.nn.Linear(3, 4)
    x = torch.randn(8, 3)
    check_compiled(lambda t: Output(logits=eager(t)), eager, x, "classifier")
    with pytest.raises(CompiledOutputChanged):
        check_compiled(lambda t: Output(logits=eager(t) + 1.0, last_hidden_state=eager(t)), eager, x, "classifier")
    check_compiled(lambda t: Output(logits=None, last_hidden_state=eager(t)), eager, x, "encoder")
    with pytest.raises(CompiledOutputChanged):
        check_compiled(lambda t: Output(last_hidden_state=eager(t) + 1.0), eager, x, "encoder")
