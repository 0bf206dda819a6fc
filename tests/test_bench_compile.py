"""`tokenprune bench --compile`: compiled against compiled, after checking the compiled patched model
gives the eager one's output."""
from __future__ import annotations

import pytest
import torch
from tokenprune.eval.benchmark import benchmark, check_compiled, format_rows

from tokenprune import extension
from tokenprune.flops import random_model
from tokenprune.speed import CHECK_SAMPLES, CompiledOutputChanged, RecompileLimitReached, verify_compiled


def reduced_by(eager, effect):
    """A stand-in unpatched model: ``eager``'s output moved by ``effect`` in every entry (how far the reduction moved
    it), a number or one per sample."""
    effect = torch.as_tensor(effect)
    return lambda t: eager(t) + (effect[:len(t), None] if effect.ndim else effect)


def test_check_compiled_refuses_a_compiled_model_that_changes_the_output(capsys):
    x = torch.randn(2, 3)
    eager = torch.nn.Linear(3, 4)
    check_compiled(eager, eager, reduced_by(eager, 1.0), x, "linear")  # equal: passes and says so
    assert "output equals eager" in capsys.readouterr().out
    with pytest.raises(CompiledOutputChanged, match="torch.compile changed the patched linear's output"):
        check_compiled(lambda t: eager(t) + 1e-3, eager, reduced_by(eager, 1.0), x, "linear")
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
    import tokenprune.eval.benchmark as bench

    import tokenprune

    real, calls = tokenprune.compiled, []
    monkeypatch.setattr(tokenprune, "compiled", lambda m: calls.append(m) or real(m))
    real_check, checked = bench.check_compiled, []
    monkeypatch.setattr(bench, "check_compiled", lambda *args: checked.append(args) or real_check(*args))
    rows = benchmark("vit_testbed_fmnist", "random", keep=0.5, batch_sizes=(1,), repeats=1, warmup=1,
                     compile=True)
    assert len(calls) == 3  # the unpatched, patched and truncated models, all through tokenprune.compiled
    (_, eager, stock, _, _), = checked  # checked against the eager patched model, the unpatched one as the stock
    assert tokenprune.is_patched(eager) and not tokenprune.is_patched(stock) and stock is calls[0]
    # inductor traces the PyTorch ops; compiled CPU graphs may call the CPU build's ToMe and MCTF ops (a method-blind
    # label)
    assert [(r.compiled, r.kernels) for r in rows] == [(True, extension.kernels_in_use("cpu", compiled=True))]
    assert rows[0].kernels in ("CPU build: ToMe's and Zero-TPrune's steps, MCTF's matching and merges",
                               "pytorch ops (the CPU build failed)")
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
    """Up to an eighth of the samples may move, each by less than NEAR_TIE_SHARE (0.8) of how far the reduction itself
    moved it from the unpatched model's output (a near-tie token choice that compiling's reordered sums flip: in a
    small random-init model it moved a sample up to 0.59 of that, far past the rounding); more samples, or a larger
    move, is refused, and the message says which limit was passed."""
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    eager = torch.nn.Linear(3, 4)  # outputs up to about 1.4: the tolerance is 1e-4 of that
    stock = reduced_by(eager, 0.5)

    def moved(samples, by):
        def compiled(t):
            out = eager(t).clone()
            out[:samples] += by
            return out
        return compiled
    check_compiled(moved(2, 5e-4), eager, stock, x, "linear")  # 2 of 16: allowed
    assert "2 sample(s) within 5.0e-04: a near-tie token choice" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="in 3 of 16 samples; near-tie token choices move at most an eighth"):
        check_compiled(moved(3, 5e-4), eager, stock, x, "linear")
    check_compiled(moved(1, 0.39), eager, stock, x, "linear")  # 2800x the tolerance, but under 0.8 of the reduction's
    assert "1 sample(s) within 3.9e-01" in capsys.readouterr().out
    far = r"sample 0 of 16 moved 4.10e-01: the reduction moved it 5.00e-01 from the unpatched model's output, and a " \
          r"near-tie token choice moves a sample less than 0.8 of that\); not using it"
    with pytest.raises(RuntimeError, match=far):
        check_compiled(moved(1, 0.41), eager, stock, x, "linear")
    with pytest.raises(RuntimeError, match="sample 0 of 16 moved 7.00e-01"):
        check_compiled(moved(1, 0.7), eager, stock, x, "linear")  # farther than the reduction moved it
    with pytest.raises(RuntimeError, match="sample 0 of 16 moved 7.00e-01"):  # the first of two too far
        check_compiled(lambda t: eager(t) + torch.tensor([0.7, 0.9] + [0.0] * 14)[:len(t), None], eager, stock, x,
                       "linear")
    with pytest.raises(RuntimeError, match="sample 0 of 16 moved"):  # each sample against its own reduction's move
        check_compiled(moved(1, 0.3), eager, reduced_by(eager, [0.2] + [0.5] * 15), x, "linear")
    check_compiled(moved(1, 0.3), eager, reduced_by(eager, [0.5] + [0.2] * 15), x, "linear")
    with pytest.raises(RuntimeError, match="sample 0 of 16 moved 5.00e-04: nothing was reduced in it"):
        check_compiled(moved(1, 5e-4), eager, eager, x, "linear")  # the baseline: no token choice to flip


