"""The CPU speed tables of the README and docs/performance.md, and the speed bar they are held to, in one command.

    python -m tokenprune.eval.speed_table --output runs/speed/eager.jsonl            # 3 models x 4 methods, 3 runs
    python -m tokenprune.eval.speed_table --output runs/speed/compiled.jsonl --compile --batch-sizes 1
    python -m tokenprune.eval.speed_table --report runs/speed/eager.jsonl             # the tables again, no timing

Each run of a cell is one ``tokenprune bench`` (``benchmark``: the unpatched model, the patched one and the zero-cost
truncation timed in turn, medians of interleaved repeats) at one batch size; the runs are the outer loop, so a cell's
runs are spread over the session rather than taken back to back. Each row is appended to ``--output`` (JSON lines,
with its run number) as soon as it is timed: an interrupted table loses nothing finished, and ``--resume`` goes on
where it stopped (a line torn by the interruption is dropped). With ``--compile``, a cell whose compiled model fails
the compile check (its output is not the eager one's) is recorded as refused, its later runs are skipped (they would
be refused alike), and the table goes on; ``--resume`` tries a refused cell again.

The report gives each cell the median of its runs, then the runs, and checks the speed bar (issue 17): every cell at
least as fast as the unpatched model; on ``deit_small_patch16_224``, batch 32 (eager) at least 0.98 of the FLOPs-ideal
speedup and batch 1 at least 0.97 of the zero-cost truncation's. It says which cells miss it, and which runs were
taken on a busy machine (more than 5% of the CPUs used by other processes meanwhile: their ratios are not evidence).
A whole table (3 models x 4 methods x 3 runs at batch 1, 32 and 256) takes about an hour on two cores, eager.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import asdict
from pathlib import Path

from tokenprune.cli import ArgumentParser, check_writable
from tokenprune.registry import config_label

from .evaluate import write_atomically

#: the issue's models and methods: the testbed, ViT-Ti and ViT-S widths
MODELS = ("vit_testbed_fmnist", "deit_tiny_patch16_224", "deit_small_patch16_224")
METHODS = ("tome", "mctf", "zero-tprune", "random")
#: the speed bar: the model its ratios are asked of, and the ratios
BAR_MODEL = "deit_small_patch16_224"
BAR_B32_OF_IDEAL = 0.98  # eager only: compiled graphs are not what the FLOPs count describes
BAR_B1_OF_CEILING = 0.97
BUSY = 0.05  # foreign load above which a run's ratios say more about the machine than the method


#: what a table cell is: the runs of one model, method, configuration, compile setting and batch size
CELL = ("model", "method", "config", "compiled", "batch_size")
#: what every row holds (its cell and run), and what a timed one adds (a refused one has ``refused`` instead)
CELL_FIELDS = {"run", *CELL}
TIMED_FIELDS = {"measured_speedup", "ceiling_speedup", "ideal_speedup", "fraction_of_ideal", "foreign_load"}


#: what else a timed row's figures depend on: a cell's runs must agree on them (rows of older files lack some: None)
SETTINGS = ("device", "dtype", "threads", "kernels")


def cell_key(row: dict) -> tuple:
    """The cell a row belongs to (``CELL``)."""
    return tuple(row[field] for field in CELL)


def settings_of(row: dict) -> dict:
    """The machine settings a timed row was taken under (``SETTINGS``)."""
    return {field: row.get(field) for field in SETTINGS}


def _differing(rows: list[dict], settings: dict) -> str:
    """The first timed row's settings that differ from ``settings``, in words ('' when none does)."""
    for row in _timed(rows):
        theirs = settings_of(row)
        if theirs != settings:
            return ", ".join(f"{k}={theirs[k]!r} against {settings[k]!r}" for k in SETTINGS if theirs[k] != settings[k])
    return ""


def current_settings(compile: bool) -> dict:
    """The settings ``run_table`` times under: ``benchmark``'s defaults (CPU, fp32, 2 threads) and the kernels this
    process runs (``TOKENPRUNE_EXT``)."""
    from tokenprune import extension

    return dict(device="cpu", dtype="fp32", threads=2, kernels=extension.kernels_in_use("cpu", compiled=compile))


