"""Tiny random-init models of every supported timm family (no downloads)."""
from __future__ import annotations

import gzip
import struct
import threading

import numpy as np
import pytest
import timm
import torch

torch.set_num_threads(2)

# timm name -> what it exercises
TIMM_FAMILIES = {
    "vit_base_patch16_224": "class token, token pool",
    "deit_small_distilled_patch16_224": "2 prefix tokens (class + distillation)",
    "deit3_small_patch16_224": "LayerScale, no_embed_class",
    "vit_small_patch14_reg4_dinov2": "5 prefix tokens (class + 4 registers), LayerScale",
    "vit_base_patch16_clip_224": "CLIP: norm_pre",
    "vit_base_patch16_siglip_224": "SigLIP: no class token, 'map' attention pool",
    "vit_base_patch16_siglip_gap_224": "SigLIP: no class token, 'avg' pool",
}


def tiny_timm(name: str = "vit_base_patch16_224", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 64-patch (8x8 grid at 32 px), 4-block, width-48 version of a timm model, in eval mode."""
    torch.manual_seed(seed)
    kwargs = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    kwargs.update(overrides)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=sorted(TIMM_FAMILIES))
def family(request) -> str:
    return request.param


def write_idx(path, array) -> None:
    """Write ``array`` as a gzipped uint8 IDX file (the Fashion-MNIST format)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def fmnist_train_root(tmp_path_factory):
    """A folder with a synthetic Fashion-MNIST train split (6,000 random garments, below 200 so that a
    mosaic's frame stands out), for the splits carved from train."""
    root = tmp_path_factory.mktemp("fmnist-train")
    rng = np.random.default_rng(0)
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 200, (6000, 28, 28)))
    write_idx(root / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 6000))
    return root


def assert_threads_get_what_each_gets_alone(forward, inputs: list, rounds: int = 3) -> None:
    """``forward(x)`` of every input, called from one thread per input at once (``rounds`` times each), equals
    ``forward(x)`` called alone: per-forward state never leaks between concurrent forwards of one model."""
    alone = [forward(x) for x in inputs]
    barrier = threading.Barrier(len(inputs))
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(inputs))}

    def worker(i):
        barrier.wait()
        for _ in range(rounds):
            results[i].append(forward(inputs[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(alone):
        assert len(results[i]) == rounds and all(torch.equal(r, expected) for r in results[i]), i
