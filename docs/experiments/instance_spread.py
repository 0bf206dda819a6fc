"""How much fresh instances of one model differ in speed (docs/performance.md, session 31): K copies of the same
unpatched timm model (the same weights), each compiled with ``tokenprune.compiled`` (or eager), timed in turn in one
process; the median forward of each, and the largest over the smallest.

    .venv/bin/python docs/experiments/instance_spread.py deit_small_patch16_224 4 20 compile
    .venv/bin/python docs/experiments/instance_spread.py deit_small_patch16_224 4 20 eager

Session 31 (Intel Xeon, 2 vCPUs, batch 1): compiled 37.25-37.68 ms (1.011), eager 38.93-39.10 ms (1.004): a cell's
ratios are not moved by which instance was built, but by how the machine drifts while it is timed.
"""
import statistics
import sys
import time

import timm
import torch

from tokenprune.speed import compiled


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
    times = [[] for _ in forwards]
    with torch.inference_mode():
        for forward in forwards:  # compile, warm up
            for _ in range(5):
                forward(x)
        for _ in range(rounds):
            for i, forward in enumerate(forwards):
                start = time.perf_counter()
                for _ in range(10):
                    forward(x)
                times[i].append((time.perf_counter() - start) / 10 * 1e3)
    medians = [statistics.median(t) for t in times]
    print(f"{name} {mode}: medians (ms) {' '.join(f'{m:.2f}' for m in medians)}; largest / smallest "
          f"{max(medians) / min(medians):.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