def read_rows(path: Path) -> list[dict]:
    """The rows of a speed-table file; a last line torn by an interruption is dropped (that run of that cell is
    taken again on ``--resume``), any other line that is not a row is an error."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({getattr(e, 'strerror', None) or e})") from e
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}, line {number}: not JSON; is this a speed-table file?") from None
        if not isinstance(row, dict) or not CELL_FIELDS <= row.keys() or not (
                "refused" in row or TIMED_FIELDS <= row.keys()):
            raise ValueError(f"{path}, line {number}: not a speed-table row (written by python -m "
                             "tokenprune.eval.speed_table)")
        rows.append(row)
    return rows


def run_table(output: Path, *, models, methods, batch_sizes, runs: int, keep: float, repeats: int, compile: bool,
              resume: bool = False, benchmark=None) -> list[dict]:
    """Time every model x method x batch size ``runs`` times (runs outermost), appending each one's row to ``output``
    as it is timed. A compiled cell the compile check refuses (``CompiledOutputChanged``) is recorded as a row with
    ``refused`` (the check's message), and the table goes on without its later runs (each would compile the same
    model to be refused the same way). With ``resume``, the runs ``output`` already holds at these settings (keep,
    compile) are not taken again, except refused ones, and its other rows are kept; without, ``output`` starts
    afresh. Returns every row."""
    from tokenprune.speed import CompiledOutputChanged

    if benchmark is None:
        from tokenprune.eval.benchmark import benchmark
    rows = read_rows(output) if resume and output.exists() else []
    # a resumed run counts the runs already timed: under other settings (another TOKENPRUNE_EXT, an older file) they
    # would stand in for this run's, unmarked
    other = _differing([r for r in rows if r.get("compiled") == compile], current_settings(compile)) if rows else ""
    if other:
        raise ValueError(f"--resume: {output} holds runs taken under other settings ({other}): time into another "
                         "--output")
    # a torn last line is gone from the rows: the file is written back without it (whole, or not at) before appending
    write_atomically(output, lambda tmp: tmp.write_text("".join(json.dumps(row) + "\n" for row in rows)))
    done = {(row["run"], *cell_key(row)) for row in rows if "refused" not in row}
    refused = set()  # cells refused in this call
    config = config_label(keep, {})
    for run in range(1, runs + 1):
        for model in models:
            for method in methods:
                # one benchmark per batch size: a refusal costs no other batch size its figures, and an interruption
                # loses at most one batch size's timing (compiled, each batch size gets its own static graphs)
                for batch in batch_sizes:
                    cell = (model, method, config, compile, batch)
                    if (run, *cell) in done or cell in refused:
                        continue
                    try:
                        [timed] = benchmark(model, method, keep=keep, batch_sizes=(batch,), repeats=repeats,
                                            compile=compile)
                        row = dict(asdict(timed), run=run)
                        said = f"{row['measured_speedup']:.2f}x"
                    except CompiledOutputChanged as e:
                        row = dict(zip(CELL, cell), run=run, refused=str(e))
                        refused.add(cell)
                        said = f"refused by the compile check: {e}"
                    with output.open("a") as f:  # on disk before the next is timed
                        f.write(json.dumps(row) + "\n")
                        f.flush()
                        os.fsync(f.fileno())
                    rows.append(row)
                    print(f"run {run}/{runs} {model} {method} batch {batch}: {said}", flush=True)
    return rows


def cells(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Each cell's runs, in run order (a run measured twice, as after a ``--resume`` of a torn line: the last)."""
    by_cell: dict[tuple, dict[int, dict]] = {}
    for row in rows:
        by_cell.setdefault(cell_key(row), {})[row["run"]] = row
    runs_of = {key: [runs[n] for n in sorted(runs)] for key, runs in by_cell.items()}
    for key, runs in runs_of.items():  # one median of runs taken under other kernels, threads or dtypes: refused
        timed = _timed(runs)
        other = _differing(timed, settings_of(timed[0])) if timed else ""
        if other:
            raise ValueError(f"{' '.join(map(str, key))}: its runs were taken under different settings ({other}): "
                             "report them from separate files")
    return runs_of


