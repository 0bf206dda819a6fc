"""The ``tokenprune`` command line: ``methods``, ``flops``, ``bench``, ``bench-vlm``, ``show``, ``demo``, ``eval``,
``eval-vlm``, ``build-ext``."""
from __future__ import annotations

import argparse
import ast
import copy
import difflib
import os
import sys
import tempfile
from pathlib import Path


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are a ``ValueError``: ``main`` prints them as one line (exit 2), like every
    other bad input, instead of the usage text."""

    def error(self, message):
        raise ValueError(message)


def count(minimum: int):
    """An argparse type: an int >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _close(name: str, names) -> str:
    matches = difflib.get_close_matches(name, list(names), n=5, cutoff=0.6)
    return f"; close matches: {', '.join(matches)}" if matches else ""


def check_model_name(name: str, transformers_ok: str = "hf:<model_type>") -> None:
    """A known timm architecture with an optional ``.pretrained_tag`` it has, a ``local-dir:`` folder that
    exists (``hf-hub:`` names pass: only loading tells whether the Hub or its cache has them) or, for
    ``hf:<type>``, a transformers model type; else a one-line error with close matches."""
    if name.startswith("hf:"):
        from transformers import CONFIG_MAPPING

        types = list(CONFIG_MAPPING.keys())
        if name[3:] not in types:
            raise ValueError(f"unknown transformers model type {name[3:]!r} in {name!r} (hf:<model_type>, e.g. "
                             f"hf:vit){_close(name[3:], types)}")
        return
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):]).expanduser()
        if not (folder / "config.json").is_file():
            raise ValueError(f"--model {name}: {folder} is not a folder with a config.json (local-dir:<folder "
                             f"holding a timm model's config.json and weights>)")
        return
    if name.startswith(("hf-hub:", "hf_hub:")):  # timm loads these from the Hub or its cache
        return
    import timm

    import tokenprune.testbed  # noqa: F401  (registers the testbed with timm)

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise ValueError(f"unknown model {name!r}: not a timm model (timm.list_models()) or {transformers_ok}"
                         f"{_close(name, timm.list_models())}")
    tags = [known.partition(".")[2] for known in timm.list_pretrained(f"{arch}.*")]
    if tag and tag not in tags:
        raise ValueError(f"unknown pretrained tag {tag!r} in {name!r}: {arch} has "
                         f"{', '.join(tags) if tags else 'none'} (or leave the tag out){_close(tag, tags)}")


def check_writable(path: Path, what: str) -> None:
    """Fail now, not after an hour of evaluation, if ``path`` cannot be written: its folder must exist
    and be writable, or be creatable (it is created)."""
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError("the file is read-only")
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be written ({e.strerror or e}); give a path in a writable "
                         f"folder") from e


#: ``--dtype`` names and the torch dtypes they stand for
DTYPES = ("fp32", "fp16", "bf16")


def torch_dtype(name: str):
    """The torch dtype of a ``--dtype`` name."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def check_device(text: str):
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N``, as a ``torch.device`` this machine has; else a one-line
    ValueError (the CLI's exit 2)."""
    import torch

    if text == "cpu":
        return torch.device("cpu")
    kind, _, index = text.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"--device {text!r}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available here (torch.cuda.is_available() is False); "
                         "use --device cpu")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise ValueError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device(text)


def parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as a Python literal when it is one (``r=13``, ``r=(13,-1)``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    if key == "keep":  # every method takes keep, from its own flag: two values would be ambiguous
        raise argparse.ArgumentTypeError(f"{text!r}: keep is not a method option but its own flag: --keep {value}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="deit_small_patch16_224",
                   help="timm model name, or hf:<model_type> for a transformers model from its default config "
                   "(hf:vit = ViT-B/16; hf:clip, hf:siglip, hf:llava: their vision tower); random init")
    p.add_argument("--method", default="tome", help="a registered method (see `tokenprune methods`)")
    p.add_argument("--keep", type=float, default=0.33, help="fraction of patch tokens that leave the encoder")
    add_option_argument(p)


def add_option_argument(p: argparse.ArgumentParser) -> None:
    """``--option/-o KEY=VALUE`` (repeatable), read by ``parse_option``; shared with the eval CLI."""
    p.add_argument("--option", "-o", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a native method option, VALUE a Python literal: -o r=13 (overrides --keep), "
                   "-o prop_attn=False; repeatable; in a sweep, each method gets the options it declares. "
                   "`tokenprune methods` lists what each option accepts")


def options_by_method(methods: list[str], options: list[tuple[str, object]]) -> dict[str, dict]:
    """Each method of a sweep gets the ``-o`` options it declares (``-o r=13`` goes to tome and mctf, not to
    zero-tprune); an option no method of the sweep declares is an error. Values are checked by the callers."""
    from tokenprune.registry import get_method

    given = dict(options)
    own = {m: {k: v for k, v in given.items() if k in get_method(m).native_options} for m in methods}
    unused = set(given) - {k for chosen in own.values() for k in chosen}
    if unused:
        raise ValueError(f"-o {sorted(unused)[0]}: no method of the sweep ({', '.join(methods)}) takes it; "
                         "`tokenprune methods` lists each method's options")
    return own


def add_device_arguments(p: argparse.ArgumentParser, auto: bool = False) -> None:
    """``--device`` and ``--dtype``; shared with the eval CLI (whose default device is ``auto``)."""
    p.add_argument("--device", default="auto" if auto else "cpu",
                   help="cpu, cuda or cuda:N" + (" (default auto: cuda when available, else cpu)" if auto else "")
                   + "; CUDA times with CUDA events")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="the model's and the input's dtype (half precision: merges still accumulate in float32)")