def test_the_unpatched_model_runs_only_where_a_sample_moved():
    """The stock forwards measure how far a moved sample may go: where none moved (the usual case) they are not run,
    so ``tokenprune eval --compile`` makes its unpatched copy only where the check needs it."""
    eager = torch.nn.Linear(3, 4)

    def stock(t):
        raise AssertionError("the unpatched model ran")
    check_compiled(eager, eager, stock, torch.randn(4, 3), "linear")
    with pytest.raises(AssertionError, match="the unpatched model ran"):
        check_compiled(lambda t: eager(t) + torch.eye(len(t), 1), eager, stock, torch.randn(16, 3), "linear")


def test_an_encoders_tokens_fewer_where_reduced_are_compared_by_their_mean():
    """An encoder without a head gives its tokens, and the reduction leaves fewer of them than the unpatched model
    has: how far each output moved is then measured on the mean over tokens (a near-tie choice swaps tokens, which
    moves them one by one farther than their mean)."""
    torch.manual_seed(0)
    x = torch.randn(16, 3)

    def eager(t):  # 4 tokens
        return t[:, None, :] + torch.arange(4.0)[None, :, None]

    def stock(t):  # 8 tokens, their mean 0.5 from eager's
        return torch.cat([eager(t), eager(t) + 1.0], dim=1)

    def moved(token_moves):
        def compiled(t):
            out = eager(t).clone()
            out[0] += torch.tensor(token_moves)[:, None]
            return out
        return compiled
    check_compiled(moved([1.2, 0.0, 0.0, 0.0]), eager, stock, x, "encoder")  # one token 1.2, their mean 0.3: allowed
    with pytest.raises(CompiledOutputChanged, match="sample 0 of 16 moved 4.50e-01: the reduction moved it 5.00e-01"):
        check_compiled(moved([0.45] * 4), eager, stock, x, "encoder")
    from tokenprune.speed import NEAR_TIE_SHARE
    assert NEAR_TIE_SHARE == 0.8


def test_check_compiled_refuses_a_sample_not_finite_where_eager_is():
    """NaN is no difference to compare (NaN > tolerance is false): it counts as infinitely far, and so does an
    infinity where eager is finite; the same NaN or infinity in both is no move."""
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    eager = torch.nn.Linear(3, 4)

    def with_first_sample(value, of=None):
        def model(t):
            out = (of or eager)(t).clone()
            out[0, 0] = value
            return out
        return model
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(CompiledOutputChanged, match="sample 0 of 16 moved inf"):
            check_compiled(with_first_sample(value), eager, reduced_by(eager, 0.5), x, "linear")
        check_compiled(with_first_sample(value), with_first_sample(value), reduced_by(eager, 0.5), x, "linear")
    # an infinity in eager's output does not make the tolerance infinite
    with pytest.raises(CompiledOutputChanged, match="in 16 of 16 samples"):
        check_compiled(lambda t: with_first_sample(float("inf"))(t) + 1e-2, with_first_sample(float("inf")),
                       reduced_by(eager, 0.5), x, "linear")


