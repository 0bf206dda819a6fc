"""How far each method moves the feature the classifier head reads, on an average-pooled testbed and on a
class-token one: the mean relative error ||f - f0|| / ||f0|| of the head's input against the unpruned model's,
and how often the prediction stays the same; the first 1,000 test images, fp32, 1 thread.

    python docs/results/family/pooled_feature.py > docs/results/family/pooled_feature.txt
"""
import copy

import timm
import torch

import tokenprune
from tokenprune import testbed as tb


def head_input(model, x):
    """The head's input and the logits of one forward (what the patched model itself feeds its head)."""
    seen = {}
    hook = model.head.register_forward_hook(lambda module, args, out: seen.setdefault("f", args[0]))
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    return seen["f"], logits


def main():
    torch.set_num_threads(1)
    images, _ = tb.testbed_split("fmnist", "test")
    x = tb.normalize_images(images[:1000])
    for name in ("vit_testbed_fmnist_gap", "vit_testbed_fmnist_plain"):
        base = timm.create_model(name, pretrained=True).eval()
        f0, logits0 = head_input(base, x)
        for method, options in (("random", {"seed": 0}), ("zero-tprune", {}), ("tome", {}), ("mctf", {})):
            for keep in (0.5, 0.33):
                f, logits = head_input(tokenprune.apply(copy.deepcopy(base), method, keep=keep, **options), x)
                error = ((f - f0).norm(dim=-1) / f0.norm(dim=-1)).mean().item()
                same = (logits.argmax(-1) == logits0.argmax(-1)).float().mean().item()
                print(f"{name} {method:12s} keep {keep}: head-input relative error {error:.3f}, "
                      f"prediction unchanged {same:.3f}")


if __name__ == "__main__":
    main()