def _check_method(command: str, method: str, keep: float, options: list[tuple[str, object]]) -> None:
    """The method, keep and options against the method's declarations, before any model is built; and that it
    is a vision-encoder method: ``flops``, ``bench`` and ``show`` run image encoders, not VLMs."""
    from tokenprune.registry import EncoderReducer, get_method, method_names

    reducer = get_method(method)(keep=keep, **dict(options))
    if not isinstance(reducer, EncoderReducer):
        encoder = [m for m in method_names() if issubclass(get_method(m), EncoderReducer)]
        raise ValueError(f"--method {method} is {reducer.kind}: `tokenprune {command}` runs image encoders, which "
                         f"take {', '.join(encoder)} (VLMs: `tokenprune bench-vlm`, `tokenprune eval-vlm`)")


def _cmd_methods(args) -> int:
    import tokenprune

    print(tokenprune.methods())
    return 0


def _cmd_flops(args) -> int:
    import tokenprune
    from tokenprune.flops import default_input_size, random_model

    check_model_name(args.model)
    _check_method(args.command, args.method, args.keep, args.option)
    model = random_model(args.model)
    # apply's checks (a supported model, a method it runs, a schedule its depth allows) before any count
    patched = tokenprune.apply(copy.deepcopy(model), args.method, keep=args.keep, **dict(args.option))
    size = tuple(args.input_size) if args.input_size else None
    try:
        base = tokenprune.count_flops(model, size)
    except (ValueError, RuntimeError) as e:  # the model's own shape check (count_flops words timm's assert)
        if size is None:
            raise
        cause = e.__cause__ or e  # the model's own words, not count_flops' wrapping of them
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        native = " ".join(map(str, default_input_size(model)))
        raise ValueError(f"--input-size {' '.join(map(str, size))} does not fit {args.model} ({reason}); its "
                         f"native input is C H W = {native}") from e
    reduced = tokenprune.count_flops(patched, size)
    report = tokenprune.last_forward(patched)
    print(f"model {args.model} ({type(model).__name__}), input {size or 'default'}; FLOPs = 2 x MACs, per image")
    print(f"  unpatched           {base.gmacs_per_sample:8.3f} GMACs  {base.gflops_per_sample:8.3f} GFLOPs")
    print(f"  {args.method:<8} {tokenprune.reducer_of(patched)!r}")
    print(f"                      {reduced.gmacs_per_sample:8.3f} GMACs  {reduced.gflops_per_sample:8.3f} GFLOPs"
          f"  ({base.flops / reduced.flops:.2f}x fewer)")
    print(f"  tokens entering each block: {report.token_counts} -> {report.output_tokens}")
    return 0


def _cmd_bench(args) -> int:
    from tokenprune.eval.benchmark import benchmark, format_rows, rows_to_json
    from tokenprune.eval.evaluate import write_atomically

    check_model_name(args.model)
    if args.json:
        check_writable(Path(args.json), "--json")
    _check_method(args.command, args.method, args.keep, args.option)
    device = check_device(args.device)
    rows = benchmark(args.model, args.method, keep=args.keep, options=dict(args.option),
                     batch_sizes=args.batch_sizes, repeats=args.repeats, threads=args.threads, compile=args.compile,
                     device=device, dtype=torch_dtype(args.dtype))
    print(format_rows(rows))
    if args.json:  # an interrupted write leaves the old file or the new one, never half a JSON document
        write_atomically(Path(args.json), lambda tmp: tmp.write_text(rows_to_json(rows)))
    return 0


def _cmd_show(args) -> int:
    from tokenprune.visualize import read_image, render

    if args.model.startswith("hf:"):
        raise ValueError(f"--model {args.model}: show draws timm ViTs only (a timm name, hf-hub: or local-dir:)")
    check_model_name(args.model, transformers_ok="hf-hub:<repo> / local-dir:<folder>")
    for method in args.method:
        _check_method(args.command, method, args.keep, args.option)
    image = None
    if args.image is not None:
        if not Path(args.image).is_file():
            raise ValueError(f"--image {args.image} is not a file")
        image = read_image(args.image)
    check_writable(Path(args.out) / "token_counts.png", "--out")
    for path in render(args.model, image, args.method, args.keep, dict(args.option), args.out):
        print(path)
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


