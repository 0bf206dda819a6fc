"""How much fresh instances of one model differ in speed (docs/performance.md, session 31): K copies of the same
unpatched timm model (the same weights), each compiled with ``tokenprune.compiled`` (or eager), timed in turn in one
process (``timing.interleaved_medians``, one forward a call); the median forward of each, and the largest over the
smallest.

    .venv/bin/python docs/experiments/instance_spread.py deit_small_patch16_224 4 200 compile
    .venv/bin/python docs/experiments/instance_spread.py deit_small_patch16_224 4 200 eager

Session 31 (Intel Xeon, 2 vCPUs, batch 1, 200 rounds): compiled 39.99-40.34 ms (1.009), eager 42.03-42.22 ms (1.005):
a cell's ratios are not moved by which instance was built, but by how the machine drifts while it is timed.
"""
import sys

import timm
import torch

from tokenprune.speed import compiled
from tokenprune.timing import interleaved_medians


def main(name: str, copies: int, rounds: int, mode: str) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *base.pretrained_cfg["input_size"])
    forwards = []
    for _ in range(copies):
        model = timm.create_model(name, pretrained=False).eval()
        model.load_state_dict(base.state_dict())
        forwards.append(compiled(model) if mode == "compile" else model)
    with torch.inference_mode():
        # the first forward of a compiled copy compiles it: the warm-up takes it out of the timings
        seconds, foreign = interleaved_medians({i: (lambda f=f: f(x)) for i, f in enumerate(forwards)}, rounds,
                                               warmup=5)
    medians = [seconds[i] * 1e3 for i in range(copies)]
    print(f"{name} {mode}: medians (ms) {' '.join(f'{m:.2f}' for m in medians)}; largest / smallest "
          f"{max(medians) / min(medians):.3f}; other processes' CPU share {foreign or 0:.1%}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
