"""Evaluation data: the embedded Fashion-MNIST test split, an ImageNet-val style folder, or a
Hugging Face dataset. Every source yields ``(image_tensor, label)`` through the model's own timm
transform.

Only a file that cannot be decoded (not an image PIL recognises, truncated, corrupt, over PIL's
pixel limit, unreadable on disk) is skipped: it yields a blank image and a negative label that
says why (``-1 - index into SKIP_REASONS``), so batches keep their shape (and multi-process
gathering stays exact) while the harness counts skips by reason. Any other error stops the run.

Images reach the model in its own channel count: grey -> RGB replicates the channel, RGB -> grey
is PIL's ``'L'`` conversion (ITU-R 601-2 luma); models with other channel counts are refused.
16-bit (and 32-bit integer) greyscale is scaled to 8 bits as value / 257, not clipped.
"""
from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

SKIPPED = -1  # the first skip code; every label below 0 is a skipped image
EMBEDDED = "fashion-mnist"

SKIP_REASONS = (
    "not an image PIL recognises",
    "truncated",
    "corrupt (decoder error)",
    "over PIL's pixel limit",
    "unreadable file",
)
# What decoding a broken file raises in PIL: OSError ("image file is truncated", "broken data
# stream", UnidentifiedImageError), SyntaxError (bad PNG chunks), EOFError, ValueError (bad tiles).
DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError)


def skip_label(error: BaseException) -> int:
    """The negative label that records why an image was skipped."""
    if isinstance(error, UnidentifiedImageError):
        reason = 0
    elif isinstance(error, Image.DecompressionBombError):
        reason = 3
    elif isinstance(error, OSError) and "truncated" in str(error):
        reason = 1
    elif isinstance(error, OSError) and error.errno is not None:  # permission, missing, I/O error
        reason = 4
    else:
        reason = 2
    return SKIPPED - reason


def skip_reason(label: int) -> str:
    return SKIP_REASONS[SKIPPED - label]


def mode_for(channels: int) -> str:
    if channels not in (1, 3):
        raise ValueError(f"the model takes {channels} input channels; images can be fed to 1-channel (grey) "
                         f"or 3-channel (RGB) models only")
    return "L" if channels == 1 else "RGB"


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in ``mode`` ('L' or 'RGB'), a new image. PIL clips 16-bit values to 255 when it converts
    them (a near-white image); scale them to 8 bits instead."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        values = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))
    return image.convert(mode)


def decode_image(source, mode: str) -> Image.Image | int:
    """``source`` (a path, a file object or a PIL image) decoded in ``mode``, or, for a file that cannot be
    decoded, its negative skip label (``skip_label``). Decoded here, whole, so that a broken file fails
    here and not later in a transform or a processor."""
    if isinstance(source, Image.Image):
        return to_mode(source, mode)
    try:
        opened = Image.open(source)
    except DECODE_ERRORS as e:
        return skip_label(e)
    with opened:
        try:
            opened.load()
        except DECODE_ERRORS as e:
            return skip_label(e)
        return to_mode(opened, mode)


class _Source(Dataset):
    """Base: subclasses give ``__len__`` and ``fetch(i) -> (path, file object or PIL image, label)``."""

    transform: Callable
    blank: torch.Tensor
    mode: str

    def fetch(self, index: int):
        raise NotImplementedError

    def __getitem__(self, index: int):
        source, label = self.fetch(index)
        image = decode_image(source, self.mode)
        if isinstance(image, int):
            return self.blank, image
        return self.transform(image), label


class EmbeddedFashionMNIST(_Source):
    """A testbed task's split: the packaged Fashion-MNIST test split (10,000 images, 10 classes), the 2x2
    mosaics composed from it, or either's validation split (from the train split, not packaged)."""

    def __init__(self, transform, input_size, mode="L", task="fmnist", split="test"):
        from tokenprune.testbed import testbed_split

        self.images, self.labels = testbed_split(task, split)
        self.transform, self.blank, self.mode = transform, torch.zeros(input_size), mode

    def __len__(self):
        return len(self.labels)

    def fetch(self, index):
        return Image.fromarray(self.images[index].numpy()), int(self.labels[index])


#: ``--data`` names of the testbed tasks: (task, split).
EMBEDDED_SPECS = {
    EMBEDDED: ("fmnist", "test"),
    f"{EMBEDDED}:val": ("fmnist", "val"),
    f"{EMBEDDED}-mosaic": ("mosaic", "test"),
    f"{EMBEDDED}-mosaic:val": ("mosaic", "val"),
}


def embedded_spec_for(task: str, split: str = "test") -> str:
    """The ``--data`` name of a testbed task's split."""
    return next(name for name, value in EMBEDDED_SPECS.items() if value == (task, split))


SYNSET = re.compile(r"n\d{8}")


