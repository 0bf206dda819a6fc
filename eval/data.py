"""Evaluation data: the embedded Fashion-MNIST test split, an ImageNet-val style folder, or a
Hugging Face dataset. Every source yields ``(image_tensor, label)`` through the model's own timm
transform; an image that cannot be read or decoded yields the label ``SKIPPED`` and a blank image, so
batches keep their shape (and multi-process gathering stays exact) while the harness counts it.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

SKIPPED = -1
EMBEDDED = "fashion-mnist"


class _Source(Dataset):
    """Base: subclasses give ``__len__`` and ``load(i) -> (PIL image, label)``."""

    transform: Callable
    blank: torch.Tensor

    def load(self, index: int):
        raise NotImplementedError

    def __getitem__(self, index: int):
        try:
            image, label = self.load(index)
            return self.transform(image), label
        except Exception:  # unreadable or corrupt: counted by the harness, never a crash
            return self.blank, SKIPPED


class EmbeddedFashionMNIST(_Source):
    """The Fashion-MNIST test split shipped inside the package (10,000 images, 10 classes)."""

    def __init__(self, transform, input_size):
        from tokenprune.testbed import load_fashion_mnist

        self.images, self.labels = load_fashion_mnist("test")
        self.transform, self.blank = transform, torch.zeros(input_size)

    def __len__(self):
        return len(self.labels)

    def load(self, index):
        return Image.fromarray(self.images[index].numpy(), mode="L"), int(self.labels[index])


def imagenet_class_map(class_names: list[str]) -> dict[str, int] | None:
    """Synset folder names (n01440764, ...) map to timm's ImageNet class order; other names to None."""
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo().label_names()
    index = {s: i for i, s in enumerate(synsets)}
    if class_names and all(name in index for name in class_names):
        return {name: index[name] for name in class_names}
    return None


class ImageFolder(_Source):
    """One subfolder per class, read with timm's folder reader.

    Synset folder names take timm's ImageNet indices (so a partial ImageNet-val copy still
    scores right); any other names are numbered in sorted order.
    """

    def __init__(self, root, transform, input_size, mode="RGB"):
        from timm.data.readers.reader_image_folder import ReaderImageFolder

        classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"--data {root}: no class subfolders (expected an ImageNet-val style layout)")
        class_map = imagenet_class_map(classes) or ""
        self.reader = ReaderImageFolder(str(root), class_map=class_map)
        self.transform, self.blank, self.mode = transform, torch.zeros(input_size), mode

    def __len__(self):
        return len(self.reader)

    def load(self, index):
        path, label = self.reader[index]
        with Image.open(path) as image:
            return image.convert(self.mode), label


class HFImages(_Source):
    """A Hugging Face ``datasets`` split with an Image column and a class-label column."""

    def __init__(self, dataset, transform, input_size, mode="RGB"):
        from datasets import ClassLabel
        from datasets import Image as HFImage

        features = dataset.features
        self.image_key = next((k for k, f in features.items() if isinstance(f, HFImage)), None)
        self.label_key = next((k for k, f in features.items() if isinstance(f, ClassLabel)), None) or \
            next((k for k in ("label", "labels") if k in features), None)
        if self.image_key is None or self.label_key is None:
            raise ValueError(f"dataset columns {list(features)}: need an Image column and a label column")
        # Decode lazily ourselves, so a corrupt image is one skipped sample, not a failed batch.
        self.dataset = dataset.cast_column(self.image_key, HFImage(decode=False))
        self.transform, self.blank, self.mode = transform, torch.zeros(input_size), mode

    def __len__(self):
        return len(self.dataset)

    def load(self, index):
        row = self.dataset[index]
        raw = row[self.image_key]
        source = raw["path"] if raw.get("bytes") is None else io.BytesIO(raw["bytes"])
        with Image.open(source) as image:
            return image.convert(self.mode), int(row[self.label_key])


def build_dataset(spec: str, transform, input_size, split: str = "validation") -> tuple[Dataset, str]:
    """``spec``: ``fashion-mnist`` (embedded), an image folder, a saved HF dataset folder, or a HF name."""
    mode = "L" if input_size[0] == 1 else "RGB"
    if spec == EMBEDDED:
        return EmbeddedFashionMNIST(transform, input_size), "embedded Fashion-MNIST test split (10,000)"
    path = Path(spec)
    if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            data = data[split]
        return HFImages(data, transform, input_size, mode), f"HF dataset at {path} ({split})"
    if path.is_dir():
        return ImageFolder(path, transform, input_size, mode), f"image folder {path}"
    if os.path.sep in spec or spec.startswith("."):
        raise ValueError(f"--data {spec}: no such folder")
    import datasets

    data = datasets.load_dataset(spec, split=split)
    return HFImages(data, transform, input_size, mode), f"HF dataset {spec} ({split})"
