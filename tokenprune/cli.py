"""The ``tokenprune`` command line: ``methods``, ``flops``, ``bench``."""
from __future__ import annotations

import argparse
import ast
import sys


def _option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as a Python literal when it is one (``r=13``, ``r=(13,-1)``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="deit_small_patch16_224",
                   help="timm model name, or hf:<model_type> for a transformers model from its default config "
                   "(hf:vit = ViT-B/16); random init")
    p.add_argument("--method", default="tome", help="a registered method (see `tokenprune methods`)")
    p.add_argument("--keep", type=float, default=0.33, help="fraction of patch tokens that leave the encoder")
    p.add_argument("--option", "-o", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a native method option, VALUE a Python literal: -o r=13 (overrides --keep), "
                   "-o prop_attn=False; repeatable. `tokenprune methods` lists what each option accepts")


def _check_method(args) -> None:
    """The method, keep and options against the method's declarations, before any model is built."""
    from tokenprune.registry import get_method

    get_method(args.method)(keep=args.keep, **dict(args.option))


def _cmd_methods(args) -> int:
    import tokenprune

    print(tokenprune.methods())
    return 0


def _cmd_flops(args) -> int:
    import tokenprune
    from tokenprune.flops import random_model

    _check_method(args)
    model = random_model(args.model)
    size = tuple(args.input_size) if args.input_size else None
    base = tokenprune.count_flops(model, size)
    tokenprune.apply(model, args.method, keep=args.keep, **dict(args.option))
    reduced = tokenprune.count_flops(model, size)
    report = tokenprune.last_forward(model)
    print(f"model {args.model}, input {size or 'default'}; FLOPs = 2 x MACs, per image")
    print(f"  unpatched           {base.gmacs_per_sample:8.3f} GMACs  {base.gflops_per_sample:8.3f} GFLOPs")
    print(f"  {args.method:<8} {tokenprune.reducer_of(model)!r}")
    print(f"                      {reduced.gmacs_per_sample:8.3f} GMACs  {reduced.gflops_per_sample:8.3f} GFLOPs"
          f"  ({base.flops / reduced.flops:.2f}x fewer)")
    print(f"  tokens entering each block: {report.token_counts} -> {report.output_tokens}")
    return 0


def _cmd_bench(args) -> int:
    from tokenprune.eval.benchmark import benchmark, format_rows, rows_to_json

    _check_method(args)
    rows = benchmark(args.model, args.method, keep=args.keep, options=dict(args.option),
                     batch_sizes=args.batch_sizes, repeats=args.repeats, threads=args.threads)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            f.write(rows_to_json(rows))
    return 0


def _cmd_bench_vlm(args) -> int:
    from tokenprune.eval.vlm_bench import format_tables, paper_comparison, vlm_benchmark

    rows = vlm_benchmark(args.method, keeps=tuple(args.keep), repeats=args.repeats, threads=args.threads)
    print(format_tables(rows, paper_comparison()))
    return 0


DEMO_ARGS = ["--keep", "0.5", "--limit", "2000", "--output", "runs/demo/testbed.jsonl", "--overwrite", "--plot"]


def _cmd_demo(args) -> int:
    """The README's first command: every encoder method at keep 0.5 on the embedded testbed."""
    from tokenprune.eval.evaluate import main as eval_main

    print("tokenprune eval " + " ".join(DEMO_ARGS))
    eval_main(DEMO_ARGS)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the registered methods and their options")
    p.set_defaults(func=_cmd_methods)

    sub.add_parser("eval", help="top-1/top-5 over a grid of methods and keeps (see `tokenprune eval --help`)",
                   add_help=False)

    p = sub.add_parser("demo", help="the README's first command")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("flops", help="count a model's forward FLOPs, unpatched and patched")
    _add_method_args(p)
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    p.set_defaults(func=_cmd_flops)

    p = sub.add_parser("bench", help="throughput, patched vs unpatched, beside the FLOPs-ideal speedup")
    _add_method_args(p)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1])
    p.add_argument("--repeats", type=int, default=11, help="timed repeats at batch 32 (more at smaller batches)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the rows as JSON here")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("bench-vlm", help="VLM prefill FLOPs and time with and without visual-token reduction "
                       "(small random LLaVA), and the FLOPs formula on LLaVA-1.5-7B's shapes")
    p.add_argument("--method", default="hiprune")
    p.add_argument("--keep", type=float, nargs="+", default=[1 / 3, 2 / 9, 1 / 9])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=_cmd_bench_vlm)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # its own parser: `tokenprune eval --help`
        from tokenprune.eval.evaluate import main as eval_main

        try:
            eval_main(argv[1:])
            return 0
        except (ValueError, TypeError) as e:
            print(f"tokenprune eval: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:  # bad input: one clear line, not a traceback
        print(f"tokenprune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
