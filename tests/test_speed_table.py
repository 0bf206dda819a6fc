"""The speed-table command (tokenprune.eval.speed_table): runs outermost, each row on disk as it is timed, resume,
medians of the runs, and the speed bar's checks."""
import json

import pytest
from tokenprune.eval import speed_table as st
from tokenprune.eval.benchmark import BenchRow

from tokenprune.speed import CompiledOutputChanged, RecompileLimitReached


def bench_row(model="vit_testbed_fmnist", method="tome", batch=1, speedup=1.2, ceiling=1.3, ideal=1.4,
              compiled=False, foreign=0.01, keep=0.5):
    return BenchRow(model=model, method=method, config=f"keep={keep}", batch_size=batch, threads=2, repeats=5,
                    baseline_ms=10.0, patched_ms=10.0 / speedup, measured_speedup=speedup, ideal_speedup=ideal,
                    fraction_of_ideal=speedup / ideal, ceiling_speedup=ceiling, overhead=0.1, baseline_gmacs=1.0,
                    patched_gmacs=0.7, foreign_load=foreign, compiled=compiled)


def row(run, **kw):
    from dataclasses import asdict

    return dict(asdict(bench_row(**kw)), run=run)


class FakeBench:
    """Stands for benchmark: records its calls; each gives one row per batch size; may stop after ``stop_after``
    calls; refuses (as the compile check does) the (model, method, batch size)s in ``refuse``."""

    def __init__(self, stop_after=None, refuse=()):
        self.calls, self.stop_after, self.refuse, self.batches = [], stop_after, refuse, []

    def __call__(self, model, method, keep, batch_sizes, repeats, compile):
        if self.stop_after is not None and len(self.calls) == self.stop_after:
            raise KeyboardInterrupt
        self.calls.append((model, method))
        self.batches.append(batch_sizes)
        if any((model, method, b) in self.refuse for b in batch_sizes):
            raise CompiledOutputChanged(f"torch.compile changed the patched {model}'s output")
        return [bench_row(model, method, b, compiled=compile, keep=keep) for b in batch_sizes]


REAL_CURRENT_SETTINGS = st.current_settings  # the fixture below stands in for it: the real run's test reads it


@pytest.fixture(autouse=True)
def fake_settings(monkeypatch):
    """The fake benchmark's rows are taken under the settings run_table times under (what a --resume checks)."""
    monkeypatch.setattr(st, "current_settings", lambda compile: st.settings_of(row(1)))


def table(out, benchmark, **settings):
    """run_table with the settings the tests do not vary."""
    settings = {"batch_sizes": (1,), "runs": 1, "keep": 0.5, "repeats": 5, "compile": False, **settings}
    return st.run_table(out, benchmark=benchmark, **settings)


def test_runs_are_the_outer_loop_and_every_configuration_lands_on_disk(tmp_path):
    out, bench = tmp_path / "t.jsonl", FakeBench()
    rows = table(out, bench, models=("m1", "m2"), methods=("tome", "mctf"), batch_sizes=(1, 32), runs=2)
    # one benchmark per batch size, batch sizes innermost
    assert bench.calls == [(m, t) for m in ("m1", "m2") for t in ("tome", "mctf") for b in (1, 32)] * 2
    assert bench.batches == [(1,), (32,)] * 8
    on_disk = st.read_rows(out)
    assert on_disk == rows and len(rows) == 16
    assert [r["run"] for r in on_disk] == [1] * 8 + [2] * 8


def test_an_interrupted_table_keeps_what_finished_and_resume_runs_only_the_rest(tmp_path):
    out = tmp_path / "t.jsonl"
    with pytest.raises(KeyboardInterrupt):
        table(out, FakeBench(stop_after=4), models=("m1",), methods=("tome", "mctf", "random"), runs=2)
    assert [(r["run"], r["method"]) for r in st.read_rows(out)] == [(1, "tome"), (1, "mctf"), (1, "random"),
                                                                    (2, "tome")]
    with out.open("a") as f:  # the interruption tore the next row's line
        f.write('{"model": "m1", "meth')
    bench = FakeBench()
    rows = table(out, bench, models=("m1",), methods=("tome", "mctf", "random"), runs=2, resume=True)
    assert bench.calls == [("m1", "mctf"), ("m1", "random")]
    assert len(rows) == 6 and st.read_rows(out) == rows  # the torn line is gone from the file
    assert all(json.loads(line) for line in out.read_text().splitlines())