def image_extensions() -> set[str]:
    """Every file extension of a format PIL can open (``.png``, ``.jpeg``, ``.tif``, ``.webp``, ...)."""
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _listing(names, limit: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def read_class_map(path) -> dict[str, int]:
    """A JSON object ``{"folder name": class index, ...}``."""
    def no_duplicate_keys(pairs):
        keys = [k for k, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"--class-map {path}: folder(s) listed twice: {_listing(repeated)}")
        return dict(pairs)

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--class-map {path}: cannot read it ({e.strerror or e})") from e
    try:
        mapping = json.loads(text, object_pairs_hook=no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f"--class-map {path}: not JSON ({e}); expected {{\"folder\": index, ...}}") from e
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"--class-map {path}: expected a JSON object {{\"folder\": index, ...}}")
    return mapping


def assign_classes(root, folders: list[str], num_classes: int | None, class_map=None) -> tuple[dict[str, int], str]:
    """Class index of each folder, and a one-line note of how they were assigned.

    With ``class_map`` (a JSON file), its indices; else synset names (n01440764, ...) take timm's
    ImageNet indices for the model's class count (so a partial ImageNet-val copy scores right);
    else sorted order. A mix of synset and other names is refused.
    """
    limit = f" (the model has {num_classes} classes)" if num_classes else ""
    if class_map is not None:
        mapping = read_class_map(class_map)
        unknown = [f for f in folders if f not in mapping]
        if unknown:
            raise ValueError(f"--class-map {class_map} has no index for class folder(s) {_listing(unknown)} "
                             f"of --data {root}")
        bad = [f"{k}: {v!r}" for k, v in mapping.items()
               if type(v) is not int or v < 0 or (num_classes is not None and v >= num_classes)]
        if bad:
            accepted = f"integers in 0..{num_classes - 1}{limit}" if num_classes else "integers >= 0"
            raise ValueError(f"--class-map {class_map}: indices must be {accepted}; got {_listing(bad)}")
        indices = list(mapping.values())
        repeated = sorted({f"{k}: {v}" for k, v in mapping.items() if indices.count(v) > 1})
        if repeated:
            raise ValueError(f"--class-map {class_map}: class index used twice: {_listing(repeated)}")
        classes = {f: mapping[f] for f in folders}
        return classes, f"classes from --class-map {class_map}: " + _note(classes)
    synsets = [f for f in folders if SYNSET.fullmatch(f)]
    if synsets and len(synsets) < len(folders):
        others = [f for f in folders if not SYNSET.fullmatch(f)]
        raise ValueError(f"--data {root} mixes synset class folders ({_listing(synsets, 3)}) with other names: "
                         f"{_listing(others)}; remove or hide them (a leading '.') or give --class-map FILE")
    if synsets:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = "imagenet-1k" if num_classes is None else infer_imagenet_subset({"num_classes": num_classes})
        if subset is None:
            raise ValueError(f"--data {root} has synset class folders but the model's {num_classes} classes are "
                             f"not an ImageNet label set timm knows; give --class-map FILE")
        index = {s: i for i, s in enumerate(ImageNetInfo(subset).label_names())}
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise ValueError(f"--data {root}: folder(s) {_listing(unknown)} are not {subset} synsets; "
                             f"give --class-map FILE")
        return {f: index[f] for f in folders}, f"synset folders: {subset} class indices"
    if num_classes is not None and len(folders) > num_classes:
        raise ValueError(f"--data {root} has {len(folders)} class folders but the model has {num_classes} "
                         f"classes")
    classes = {f: i for i, f in enumerate(folders)}
    return classes, "class folders numbered in sorted order (--class-map FILE to choose): " + _note(classes)


def _note(classes: dict[str, int], limit: int = 12) -> str:
    pairs = [f"{i}={f}" for f, i in sorted(classes.items(), key=lambda item: item[1])]
    if len(pairs) > limit:
        pairs = pairs[:limit - 2] + ["..."] + pairs[-1:] + [f"({len(classes)} classes)"]
    return " ".join(pairs)


def _natural(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text.lower())]


