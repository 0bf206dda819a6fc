"""Zero-TPrune defaults, searched on the validation splits of the whole testbed family (never on test).

For each testbed: random selection at several keeps over 3 seeds (the yardstick at matched GFLOPs), then
Zero-TPrune configurations at keep 0.5 and 0.33, all through the eval CLI on the validation split (the last
5,000 Fashion-MNIST training images, or the mosaics composed from them). Results append to
``<out>/<model>-val.jsonl`` (resumable); ``summary.md`` ranks each configuration by its mean margin over
random at matched GFLOPs across the family.

    TOKENPRUNE_FMNIST_ROOT=FASHION_MNIST_FOLDER python docs/results/zero_tprune_family/search.py \
        [--models ...] [--weights-dir DIR] [--out docs/results/zero_tprune_family]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenprune.eval import evaluate, family
from tokenprune.eval.data import embedded_spec_for

from tokenprune import testbed

KEEPS = (0.5, 0.33)
RANDOM_KEEPS = (0.1, 0.15, 0.2, 0.25, 0.33, 0.4, 0.5, 0.6, 0.7)

# Pruning-layer rules as functions of the depth d (None: the current default, d/4-1, d/2-1, 3d/4-1).
LAYER_RULES = {
    "early (d/4-1, d/2-1, 3d/4-1)": None,
    "paper spacing (d/4, d/2, 3d/4)": lambda d: [d // 4, d // 2, 3 * d // 4],
    "late (d/2-1, 3d/4-1, d-2)": lambda d: [d // 2 - 1, 3 * d // 4 - 1, d - 2],
}
CONFIGS = {  # name -> options (layers filled in per depth)
    f"{rule}, s_fraction {sf}": dict(layers=rule, s_fraction=sf)
    for rule in LAYER_RULES for sf in (1.0, 0.5, 0.0)
}
CONFIGS["early, s_fraction 1.0, uniform start"] = dict(layers="early (d/4-1, d/2-1, 3d/4-1)", s_fraction=1.0,
                                                         uniform_start=True)
CONFIGS["early, s_fraction 0.0, uniform start"] = dict(layers="early (d/4-1, d/2-1, 3d/4-1)", s_fraction=0.0,
                                                         uniform_start=True)
for flag in ("vhf", "eir"):  # the head aggregation matters only where the I-stage runs
    CONFIGS[f"early, s_fraction 0.0, {flag} off"] = dict(layers="early (d/4-1, d/2-1, 3d/4-1)", s_fraction=0.0,
                                                          **{flag: False})


def options_for(config: dict, depth: int) -> list[str]:
    """The ``-o KEY=VALUE`` arguments of a configuration on a model of ``depth`` blocks."""
    return [arg for key, value in resolved(config, depth).items() for arg in ("-o", f"{key}={value!r}")]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=list(testbed.TESTBEDS))
    p.add_argument("--weights-dir")
    p.add_argument("--configs", nargs="+", help="names from CONFIGS (default: all)")
    p.add_argument("--out", default=str(Path(__file__).parent))
    p.add_argument("--summary-only", action="store_true", help="rebuild summary.md from the results so far")
    args = p.parse_args(argv)
    if args.summary_only:
        return write_summary(Path(args.out))

    for model in args.models:
        spec = testbed.TESTBEDS[model]
        depth = spec.args["depth"]
        common = ["--model", model, "--data", embedded_spec_for(spec.task, "val"),
                  "--output", str(Path(args.out) / f"{model}-val.jsonl"), "--resume", "--batch-size", "250",
                  "--threads", "1"]
        if args.weights_dir:
            common += ["--checkpoint", str(Path(args.weights_dir) / spec.weights_path.name)]
        for seed in (0, 1, 2):
            evaluate.main(common + ["--method", "random", "--keep", *map(str, RANDOM_KEEPS), "-o", f"seed={seed}"])
        for name in args.configs or CONFIGS:
            evaluate.main(common + ["--method", "zero-tprune", "--keep", *map(str, KEEPS),
                                    *options_for(CONFIGS[name], depth)])
    write_summary(Path(args.out))


def resolved(config: dict, depth: int) -> dict:
    """The options a configuration passes on a model of ``depth`` blocks, as the results record them."""
    out = {}
    for key, value in config.items():
        if key == "layers":
            if LAYER_RULES[value] is not None:
                out["layers"] = LAYER_RULES[value](depth)
        else:
            out[key] = value
    return out


def write_summary(folder: Path) -> None:
    """Rank every configuration by its mean margin over random at matched GFLOPs, over every model searched."""
    summary: dict[str, dict] = {}
    for model, spec in testbed.TESTBEDS.items():
        path = folder / f"{model}-val.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        base = next(r for r in rows if r["method"] is None)
        curve = family.random_curve(rows)
        for name, config in CONFIGS.items():
            options = resolved(config, spec.args["depth"])
            for r in rows:
                if r["method"] == "zero-tprune" and r["options"] == options:
                    rnd = family.interpolate(curve, r["gflops"])
                    summary.setdefault(name, {})[f"{model} keep {r['keep']}"] = dict(
                        top1=r["top1"], delta=r["top1"] - base["top1"], gflops=r["gflops"],
                        margin=None if rnd is None else r["top1"] - rnd[0], spread=None if rnd is None else rnd[1])
    columns = sorted({c for cells in summary.values() for c in cells})
    lines = ["| configuration | " + " | ".join(columns) + " | mean margin | worst margin |",
             "| --- |" + " ---: |" * (len(columns) + 2)]

    def margins(cells):
        return [v["margin"] for v in cells.values() if v["margin"] is not None] or [float("nan")]

    def mean_margin(cells):
        return sum(margins(cells)) / len(margins(cells))

    for name, cells in sorted(summary.items(), key=lambda kv: -mean_margin(kv[1])):
        text = []
        for c in columns:
            v = cells.get(c)
            text.append("-" if v is None else f"{v['top1']:.2f} (outside the sweep)" if v["margin"] is None
                        else f"{v['top1']:.2f} ({v['margin']:+.2f}, +-{v['spread']:.2f})")
        lines.append(f"| {name} | " + " | ".join(text) + f" | {mean_margin(cells):+.2f} | {min(margins(cells)):+.2f} |")
    text = "\n".join(lines) + "\n"
    (folder / "summary.md").write_text(text)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