def test_without_resume_the_file_starts_afresh(tmp_path):
    out = tmp_path / "t.jsonl"
    table(out, FakeBench(), models=("m1",), methods=("tome",))
    bench = FakeBench()
    table(out, bench, models=("m1",), methods=("tome",))
    assert bench.calls == [("m1", "tome")] and len(st.read_rows(out)) == 1


def test_a_bad_line_before_the_last_is_an_error(tmp_path):
    out = tmp_path / "t.jsonl"
    out.write_text("not json\n" + json.dumps(row(1)) + "\n")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        st.read_rows(out)
    out.write_text(json.dumps({"top1": 80.0}) + "\n")
    with pytest.raises(ValueError, match="not a speed-table row"):
        st.read_rows(out)


def test_cells_take_the_median_of_their_runs_and_bold_what_is_slower():
    rows = [row(1, speedup=0.90), row(2, speedup=1.10), row(3, speedup=1.20),
            row(1, method="mctf", speedup=0.90), row(2, method="mctf", speedup=0.95),
            row(3, method="mctf", speedup=1.2)]
    table = st.markdown(rows)
    assert "| tome | keep=0.5 | 1.10x (0.90 / 1.10 / 1.20) |" in table
    assert "| mctf | keep=0.5 | **0.95x** (0.90 / 0.95 / 1.20) |" in table
    assert st.bar_misses(rows) == ["vit_testbed_fmnist mctf keep=0.5 batch 1: 0.950x, slower than the unpatched "
                                   "model"]


def test_batch_1_of_the_ceiling_and_batch_32_of_the_ideal_are_medians_of_ratios():
    rows = [row(n, batch=1, speedup=s, ceiling=c) for n, s, c in ((1, 1.2, 1.25), (2, 1.1, 1.2), (3, 1.3, 1.3))]
    rows += [row(n, batch=32, speedup=s, ideal=1.4) for n, s in ((1, 1.40), (2, 1.33), (3, 1.26))]
    line = st.markdown(rows).splitlines()[2].split(" | ")
    assert line[-4:-1] == ["1.20-1.30x", f"{1.2 / 1.25:.3f}", f"{1.33 / 1.4:.3f}"]


def test_the_bar_on_deit_small(monkeypatch):
    s = st.BAR_MODEL
    at_bar = [row(n, model=s, batch=1, speedup=1.2 * st.BAR_B1_OF_CEILING, ceiling=1.2) for n in (1, 2, 3)]
    at_bar += [row(n, model=s, batch=32, speedup=1.4 * st.BAR_B32_OF_IDEAL + 1e-9, ideal=1.4) for n in (1, 2, 3)]
    assert st.bar_misses(at_bar) == []
    below = [row(n, model=s, batch=1, speedup=1.15, ceiling=1.2) for n in (1, 2, 3)]
    below += [row(n, model=s, batch=32, speedup=1.35, ideal=1.4) for n in (1, 2, 3)]
    assert st.bar_misses(below) == [
        f"{s} tome keep=0.5 batch 1: {1.15 / 1.2:.3f} of the zero-cost truncation's speedup (the bar: 0.97)",
        f"{s} tome keep=0.5 batch 32: {1.35 / 1.4:.3f} of the FLOPs-ideal speedup (the bar: 0.98)"]
    # compiled: batch 32 is not held to the FLOPs-ideal speedup (nor shown against it); other models to neither
    compiled = [row(n, model=s, batch=32, speedup=1.35, ideal=1.4, compiled=True) for n in (1, 2, 3)]
    assert st.bar_misses(compiled) == [] and st.markdown(compiled).splitlines()[2].split(" | ")[-2] == ""
    other = [row(n, batch=1, speedup=1.05, ceiling=1.2) for n in (1, 2, 3)]
    assert st.bar_misses(other) == []


def test_the_report_names_busy_runs_and_short_cells():
    text = st.report([row(1, foreign=0.2), row(2, foreign=0.01)])
    assert "vit_testbed_fmnist tome run 1 (20%)" in text and "run 2" not in text.split("busy machine")[1]
    assert "fewer than 3 runs (2)" in text
    assert "Speed bar: every cell measured meets it" in text