class ImageFolder(_Source):
    """One subfolder per class (searched recursively); every file of a format PIL can open is an image.
    Hidden folders and files (a leading '.') are ignored. Class indices: see ``assign_classes``."""

    def __init__(self, root, transform, input_size, mode="RGB", num_classes=None, class_map=None):
        root = Path(root)
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(f"--data {root}: no class subfolders (expected an ImageNet-val style layout)")
        self.classes, self.class_note = assign_classes(root, folders, num_classes, class_map)
        extensions = image_extensions()
        samples, ignored, empty = [], Counter(), []
        for folder in folders:
            found = 0
            for dirpath, dirnames, filenames in os.walk(root / folder, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    if name.startswith("."):
                        continue
                    suffix = os.path.splitext(name)[1].lower()
                    if suffix in extensions:
                        samples.append((os.path.join(dirpath, name), self.classes[folder]))
                        found += 1
                    else:
                        ignored[suffix or "(no extension)"] += 1
            if not found:
                empty.append(folder)
        if empty:
            raise ValueError(f"--data {root}: class folder(s) with no images: {_listing(empty)} (images are files "
                             f"PIL can open: .png, .jpg, .jpeg, .tif, .webp, ...)")
        self.samples = sorted(samples, key=lambda s: _natural(os.path.relpath(s[0], root)))
        self.ignored = (f"ignored {sum(ignored.values())} file(s) PIL cannot open: "
                        + ", ".join(f"{ext} ({n})" for ext, n in sorted(ignored.items()))) if ignored else ""
        self.transform, self.blank, self.mode = transform, torch.zeros(input_size), mode

    def __len__(self):
        return len(self.samples)

    def fetch(self, index):
        return self.samples[index]


class HFImages(_Source):
    """A Hugging Face ``datasets`` split with an Image column and a class-label column."""

    def __init__(self, dataset, transform, input_size, mode="RGB", num_classes=None, label_column=None,
                 image_column=None):
        from datasets import ClassLabel, Value
        from datasets import Image as HFImage

        features = dataset.features
        image_columns = [k for k, f in features.items() if isinstance(f, HFImage)]
        class_labels = [k for k, f in features.items() if isinstance(f, ClassLabel)]
        # A column named label (labels) first: the one timm's hfds reader (its default target_key) and transformers'
        # scripts score, whatever other class-label columns come before it (a species beside a breed, a coarse class)
        self.default_label_key = next((k for k in ("label", "labels") if k in features), None) or \
            next(iter(class_labels), None)
        self.several_image_columns = len(image_columns) > 1
        for flag, name in (("--image-column", image_column), ("--label-column", label_column)):
            if name is not None and name not in features:
                raise ValueError(f"{flag} {name}: the dataset's columns are {', '.join(features)}")
        if image_column is not None and not isinstance(features[image_column], HFImage):
            raise ValueError(f"--image-column {image_column}: not an image column (its type: "
                             f"{type(features[image_column]).__name__}); the image columns are "
                             f"{', '.join(image_columns) or '(none)'}")
        self.image_key = image_column or next(iter(image_columns), None)
        self.label_key = label_column or self.default_label_key
        if self.image_key is None or self.label_key is None:
            raise ValueError(f"dataset columns {list(features)}: need an Image column and a label column "
                             "(--image-column, --label-column)")
        label = features[self.label_key]
        integers = isinstance(label, Value) and label.dtype.startswith(("int", "uint"))
        if not (isinstance(label, ClassLabel) or integers):
            which = f"--label-column {label_column}:" if label_column else \
                f"the dataset's {self.label_key!r} column (pass --label-column):"
            raise ValueError(f"{which} not a class-label or integer column ({label}); the class-label columns are "
                             f"{', '.join(class_labels) or '(none)'}")
        self.other_label_columns = [k for k in class_labels if k != self.label_key]
        self.class_note = (f"labels from the dataset's {self.label_key!r} column (other class-label columns: "
                           f"{', '.join(map(repr, self.other_label_columns))}; --label-column picks another)"
                           ) if self.other_label_columns else ""
        if isinstance(label, ClassLabel) and num_classes is not None and label.num_classes > num_classes:
            raise ValueError(f"the dataset has {label.num_classes} classes but the model has {num_classes}")
        check_labels(list(dataset[self.label_key]), self.label_key, num_classes)
        # Decode lazily ourselves, so a corrupt image is one skipped sample, not a failed batch.
        self.dataset = dataset.cast_column(self.image_key, HFImage(decode=False))
        self.transform, self.blank, self.mode = transform, torch.zeros(input_size), mode

    def __len__(self):
        return len(self.dataset)

    def fetch(self, index):
        row = self.dataset[index]
        return image_source(row[self.image_key]), int(row[self.label_key])


def check_labels(labels: list[int], column: str, num_classes: int | None) -> None:
    """Every label indexes one of the model's outputs: a label -1 (``datasets``' unlabeled row: a test
    split) or one past the model's classes (a plain integer column) would count as a miss, or as a skipped
    image, without a word."""
    outside = [v for v in labels if v < 0 or (num_classes is not None and v >= num_classes)]
    if outside:
        values = sorted(set(outside))
        shown = ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")
        within = f"the model's classes 0..{num_classes - 1}" if num_classes is not None else "labels >= 0"
        hint = "; -1 marks an unlabeled row (a test split?): give a labeled --split" if -1 in values else ""
        raise ValueError(f"the dataset's {column!r} column has {len(outside)} label(s) outside {within} "
                         f"({shown}){hint}")


def image_source(raw):
    """What ``decode_image`` opens for a value of a ``datasets`` image column read with ``decode=False``
    ({"bytes", "path"}), a path string, or an already decoded PIL image."""
    if isinstance(raw, dict):
        return raw["path"] if raw.get("bytes") is None else io.BytesIO(raw["bytes"])
    return raw


def looks_like_path(text: str) -> bool:
    """A local path rather than a hub name (``org/name``): it must exist here, never be looked up online."""
    first = text.split("/", 1)[0]
    return (text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1 or text.endswith("/")
            or ("/" in text and Path(first).is_dir()))


def is_saved_dataset(path: Path) -> bool:
    """A folder ``datasets.load_from_disk`` reads, by its own rule: a ``Dataset``'s dataset_info.json and
    state.json, or a ``DatasetDict``'s dataset_dict.json. (One of the first two alone, say a state.json some tool
    left in an image folder, does not make one.)"""
    return all((path / name).is_file() for name in ("dataset_info.json", "state.json")) or \
        (path / "dataset_dict.json").is_file()


def pick_split(data, split: str, path) -> tuple:
    """``data[split]`` of a ``DatasetDict`` (a ``--split`` it lacks is an error naming those it has), or a
    ``Dataset``, which is one split whatever ``split`` says; and the split's name for a description."""
    import datasets

    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"--split {split}: {path} has the splits {', '.join(data) or '(none)'}")
        return data[split], split
    return data, "its one saved split" + (f", {data.split}" if data.split else "") + "; --split does not apply"


