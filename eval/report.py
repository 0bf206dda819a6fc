"""Markdown tables (and a combined plot) from ``tokenprune eval`` result files.

    python -m tokenprune.eval.report docs/results/testbed.jsonl [more.jsonl ...] [--plot out.png]

Rows keep the order they were evaluated in; a baseline that appears in several files is shown once.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .evaluate import plot, with_deltas


def read_rows(paths: list[str]) -> list[dict]:
    rows, seen = [], set()
    for path in paths:
        for line in Path(path).read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line torn by an interruption
                continue
            ident = (row["method"], row["keep"], json.dumps(row["options"], sort_keys=True), row["images"])
            if ident not in seen:
                seen.add(ident)
                rows.append(row)
    return with_deltas(rows)


def markdown(rows: list[dict]) -> str:
    lines = ["| method | keep | options | top-1 | delta | top-5 | GFLOPs | images |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        keep = "" if r["keep"] is None else f"{r['keep']:g}"
        delta = "" if r["method"] is None else f"{r['delta_top1']:+.2f}"
        lines.append(f"| {r['method'] or 'baseline'} | {keep} | {options} | {r['top1']:.2f} | {delta} | "
                     f"{r['top5']:.2f} | {r['gflops']:.3f} | {r['images']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="JSON-lines files written by tokenprune eval")
    p.add_argument("--plot", help="also draw top-1 against GFLOPs for all rows")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    rows = read_rows(args.results)
    print(markdown(rows))
    if args.plot:
        plot(Path(args.plot), rows, args.title)


if __name__ == "__main__":
    main()