@pytest.mark.parametrize("argv, message", [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--methods", "hiprune"], "runs image encoders"),
    (["--models", "deit_smal"], "unknown model 'deit_smal'"),
    (["--runs", "0"], "--runs, --repeats and --batch-sizes take integers >= 1"),
    (["--repeats", "0"], "--runs, --repeats and --batch-sizes take integers >= 1"),
    (["--batch-sizes", "0"], "--runs, --repeats and --batch-sizes take integers >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        st.main(["--output", str(tmp_path / "t.jsonl"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_existing_rows_are_neither_appended_to_nor_lost_without_being_asked(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    out.write_text(json.dumps(row(1)) + "\n")
    with pytest.raises(SystemExit) as e:
        st.main(["--output", str(out)])
    assert e.value.code == 2 and "pass --resume" in capsys.readouterr().err
    assert st.read_rows(out) == [row(1)]


def test_report_prints_the_tables_of_files_without_timing(tmp_path, capsys):
    out, md = tmp_path / "t.jsonl", tmp_path / "t.md"
    out.write_text("".join(json.dumps(row(n)) + "\n" for n in (1, 2, 3)))
    st.main(["--report", str(out), "--markdown", str(md)])
    printed = capsys.readouterr().out
    assert "1.20x (1.20 / 1.20 / 1.20)" in printed and md.read_text() == printed
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit) as e:
        st.main(["--report", str(empty)])
    assert e.value.code == 2


def test_a_real_run_of_the_smallest_table(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    st.main(["--output", str(out), "--models", "vit_testbed_fmnist", "--methods", "random", "--batch-sizes", "1",
             "--runs", "1", "--repeats", "1"])
    [r] = st.read_rows(out)
    assert (r["model"], r["method"], r["batch_size"], r["run"], r["compiled"]) == ("vit_testbed_fmnist", "random",
                                                                                    1, 1, False)
    assert r["measured_speedup"] > 0 and "| vit_testbed_fmnist | random | keep=0.5 |" in capsys.readouterr().out
    # what a --resume compares with is what the real run records
    assert REAL_CURRENT_SETTINGS(False) == st.settings_of(r)


def test_the_command_line_defaults_are_the_issues_table(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(st, "run_table", lambda output, **settings: seen.update(settings) or [row(1)])
    st.main(["--output", str(tmp_path / "t.jsonl")])
    assert seen == {"models": list(st.MODELS), "methods": list(st.METHODS), "batch_sizes": (1, 32, 256), "runs": 3,
                    "keep": 0.5, "repeats": 5, "compile": False, "resume": False}
    assert st.MODELS == ("vit_testbed_fmnist", "deit_tiny_patch16_224", "deit_small_patch16_224")
    assert st.METHODS == ("tome", "mctf", "zero-tprune", "random")
    st.main(["--output", str(tmp_path / "t.jsonl"), "--batch-sizes", "8", "2", "--runs", "1", "--repeats", "1",
             "--compile"])
    assert (seen["batch_sizes"], seen["runs"], seen["repeats"], seen["compile"]) == ((8, 2), 1, 1, True)


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_resume_or_overwrite_lets_a_file_with_rows_be_used(tmp_path, monkeypatch, flag):
    out = tmp_path / "t.jsonl"
    out.write_text(json.dumps(row(1)) + "\n")
    seen = {}
    monkeypatch.setattr(st, "run_table", lambda output, **settings: seen.update(settings) or [row(1)])
    st.main(["--output", str(out), flag])
    assert seen["resume"] is (flag == "--resume")


def test_one_of_output_and_report_is_required(capsys):
    with pytest.raises(SystemExit) as e:
        st.main([])
    assert e.value.code == 2


@pytest.mark.parametrize("argv, message", [
    ([], "one of the arguments --output --report is required"),
    (["--output", "t.jsonl", "--runs", "x"], "argument --runs: invalid int value: 'x'"),
])
def test_a_usage_error_is_one_line_not_the_usage_text(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        st.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("flag", ["--output", "--report"])
def test_markdown_onto_a_file_of_rows_is_refused_and_the_rows_kept(tmp_path, capsys, monkeypatch, flag):
    """The report written over --output (or a --report file) would destroy the timings it reports: one line, exit 2,
    before any timing (paths compared resolved)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "t.jsonl"
    out.write_text("".join(json.dumps(row(n)) + "\n" for n in (1, 2, 3)))
    before = out.read_bytes()
    monkeypatch.setattr(st, "run_table", lambda output, **settings: pytest.fail("timed despite a bad --markdown"))
    given = [flag, "t.jsonl", "--resume"] if flag == "--output" else [flag, str(tmp_path / "other.jsonl"), "t.jsonl"]
    with pytest.raises(SystemExit) as e:
        st.main([*given, "--markdown", "sub/../t.jsonl"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"--markdown sub/../t.jsonl and {flag} t.jsonl are the same file" in err
    assert out.read_bytes() == before and not (tmp_path / "sub").exists()


def test_an_interrupted_markdown_write_leaves_the_old_report(tmp_path, monkeypatch):
    """The report is written beside --markdown and renamed over it: killed halfway, the old report is still whole."""
    from pathlib import Path

    out, md = tmp_path / "t.jsonl", tmp_path / "t.md"
    out.write_text(json.dumps(row(1)) + "\n")
    md.write_text("the old report\n")
    real_write_text = Path.write_text

    def killed_halfway(self, text, *args, **kwargs):
        real_write_text(self, text[:len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(Path, "write_text", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        st.main(["--report", str(out), "--markdown", str(md)])
    monkeypatch.undo()
    assert md.read_text() == "the old report\n" and sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl", "t.md"]


def test_a_file_that_cannot_be_read_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="No such file"):
        st.read_rows(tmp_path / "missing.jsonl")
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="cannot be read") as e:
        st.read_rows(binary)
    assert "can't decode" in str(e.value)


def test_every_table_line_has_the_headers_columns_even_with_a_cell_missing():
    rows = [row(1, batch=1), row(1, batch=32), row(1, method="mctf", batch=32)]  # mctf has no batch-1 run
    lines = st.markdown(rows).splitlines()
    assert len({line.count("|") for line in lines}) == 1
    assert lines[3].split(" | ")[3] == ""


def test_at_the_bar_is_not_a_miss_and_above_it_neither():
    s = st.BAR_MODEL
    exactly = [row(n, model=s, batch=1, speedup=1.94, ceiling=2.0) for n in (1, 2, 3)]  # 0.97 exactly
    assert st._of_ceiling(exactly[0]) == st.BAR_B1_OF_CEILING
    b32 = [dict(row(n, model=s, batch=32, speedup=1.5, ideal=1.5), fraction_of_ideal=st.BAR_B32_OF_IDEAL)
           for n in (1, 2, 3)]
    level = [row(n, batch=1, speedup=1.0) for n in (1, 2, 3)]  # as fast as the unpatched model
    above = [row(n, model=s, batch=1, speedup=1.3, ceiling=1.3, method="mctf") for n in (1, 2, 3)]
    assert st.bar_misses(exactly + b32 + level + above) == []
    assert "| 1.00x (1.00 / 1.00 / 1.00) |" in st.markdown(level)


def test_the_ratios_are_asked_of_their_batch_sizes_and_of_deit_small_only():
    s = st.BAR_MODEL
    # batch 256 below both ratios: neither is asked of it; nor of deit_base (sorts before deit_small) or vit_*
    low = [row(n, model=s, batch=256, speedup=1.05, ceiling=1.3, ideal=1.4) for n in (1, 2, 3)]
    low += [row(n, model=m, batch=b, speedup=1.05, ceiling=1.3, ideal=1.4) for n in (1, 2, 3)
            for m in ("deit_base_patch16_224", "vit_small_patch16_224") for b in (1, 32)]
    assert st.bar_misses(low) == []


def test_busy_is_above_five_percent_and_the_foreign_column_shows_the_largest():
    rows = [row(1, foreign=st.BUSY), row(2, foreign=0.02), row(3, foreign=None)]
    text = st.report(rows)
    assert "busy machine" not in text and "| 5.0% |" in text
    assert st.markdown([row(1, foreign=None)]).endswith("| n/a |")


def test_three_runs_or_more_are_what_the_bar_takes():
    assert "fewer than 3 runs" not in st.report([row(n) for n in (1, 2, 3)])
    assert "fewer than 3 runs" not in st.report([row(n) for n in (1, 2, 3, 4)])
    assert "Speed bar: every cell measured meets it" in st.report([])


def test_resume_takes_again_what_was_timed_at_other_settings(tmp_path):
    out = tmp_path / "t.jsonl"
    table(out, FakeBench(), models=("m1",), methods=("tome",))
    bench = FakeBench()
    rows = table(out, bench, models=("m1",), methods=("tome",), compile=True, resume=True)
    assert bench.calls == [("m1", "tome")] and [r["compiled"] for r in rows] == [False, True]
    bench = FakeBench()
    table(out, bench, models=("m1",), methods=("tome",), keep=0.7, resume=True)
    assert bench.calls == [("m1", "tome")]


def test_a_refused_compiled_cell_is_recorded_and_the_table_goes_on(tmp_path, capsys):
    """The compile check refusing one configuration stopped a whole --compile table: it is now a row marked refused
    (with the check's message), shown as refused and counted as a miss of the bar; its later runs are skipped (they
    would compile the same model to be refused alike), and --resume tries it again."""
    out = tmp_path / "t.jsonl"
    bench = FakeBench(refuse={("m1", "mctf", 1)})
    rows = table(out, bench, models=("m1",), methods=("mctf", "tome"), batch_sizes=(1, 32), compile=True, runs=2)
    # run 2 skips the refused cell and nothing else
    assert bench.batches == [(1,), (32,), (1,), (32,), (32,), (1,), (32,)]
    assert st.read_rows(out) == rows and len(rows) == 7
    refused = rows[0]
    assert (refused["model"], refused["method"], refused["config"]) == ("m1", "mctf", "keep=0.5")
    assert (refused["batch_size"], refused["compiled"], refused["run"]) == (1, True, 1)
    assert refused["refused"] == "torch.compile changed the patched m1's output"
    said = "run 1/2 m1 mctf batch 1: refused by the compile check: torch.compile changed the patched m1's output"
    assert said in capsys.readouterr().out
    [mctf] = [line for line in st.markdown(rows).splitlines() if "| mctf |" in line]
    assert "| **refused** (refused) | 1.20x (1.20 / 1.20) |" in mctf
    assert mctf.endswith("| 1.40x | 1.30-1.30x |  |  | 1.0% |")
    miss = ("m1 mctf keep=0.5 compiled batch 1: refused by the compile check (torch.compile changed the patched m1's "
            "output)")
    assert st.bar_misses(rows) == [miss]
    text = st.report(rows)
    assert "Speed bar: 1 misses" in text and f"- {miss}" in text and "fewer than 3 runs (2)" in text
    bench = FakeBench()  # fixed since: --resume times the refused cell, and nothing else
    rows = table(out, bench, models=("m1",), methods=("mctf", "tome"), batch_sizes=(1, 32), compile=True, runs=2,
                 resume=True)
    assert bench.calls == [("m1", "mctf")] * 2 and bench.batches == [(1,), (1,)]
    assert st.bar_misses(rows) == []  # the timed run 1 replaces the refused one in the report
    assert "| 1.20x (1.20 / 1.20) |" in st.markdown(rows)


def test_only_the_compile_checks_refusal_is_recorded_other_errors_stop_the_table(tmp_path):
    def recompiled(*args, **kwargs):  # dynamo's recompile limit under never_eager_fallback
        raise RecompileLimitReached("torch.compile reached one of dynamo's recompile limits")
    with pytest.raises(RecompileLimitReached, match="recompile limits"):
        table(tmp_path / "t.jsonl", recompiled, models=("m1",), methods=("tome",), compile=True)
    assert st.read_rows(tmp_path / "t.jsonl") == []


def test_an_interruption_between_batch_sizes_resumes_with_the_rest(tmp_path):
    out = tmp_path / "t.jsonl"
    with pytest.raises(KeyboardInterrupt):
        table(out, FakeBench(stop_after=1), models=("m1",), methods=("tome",), batch_sizes=(1, 32, 256))
    bench = FakeBench()
    rows = table(out, bench, models=("m1",), methods=("tome",), batch_sizes=(1, 32, 256), resume=True)
    assert bench.batches == [(32,), (256,)] and [r["batch_size"] for r in rows] == [1, 32, 256]


def test_a_cell_with_refused_and_timed_runs_takes_the_timed_ones():
    s = st.BAR_MODEL
    refused = dict(model=s, method="mctf", config="keep=0.5", compiled=True, batch_size=1, run=2, refused="changed")
    rows = [row(1, model=s, method="mctf", batch=1, speedup=0.9, ceiling=1.0, compiled=True), refused,
            row(3, model=s, method="mctf", batch=1, speedup=0.94, ceiling=1.0, compiled=True)]
    assert "| **0.92x** (0.90 / refused / 0.94) |" in st.markdown(rows)  # the median of the timed runs
    where = f"{s} mctf keep=0.5 compiled batch 1"
    assert st.bar_misses(rows) == [f"{where}: refused by the compile check (changed)",
                                   f"{where}: 0.920x, slower than the unpatched model",
                                   f"{where}: 0.920 of the zero-cost truncation's speedup (the bar: 0.97)"]
    assert "fewer than 3 runs (2)" in st.report(rows)  # two were timed
    only = [refused]
    line = st.markdown(only).splitlines()[-1]
    assert line == f"| {s} | mctf | keep=0.5 compiled | **refused** (refused) |  |  |  |  |  |"
    assert "busy machine" not in st.report(only)  # a refused row has no foreign load
    assert st.bar_misses(only) == [f"{where}: refused by the compile check (changed)"]


def test_a_row_holds_its_cell_and_either_its_timing_or_its_refusal(tmp_path):
    out = tmp_path / "t.jsonl"
    cell = {"run": 1, "model": "m", "method": "tome", "config": "keep=0.5", "compiled": True, "batch_size": 1}
    timed = {key: row(1)[key] for key in st.TIMED_FIELDS}
    for good in (dict(cell, refused="changed"), dict(cell, **timed), row(1)):
        out.write_text(json.dumps(good) + "\n")
        assert st.read_rows(out) == [good]
    for field in sorted(st.CELL_FIELDS):  # a row without one of them would crash the report: refused when read
        out.write_text(json.dumps({k: v for k, v in dict(cell, refused="changed").items() if k != field}) + "\n")
        with pytest.raises(ValueError, match="line 1: not a speed-table row"):
            st.read_rows(out)
    for field in sorted(st.TIMED_FIELDS):
        out.write_text(json.dumps({k: v for k, v in dict(cell, **timed).items() if k != field}) + "\n")
        with pytest.raises(ValueError, match="line 1: not a speed-table row"):
            st.read_rows(out)


def test_every_cell_is_checked_after_a_wholly_refused_one_and_the_latest_refusal_is_named():
    def refused(run, message, method="mctf"):
        return dict(model="m", method=method, config="keep=0.5", compiled=True, batch_size=1, run=run,
                    refused=message)
    rows = [refused(1, "first"), refused(2, "latest"), row(1, model="m", method="tome", batch=1, speedup=0.9)]
    assert st.bar_misses(rows) == ["m mctf keep=0.5 compiled batch 1: refused by the compile check (latest)",
                                   "m tome keep=0.5 batch 1: 0.900x, slower than the unpatched model"]


def test_a_resume_under_other_settings_is_refused_before_timing(tmp_path, monkeypatch):
    """Runs timed under other kernels (TOKENPRUNE_EXT=off), threads or dtype counted as done on --resume, and the
    report showed their figures for this run's, unmarked."""
    out = tmp_path / "t.jsonl"
    table(out, FakeBench(), models=("m1",), methods=("tome",))
    monkeypatch.setattr(st, "current_settings", lambda compile: {**st.settings_of(row(1)), "kernels": "CPU build"})
    bench = FakeBench()
    with pytest.raises(ValueError, match=r"--resume: .* other settings \(kernels='pytorch ops' against 'CPU build'\)"):
        table(out, bench, models=("m1",), methods=("tome", "mctf"), resume=True)
    assert bench.calls == [] and len(st.read_rows(out)) == 1  # nothing timed, the file as it was


def test_a_cell_whose_runs_differ_in_settings_is_refused_in_the_report():
    rows = [row(1), dict(row(2), threads=4), row(1, method="mctf")]
    with pytest.raises(ValueError, match=r"vit_testbed_fmnist tome keep=0.5 False 1: .*threads=4 against 2"):
        st.report(rows)
    assert "mctf" in st.report([row(1), row(2), row(1, method="mctf")])  # the same settings: one median
    with pytest.raises(ValueError, match=r"threads=1 against 2"):  # a setting below the first run's too
        st.report([row(1), dict(row(2), threads=1)])


def test_a_resume_compares_eager_runs_with_eager_settings_and_compiled_with_compiled(tmp_path, monkeypatch):
    """A compiled graph runs other kernels than an eager forward: one file holds both, and a resume of either kind
    compares the runs of its kind only."""
    out = tmp_path / "t.jsonl"
    kernels = {False: "eager kernels", True: "compiled kernels"}
    out.write_text(json.dumps(dict(row(1), kernels=kernels[False])) + "\n"
                   + json.dumps(dict(row(1, compiled=True), kernels=kernels[True])) + "\n")
    monkeypatch.setattr(st, "current_settings", lambda compile: {**st.settings_of(row(1)), "kernels": kernels[compile]})
    for compile in (False, True):
        bench = FakeBench()
        table(out, bench, models=("vit_testbed_fmnist",), methods=("tome",), compile=compile, resume=True)
        assert bench.calls == []  # the run of its kind is done, and nothing was refused