def test_per_sample_distance_is_the_largest_difference_and_knows_nan_and_infinity():
    from tokenprune.speed import per_sample_distance

    inf, nan = float("inf"), float("nan")
    a = torch.tensor([[1.0, 2.0], [inf, nan], [0.0, nan], [inf, 1.0], [-inf, 0.0]])
    b = torch.tensor([[1.5, 1.0], [inf, nan], [0.0, 1.0], [inf, 1.0], [inf, 0.0]])
    assert per_sample_distance(a, b).tolist() == [1.0, 0.0, inf, 0.0, inf]
    assert per_sample_distance(a, a).tolist() == [0.0] * 5  # equal, NaN and infinities included: no distance
    half = torch.tensor([[60000.0], [1.0]], dtype=torch.float16)  # in float32: no overflow, and every digit
    assert per_sample_distance(half, -half).tolist() == [120000.0, 2.0]
    assert per_sample_distance(half, half + 1e-3).dtype == torch.float32


def test_small_batches_are_checked_on_sixteen_samples_so_two_near_tie_flips_are_allowed(capsys):
    """At batch 1 the eighth allowed no sample: one near-tie flip refused a whole configuration. The compiled graph of
    that batch size is run on further seeded batches until CHECK_SAMPLES samples are compared; the caller's random
    stream is not touched. Sixteen, not eight: a flip moved 1 in 30-60 samples of the random-init testbed and DeiT-S
    under MCTF (docs/performance.md, session 28), and one allowed of eight refused a sound graph by chance."""
    assert CHECK_SAMPLES == 16
    eager = torch.nn.Linear(3, 4)
    stock = reduced_by(eager, 1.0)
    calls = []

    def flips_the_first_call(t):  # the compiled model: one sample (the first call's first) moved by a near tie
        calls.append(t)
        out = eager(t).clone()
        out[0] += 5e-4 if len(calls) == 1 else 0.0
        return out
    for batch, calls_made in ((1, 16), (3, 6), (8, 2), (16, 1), (17, 1)):
        calls.clear()
        x = torch.randn(batch, 3)
        state = torch.random.get_rng_state()
        check_compiled(flips_the_first_call, eager, stock, x, "linear")
        assert torch.equal(torch.random.get_rng_state(), state)
        assert len(calls) == calls_made and calls[0] is x and all(t.shape == x.shape for t in calls)
        assert len({t.sum().item() for t in calls}) == calls_made  # each a different batch
        samples = batch * calls_made
        said = capsys.readouterr().out
        assert f"for batch {batch} in " in said
        assert f"output equals eager on {samples} samples (1 sample(s) within 5.0e-04" in said
    calls.clear()
    with pytest.raises(CompiledOutputChanged, match="in 16 of 16 samples"):  # every probe moved: refused
        check_compiled(lambda t: eager(t) + 5e-4, eager, stock, torch.randn(1, 3), "linear")
    check_compiled(lambda t: calls.append(t) or eager(t) + (5e-4 if len(calls) <= 2 else 0.0), eager, stock,
                   torch.randn(1, 3), "linear")  # two of sixteen: allowed
    calls.clear()
    with pytest.raises(CompiledOutputChanged, match="in 3 of 16 samples"):  # three: more than an eighth
        check_compiled(lambda t: calls.append(t) or eager(t) + (5e-4 if len(calls) <= 3 else 0.0), eager, stock,
                       torch.randn(1, 3), "linear")


def test_the_probe_batches_are_seeded_and_of_the_inputs_dtype():
    eager = torch.nn.Linear(3, 4).to(torch.bfloat16)
    seen = []
    x = torch.randn(2, 3).to(torch.bfloat16)
    for _ in range(2):
        check_compiled(lambda t: seen.append(t) or eager(t), eager, eager, x, "linear")
    assert len(seen) == 16 and all(t.dtype == torch.bfloat16 and t.shape == (2, 3) for t in seen)
    assert all(torch.equal(a, b) for a, b in zip(seen[:8], seen[8:]))  # the same probes each time
    torch.manual_seed(0)  # a caller's usual seed: its first batch is not a probe
    assert not torch.equal(torch.randn(2, 3).to(torch.bfloat16), seen[1])


