"""Markdown tables (and a combined plot) from ``tokenprune eval`` result files.

    python -m tokenprune.eval.report docs/results/testbed.jsonl [more.jsonl ...] [--plot out.png]

Rows keep the order they were evaluated in; a baseline that appears in several files is shown once.
Rows of different runs (another model, data, --limit, --dtype, --compile, --batch-size, device, threads, ...)
get a table each, every row compared with its own run's baseline (a run without one in these files: no delta).
Rows written before the batch size, device and threads were keyed show them as "unrecorded".
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenprune.cli import ArgumentParser, check_writable

from .evaluate import plot, plot_formats, with_deltas

#: what the report reads of a row (every row tokenprune eval writes has them, from its first version on)
FIELDS = ("key", "method", "keep", "options", "top1", "top5", "gflops", "images", "images_per_s")


def run_of(row: dict) -> dict:
    """The settings a row was evaluated under (model, checkpoint, data, split, limit, dtype, compile, ...): its
    ``key`` without the configuration (method, keep, options). Rows of one run share a baseline."""
    run = json.loads(row["key"])
    for name in ("method", "keep", "options"):
        run.pop(name, None)
    return run


def read_rows(paths: list[str]) -> list[dict]:
    """The rows of ``paths``, each once, grouped by run (in the order the runs first appear), each row's deltas
    against the baseline of its own run: another model's or dtype's rows are neither dropped as duplicates
    of this one's nor compared with its baseline."""
    runs: dict[str, list[dict]] = {}
    seen = set()
    for path in paths:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} cannot be read ({getattr(e, 'strerror', None) or e})") from e
        found = torn = 0
        for number, line in enumerate(text.splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                torn += line.startswith('{"')  # a line torn by an interruption (rows are written as {"key": ...)
                continue
            if not isinstance(row, dict):
                continue
            missing = [name for name in FIELDS if name not in row]
            if missing:  # e.g. a tokenprune eval-vlm row (accuracy, no top-1)
                raise ValueError(f"{path}, line {number}: not a tokenprune eval result (no {', '.join(missing)})"
                                 + ("; tokenprune eval-vlm writes its own table (its CSV)" if "accuracy" in row
                                    else ""))
            found += 1
            run = json.dumps(run_of(row), sort_keys=True, default=str)
            ident = (run, row["method"], row["keep"], json.dumps(row["options"], sort_keys=True), row["images"])
            if ident not in seen:
                seen.add(ident)
                runs.setdefault(run, []).append(row)
        if not found and not torn and text.strip():  # a --json of tokenprune bench, a CSV, ...: not silently empty
            raise ValueError(f"{path} holds no tokenprune eval results (JSON lines, one row per configuration)")
    return [row for rows in runs.values() for row in with_deltas(rows)]


#: what a run whose key lacks these names was evaluated with
UNNAMED = {"dtype": "fp32", "compile": False}


def split_runs(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """``rows`` (from ``read_rows``) by run, each with a heading that names the model and the settings in which
    the runs differ (an empty heading when there is one run)."""
    runs: dict[str, list[dict]] = {}
    for row in rows:
        runs.setdefault(json.dumps(run_of(row), sort_keys=True, default=str), []).append(row)
    if len(runs) < 2:
        return [("", rows)]
    settings = [json.loads(run) for run in runs]
    differ = sorted({name for s in settings for name in s if len({json.dumps(t.get(name)) for t in settings}) > 1}
                    - {"model"})
    out = []
    for s, group in zip(settings, runs.values()):
        # a key without dtype / compile is an fp32, eager run (those names were added to keys only when set); other
        # names are missing from keys written before they were keyed
        shown = ", ".join(f"{name}={s.get(name, UNNAMED.get(name, 'unrecorded'))}" for name in differ)
        out.append((f"**{s.get('model')}** on {group[0]['data']}" + (f" ({shown})" if shown else ""), group))
    return out


def markdown(rows: list[dict]) -> str:
    """A table per run (``split_runs``), under a heading when there are several."""
    return "\n\n".join((heading + "\n\n" if heading else "") + table(group) for heading, group in split_runs(rows))


def table(rows: list[dict]) -> str:
    lines = ["| method | keep | options | top-1 | delta | top-5 | GFLOPs | images |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        keep = "" if r["keep"] is None else f"{r['keep']:g}"
        # none for a baseline, nor for a row whose run has no baseline in these files
        delta = "" if r["method"] is None or r["delta_top1"] is None else f"{r['delta_top1']:+.2f}"
        lines.append(f"| {r['method'] or 'baseline'} | {keep} | {options} | {r['top1']:.2f} | {delta} | "
                     f"{r['top5']:.2f} | {r['gflops']:.3f} | {r['images']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    # usage errors raise ValueError: one line, as every other bad input
    p = ArgumentParser(prog="python -m tokenprune.eval.report", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="JSON-lines files written by tokenprune eval")
    p.add_argument("--plot", help="also draw top-1 against GFLOPs for all rows")
    p.add_argument("--title", default="")
    try:
        args = p.parse_args(argv)
        if args.plot:  # as the eval CLI checks its --plot: a format matplotlib writes, a writable path
            png = Path(args.plot)
            if png.suffix[1:].lower() not in plot_formats():
                what = png.suffix or "a name without an extension"
                raise ValueError(f"--plot {png}: matplotlib cannot write {what}; give a name ending in one of "
                                 f".{', .'.join(plot_formats())}")
            check_writable(png, "--plot")
        rows = read_rows(args.results)
        if args.plot and len(split_runs(rows)) > 1:  # one plot would draw every run's points as one method's line
            raise ValueError(f"--plot draws the rows of one run; these files hold {len(split_runs(rows))} (other "
                             "models, data or settings): plot them separately")
    except ValueError as e:  # bad input: one line, exit 2, not a traceback
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(markdown(rows))
    if args.plot:
        plot(Path(args.plot), rows, args.title)


if __name__ == "__main__":
    main()
