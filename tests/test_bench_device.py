"""`tokenprune bench` / `tokenprune eval` with `--device` and `--dtype` (issue 16, part 3): the CPU half-precision
paths end to end, the validation errors, and (with a GPU only, `-m cuda`) the CUDA-event timing."""
from __future__ import annotations

import json
import time

import pytest
import tokenprune.eval.benchmark as bench
import tokenprune.eval.evaluate as evaluate
import torch
from conftest import tiny_timm

from tokenprune import timing
from tokenprune.cli import main


def _one_line_error(capsys, *fragments: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_cuda_without_cuda_is_one_line_and_exit_2(command, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run.jsonl"
    extra = ["--output", str(out), "--limit", "1"] if command == "eval" else []
    for device in ("cuda", "cuda:0"):
        assert main([command, "--device", device, *extra]) == 2
        _one_line_error(capsys, f"--device {device}", "CUDA is not available", "--device cpu")
    assert not out.exists()  # refused before any work


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_bad_device_and_dtype_names(command, monkeypatch, capsys, tmp_path):
    command = [command] + (["--output", str(tmp_path / "run.jsonl"), "--limit", "1"] if command == "eval" else [])
    for device in ("gpu", "cuda:x", "cuda:-1", "mps"):
        assert main([*command, "--device", device]) == 2
        _one_line_error(capsys, "expected cpu, cuda or cuda:N")
    assert main([*command, "--dtype", "fp64"]) == 2
    _one_line_error(capsys, "--dtype", "fp32", "fp16", "bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main([*command, "--device", "cuda:2"]) == 2
    _one_line_error(capsys, "2 CUDA device(s), cuda:0 to cuda:1")


def test_eval_amp_with_a_half_dtype_is_refused(capsys, tmp_path):
    assert main(["eval", "--amp", "--dtype", "bf16", "--output", str(tmp_path / "run.jsonl"), "--limit", "1"]) == 2
    _one_line_error(capsys, "--amp", "--dtype bf16")


def _record_dtypes(model: torch.nn.Module, seen: list) -> torch.nn.Module:
    """Note the parameters' and every input's dtype on each forward of ``model`` (and its copies)."""
    model.register_forward_pre_hook(lambda m, args: seen.append((next(m.parameters()).dtype, args[0].dtype)))
    return model


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_bench_runs_in_half_precision_on_cpu(dtype, torch_dtype, monkeypatch, capsys, tmp_path):
    seen = []  # the named architecture, tiny (64 patches, 4 blocks), so that half precision on a CPU is quick
    monkeypatch.setattr(bench, "random_model", lambda name, seed=0: _record_dtypes(tiny_timm(name, seed), seen))
    out = tmp_path / "rows.json"
    assert main(["bench", "--model", "vit_base_patch16_224", "--method", "tome", "--keep", "0.5", "--batch-sizes", "32",
                 "--repeats", "1", "--dtype", dtype, "--device", "cpu", "--json", str(out)]) == 0
    assert f"keep=0.5 {dtype}" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [(r["dtype"], r["device"]) for r in rows] == [(dtype, "cpu")]
    assert rows[0]["patched_gmacs"] < rows[0]["baseline_gmacs"] and rows[0]["patched_ms"] > 0
    # every forward (FLOP counts, warm-up, timing; baseline, patched, ceiling) ran in that dtype
    assert len(seen) >= 3 * 3 and set(seen) == {(torch_dtype, torch_dtype)}


@pytest.mark.parametrize("setting, loads, kernels, marked", [
    ("auto", True, "CPU build: ToMe's, MCTF's and Zero-TPrune's steps, the merge, the gather, the top-k, "
                   "the attention map", False),
    ("auto", False, "pytorch ops (the CPU build failed)", True),
    ("off", True, "pytorch ops", True),
    ("all", True, "CPU build, every kernel", False),
])
def test_bench_rows_say_which_kernels_ran(setting, loads, kernels, marked, monkeypatch, capsys, tmp_path):
    """Eager CPU figures depend on the extension's CPU kernels (a machine without a compiler falls back to the
    PyTorch ops): the JSON rows say which ran, the table marks a run without them."""
    from tokenprune import extension
    monkeypatch.setattr(bench, "random_model", lambda name, seed=0: tiny_timm(name, seed))
    monkeypatch.setenv(extension.ENV, setting)
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: object() if loads else None)
    monkeypatch.setattr(extension, "load", lambda cuda, verbose=False: object())
    monkeypatch.setattr(extension, "for_tensor", lambda *args, **kwargs: None)  # the timing itself: PyTorch ops
    out = tmp_path / "rows.json"
    assert main(["bench", "--model", "vit_base_patch16_224", "--method", "random", "--keep", "0.5",
                 "--batch-sizes", "2", "--repeats", "1", "--json", str(out)]) == 0
    table_row = capsys.readouterr().out.strip().splitlines()[-1]
    assert (" keep=0.5 no-ext " in table_row) == marked, table_row
    assert [r["kernels"] for r in json.loads(out.read_text())] == [kernels]


@pytest.mark.parametrize("setting, loads, device, kernels", [
    ("auto", True, "cpu", "CPU build: ToMe's and Zero-TPrune's steps, MCTF's matching and merges"),
    ("all", True, "cpu", "CPU build: ToMe's and Zero-TPrune's steps, MCTF's matching and merges"),
    ("auto", False, "cpu", "pytorch ops (the CPU build failed)"),
    ("off", True, "cpu", "pytorch ops"),
    ("auto", True, "cuda", "pytorch ops"),
])
def test_compiled_rows_say_which_kernels_their_graphs_call(setting, loads, device, kernels, monkeypatch):
    """A compiled CPU graph calls the CPU build's ToMe and Zero-TPrune steps and MCTF's matching and merges
    (torch.library ops), nothing else of it; a compiled CUDA graph none: the row says so."""
    from tokenprune import extension
    monkeypatch.setenv(extension.ENV, setting)
    # only the CPU build counts: a CUDA build does not run in a CPU graph
    monkeypatch.setattr(extension, "_load_or_warn", lambda cuda: object() if loads and not cuda else None)
    assert extension.kernels_in_use(device, compiled=True) == kernels


def test_the_config_label_names_what_differs_from_a_default_run():
    from dataclasses import replace
    row = bench.BenchRow(model="m", method="tome", config="keep=0.5", batch_size=1, threads=2, repeats=1,
                         baseline_ms=1.0, patched_ms=1.0, measured_speedup=1.0, ideal_speedup=1.0,
                         fraction_of_ideal=1.0, ceiling_speedup=1.0, overhead=0.0, baseline_gmacs=1.0,
                         patched_gmacs=1.0, foreign_load=None,
                         kernels="CPU build: ToMe's, MCTF's and Zero-TPrune's steps, the merge, the gather, the top-k, "
                                 "the attention map")
    assert bench._config_label(row) == "keep=0.5"
    assert bench._config_label(replace(row, kernels="pytorch ops")) == "keep=0.5 no-ext"
    assert bench._config_label(replace(row, kernels="pytorch ops", compiled=True)) == "keep=0.5 compiled"
    assert bench._config_label(replace(row, dtype="bf16", device="cuda:0")) == "keep=0.5 bf16 cuda:0"



def test_the_config_names_keep_unless_an_option_overrides_it():
    """Only r, fast and keep_rates replace keep; with any other option the row (printed and --json) must still
    say which keep it timed, or a keep 0.5 and a keep 0.33 run read the same."""
    assert bench.config_label(0.5, {}) == "keep=0.5"
    assert bench.config_label(0.5, {"prop_attn": False}) == "keep=0.5, prop_attn=False"
    assert bench.config_label(0.33, {"layers": [3, 6, 9]}) == "keep=0.33, layers=[3, 6, 9]"
    assert bench.config_label(0.5, {"r": 13}) == "r=13"
    assert bench.config_label(0.5, {"r": 0}) == "r=0"  # r=0 (no merging) overrides keep too
    assert bench.config_label(0.5, {"fast": True}) == "fast=True"
    assert bench.config_label(0.5, {"fast": False}) == "keep=0.5, fast=False"
    assert bench.config_label(0.5, {"keep_rates": [0.7, 0.7, 0.7]}) == "keep_rates=[0.7, 0.7, 0.7]"
    [row] = bench.benchmark("vit_testbed_fmnist", "random", keep=0.5, options={"seed": 1}, batch_sizes=(1,),
                            repeats=1, warmup=1)
    assert row.config == "keep=0.5, seed=1"


def test_the_table_s_columns_stay_under_their_headers():
    """A method or config longer than its column's default width (zero-tprune; keep with options) shifted every
    number after it under the next header."""
    from dataclasses import replace
    row = bench.BenchRow(model="m", method="tome", config="keep=0.5", batch_size=1, threads=2, repeats=1,
                         baseline_ms=2.0, patched_ms=1.0, measured_speedup=2.0, ideal_speedup=1.5,
                         fraction_of_ideal=1.333, ceiling_speedup=2.5, overhead=0.1, baseline_gmacs=1.0,
                         patched_gmacs=0.5, foreign_load=0.01, kernels="CPU build")
    rows = [row, replace(row, method="zero-tprune", config="keep=0.5, layers=[3, 6, 9], s_fraction=0.5",
                         measured_speedup=1.25, foreign_load=None),
            # above 100 GMACs (ViT-H) and 10,000 img/s (a GPU at batch 256): "before->after" columns wider
            replace(row, baseline_gmacs=167.4, patched_gmacs=110.25, baseline_ms=0.01, patched_ms=0.005,
                    measured_speedup=1.5)]
    head, _, *lines = bench.format_rows(rows).splitlines()
    end = head.index("speedup") + len("speedup")  # the numbers are right-aligned under their header
    assert [line[end - 5:end] for line in lines] == ["2.00x", "1.25x", "1.50x"]
    assert len({len(line) for line in [head, *lines]}) == 1
    assert [line.split()[-1] for line in lines] == ["1.0%", "n/a", "1.0%"]  # the foreign share, or none measured
    gmacs_end = head.index("GMACs") + len("GMACs")
    assert [line[:gmacs_end].split()[-1] for line in lines] == ["1.00->0.50", "1.00->0.50", "167.40->110.25"]

def test_timed_returns_the_result_and_the_wall_clock_on_cpu():
    result, seconds = timing.timed(lambda: time.sleep(0.02) or 7, torch.device("cpu"))
    assert result == 7 and 0.02 <= seconds < 1


def test_eval_runs_in_bf16_on_cpu_and_keeps_its_results_apart(monkeypatch, tmp_path, capsys):
    seen = []
    load = evaluate.load_model
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: _record_dtypes(load(*a, **k), seen))
    out = tmp_path / "run.jsonl"
    common = ["--limit", "8", "--batch-size", "8", "--method", "tome", "--keep", "0.5", "--output", str(out),
              "--device", "cpu"]
    assert main(["eval", *common]) == 0
    assert set(seen) == {(torch.float32, torch.float32)}
    seen.clear()
    capsys.readouterr()
    assert main(["eval", *common, "--resume", "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "already done" not in printed and ", bf16" in printed  # an fp32 result is no bf16 result
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["dtype"] for r in rows] == ["fp32", "fp32", "bf16", "bf16"]
    assert [json.loads(r["key"]).get("dtype") for r in rows] == [None, None, "bf16", "bf16"]
    fp32, bf16 = rows[0], rows[2]  # the baselines: 8 testbed images, the same answers in bf16 (at most one flip)
    assert bf16["images"] == fp32["images"] == 8 and abs(bf16["top1"] - fp32["top1"]) <= 100 / 8


# ------------------------------------------------------------------ with a GPU only (`pytest -m cuda`)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_timed_measures_gpu_time_not_the_launch():
    """A kernel that spins for ~50 ms returns at once on the host; CUDA events time the kernel."""
    device = torch.device("cuda")
    torch.cuda._sleep(1000)  # load the kernel
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(int(1e8))
    launch = time.perf_counter() - start
    torch.cuda.synchronize()
    _, seconds = timing.timed(lambda: torch.cuda._sleep(int(1e8)), device)
    assert seconds > 5 * launch and seconds > 0.005


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_and_eval_on_cuda_in_bf16(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["bench", "--model", "vit_testbed_fmnist", "--method", "tome", "--keep", "0.5", "--batch-sizes", "32",
                 "--repeats", "3", "--device", "cuda:0", "--dtype", "bf16", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["dtype"], r["device"]) for r in rows] == [("bf16", "cuda:0")] and rows[0]["patched_ms"] > 0
    results = tmp_path / "run.jsonl"
    assert main(["eval", "--device", "cuda", "--dtype", "bf16", "--limit", "64", "--method", "tome", "mctf",
                 "zero-tprune", "random", "--keep", "0.5", "--output", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == 5 and all(r["dtype"] == "bf16" and r["images"] == 64 for r in rows)
    assert rows[0]["top1"] > 70  # the trained testbed, unpruned, in bf16 on the GPU
    print(capsys.readouterr().out)


def test_a_flops_budget_is_labelled_with_the_keep_it_was_fitted_to(monkeypatch):
    """``benchmark(keep=None, options={"flops": 0.6})`` read "keep=None, flops=0.6": the keep that ran was not said."""
    import tokenprune

    built = []
    make = bench.patched_and_ceiling
    monkeypatch.setattr(bench, "patched_and_ceiling", lambda *args: built.append(make(*args)) or built[-1])
    [row] = bench.benchmark("vit_testbed_fmnist", "tome", keep=None, options={"flops": 0.6}, batch_sizes=(1,),
                            repeats=1, warmup=0)
    fitted = tokenprune.reducer_of(built[0][0]).keep
    assert 0 < fitted < 1 and row.config == f"keep={fitted}, flops=0.6"