def load_saved_dataset(path: Path, split: str) -> tuple:
    """The ``split`` of a folder saved with ``save_to_disk`` (``is_saved_dataset``), see ``pick_split``."""
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as e:  # a split's folder missing, bad JSON, no "splits" in the dict
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        raise ValueError(f"--data {path}: a folder saved with datasets' save_to_disk that does not load ({reason}); "
                         "expected what save_to_disk writes: dataset_info.json, state.json and the data of a "
                         "Dataset, or a DatasetDict's dataset_dict.json listing its split folders") from e
    return pick_split(data, split, path)


def build_dataset(spec: str, transform, input_size, split: str = "validation", num_classes: int | None = None,
                  class_map=None, label_column: str | None = None, image_column: str | None = None
                  ) -> tuple[Dataset, str]:
    """``spec``: ``fashion-mnist`` (embedded), an image folder, a saved HF dataset folder, or a HF name;
    ``label_column`` and ``image_column`` name a ``datasets`` split's columns (its label and first image column
    otherwise)."""
    mode = mode_for(input_size[0])
    path = Path(spec).expanduser()
    is_folder = path.is_dir() and spec not in EMBEDDED_SPECS
    is_hf_folder = is_folder and is_saved_dataset(path)
    if class_map is not None and (not is_folder or is_hf_folder):
        raise ValueError("--class-map applies to an image-folder --data only")
    flags = {"--label-column": label_column, "--image-column": image_column}
    chosen = [flag for flag, name in flags.items() if name is not None]
    if chosen and (spec in EMBEDDED_SPECS or (is_folder and not is_hf_folder)):
        raise ValueError(f"{chosen[0]} applies to a datasets --data only (a datasets name or a saved dataset folder)")
    columns = dict(label_column=label_column, image_column=image_column)
    if spec in EMBEDDED_SPECS:
        if num_classes is not None and num_classes < 10:
            raise ValueError(f"the embedded Fashion-MNIST has 10 classes but the model has {num_classes}")
        task, part = EMBEDDED_SPECS[spec]
        dataset = EmbeddedFashionMNIST(transform, input_size, mode, task, part)
        what = "2x2 mosaics of the " if task == "mosaic" else ""
        where = "test split" if part == "test" else "validation split (the last 5,000 train images)"
        return dataset, f"embedded {what}Fashion-MNIST {where} ({len(dataset):,})"
    if is_hf_folder:
        data, which = load_saved_dataset(path, split)
        return HFImages(data, transform, input_size, mode, num_classes, **columns), f"HF dataset at {path} ({which})"
    if is_folder:
        return ImageFolder(path, transform, input_size, mode, num_classes, class_map), f"image folder {path}"
    if path.exists():
        raise ValueError(f"--data {spec}: a file; expected a folder, {EMBEDDED!r} or a datasets name")
    if looks_like_path(spec):
        raise ValueError(f"--data {spec}: no such folder")
    import datasets

    try:
        data = datasets.load_dataset(spec, split=split)
    except (OSError, ValueError) as e:  # DatasetNotFoundError is a FileNotFoundError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--data {spec}: not a local folder, and no datasets name that loads ({first})") from e
    return HFImages(data, transform, input_size, mode, num_classes, **columns), f"HF dataset {spec} ({split})"