def _timed(runs: list[dict]) -> list[dict]:
    """The runs that were timed (not refused by the compile check)."""
    return [r for r in runs if "refused" not in r]


def _median(runs: list[dict], value) -> float:
    return statistics.median(value(r) for r in runs)


def _of_ceiling(row: dict) -> float:
    return row["measured_speedup"] / row["ceiling_speedup"]


def markdown(rows: list[dict]) -> str:
    """One table row per model, method and configuration (compiled ones apart): each batch size's median speedup
    (bold below 1) with its runs, the FLOPs-ideal speedup, the ceilings' range, batch 1 of the ceiling and batch
    32 of the ideal (medians of the runs), and the largest foreign load of any run."""
    by_cell = cells(rows)
    batches = sorted({key[-1] for key in by_cell})
    head = (["model", "method", "config"] + [f"batch {b}" for b in batches]
            + ["FLOPs-ideal", "ceilings", "b1 of ceiling", "b32 of ideal", "foreign max"])
    lines = ["| " + " | ".join(head) + " |", "| --- | --- | --- |" + " ---: |" * (len(head) - 3)]
    configs = list(dict.fromkeys(key[:-1] for key in by_cell))
    for model, method, config, compiled in configs:
        runs_of = {b: by_cell.get((model, method, config, compiled, b), []) for b in batches}
        timed_of = {b: _timed(runs) for b, runs in runs_of.items()}
        every = [r for runs in timed_of.values() for r in runs]
        cols = []
        for b in batches:
            runs, timed = runs_of[b], timed_of[b]
            if not runs:
                cols.append("")
                continue
            if timed:
                speedup = _median(timed, lambda r: r["measured_speedup"])
                shown = f"{speedup:.2f}x" if speedup >= 1 else f"**{speedup:.2f}x**"
            else:
                shown = "**refused**"
            cols.append(shown + " (" + " / ".join("refused" if "refused" in r else f"{r['measured_speedup']:.2f}"
                                                  for r in runs) + ")")
        if every:
            ceilings = sorted(r["ceiling_speedup"] for r in every)
            b1, b32 = timed_of.get(1), timed_of.get(32)
            foreign = [r["foreign_load"] for r in every if r["foreign_load"] is not None]
            cols += [f"{_median(every, lambda r: r['ideal_speedup']):.2f}x",
                     f"{ceilings[0]:.2f}-{ceilings[-1]:.2f}x",
                     f"{_median(b1, _of_ceiling):.3f}" if b1 else "",
                     f"{_median(b32, lambda r: r['fraction_of_ideal']):.3f}" if b32 and not compiled else "",
                     f"{max(foreign):.1%}" if foreign else "n/a"]
        else:  # every run refused by the compile check: nothing measured to summarise
            cols += [""] * 5
        label = config + " compiled" * compiled
        lines.append(f"| {model} | {method} | {label} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def bar_misses(rows: list[dict]) -> list[str]:
    """The cells that miss the speed bar, in words (empty: every cell measured meets it); a refused run is a miss."""
    misses = []
    for (model, method, config, compiled, batch), every_run in cells(rows).items():
        where = f"{model} {method} {config}{' compiled' * compiled} batch {batch}"
        refused, runs = [r for r in every_run if "refused" in r], _timed(every_run)
        if refused:  # not timed: the bar is not shown to hold
            misses.append(f"{where}: refused by the compile check ({refused[-1]['refused']})")
        if not runs:
            continue
        speedup = _median(runs, lambda r: r["measured_speedup"])
        if speedup < 1:
            misses.append(f"{where}: {speedup:.3f}x, slower than the unpatched model")
        if model != BAR_MODEL:
            continue
        of_ideal, of_ceiling = _median(runs, lambda r: r["fraction_of_ideal"]), _median(runs, _of_ceiling)
        if batch == 32 and not compiled and of_ideal < BAR_B32_OF_IDEAL:
            misses.append(f"{where}: {of_ideal:.3f} of the FLOPs-ideal speedup (the bar: {BAR_B32_OF_IDEAL})")
        if batch == 1 and of_ceiling < BAR_B1_OF_CEILING:
            misses.append(f"{where}: {of_ceiling:.3f} of the zero-cost truncation's speedup (the bar: "
                          f"{BAR_B1_OF_CEILING})")
    return misses


def report(rows: list[dict]) -> str:
    """The table, the cells that miss the speed bar, and the runs taken on a busy machine."""
    out = [markdown(rows), ""]
    misses = bar_misses(rows)
    out.append("Speed bar: " + ("every cell measured meets it" if not misses else f"{len(misses)} misses"))
    out += [f"- {m}" for m in misses]
    busy = sorted({f"{r['model']} {r['method']} run {r['run']} ({r['foreign_load']:.0%})" for r in rows
                   if r.get("foreign_load") is not None and r["foreign_load"] > BUSY})
    if busy:
        out += ["", f"Taken on a busy machine (foreign load above {BUSY:.0%}; re-run them): " + "; ".join(busy)]
    counts = {len(_timed(runs)) for runs in cells(rows).values()} - {0}  # a wholly refused cell has no runs to count
    if counts and min(counts) < 3:
        out += ["", f"Some cells have fewer than 3 runs ({min(counts)}): their medians are not the bar's"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    # usage errors raise ValueError: one line, as every other bad input
    p = ArgumentParser(prog="python -m tokenprune.eval.speed_table", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--output", help="time the table, appending its rows here (JSON lines)")
    what.add_argument("--report", nargs="+", help="only print the tables of these files")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32, 256])
    p.add_argument("--runs", type=int, default=3, help="runs of each configuration (the bar takes medians of 3)")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats per run (tokenprune bench's)")
    p.add_argument("--compile", action="store_true", help="compiled against compiled (tokenprune.compiled)")
    p.add_argument("--markdown", help="also write the report here")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="go on with the runs --output does not hold yet")
    existing.add_argument("--overwrite", action="store_true", help="start --output afresh")
    try:
        args = p.parse_args(argv)
        if args.markdown:
            check_markdown(args)
            check_writable(Path(args.markdown), "--markdown")
        if args.report:
            rows = [row for path in args.report for row in read_rows(Path(path))]
            if not rows:
                raise ValueError(f"{', '.join(args.report)}: no rows")
        else:
            rows = _time(args)
    except ValueError as e:  # bad input: one line, exit 2, not a traceback
        p.exit(2, f"{p.prog}: error: {e}\n")
    text = report(rows)
    print(text)
    if args.markdown:
        write_atomically(Path(args.markdown), lambda tmp: tmp.write_text(text + "\n"))


def check_markdown(args) -> None:
    """``--markdown`` is none of the files of rows (``--output``, ``--report``): the report written over one would
    destroy the timings it reports."""
    markdown = Path(args.markdown).resolve()
    for flag, paths in (("--output", [args.output] if args.output else []), ("--report", args.report or [])):
        for path in paths:
            if Path(path).resolve() == markdown:
                raise ValueError(f"--markdown {args.markdown} and {flag} {path} are the same file: the report would "
                                 "overwrite the rows it reports; give --markdown a file of its own (e.g. NAME.md)")


def _time(args) -> list[dict]:
    from tokenprune.cli import _check_method, check_model_name

    output = Path(args.output)
    check_writable(output, "--output")
    if output.exists() and output.stat().st_size and not (args.resume or args.overwrite):
        raise ValueError(f"--output {output} already holds rows: pass --resume to go on with them, or --overwrite")
    if args.runs < 1 or args.repeats < 1 or min(args.batch_sizes) < 1:
        raise ValueError(f"--runs, --repeats and --batch-sizes take integers >= 1; got --runs {args.runs}, --repeats "
                         f"{args.repeats}, --batch-sizes {' '.join(map(str, args.batch_sizes))}")
    for model in args.models:  # before an hour of timing, not in the middle of it
        check_model_name(model)
    for method in args.methods:
        _check_method("bench", method, args.keep, [])
    return run_table(output, models=args.models, methods=args.methods, batch_sizes=tuple(args.batch_sizes),
                     runs=args.runs, keep=args.keep, repeats=args.repeats, compile=args.compile, resume=args.resume)


if __name__ == "__main__":
    main()