def test_the_tolerance_scales_with_the_output_and_its_limits_are_inclusive():
    """1e-4 of the output's largest magnitude, never less than 1e-4 (outputs below 1), the dtype's own (float64: the
    float32 figure); a move of exactly the tolerance is within it, a near tie of exactly 0.8 of the reduction's own
    move is not."""
    def check(scale, moves, dtype=torch.float32, effect=1.0):  # eager: every entry `scale`; moves: each sample's move
        moves = torch.tensor(moves, dtype=dtype)
        eager = lambda t: torch.full((len(t), 4), scale, dtype=dtype)  # noqa: E731
        check_compiled(lambda t: eager(t) + moves[:, None], eager, reduced_by(eager, torch.tensor(effect, dtype=dtype)),
                       torch.zeros(len(moves), 3, dtype=dtype), "m")

    check(100.0, [5e-3] * 16)  # within 1e-4 x 100
    with pytest.raises(CompiledOutputChanged, match="in 16 of 16"):
        check(100.0, [2e-2] * 16)
    check(0.01, [5e-5] * 16)  # outputs below 1: the tolerance is 1e-4, not 1e-6
    with pytest.raises(CompiledOutputChanged, match="in 16 of 16"):
        check(0.01, [1.5e-4] * 16)
    check(0.0, [1e-4] * 16, effect=0.0)  # exactly the tolerance: not a move (nothing reduced: no near tie either)
    check(0.0, [0.125] + [0.0] * 15, effect=0.25)  # one near tie, half the reduction's move: allowed
    with pytest.raises(CompiledOutputChanged, match="sample 0 of 16 moved 2.00e-01"):
        check(0.0, [0.2] + [0.0] * 15, effect=0.25)  # exactly 0.8 of the reduction's move: not less
    check(0.0, [5e-5] * 16, torch.float64)
    with pytest.raises(CompiledOutputChanged, match="in 16 of 16"):
        check(0.0, [2e-4] * 16, torch.float64)
    check(0.0, [5e-3] * 16, torch.float16)  # half precision: 1e-2
    with pytest.raises(CompiledOutputChanged, match="in 16 of 16"):
        check(0.0, [2e-2] * 16, torch.float16)
    check(0.0, [3e-2] * 16, torch.bfloat16)  # bfloat16: 5e-2
    with pytest.raises(CompiledOutputChanged, match="in 16 of 16"):
        check(0.0, [1e-1] * 16, torch.bfloat16)
    check(0.0, [5e-4] * 2 + [0.0] * 15)  # 2 of 17: an eighth is two samples
    with pytest.raises(CompiledOutputChanged, match="in 3 of 17"):
        check(0.0, [5e-4] * 3 + [0.0] * 14)
    with pytest.raises(CompiledOutputChanged, match="in 3 of 23"):  # an eighth of 23 is still two
        check(0.0, [5e-4] * 3 + [0.0] * 20)
    # float32 inputs to a forward computing in bfloat16 (autocast): the tolerance of the dtype it computes in
    eager = lambda t: torch.zeros(len(t), 4)  # noqa: E731
    verify_compiled(lambda t: eager(t) + 3e-2, eager, torch.zeros(8, 3), "m", compute_dtype=torch.bfloat16,
                    stock=eager)
    with pytest.raises(CompiledOutputChanged, match="in 16 of 16"):
        verify_compiled(lambda t: eager(t) + 1e-1, eager, torch.zeros(8, 3), "m", compute_dtype=torch.bfloat16,
                        stock=eager)
    with pytest.raises(CompiledOutputChanged, match="in 16 of 16"):
        verify_compiled(lambda t: eager(t) + 3e-2, eager, torch.zeros(8, 3), "m", stock=eager)


def test_model_outputs_are_compared_by_their_logits_or_else_their_last_hidden_state():
    """Hugging Face models return an output object: a classifier's logits, else an encoder's last hidden state."""
    from types import SimpleNamespace as Output

    eager = torch.nn.Linear(3, 4)
    x = torch.randn(8, 3)
    check_compiled(lambda t: Output(logits=eager(t)), eager, eager, x, "classifier")
    with pytest.raises(CompiledOutputChanged):
        check_compiled(lambda t: Output(logits=eager(t) + 1.0, last_hidden_state=eager(t)), eager, eager, x,
                       "classifier")
    check_compiled(lambda t: Output(logits=None, last_hidden_state=eager(t)), eager, eager, x, "encoder")
    with pytest.raises(CompiledOutputChanged):
        check_compiled(lambda t: Output(last_hidden_state=eager(t) + 1.0), eager, eager, x, "encoder")
