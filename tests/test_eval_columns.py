"""`tokenprune eval --label-column / --image-column`: which columns of a `datasets` split are scored and read, what
is refused (one line, exit 2), and that another column is another run for `--resume`."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_eval_inputs import never_evaluated, one_line_error
from tokenprune.eval.data import build_dataset
from tokenprune.eval.evaluate import data_settings
from tokenprune.eval.evaluate import main as evaluate

datasets = pytest.importorskip("datasets")

# a black image is class 0 to a model that only sees brightness; the second image column is white
DARK, LIGHT = (np.zeros((28, 28), dtype=np.uint8), np.full((28, 28), 255, dtype=np.uint8))


def save(path, columns: dict, features: dict):
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(str(path))
    return str(path)


@pytest.fixture
def coarse_and_fine(tmp_path):
    """CIFAR-100's layout: two class-label columns, neither named label, and a second image column."""
    images = [Image.fromarray(DARK)] * 3
    return save(tmp_path / "hf", {"img": images, "mask": [Image.fromarray(LIGHT)] * 3, "fine_label": [7, 3, 9],
                                  "coarse_label": [1, 0, 1], "caption": ["a", "b", "c"], "score": [0.5, 1.0, 2.0]},
                {"img": datasets.Image(), "mask": datasets.Image(), "fine_label": datasets.ClassLabel(num_classes=10),
                 "coarse_label": datasets.ClassLabel(names=["x", "y"]), "caption": datasets.Value("string"),
                 "score": datasets.Value("float32")})


def labels_and_pixels(dataset):
    return [int(dataset[i][1]) for i in range(len(dataset))], [float(dataset[i][0].mean()) for i in range(len(dataset))]


def test_the_default_columns_and_the_chosen_ones(coarse_and_fine):
    def load(**columns):
        return build_dataset(coarse_and_fine, lambda image: np.asarray(image, dtype=np.float32), (1, 28, 28),
                             num_classes=10, **columns)[0]

    default = load()
    assert labels_and_pixels(default) == ([7, 3, 9], [0.0] * 3)  # the first class-label column, the first image
    assert "--label-column picks another" in default.class_note
    assert data_settings(default)["label_column"] == "fine_label" and data_settings(default)["image_column"] == "img"
    chosen = load(label_column="coarse_label", image_column="mask")
    assert labels_and_pixels(chosen) == ([1, 0, 1], [255.0] * 3)
    assert chosen.other_label_columns == ["fine_label"] and "'coarse_label' column" in chosen.class_note
    assert data_settings(chosen)["label_column"] == "coarse_label" and data_settings(chosen)["image_column"] == "mask"


def test_an_integer_column_other_than_the_default_keys_another_run(tmp_path):
    """Without other class-label columns the key names no column; a chosen integer column is still another run."""
    path = save(tmp_path / "hf", {"image": [Image.fromarray(DARK)] * 2, "label": [1, 2], "target": [3, 4]},
                {"image": datasets.Image(), "label": datasets.Value("int64"), "target": datasets.Value("int64")})
    default, _ = build_dataset(path, lambda image: image, (1, 28, 28), num_classes=10)
    assert "label_column" not in data_settings(default) and "image_column" not in data_settings(default)
    target, _ = build_dataset(path, lambda image: image, (1, 28, 28), num_classes=10, label_column="target")
    assert [target[i][1] for i in range(2)] == [3, 4] and target.other_label_columns == []
    assert data_settings(target)["label_column"] == "target"
    same, _ = build_dataset(path, lambda image: image, (1, 28, 28), num_classes=10, label_column="label")
    assert data_settings(same) == data_settings(default)  # the default named: the same run


@pytest.mark.parametrize("flags, fragments", [
    (["--label-column", "nope"], ["--label-column nope: the dataset's columns are img, mask, fine_label"]),
    (["--image-column", "nope"], ["--image-column nope: the dataset's columns are"]),
    (["--label-column", "caption"], ["--label-column caption: not a class-label or integer column",
                                     "the class-label columns are fine_label, coarse_label"]),
    (["--label-column", "score"], ["--label-column score: not a class-label or integer column"]),
    (["--image-column", "fine_label"], ["--image-column fine_label: not an image column", "are img, mask"]),
    (["--label-column", "coarse_label", "--limit", "2"], []),  # accepted (reaches the evaluation)
])
def test_bad_columns_are_one_line_errors(coarse_and_fine, tmp_path, capsys, monkeypatch, flags, fragments):
    never_evaluated(monkeypatch)
    argv = ["eval", "--no-pretrained", "--data", coarse_and_fine, "--method", "tome", "--output",
            str(tmp_path / "r.jsonl"), *flags]
    if fragments:
        one_line_error(argv, capsys, *fragments)
    else:
        with pytest.raises(AssertionError, match="evaluation started"):
            evaluate(argv[1:])


def test_a_default_label_column_that_holds_no_class_indices_is_refused(tmp_path):
    path = save(tmp_path / "hf", {"image": [Image.fromarray(DARK)] * 2, "label": ["cat", "dog"]},
                {"image": datasets.Image(), "label": datasets.Value("string")})
    with pytest.raises(ValueError, match=r"the dataset's 'label' column \(pass --label-column\): not a class-label"):
        build_dataset(path, lambda image: image, (1, 28, 28), num_classes=10)


@pytest.mark.parametrize("data", ["fashion-mnist", "folder"])
def test_the_column_flags_apply_to_datasets_only(data, tmp_path, capsys, monkeypatch):
    from test_eval_cli import make_folder

    never_evaluated(monkeypatch)
    spec = str(make_folder(tmp_path / "val", corrupt=False)) if data == "folder" else data
    one_line_error(["eval", "--no-pretrained", "--data", spec, "--label-column", "label", "--output",
                    str(tmp_path / "r.jsonl")], capsys, "--label-column applies to a datasets --data only")
    one_line_error(["eval", "--no-pretrained", "--data", spec, "--image-column", "image", "--output",
                    str(tmp_path / "r.jsonl")], capsys, "--image-column applies to a datasets --data only")
    one_line_error(["eval", "--no-pretrained", "--data", spec, "--image-column", "image", "--label-column", "label",
                    "--output", str(tmp_path / "r.jsonl")], capsys, "--label-column applies to a datasets --data only")


def test_eval_scores_the_chosen_column_and_resumes_per_column(coarse_and_fine, tmp_path):
    """End to end: the coarse column's rows are keyed apart from the fine column's, so a resume with the other
    column evaluates again instead of reusing the other column's top-1."""
    out = tmp_path / "r.jsonl"
    common = ["--no-pretrained", "--data", coarse_and_fine, "--method", "tome", "--keep", "0.5", "--output", str(out)]
    fine = evaluate(common)
    coarse = evaluate(common + ["--label-column", "coarse_label", "--resume"])
    assert len(fine) == len(coarse) == 2  # the baseline and tome, each evaluated again
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()]
    assert len(set(keys)) == 4
    again = evaluate(common + ["--label-column", "coarse_label", "--resume"])
    assert [r["top1"] for r in again] == [r["top1"] for r in coarse]
    assert len(out.read_text().splitlines()) == 4  # nothing evaluated twice
