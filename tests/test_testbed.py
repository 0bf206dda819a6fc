"""The shipped testbed: its weights load offline through timm and classify the shipped test split."""
from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer

import tokenprune
from tokenprune import testbed


def test_shipped_test_split():
    images, labels = testbed.load_fashion_mnist("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10_000,) and set(labels.unique().tolist()) == set(range(10))
    assert (testbed.DATA_DIR / "LICENSE-fashion-mnist.md").is_file()


def test_pretrained_weights_load_offline_and_classify(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = timm.create_model("vit_testbed_fmnist", pretrained=True).eval()
    assert type(model) is VisionTransformer and all(type(b) is Block for b in model.blocks)
    assert model.patch_embed.num_patches == 196 and model.num_prefix_tokens == 1
    images, labels = testbed.load_fashion_mnist("test")
    with torch.inference_mode():
        logits = model(testbed.normalize_images(images[:500]))
        accuracy = (logits.argmax(-1) == labels[:500]).float().mean().item()
        assert accuracy > 0.85
        tokenprune.apply(model, "tome", keep=0.5)
        pruned = (model(testbed.normalize_images(images[:500])).argmax(-1) == labels[:500]).float().mean().item()
    assert pruned > 0.75  # merging half the tokens keeps most of it (a broken merge falls to chance)
