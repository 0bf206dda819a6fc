"""One comparison across the testbed family: every encoder method against random selection at matched GFLOPs.

For each testbed with trained weights, on one split: the encoder methods at ``--keep`` (default 0.5, 0.33,
0.2) and random selection swept over ``--random-keep`` with ``--seeds`` seeds, all through the eval CLI
(so every row is an ordinary, resumable ``tokenprune eval`` result). Random's mean top-1 is interpolated
linearly in GFLOPs at each method's GFLOPs, and so is its seed spread (max - min over seeds at each keep);
a method is *ahead* when it beats that mean by more than the spread, *behind* when it trails by more,
else *within* it. Writes, per testbed, ``<out>/<model>-<split>.jsonl``/``.csv`` and a plot
``<model>-<split>.png``, and one ``summary-<split>.md`` for all.

Usage::

    python -m tokenprune.eval.family [--models vit_testbed_mosaic ...] [--split test] [--out docs/results/family]

The validation split (``--split val``) needs the Fashion-MNIST train files (``$TOKENPRUNE_FMNIST_ROOT``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tokenprune import testbed
from tokenprune.cli import count
from tokenprune.registry import get_method

from . import evaluate
from .data import embedded_spec_for

METHODS = ("tome", "mctf", "zero-tprune")
KEEPS = (0.5, 0.33, 0.2)
RANDOM_KEEPS = (0.1, 0.15, 0.2, 0.33, 0.5, 0.7)
SEEDS = (0, 1, 2)


def random_curve(rows: list[dict]) -> list[tuple[float, float, float]]:
    """(GFLOPs, mean top-1, spread) of random selection per keep, by GFLOPs; seeds averaged."""
    by_keep: dict[float, list[dict]] = {}
    for r in rows:
        if r["method"] == "random":
            by_keep.setdefault(r["keep"], []).append(r)
    curve = []
    for group in by_keep.values():
        top1 = [r["top1"] for r in group]
        curve.append((sum(r["gflops"] for r in group) / len(group), sum(top1) / len(top1), max(top1) - min(top1)))
    return sorted(curve)


def interpolate(curve: list[tuple[float, float, float]], gflops: float) -> tuple[float, float] | None:
    """Random's (mean, spread) at ``gflops``, linear between the two nearest keeps; None outside the sweep."""
    for (g0, m0, s0), (g1, m1, s1) in zip(curve, curve[1:]):
        if g0 <= gflops <= g1:
            t = 0.0 if g1 == g0 else (gflops - g0) / (g1 - g0)
            return m0 + t * (m1 - m0), s0 + t * (s1 - s0)
    return None


def verdict(top1: float, random: tuple[float, float] | None) -> str:
    if random is None:
        return "outside the random sweep"
    mean, spread = random
    return "ahead" if top1 - mean > spread else "behind" if mean - top1 > spread else "within"


def summarize(model: str, rows: list[dict]) -> list[dict]:
    """One line per method and keep: top-1, GFLOPs, random's mean and spread there, the verdict."""
    base = next(r for r in rows if r["method"] is None)
    curve = random_curve(rows)
    out = []
    for r in sorted((r for r in rows if r["method"] not in (None, "random")),
                    key=lambda r: (r["method"], -r["keep"])):
        rnd = interpolate(curve, r["gflops"])
        out.append(dict(model=model, method=r["method"], keep=r["keep"], gflops=r["gflops"], top1=r["top1"],
                        delta=r["top1"] - base["top1"], random_top1=rnd[0] if rnd else None,
                        random_spread=rnd[1] if rnd else None, verdict=verdict(r["top1"], rnd)))
    return out


def markdown(model: str, base: dict, lines: list[dict]) -> str:
    head = (f"**{model}** (baseline {base['top1']:.2f}%, {base['gflops']:.3f} GFLOPs, {base['images']:,} images)\n\n"
            "| method | keep | GFLOPs | top-1 | vs baseline | random at these GFLOPs (spread over seeds) | |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |\n")
    body = "".join(
        f"| {s['method']} | {s['keep']:g} | {s['gflops']:.3f} | {s['top1']:.2f} | {s['delta']:+.2f} | "
        + (f"{s['random_top1']:.2f} ({s['random_spread']:.2f})" if s["random_top1"] is not None else "-")
        + f" | {s['verdict']} |\n" for s in lines)
    return head + body


