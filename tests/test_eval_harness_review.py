"""`tokenprune eval` reports what the field's own tools would on the same data and model: the pixels each model
family's standard preprocessing gives, the labels, the samples and top-k as timm counts them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenprune.eval import evaluate as evaluate_module
from tokenprune.eval.evaluate import main as evaluate

# odd sizes, landscape and portrait: crop offsets and aspect ratios that a resize or crop convention shows
SIZES = [(61, 47), (40, 77), (53, 53)]  # (width, height)


def odd_images(root, classes=("bag", "boot")):
    rng = np.random.default_rng(0)
    paths = []
    for c in classes:
        (root / c).mkdir(parents=True)
        for i, (w, h) in enumerate(SIZES):
            path = root / c / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
            paths.append(path)
    return root, paths


def processors():
    from transformers import BitImageProcessor, CLIPImageProcessor, DeiTImageProcessor, ViTImageProcessor

    return {  # each family's layout of a processor config, scaled down to a 32-pixel model input
        "vit (squash to 32)": ViTImageProcessor(size={"height": 32, "width": 32}),
        "deit (squash to 40, crop 32)": DeiTImageProcessor(size={"height": 40, "width": 40},
                                                          crop_size={"height": 32, "width": 32}),
        "clip (short side 32, crop 32)": CLIPImageProcessor(size={"shortest_edge": 32},
                                                           crop_size={"height": 32, "width": 32}),
        "dinov2 (short side 37, crop 32)": BitImageProcessor(size={"shortest_edge": 37},
                                                            crop_size={"height": 32, "width": 32},
                                                            do_center_crop=True, resample=3),
    }


@pytest.mark.parametrize("name", list(processors()))
def test_a_transformers_classifier_sees_its_own_processor_s_pixels(tmp_path, monkeypatch, name):
    """What `transforms from its processor` promises: the baseline's forward gets exactly the processor's
    pixel_values (a timm transform from an equivalent config crops DeiT's image from the wrong resize, and
    crops one pixel off where the processor's (size - crop) // 2 and torchvision's rounding differ)."""
    from transformers import ViTConfig, ViTForImageClassification

    processor = processors()[name]
    model_dir = tmp_path / "model"
    config = ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                       image_size=32, patch_size=8, num_labels=2)
    ViTForImageClassification(config).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data, paths = odd_images(tmp_path / "val")

    seen = []  # per configuration, the images its evaluation fed the model
    evaluate_config = evaluate_module.evaluate_config

    def spy(model, loader, *args, **kwargs):
        seen.append(torch.cat([x for x, _ in loader]))
        return evaluate_config(model, loader, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_config", spy)
    evaluate(["--model", str(model_dir), "--data", str(data), "--batch-size", "4", "--method", "tome",
              "--keep", "0.5", "--output", str(tmp_path / "out.jsonl")])
    baseline = seen[0]
    expected = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    assert baseline.shape == expected.shape and torch.equal(baseline, expected)
    # results computed from timm's transform before (another run): not resumed
    first = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert json.loads(first["key"])["pixels"] == "processor"


def test_a_dataset_s_label_column_is_scored_even_with_another_class_label_column_before_it(tmp_path):
    """timm's hfds reader (target_key 'label') and transformers' scripts score the 'label' column; the first
    ClassLabel column was taken instead, silently: here the cat/dog species, not the breed."""
    datasets = pytest.importorskip("datasets")
    from tokenprune.eval.data import build_dataset

    features = datasets.Features({"image": datasets.Image(), "species": datasets.ClassLabel(names=["cat", "dog"]),
                                  "age": datasets.ClassLabel(names=["young", "old"]),
                                  "label": datasets.ClassLabel(num_classes=10)})
    images = [Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)) for v in (10, 20, 30)]
    datasets.Dataset.from_dict({"image": images, "species": [0, 1, 1], "age": [1, 1, 0], "label": [7, 3, 9]},
                               features=features).save_to_disk(str(tmp_path / "hf"))
    dataset, _ = build_dataset(str(tmp_path / "hf"), lambda image: image, (3, 8, 8), num_classes=10)
    assert [dataset[i][1] for i in range(3)] == [7, 3, 9]
    assert dataset.class_note == ("labels from the dataset's 'label' column (other class-label columns: 'species', "
                                  "'age'; --label-column picks another)")
    from tokenprune.eval.evaluate import data_settings

    assert data_settings(dataset)["label_column"] == "label"  # runs scored on 'species' before are another run
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    datasets.Dataset.from_dict({"image": images, "label": [7, 3, 9]}, features=features).save_to_disk(
        str(tmp_path / "one"))
    dataset, _ = build_dataset(str(tmp_path / "one"), lambda image: image, (3, 8, 8), num_classes=10)
    assert "label_column" not in data_settings(dataset) and dataset.class_note == ""
    # no label column at all: refused, not scored against some other column
    datasets.Dataset.from_dict({"image": images, "caption": ["a", "b", "c"]}).save_to_disk(str(tmp_path / "none"))
    with pytest.raises(ValueError, match="need an Image column and a label column"):
        build_dataset(str(tmp_path / "none"), lambda image: image, (3, 8, 8), num_classes=10)


def test_a_timm_model_sees_timms_eval_transform(tmp_path, monkeypatch):
    """timm models: exactly the pixels of timm's eval transform for the model's data config (no training-time
    augmentation), the images in the folder's order."""
    from timm.data import create_transform, resolve_data_config
    from tokenprune.eval.data import mode_for

    data, paths = odd_images(tmp_path / "val")
    seen = []
    evaluate_config = evaluate_module.evaluate_config

    def spy(model, loader, *args, **kwargs):
        seen.append(torch.cat([x for x, _ in loader]))
        return evaluate_config(model, loader, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_config", spy)
    evaluate(["--model", "vit_testbed_fmnist", "--data", str(data), "--batch-size", "4", "--method", "tome",
              "--keep", "0.5", "--output", str(tmp_path / "out.jsonl")])
    model = evaluate_module.load_model("vit_testbed_fmnist", True, None, 0)
    config = resolve_data_config(model=model)
    transform = create_transform(**config, is_training=False)
    mode = mode_for(config["input_size"][0])  # the testbed's grey images
    expected = torch.stack([transform(Image.open(p).convert(mode)) for p in paths])
    assert torch.equal(seen[0], expected) and torch.equal(seen[1], expected)
