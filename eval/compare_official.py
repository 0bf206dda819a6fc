"""Our ToMe and MCTF against the official implementations, on identical random weights and inputs.

    python -m tokenprune.eval.compare_official --tome /path/to/ToMe --mctf /path/to/MCTF

``--tome`` is a checkout of facebookresearch/ToMe, ``--mctf`` one of mlvlab/MCTF (either may be
left out). The script builds timm ``deit_small_patch16_224`` with seeded random weights, applies
the official patch (imported from the checkout) to one copy and ours to another, feeds both the
same seeded batch (4 images, fp32, CPU) and prints, per ``r``, the largest absolute difference
of the logits and the tokens entering each block of both models. ToMe runs at r = 4, 8, 13, 16;
MCTF at r = 8, 16, 20 with the DeiT-S settings of its README (``--mctf_type
[r,0,0,1,1,1,20,40,1,1,0]``, merging at blocks 1..11), which are our defaults with ``r=r``:
one-step-ahead attention reused (``one_step_ahead="approximate"``), proportional attention,
tau = (1, 20, 40), bidirectional matching, attention x size fusion ("pooling type 1").

It is a comparison tool, not part of the library: it imports the official code, and shims the
little that newer timm versions moved. Exit status 0 when every ``r`` agrees within ``--atol``
with identical token counts, 1 otherwise, 2 for bad arguments. The official MCTF code needs
nothing beyond torch, timm and numpy.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
import types
import warnings

TOME_R = (4, 8, 13, 16)
MCTF_R = (8, 16, 20)
MODEL = "deit_small_patch16_224"


def _checkout(path: str, marker: str, what: str) -> str:
    """The absolute checkout path, or an argparse error naming what is missing."""
    if not os.path.isfile(os.path.join(path, marker)):
        raise argparse.ArgumentTypeError(f"{path!r} is not a checkout of {what} (no {marker} in it)")
    return os.path.abspath(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tokenprune.eval.compare_official", description=__doc__.split("\n")[0])
    p.add_argument("--tome", metavar="PATH", type=lambda s: _checkout(s, "tome/merge.py", "facebookresearch/ToMe"),
                   help="checkout of facebookresearch/ToMe")
    p.add_argument("--mctf", metavar="PATH", type=lambda s: _checkout(s, "utils/mctf.py", "mlvlab/MCTF"),
                   help="checkout of mlvlab/MCTF")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the images (default 0)")
    p.add_argument("--batch", type=int, default=4, help="images per batch (default 4)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest accepted |logit difference| (default 1e-4)")
    return p


def _package(name: str, path: str) -> None:
    """Register ``name`` as a package rooted at ``path`` without running its ``__init__`` (ToMe's
    imports visualisation and other patches that need packages the comparison does not)."""
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module


def _entering_counts(model, blocks) -> tuple[list[int], list]:
    """Tokens entering each block, recorded by forward pre-hooks; returns (counts, hook handles)."""
    counts: list[int] = []
    handles = [b.register_forward_pre_hook(lambda _m, args, kwargs: counts.append(args[0].shape[1]),
                                           with_kwargs=True) for b in blocks]
    return counts, handles


def _ours(model, method: str, x, **options):
    import torch

    import tokenprune
    tokenprune.apply(model, method, **options)
    with torch.inference_mode():
        out = model(x)
    return out, tokenprune.last_forward(model).token_counts


def compare_tome(path: str, base, x) -> list[tuple[int, float, list[int], list[int]]]:
    import torch
    _package("tome", os.path.join(path, "tome"))
    _package("tome.patch", os.path.join(path, "tome", "patch"))
    official_patch = importlib.import_module("tome.patch.timm")
    rows = []
    for r in TOME_R:
        official = copy.deepcopy(base)
        official_patch.apply_patch(official)
        official.r = r
        counts, handles = _entering_counts(official, official.blocks)
        with torch.inference_mode():
            expected = official(x)
        for h in handles:
            h.remove()
        out, ours = _ours(copy.deepcopy(base), "tome", x, r=r)
        rows.append((r, float((out - expected).abs().max()), counts, ours))
    return rows


def compare_mctf(path: str, base, x) -> list[tuple[int, float, list[int], list[int]]]:
    import torch
    sys.path.insert(0, path)  # its modules import each other as models.*, utils.*
    try:
        with warnings.catch_warnings():  # it imports from timm.models.layers etc., deprecated but still there
            warnings.simplefilter("ignore", FutureWarning)
            deit = importlib.import_module("models.deit")
    finally:
        sys.path.remove(path)
    rows = []
    for r in MCTF_R:
        official = deit.VisionTransformer(
            patch_size=16, embed_dim=384, depth=12, num_heads=6, qkv_bias=True,
            norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6), num_classes=base.num_classes,
            use_mctf=True, mctf_type=[r, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0], task_type=[1, 0, 0, 0],
            activate_layer=list(range(1, 12))).eval()
        official.load_state_dict(base.state_dict(), strict=True)
        counts, handles = _entering_counts(official, official.blocks)
        with torch.inference_mode():
            expected = official(x, r_eval=r)
        for h in handles:
            h.remove()
        out, ours = _ours(copy.deepcopy(base), "mctf", x, r=r)
        rows.append((r, float((out - expected).abs().max()), counts, ours))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tome is None and args.mctf is None:
        parser.error("give --tome PATH and/or --mctf PATH (checkouts of the official repositories)")
    if args.batch < 1:
        parser.error(f"--batch must be a positive int, got {args.batch}")
    import timm
    import torch
    torch.manual_seed(args.seed)
    base = timm.create_model(MODEL, pretrained=False).eval()
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(args.seed))
    ok = True
    for name, path, compare in (("tome", args.tome, compare_tome), ("mctf", args.mctf, compare_mctf)):
        if path is None:
            continue
        print(f"{name}: {MODEL}, random weights (seed {args.seed}), batch {args.batch}, fp32; official: {path}")
        for r, diff, official, ours in compare(path, base, x):
            same = official == ours
            ok &= same and diff <= args.atol
            print(f"  r={r:<3d} max|logit diff| {diff:.2e}  token counts identical: {'yes' if same else 'NO'}")
            print(f"         tokens entering each block: {ours}" + ("" if same else f" (official: {official})"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
