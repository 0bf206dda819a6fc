"""Hand-written mutants: every documented option and promised behaviour, switched off on purpose.

Each entry forces one option to its default (or one promise off) by a literal text replacement in
the library, runs the tests, and restores the file. A behaviour is *covered* when some test fails.
As mutation/run.py, it works in a scratch copy of the working tree, never in the checkout.
``make mutation`` runs it after the tool-generated mutants:

    .venv/bin/python mutation/documented_options.py              # all; the fast tests, then the adapters'
    .venv/bin/python mutation/documented_options.py --fast-only  # the method and ops tests only
    .venv/bin/python mutation/documented_options.py mctf.size    # only the named ones

The replacements name the code as it is; when someone rewrites a line, its entry reports "stale"
(the text is gone) instead of silently testing nothing: update the entry then.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from run import BIN, scratch_copy

M = "tokenprune/methods/"
TOME, RANDOM, SCHED, ZT, MCTF = (M + f for f in ("tome.py", "random_drop.py", "_scheduled.py", "zero_tprune.py",
                                                 "mctf.py"))
OPS, STATE = "tokenprune/ops.py", "tokenprune/state.py"
TIMM, HF, VLM = "patches/timm_vit.py", "patches/hf_vision.py", "patches/vlm.py"
BLOCK, HIPRUNE = "tokenprune/block.py", M + "hiprune.py"

# name -> [(file, old text, new text)]; every occurrence of ``old`` in ``file`` is replaced
BREAKS: dict[str, list[tuple[str, str, str]]] = {
    "tome.prop_attn": [(TOME, 'return self.options["prop_attn"]', "return True")],
    "tome.r (ignored)": [(SCHED, 'r = self.options["r"]\n        if r is None:\n            return keep_schedule',
                          'r = None\n        if r is None:\n            return keep_schedule')],
    "tome.r (r, inflection)": [(OPS, "r, inflection = r\n", "r, inflection = r[0], 0.0\n")],
    "tome.r per-block list": [(OPS, "return tuple(r) + (0,) * (depth - len(r))", "return (r[0],) * depth")],
    "tome.r 50% cap": [(SCHED, "allowed = min(left // 2, max(0, left - floor))", "allowed = max(0, left - floor)")],
    "trace_source (timm)": [(TIMM, "if reducer.trace_source:", "if False:")],
    "trace_source (transformers)": [(HF, "if state.reducer.trace_source", "if False")],
    "random.seed": [(RANDOM, 'self.options["seed"], state)', "0, state)")],
    "random seed + block index": [(RANDOM, "manual_seed(seed + state.layer)", "manual_seed(seed)")],
    "random survivors in spatial order": [(OPS, "[:, :keep].sort(dim=-1).values", "[:, :keep]")],
    "zero-tprune.layers": [(ZT, 'layers = self.options["layers"] or [', "layers = None or [")],
    "zero-tprune.keep_rates": [(ZT, 'rates = self.options["keep_rates"]', "rates = None")],
    "zero-tprune.iterations": [(ZT, 'its = self.options["iterations"]', "its = None")],
    "zero-tprune.tol": [(ZT, 'if self.options["tol"] is not None:', "if False:"), (ZT, 'tol=o["tol"]', "tol=None")],
    "zero-tprune.uniform_start": [(ZT, 'cls = None if o["uniform_start"] or p == 0 else 0',
                                   "cls = None if p == 0 else 0")],
    "zero-tprune class-token start": [(ZT, 'cls = None if o["uniform_start"] or p == 0 else 0', "cls = None")],
    "zero-tprune.eir": [(ZT, 'rms=o["eir"]', "rms=True")],
    "zero-tprune.vhf": [(ZT, 'tuple(o["vhf_range"]) if o["vhf"] else None', 'tuple(o["vhf_range"])')],
    "zero-tprune.vhf_range": [(ZT, 'tuple(o["vhf_range"]) if o["vhf"]', '(0.01, 0.7) if o["vhf"]')],
    "zero-tprune.s_stage": [(ZT, 'if o["s_stage"] else 0', "if True else 0")],
    "zero-tprune.s_fraction": [(ZT, 'round(remove * o["s_fraction"])', "round(remove * 1.0)")],
    "zero-tprune.renormalize": [(ZT, 'renormalize=o["renormalize"]', "renormalize=True")],
    "zero-tprune.importance": [(ZT, 'if o["importance"] == "random":', "if False:")],
    "mctf.r (ignored)": [(MCTF, 'r = 0.35 if o["fast"] and o["r"] is None else o["r"]',
                          'r = 0.35 if o["fast"] else None')],
    "mctf.r per-block list": [(MCTF, "per_layer = tuple(r) + (0,) * (len(layers) - len(r))",
                               "per_layer = (r[0],) * len(layers)")],
    "mctf.r fraction of tokens left": [(SCHED, "step = int(step * left)", "step = int(step * num_patches)")],
    "mctf.layers": [(MCTF, 'layers = o["layers"] or (', "layers = None or (")],
    "mctf.fast": [(MCTF, 'r = 0.35 if o["fast"] and o["r"] is None else o["r"]', 'r = o["r"]'),
                  (MCTF, '[3, 6, 9] if o["fast"] else', "[3, 6, 9] if False else")],
    "mctf.tau": [(MCTF, 'tuple(o["tau"])', "(1.0, 20.0, 40.0)")],
    "mctf.similarity": [(MCTF, '(o["similarity"], o["informativeness"], o["size"])',
                         '(True, o["informativeness"], o["size"])')],
    "mctf.informativeness": [(MCTF, '(o["similarity"], o["informativeness"], o["size"])',
                              '(o["similarity"], True, o["size"])')],
    "mctf.size": [(MCTF, '(o["similarity"], o["informativeness"], o["size"])',
                   '(o["similarity"], o["informativeness"], True)')],
    "mctf.bidirectional": [(MCTF, 'p, o["bidirectional"])', "p, True)")],
    "mctf.one_step_ahead": [(MCTF, 'if o["one_step_ahead"] == "exact":', "if False:")],
    "mctf.prop_attn": [(MCTF, 'return self.options["prop_attn"]', "return True")],
    "mctf.min_tokens": [(MCTF, 'floor = max(0, o["min_tokens"] - num_prefix)', "floor = max(0, 10 - num_prefix)")],
    "mctf fusion weight attention x size": [(MCTF, "weight = received.unsqueeze(-1) * size", "weight = size")],
    "report.method": [(STATE, "method=self.reducer.name", 'method="tome"')],
    "report.num_prefix_tokens": [(STATE, "num_prefix_tokens=self.num_prefix", "num_prefix_tokens=0")],
    "report.token_counts": [(STATE, "token_counts=list(self.token_counts)", "token_counts=[]")],
    "report.output_tokens (timm)": [(TIMM, "state.output_tokens = x.shape[1]", "state.output_tokens = None")],
    "report.output_tokens (transformers)": [(HF, "state.output_tokens = x.shape[1]", "state.output_tokens = None")],
    "report.size": [(STATE, "size=self.size,", "size=None,")],
    "remove (timm blocks)": [(TIMM, "block.__class__ = Block", "pass")],
    "remove (transformers layers)": [(HF, "        restore(layer)\n", "        pass\n")],
    "timm size-weighted average pool": [(TIMM, "mean = ops.size_weighted_mean(x, size)", "mean = x.mean(dim=1)")],
    "block: reduction before the MLP": [
        (BLOCK, "    if remove:\n        x = reducer.after_attention(x, remove, request.taps, state).tokens\n"
                "    return x + block.mlp_residual(x)",
         "    x = x + block.mlp_residual(x)\n    if remove:\n"
         "        x = reducer.after_attention(x, remove, request.taps, state).tokens\n    return x")],
    "block: proportional attention in blocks that reduce nothing": [
        (BLOCK, "return block.stock_block(x, state.attention_bias())", "return block.stock_block(x, None)")],
    "block: proportional attention in blocks that reduce": [
        (BLOCK, "block.run_attention(block.attention_input(x), state.attention_bias(), request)",
         "block.run_attention(block.attention_input(x), None, request)")],
    "hiprune.alpha": [(HIPRUNE, 'self.options["alpha"], self.options["wrap"]', '0.1, self.options["wrap"]')],
    "hiprune.wrap": [(HIPRUNE, 'self.options["alpha"], self.options["wrap"]', 'self.options["alpha"], False')],
    "hiprune.object_layer": [(HIPRUNE, 'return (self.options["object_layer"] or tower.object_layer) - 1',
                              "return tower.object_layer - 1")],
    "hiprune.tokens": [(HIPRUNE, 'if self.options["tokens"] is not None:', "if False:")],
    "vlm positions='reindex'": [(VLM, 'if compaction.positions == "reindex":', "if False:")],
    "vlm decode-time position shift": [(VLM, 'kwargs["position_ids"] = positions - note.shift[:, None]',
                                        'kwargs["position_ids"] = positions')],
    "vlm decode-time mask rebuild": [
        (VLM, 'kwargs["attention_mask"] = torch.cat([note.mask, tail.to(note.mask.dtype)], dim=1)', "pass")],
}

EXISTING = ["tests/test_ops.py", "tests/test_mctf.py", "tests/test_zero_tprune.py"]  # before this harness
FAST = EXISTING + ["tests/test_documented_options.py", "tests/test_ops_properties.py", "tests/test_mutation_gaps.py"]
SLOW = ["tests/test_timm_patch.py", "tests/test_hf_patch.py", "tests/test_bad_input.py",
        "tests/test_official_conventions.py", "tests/test_vlm.py", "tests/test_vlm_generate.py",
        "tests/test_extending.py"]


def pytest(root: Path, files: list[str], extra: list[str] = ()) -> bool:
    files = [f for f in files if (root / f).exists()]
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *extra, *files]
    env = {**os.environ, "PYTHONPATH": str(root), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def check(root: Path, name: str, fast_only: bool, tests: list[str], fast: list[str] = FAST) -> str:
    originals: dict[Path, str] = {}
    try:
        for file, old, new in BREAKS[name]:
            path = root / file
            text = path.read_text()
            originals.setdefault(path, text)
            if old not in text:
                return "stale (text not found)"
            path.write_text(text.replace(old, new))
        if tests:
            return "caught" if not pytest(root, tests) else "NOT CAUGHT by " + " ".join(tests)
        if not pytest(root, fast):
            return "caught (fast tests)"
        if fast_only:
            return "not caught by fast tests"
        if not pytest(root, SLOW, ["-k", "not compile"]):
            return "caught (adapter tests)"
        return "NOT CAUGHT"
    finally:
        for path, text in originals.items():
            path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="entries of BREAKS; default: all")
    parser.add_argument("--fast-only", action="store_true", help="skip the adapter tests (minutes per entry)")
    parser.add_argument("--tests", nargs="+", default=[], help="run only these test files")
    parser.add_argument("--without-new", action="store_true",
                        help="leave out the test files written with this harness (what the suite caught before)")
    args = parser.parse_args()
    names = args.names or list(BREAKS)
    missed = 0
    root = scratch_copy()
    try:
        for name in names:
            start = time.monotonic()
            verdict = check(root, name, args.fast_only, args.tests, EXISTING if args.without_new else FAST)
            missed += not verdict.startswith("caught")
            print(f"{name:<40} {verdict:<26} {time.monotonic() - start:5.0f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{len(names) - missed} of {len(names)} documented behaviours caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