def _cmd_build_ext(args) -> int:
    """Compile the extension ahead of time (otherwise the CUDA build compiles on first use)."""
    import shutil
    import time

    from tokenprune import extension

    builds = [cuda for cuda, asked in ((False, args.cpu), (True, args.cuda)) if asked]
    if not builds:
        builds = [False] + ([True] if shutil.which("nvcc") else [])
    for cuda in builds:
        name = "CUDA" if cuda else "CPU"
        start = time.perf_counter()
        try:
            module = extension.load(cuda=cuda, verbose=args.verbose)
        except Exception as error:  # a compiler's failure, not bad input: say it in one line, exit 1
            print(f"tokenprune: the {name} build failed: {str(error).splitlines()[0]}", file=sys.stderr)
            return 1
        print(f"{name} build ready in {time.perf_counter() - start:.0f} s: {module.__file__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="tokenprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the registered methods and their options")
    p.set_defaults(func=_cmd_methods)

    sub.add_parser("eval", help="top-1/top-5 over a grid of methods and keeps (see `tokenprune eval --help`)",
                   add_help=False)

    sub.add_parser("eval-vlm", help="answer accuracy of a VLM over a grid of methods and visual-token budgets "
                   "(see `tokenprune eval-vlm --help`)", add_help=False)

    p = sub.add_parser("demo", help="the README's first command")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("flops", help="count a model's forward FLOPs, unpatched and patched")
    _add_method_args(p)
    p.add_argument("--input-size", type=count(1), nargs=3, metavar=("C", "H", "W"))
    p.set_defaults(func=_cmd_flops)

    p = sub.add_parser("bench", help="throughput, patched vs unpatched, beside the FLOPs-ideal speedup")
    _add_method_args(p)
    p.add_argument("--batch-sizes", type=count(1), nargs="+", default=[32, 1])
    p.add_argument("--repeats", type=count(1), default=11, help="timed repeats at batch 32 (more at smaller batches)")
    p.add_argument("--threads", type=count(1), default=2)
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--compile", action="store_true",
                   help="run all the models through torch.compile (tokenprune.compiled: on CPU with inductor's C++ "
                   "wrapper; compiled against compiled; compile time is printed, not timed)")
    add_device_arguments(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("show", help="draw which patches each output token stands for (PNG per method) and the "
                       "token counts per block")
    p.add_argument("--model", default="vit_testbed_fmnist",
                   help="timm model name (the testbed loads its trained weights; others are random init)")
    p.add_argument("--image", help="an image file (default: the first Fashion-MNIST test image, testbed only)")
    p.add_argument("--method", nargs="+", default=["tome", "mctf", "zero-tprune", "random"])
    p.add_argument("--keep", type=float, default=0.33)
    add_option_argument(p)
    p.add_argument("--out", default="runs/show", help="folder for the PNGs")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("bench-vlm", help="VLM prefill FLOPs and time with and without visual-token reduction "
                       "(small random LLaVA), and the FLOPs formula on LLaVA-1.5-7B's shapes")
    p.add_argument("--method", default="hiprune")
    p.add_argument("--keep", type=float, nargs="+", default=[1 / 3, 2 / 9, 1 / 9])
    p.add_argument("--repeats", type=count(1), default=15)
    p.add_argument("--threads", type=count(1), default=2)
    p.set_defaults(func=_cmd_bench_vlm)

    p = sub.add_parser("build-ext", help="compile the C++/CUDA extension ahead of time (default: the CPU build, "
                       "and the CUDA build where nvcc is on PATH; no GPU needed)")
    p.add_argument("--cpu", action="store_true", help="the CPU build (what the tests compare with PyTorch)")
    p.add_argument("--cuda", action="store_true", help="the CUDA build (TORCH_CUDA_ARCH_LIST picks architectures)")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    p.set_defaults(func=_cmd_build_ext)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .speed import CompiledOutputChanged, RecompileLimitReached

    argv = sys.argv[1:] if argv is None else argv
    own_parser = argv[:1] in (["eval"], ["eval-vlm"])  # `tokenprune eval --help`: the module's own parser
    prog = f"tokenprune {argv[0]}" if own_parser else "tokenprune"
    try:
        if own_parser:
            import importlib

            module = importlib.import_module("tokenprune.eval." + {"eval": "evaluate", "eval-vlm": "vlm"}[argv[0]])
            module.main(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (ValueError, TypeError) as e:  # bad input: one clear line, not a traceback
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (CompiledOutputChanged, RecompileLimitReached) as e:  # --compile refused to report what it measured
        print(f"{prog}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
