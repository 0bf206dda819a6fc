"""The testbed family: each model builds as declared, the mosaic task is what it says, the splits are
disjoint and fixed, and the eval CLI picks each testbed's own data."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenprune.eval.data import EMBEDDED_SPECS, build_dataset, embedded_spec_for

from tokenprune import testbed as tb


@pytest.mark.parametrize("name", sorted(tb.TESTBEDS))
def test_each_testbed_builds_as_declared(name):
    spec = tb.TESTBEDS[name]
    model = timm.create_model(name)
    assert model.patch_embed.num_patches == 196  # every testbed prunes from 196 patch tokens
    assert model.num_prefix_tokens == (1 if spec.args["class_token"] else 0)
    assert model.global_pool == spec.args["global_pool"]
    assert isinstance(model.patch_embed, tb.ConvStemPatchEmbed) == spec.conv_stem
    assert model.pretrained_cfg["input_size"] == spec.input_size
    assert spec.weights_path.name == f"{name}.safetensors"
    out = model(torch.zeros(2, *spec.input_size))
    assert out.shape == (2, 10)


def test_missing_weights_name_the_training_command(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="--model vit_testbed_mosaic"):
        timm.create_model("vit_testbed_mosaic", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "none.safetensors")))


def _reference_mosaic(images, targets, others, where):
    """One mosaic built pixel by pixel: target at cell `where`, framed; the others in order."""
    canvas = torch.zeros(56, 56, dtype=torch.uint8)
    rest = iter(others)
    for cell in range(4):
        tile = images[targets] if cell == where else images[next(rest)]
        tile = tile.clone()
        if cell == where:
            f = tb.MOSAIC_FRAME
            tile[:f], tile[-f:], tile[:, :f], tile[:, -f:] = 255, 255, 255, 255
        r, c = divmod(cell, 2)
        canvas[28 * r:28 * r + 28, 28 * c:28 * c + 28] = tile
    return canvas


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 6))
def test_mosaics_match_a_pixel_by_pixel_reference(seed, n):
    images = torch.randint(0, 200, (40, 28, 28), dtype=torch.uint8)  # below 255: the frame is visible
    labels = torch.arange(40) % 10
    targets = torch.randint(0, 40, (n,))
    pool = torch.arange(10, 30)
    mosaics, y = tb.make_mosaics(images, labels, targets, torch.Generator().manual_seed(seed), pool=pool)
    # replay the generator: the same draws, in the same order
    gen = torch.Generator().manual_seed(seed)
    others = pool[torch.randint(0, pool.numel(), (n, 3), generator=gen)]
    where = torch.randint(0, 4, (n,), generator=gen)
    assert torch.equal(y, labels[targets])
    for i in range(n):
        assert torch.equal(mosaics[i], _reference_mosaic(images, targets[i], others[i], where[i]))


def test_mosaic_flip_mirrors_garments_not_the_frame():
    images = torch.arange(28 * 28, dtype=torch.uint8).view(1, 28, 28).repeat(5, 1, 1) % 200
    plain, _ = tb.make_mosaics(images, torch.zeros(5, dtype=torch.long), torch.arange(5),
                               torch.Generator().manual_seed(3))
    flipped, _ = tb.make_mosaics(images, torch.zeros(5, dtype=torch.long), torch.arange(5),
                                 torch.Generator().manual_seed(3), flip=True)
    assert not torch.equal(plain, flipped)
    tiles = flipped.view(5, 2, 28, 2, 28).permute(0, 1, 3, 2, 4).reshape(5, 4, 28, 28)
    original = images[0]
    for tile in tiles.reshape(-1, 28, 28):
        inner = tile[2:-2, 2:-2]
        assert torch.equal(inner, original[2:-2, 2:-2]) or torch.equal(inner, original.flip(-1)[2:-2, 2:-2])
    assert ((tiles[..., :2, :] == 255).all(dim=(-1, -2))).sum() == 5  # one framed garment per mosaic


def test_splits_are_fixed_and_disjoint(fmnist_train_root):
    train_x, _ = tb.load_fashion_mnist("train", fmnist_train_root)
    tr, _ = tb.testbed_split("fmnist", "train", fmnist_train_root)
    va, vy = tb.testbed_split("fmnist", "val", fmnist_train_root)
    assert len(tr) == len(train_x) - tb.VAL_SIZE and len(va) == tb.VAL_SIZE
    assert torch.equal(torch.cat([tr, va]), train_x)
    m1, y1 = tb.testbed_split("mosaic", "val", fmnist_train_root)
    m2, y2 = tb.testbed_split("mosaic", "val", fmnist_train_root)
    assert torch.equal(m1, m2) and torch.equal(y1, vy)  # fixed composition; each val garment the target once
    # every garment of a validation mosaic comes from the validation split
    tiles = m1[:50].view(50, 2, 28, 2, 28).permute(0, 1, 3, 2, 4).reshape(-1, 28, 28)
    inner = tiles[:, 2:-2, 2:-2].reshape(len(tiles), -1)
    val_inner = va[:, 2:-2, 2:-2].reshape(len(va), -1)
    assert all((val_inner == t).all(-1).any() for t in inner)


def test_testbed_split_rejects_unknown_names():
    with pytest.raises(ValueError, match="task must be"):
        tb.testbed_split("cifar", "test")
    with pytest.raises(ValueError, match="split must be"):
        tb.testbed_split("fmnist", "validation")


def test_embedded_data_names():
    assert embedded_spec_for("mosaic") == "fashion-mnist-mosaic"
    assert embedded_spec_for("fmnist", "val") == "fashion-mnist:val"
    assert EMBEDDED_SPECS["fashion-mnist"] == ("fmnist", "test")
    data, desc = build_dataset("fashion-mnist-mosaic", lambda im: torch.zeros(1, 56, 56), (1, 56, 56))
    assert len(data) == 10_000 and "mosaics" in desc and "test split" in desc
    image, label = data.fetch(3)
    assert image.size == (56, 56) and label == int(tb.load_fashion_mnist("test")[1][3])


def test_eval_defaults_to_each_testbeds_task_and_refuses_another(tmp_path, capsys):
    from tokenprune.eval.evaluate import main as evaluate

    rows = evaluate(["--model", "vit_testbed_mosaic", "--no-pretrained", "--limit", "3", "--method", "random",
                     "--output", str(tmp_path / "r.jsonl")])
    assert "mosaics" in rows[0]["data"] and rows[0]["images"] == 3
    with pytest.raises(ValueError, match="trained on fashion-mnist-mosaic"):
        evaluate(["--model", "vit_testbed_mosaic", "--no-pretrained", "--data", "fashion-mnist",
                  "--output", str(tmp_path / "s.jsonl")])
    with pytest.raises(ValueError, match="trained on fashion-mnist "):
        evaluate(["--model", "vit_testbed_fmnist_gap", "--no-pretrained", "--data", "fashion-mnist-mosaic",
                  "--output", str(tmp_path / "s.jsonl")])


def test_validation_data_comes_from_the_train_split(fmnist_train_root, monkeypatch):
    monkeypatch.setenv(tb.FMNIST_ROOT_ENV, str(fmnist_train_root))
    monkeypatch.setattr(tb, "DATA_DIR", fmnist_train_root)  # as if the package held no test split either
    data, desc = build_dataset("fashion-mnist:val", lambda im: torch.zeros(1, 28, 28), (1, 28, 28))
    assert len(data) == tb.VAL_SIZE and "validation split" in desc
    images, _ = tb.load_fashion_mnist("train", fmnist_train_root)
    assert torch.equal(data.images, images[-tb.VAL_SIZE:])


#: top-1 floors on the first 500 test images, a few points under what each testbed scores (docs/testbeds.md)
PACKAGED_FLOORS = {"vit_testbed_fmnist": 0.85, "vit_testbed_fmnist_plain": 0.78, "vit_testbed_mosaic": 0.72,
                   "vit_testbed_fmnist_gap": 0.82}


@pytest.mark.parametrize("name", sorted(PACKAGED_FLOORS))
def test_packaged_testbeds_load_offline_and_classify(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = tb.TESTBEDS[name]
    model = timm.create_model(name, pretrained=True).eval()
    images, labels = tb.testbed_split(spec.task, "test")
    with torch.inference_mode():
        top1 = (model(tb.normalize_images(images[:500])).argmax(-1) == labels[:500]).float().mean().item()
    assert top1 > PACKAGED_FLOORS[name]


def test_packaged_weights_fit_the_budget():
    sizes = [t.weights_path.stat().st_size for t in tb.TESTBEDS.values() if t.weights_path.is_file()]
    assert set(PACKAGED_FLOORS) <= {n for n, t in tb.TESTBEDS.items() if t.weights_path.is_file()}
    assert sum(sizes) <= 40 * 2**20


@pytest.mark.parametrize("name", ["vit_testbed_mosaic", "vit_testbed_fmnist_gap"])
def test_training_script_trains_exports_and_records(name, tmp_path, monkeypatch):
    import json

    import numpy as np
    from conftest import write_idx
    from safetensors.torch import load_file
    from tokenprune.eval import train_testbed

    rng = np.random.default_rng(1)  # a tiny data set: 240 training images (the last 40 held out), 30 test
    for split, n in (("train", 240), ("t10k", 30)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 200, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    monkeypatch.setattr(tb, "VAL_SIZE", 40)
    out = tmp_path / f"{name}.safetensors"
    train_testbed.main(["--model", name, "--data-root", str(tmp_path), "--epochs", "1", "--batch-size", "100",
                        "--warmup-steps", "1", "--out", str(out), "--ckpt-dir", str(tmp_path / "ck"),
                        "--eval-batch-size", "50", "--no-adaptive-threads", "--threads", "1"])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model"] == name and meta["task"] == tb.TESTBEDS[name].task and meta["complete"]
    assert "train 200 / validation 40" in meta["data"] and "test 30" in meta["data"]
    assert meta["steps_by_thread_count"] == {"1": 2} and 0 <= meta["val_top1"] <= 100
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(load_file(str(out)))  # the export is exactly this model's layout
    assert (tmp_path / "ck" / "last.pt").is_file()


def test_the_conv_stem_answers_timm_s_patch_embed_questions():
    """What timm asks of a patch embedding (feature ratio, dynamic sizes, a wrong input size), on the stem."""
    model = timm.create_model("vit_testbed_fmnist_gap")
    stem = model.patch_embed
    assert stem.feat_ratio() == 2 and tuple(stem.feat_ratio(as_scalar=False)) == (2, 2)
    assert stem.dynamic_feat_size((29, 27)) == (15, 14)  # ceil: padding-1 stride-2 convolutions
    with pytest.raises(ValueError, match=r"Input size \(32x28\) does not match model \(28x28\)"):
        stem(torch.zeros(1, 1, 32, 28))
    assert stem(torch.zeros(1, 1, 28, 28)).shape == (1, 196, 96)
    stem.strict_img_size = False
    assert stem(torch.zeros(1, 1, 32, 28)).shape == (1, 16 * 14, 96)


@pytest.mark.parametrize("name", sorted(PACKAGED_FLOORS))
def test_the_registered_architecture_is_the_one_the_weights_were_trained_as(name):
    """The training record beside each weights file names the architecture it trained; the registered model
    must be that one (a head count changed keeps every weight shape, and the weights still load)."""
    spec = tb.TESTBEDS[name]
    record = json.loads(spec.weights_path.with_suffix(".json").read_text())
    assert record["config"] == spec.args
    model = timm.create_model(name)
    assert model.blocks[0].attn.num_heads == record["config"]["num_heads"]
    assert len(model.blocks) == record["config"]["depth"]
