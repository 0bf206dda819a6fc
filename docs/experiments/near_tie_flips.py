"""How far a near-tie token choice moves a sample, against how far the reduction itself moved it (docs/performance.md,
session 28): the numbers behind ``tokenprune.speed.verify_compiled``'s limit.

Near ties are what any change of rounding flips, so a float32 forward against a float64 one of the same weights finds
them without compiling anything. A sample "moved" where the two differ by more than 1e-4 of the output's scale; the
reduction's own move is the float64 patched output's distance from the float64 unpatched one.

    .venv/bin/python docs/experiments/near_tie_flips.py deit_tiny_patch16_224 512 32 mctf,zero-tprune [SEED]
"""
import copy
import json
import sys

import torch

import tokenprune
from tokenprune.flops import default_input_size, random_model
from tokenprune.speed import _output_tensor, per_sample_distance


def main(model_name: str, samples: int, batch: int, methods: list[str], seed: int = 7) -> None:
    torch.set_num_threads(2)
    base = random_model(model_name, 0)
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(batch, *default_input_size(base), generator=generator) for _ in range(samples // batch)]
    base64 = copy.deepcopy(base).double()
    with torch.inference_mode():
        stock = torch.cat([_output_tensor(base64(x.double())) for x in inputs])
        for method in methods:
            single = tokenprune.apply(copy.deepcopy(base), method, 0.5)
            double = tokenprune.apply(copy.deepcopy(base64), method, 0.5)
            got = torch.cat([_output_tensor(single(x)) for x in inputs]).double()
            expected = torch.cat([_output_tensor(double(x.double())) for x in inputs])
            scale = max(1.0, expected.abs().max().item())
            move, effect = per_sample_distance(got, expected) / scale, per_sample_distance(stock, expected) / scale
            moved = move > 1e-4
            print(json.dumps(dict(model=model_name, method=method, samples=len(move), moved=int(moved.sum()),
                                  moves=[round(m, 5) for m in move[moved].tolist()],
                                  of_the_reductions=[round(r, 3) for r in (move[moved] / effect[moved]).tolist()],
                                  reduction_median=round(effect.median().item(), 5))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(","),
         *(int(a) for a in sys.argv[5:6]))