def plot(path: Path, model: str, rows: list[dict]) -> None:
    """Top-1 against GFLOPs: random as a band (min-max over seeds) around its mean, each method a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    by_keep: dict[float, list[dict]] = {}
    for r in rows:
        if r["method"] == "random":
            by_keep.setdefault(r["keep"], []).append(r)
    pts = sorted((sum(r["gflops"] for r in g) / len(g), min(r["top1"] for r in g), max(r["top1"] for r in g),
                  sum(r["top1"] for r in g) / len(g)) for g in by_keep.values())
    if pts:
        ax.fill_between([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], color="0.8",
                        label=f"random (min-max over {max(len(g) for g in by_keep.values())} seeds)")
        ax.plot([p[0] for p in pts], [p[3] for p in pts], color="0.5", linestyle="--")
    for method in sorted({r["method"] for r in rows} - {None, "random"}):
        line = sorted((r["gflops"], r["top1"], r["keep"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in line], [p[1] for p in line], marker="o", label=method)
        for g, t, k in line:
            ax.annotate(f"{k:g}", (g, t), textcoords="offset points", xytext=(3, 3), fontsize=7)
    base = next(r for r in rows if r["method"] is None)
    ax.plot([base["gflops"]], [base["top1"]], marker="*", markersize=14, color="k", linestyle="", label="baseline")
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{model} ({base['data']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_model(model: str, args) -> list[dict]:
    spec = testbed.TESTBEDS[model]
    output = Path(args.out) / f"{model}-{args.split}.jsonl"
    common = ["--model", model, "--data", embedded_spec_for(spec.task, args.split), "--output", str(output),
              "--resume", "--batch-size", str(args.batch_size)]
    if args.weights_dir:
        common += ["--checkpoint", str(Path(args.weights_dir) / spec.weights_path.name)]
    if args.limit:
        common += ["--limit", str(args.limit)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    rows = evaluate.main(common + ["--method", *args.methods, "--keep", *map(str, args.keep)])
    for seed in args.seeds:
        rows += evaluate.main(common + ["--method", "random", "--keep", *map(str, args.random_keep),
                                        "-o", f"seed={seed}"])[1:]
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tokenprune.eval.family", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", help="testbeds (default: every testbed whose weights are packaged)")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--keep", nargs="+", type=float, default=list(KEEPS))
    p.add_argument("--random-keep", nargs="+", type=float, default=list(RANDOM_KEEPS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    # count(1), as the eval CLI's: a --limit 0 would otherwise be dropped (falsy) and run the full split
    p.add_argument("--batch-size", type=count(1), default=250)
    p.add_argument("--limit", type=count(1), help="the first N images only")
    p.add_argument("--threads", type=count(1), help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="docs/results/family")
    p.add_argument("--weights-dir", help="read <model>.safetensors from this folder instead of the packaged weights")
    args = p.parse_args(argv)
    weights = (lambda t: Path(args.weights_dir) / t.weights_path.name) if args.weights_dir else (
        lambda t: t.weights_path)
    models = args.models or [m for m, t in testbed.TESTBEDS.items() if weights(t).is_file()]
    for m in models:
        if m not in testbed.TESTBEDS:
            p.error(f"--models {m}: not a testbed; the family is {', '.join(testbed.TESTBEDS)}")
    try:  # random's keeps and seeds now: the eval CLI would check them only after the methods' sweep
        for keep in args.random_keep:
            for seed in args.seeds:
                get_method("random")(keep=keep, seed=seed)
    except (ValueError, TypeError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sections = []
    for model in models:
        try:
            rows = run_model(model, args)
        except (ValueError, TypeError) as e:  # the eval CLI's bad input (a method, keep, seed): one line, exit 2
            p.exit(2, f"{p.prog}: error: {e}\n")
        # each eval call above rewrote the CSV with its own rows (the last: the baseline and one random seed):
        # the CSV beside the .jsonl holds the whole comparison
        evaluate.write_csv((Path(args.out) / f"{model}-{args.split}.jsonl").with_suffix(".csv"),
                           evaluate.with_deltas(rows))
        base = next(r for r in rows if r["method"] is None)
        sections.append(markdown(model, base, summarize(model, rows)))
        plot(Path(args.out) / f"{model}-{args.split}.png", model, rows)
    summary = Path(args.out) / f"summary-{args.split}.md"
    summary.write_text("\n".join(sections))
    print(summary.read_text())


if __name__ == "__main__":
    main()
