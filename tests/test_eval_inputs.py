"""What `tokenprune eval` (and `bench`, `flops`) do with the data, models, paths and numbers users give them:
class folders and --class-map, which images count and how they are converted, skips by reason, early output
checks, one-line errors (exit 2, no traceback), torn result files, no machine paths in the package."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_idx
from PIL import Image
from test_eval_cli import CLASSES, COMMON, make_folder
from tokenprune.eval import evaluate as evaluate_module
from tokenprune.eval import vlm as vlm_module
from tokenprune.eval.data import build_dataset
from tokenprune.eval.evaluate import main as evaluate

from tokenprune.cli import main as cli

RGB_MODEL = "test_vit"  # timm's 371k-parameter test ViT: RGB, 160 px, 1000 classes


def run_cli(argv, capsys):
    try:
        code = cli(argv)
    except SystemExit as e:  # argparse's own exit, as the old CLI did
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(argv, capsys, *fragments) -> str:
    """The command exits 2 with exactly one stderr line, no traceback, holding every fragment."""
    code, _, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def never_evaluated(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("evaluation started although the input was bad")

    monkeypatch.setattr(evaluate_module, "evaluate_config", fail)
    monkeypatch.setattr(vlm_module, "evaluate_vlm_config", fail)  # eval-vlm shares the output arguments


def tensor(image):
    return torch.from_numpy(np.asarray(image).copy())


def grey(value, size=28):
    return Image.fromarray(np.full((size, size), value, dtype=np.uint8))


# --- item 3: class folders ------------------------------------------------------------------------------------------

def test_hidden_folder_is_ignored_and_synset_folders_keep_imagenet_indices(tmp_path):
    # brambling (10) and toilet tissue (999): not 0 and 1, as sorted numbering would give them
    for synset in ("n01530575", "n15075141"):
        (tmp_path / synset).mkdir()
        grey(100).save(tmp_path / synset / "a.png")
    (tmp_path / ".ipynb_checkpoints").mkdir()  # empty, hidden
    dataset, _ = build_dataset(str(tmp_path), tensor, (3, 28, 28))
    assert [dataset[i][1] for i in range(len(dataset))] == [10, 999]


def test_synset_and_other_folders_mixed_is_an_error_naming_the_odd_ones(tmp_path, capsys, monkeypatch):
    never_evaluated(monkeypatch)
    for name in ("n01530575", "n15075141", "extra", "backup"):
        (tmp_path / name).mkdir()
        grey(100).save(tmp_path / name / "a.png")
    one_line_error(["eval", "--model", RGB_MODEL, "--no-pretrained", "--data", str(tmp_path),
                    "--output", str(tmp_path / "r.jsonl")], capsys, "mixes synset", "backup, extra", "--class-map")


def test_other_folder_names_print_their_class_indices(tmp_path, capsys):
    data = make_folder(tmp_path / "val", corrupt=False)
    evaluate(COMMON + ["--data", str(data), "--output", str(tmp_path / "r.jsonl")])
    assert "0=bag 1=boot 2=coat" in capsys.readouterr().out


def test_class_map_gives_the_indices(tmp_path, capsys):
    data = make_folder(tmp_path / "val", corrupt=False)
    class_map = tmp_path / "classes.json"
    class_map.write_text(json.dumps({"bag": 8, "boot": 9, "coat": 4, "not-here": 0}))  # extra entries are fine
    dataset, _ = build_dataset(str(data), tensor, (1, 28, 28), num_classes=10, class_map=str(class_map))
    assert sorted({dataset[i][1] for i in range(len(dataset))}) == [4, 8, 9]
    assert [dataset[i][1] for i in range(3)] == [8, 8, 8]  # bag's images first
    rows = evaluate(COMMON + ["--data", str(data), "--class-map", str(class_map),
                              "--output", str(tmp_path / "r.jsonl")])
    assert rows[0]["images"] == 9
    assert "4=coat 8=bag 9=boot" in capsys.readouterr().out


@pytest.mark.parametrize("text, fragments", [
    ('{"bag": 0, "boot": 1}', ["no index for class folder(s) coat"]),
    ('{"bag": 0, "boot": 1, "coat": 2, "bag": 3}', ["listed twice: bag"]),
    ('{"bag": 0, "boot": 1, "coat": 1}', ["index used twice", "boot: 1", "coat: 1"]),
    ('{"bag": 0, "boot": 1, "coat": 10}', ["integers in 0..9 (the model has 10 classes)", "coat: 10"]),
    ('{"bag": 0, "boot": 1, "coat": "2"}', ["coat: '2'"]),
    ('bag 0\nboot 1', ["not JSON"]),
])
def test_bad_class_map_is_one_line(tmp_path, capsys, monkeypatch, text, fragments):
    never_evaluated(monkeypatch)
    data = make_folder(tmp_path / "val", corrupt=False)
    (tmp_path / "classes.json").write_text(text)
    one_line_error(["eval", *COMMON, "--data", str(data), "--class-map", str(tmp_path / "classes.json"),
                    "--output", str(tmp_path / "r.jsonl")], capsys, "--class-map", *fragments)


# --- item 5: only decode errors are skipped, by reason; channels are converted ------------------------------------

def test_rgb_model_on_the_grey_embedded_data_reads_every_image(tmp_path):
    rows = evaluate(["--model", RGB_MODEL, "--no-pretrained", "--limit", "4", "--batch-size", "2",
                     "--method", "tome", "--keep", "0.5", "--output", str(tmp_path / "r.jsonl")])
    assert [(r["images"], r["skipped"]) for r in rows] == [(4, 0), (4, 0)]


def test_grey_to_rgb_replicates_and_rgb_to_grey_is_luma(tmp_path):
    (tmp_path / "a").mkdir()
    grey(77).save(tmp_path / "a" / "grey.png")
    Image.new("RGB", (28, 28), (200, 100, 50)).save(tmp_path / "a" / "rgb.png")
    rgb, _ = build_dataset(str(tmp_path), tensor, (3, 28, 28))
    assert rgb[0][0].shape == (28, 28, 3) and (rgb[0][0] == 77).all()
    luma, _ = build_dataset(str(tmp_path), tensor, (1, 28, 28))
    assert (luma[1][0] == round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)).all()
    with pytest.raises(ValueError, match="takes 2 input channels.*1-channel .grey. or 3-channel .RGB."):
        build_dataset(str(tmp_path), tensor, (2, 28, 28))


def test_skipped_images_are_counted_by_reason(tmp_path, capsys):
    data = make_folder(tmp_path / "val")  # bag/broken.png: not an image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, "PNG")
    (data / "boot" / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    rows = evaluate(COMMON + ["--data", str(data), "--output", str(tmp_path / "r.jsonl")])
    assert rows[0]["images"] == 9 and rows[0]["skipped"] == 2
    assert rows[0]["skip_reasons"] == {"not an image PIL recognises": 1, "truncated": 1}
    assert "skipped 2 unreadable image(s): 1 not an image PIL recognises, 1 truncated" in capsys.readouterr().out


def test_an_error_that_is_not_decoding_stops_the_run(tmp_path):
    data = make_folder(tmp_path / "val", corrupt=False)

    def broken_transform(image):
        raise KeyError("a bug in the transform")

    dataset, _ = build_dataset(str(data), broken_transform, (1, 28, 28))
    with pytest.raises(KeyError, match="a bug in the transform"):
        dataset[0]


# --- item 6: --limit, 16-bit images, every format PIL reads -------------------------------------------------------

def test_limit_zero_is_refused(tmp_path, capsys, monkeypatch):
    never_evaluated(monkeypatch)
    one_line_error(["eval", "--no-pretrained", "--limit", "0", "--output", str(tmp_path / "r.jsonl")], capsys,
                   "--limit", "must be an integer >= 1, got '0'")


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    (tmp_path / "a").mkdir()
    values = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 83  # up to 65,000
    Image.fromarray(values).save(tmp_path / "a" / "0-deep.png")
    assert Image.open(tmp_path / "a" / "0-deep.png").mode in ("I;16", "I")
    Image.fromarray(np.rint(values / 257).astype(np.uint8)).save(tmp_path / "a" / "1-shallow.png")
    for channels in (1, 3):
        dataset, _ = build_dataset(str(tmp_path), tensor, (channels, 28, 28))
        assert torch.equal(dataset[0][0], dataset[1][0])


def test_every_format_pil_reads_is_an_image_and_other_files_are_reported(tmp_path, capsys):
    rng = np.random.default_rng(2)
    data = tmp_path / "val"
    for c in CLASSES:
        (data / c).mkdir(parents=True)
        for ext in ("png", "jpeg", "tif", "bmp", "webp"):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(data / c / f"x.{ext}")
    (data / "bag" / "notes.txt").write_text("not an image")
    (data / "bag" / ".DS_Store").write_bytes(b"\0")
    rows = evaluate(COMMON + ["--data", str(data), "--output", str(tmp_path / "out" / "r.jsonl")])
    assert rows[0]["images"] == 15 and rows[0]["skipped"] == 0
    assert "ignored 1 file(s) PIL cannot open: .txt (1)" in capsys.readouterr().out


# --- item 7: the output is checked before any evaluation -----------------------------------------------------------

@pytest.mark.parametrize("flag", ["--output", "--plot"])
def test_unwritable_output_is_found_before_evaluating(tmp_path, capsys, monkeypatch, flag):
    never_evaluated(monkeypatch)
    (tmp_path / "a-file").write_text("")
    bad = str(tmp_path / "a-file" / "run.jsonl")
    args = ["--output", bad] if flag == "--output" else ["--output", str(tmp_path / "r.jsonl"), "--plot",
                                                         str(Path(bad).with_suffix(".png"))]
    one_line_error(["eval", "--no-pretrained", *args], capsys, flag, "cannot be written")


# --- item 8: one-line errors -----------------------------------------------------------------------------------------

def test_unknown_timm_model_suggests_close_names(tmp_path, capsys, monkeypatch):
    never_evaluated(monkeypatch)
    line = one_line_error(["eval", "--model", "deit_smal_patch16_224", "--output", str(tmp_path / "r.jsonl")],
                          capsys, "unknown model 'deit_smal_patch16_224'", "deit_small_patch16_224")
    assert len(line) < 400
    one_line_error(["flops", "--model", "deit_smal_patch16_224"], capsys, "close matches", "deit_small_patch16_224")


@pytest.mark.parametrize("command", ["flops", "bench"])
def test_unknown_transformers_type_suggests_close_types(capsys, command):
    line = one_line_error([command, "--model", "hf:vitt"], capsys, "unknown transformers model type 'vitt'", "vit")
    assert len(line) < 400


def test_a_mistyped_local_path_is_never_sent_to_the_hub(tmp_path, capsys, monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("looked up on the Hub")

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for model in ("./models/tiny-vit", "models/tiny-vit", str(tmp_path / "models" / "tiny-vit")):
        one_line_error(["eval", "--model", model, "--output", "r.jsonl"], capsys, f"--model {model}: no such folder")
    one_line_error(["eval", "--data", "models/val", "--output", "r.jsonl"], capsys, "--data models/val: no such folder")


def test_bench_batch_size_zero_and_bad_input_size(capsys):
    one_line_error(["bench", "--model", RGB_MODEL, "--batch-sizes", "0"], capsys,
                   "--batch-sizes", "must be an integer >= 1")
    from tokenprune.eval.benchmark import benchmark

    with pytest.raises(ValueError, match="batch_sizes must be integers >= 1"):
        benchmark(RGB_MODEL, batch_sizes=(0,))
    one_line_error(["flops", "--model", RGB_MODEL, "--input-size", "3", "0", "160"], capsys,
                   "--input-size", "must be an integer >= 1")
    for size in (["1", "160", "160"], ["3", "170", "170"]):
        one_line_error(["flops", "--model", RGB_MODEL, "--input-size", *size], capsys,
                       f"--input-size {' '.join(size)} does not fit test_vit", "native input is C H W = 3 160 160")


def test_class_folders_without_images_are_named(tmp_path, capsys, monkeypatch):
    never_evaluated(monkeypatch)
    data = make_folder(tmp_path / "val", corrupt=False)
    (data / "dress").mkdir()
    (data / "scarf").mkdir()
    (data / "scarf" / "readme.txt").write_text("")
    one_line_error(["eval", *COMMON, "--data", str(data), "--output", str(tmp_path / "r.jsonl")], capsys,
                   "class folder(s) with no images: dress, scarf", ".png")


def test_missing_or_corrupt_checkpoint(tmp_path, capsys, monkeypatch):
    import timm

    never_evaluated(monkeypatch)
    common = ["eval", "--model", RGB_MODEL, "--output", str(tmp_path / "r.jsonl"), "--checkpoint"]
    one_line_error(common + [str(tmp_path / "nope.pt")], capsys, "nope.pt: no such file")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file" * 10)
    one_line_error(common + [str(tmp_path / "junk.pt")], capsys, "junk.pt: not a readable weights file")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{junk}")
    one_line_error(common + [str(tmp_path / "junk.safetensors")], capsys, "not a readable weights file")
    state = timm.create_model(RGB_MODEL, num_classes=10).state_dict()
    torch.save(state, tmp_path / "ten.pt")
    one_line_error(common + [str(tmp_path / "ten.pt")], capsys, "does not fit test_vit",
                   "head.weight (10, 64) vs (1000, 64)")
    del state["norm.weight"], state["norm.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "partial.pt")
    one_line_error(common + [str(tmp_path / "partial.pt")], capsys, "2 missing key(s) (norm.weight, norm.bias)",
                   "1 unexpected key(s) (extra.weight)")


def test_hiprune_on_an_image_classifier_is_refused_before_the_baseline(tmp_path, capsys, monkeypatch):
    never_evaluated(monkeypatch)
    one_line_error(["eval", "--no-pretrained", "--method", "hiprune", "--output", str(tmp_path / "r.jsonl")], capsys,
                   "--method hiprune", "an image classifier takes: ", "tome")


# --- item 9: --resume repairs a torn file ---------------------------------------------------------------------------

def test_resume_truncates_a_torn_last_line(tmp_path, capsys):
    import csv

    data = make_folder(tmp_path / "val", corrupt=False)
    out = tmp_path / "run.jsonl"
    args = COMMON + ["--data", str(data), "--output", str(out)]
    first = evaluate(args)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])  # killed while writing the third line
    capsys.readouterr()
    second = evaluate(args + ["--resume"])
    assert f"[repair] removed the torn last line of {out} (line 3, 30 bytes)" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # every line is JSON again
    assert [(r["method"], r["keep"]) for r in rows] == [(r["method"], r["keep"]) for r in first]
    assert [r["top1"] for r in second] == [r["top1"] for r in first]
    with open(out.with_suffix(".csv")) as f:
        table = list(csv.DictReader(f))
    assert [(r["method"], float(r["top1"])) for r in table] == [(r["method"] or "baseline", r["top1"]) for r in rows]


#: a row of each command, as little of one as --resume takes for a row
ROWS = {"eval": dict(key="{}", method=None, keep=None, options={}, top1=50.0, top5=90.0, images=4),
        "eval-vlm": dict(key="{}", method=None, keep=None, options={}, metric="exact", accuracy=50.0, questions=2)}


def resume_file_cases():
    """(command, file content, the line and the reason the refusal names) for files --resume must not repair."""
    for command, other in (("eval", "eval-vlm"), ("eval-vlm", "eval")):
        own, theirs = json.dumps(ROWS[command]), json.dumps(ROWS[other])
        yield command, "notes, not results\nsecond line\n", "line 1", "(not a JSON object)"
        yield command, f"{own}\n{theirs}\n", "line 2", f"(a tokenprune {other} row)"
        yield command, f"{own}\n{own[:20]}\n{own}\n", "line 2", "(not a JSON object)"  # torn, yet not the last
        yield command, f"{own}\nhello", "line 2", "(not a JSON object)"  # last, but no row's beginning
        yield command, f'{own}\n{{"key": "k"}}\n', "line 2", "(no method, keep, options"


@pytest.mark.parametrize("command, content, line, reason", list(resume_file_cases()))
def test_resume_refuses_a_file_that_is_not_its_results_and_leaves_it_as_it_is(tmp_path, capsys, monkeypatch,
                                                                               command, content, line, reason):
    """Only the last line can be torn by an interruption: any other line that is not a row of this command (another
    file, the other eval command's results) is one line, exit 2, before any evaluation, and the file is untouched."""
    never_evaluated(monkeypatch)
    out = tmp_path / "r.jsonl"
    out.write_text(content)
    one_line_error([command, "--limit", "2", "--output", str(out), "--resume"], capsys,
                   f"{out}, {line}: not a tokenprune {command} results row {reason}", "--overwrite")
    assert out.read_text() == content


@pytest.mark.parametrize("plot, removed", [([], "r.png"), (["--plot", "p.svg"], "p.svg")])
def test_overwrite_removes_the_old_csv_and_plot_with_the_results(tmp_path, monkeypatch, plot, removed):
    """An interrupted --overwrite leaves no CSV or plot of the earlier run beside results that are not its."""
    monkeypatch.chdir(tmp_path)
    files = [tmp_path / name for name in ("r.jsonl", "r.csv", removed)]
    for path in files:
        path.write_text("an earlier run's\n")

    def interrupted(*args, **kwargs):  # the first configuration never finishes
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate_module, "evaluate_config", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(["--no-pretrained", "--limit", "2", "--method", "tome", "--output", "r.jsonl", "--overwrite", *plot])
    assert not [path.name for path in files if path.exists()]


# --- item 13: no machine paths; the training data location is an argument or an environment variable -------------

def test_no_absolute_machine_paths_in_the_package():
    root = Path(__file__).resolve().parent.parent
    pattern = re.compile(r"(?<![\w.:/])/(work|home|Users|root|mnt|opt|srv|scratch|data|tmp)/")
    found = [f"{path.relative_to(root)}:{n}" for folder in ("tokenprune", "patches", "eval")
             for path in sorted((root / folder).rglob("*")) if path.suffix in (".py", ".json", ".md", ".sh", ".cfg")
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found


def test_fashion_mnist_train_split_comes_from_the_environment(tmp_path, monkeypatch):
    from tokenprune import testbed

    monkeypatch.delenv("TOKENPRUNE_FMNIST_ROOT", raising=False)
    with pytest.raises(ValueError, match="set TOKENPRUNE_FMNIST_ROOT"):  # bad input: the CLI's one line, exit 2
        testbed.load_fashion_mnist("train")
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([1, 2, 3]))
    monkeypatch.setenv("TOKENPRUNE_FMNIST_ROOT", str(tmp_path))
    images, labels = testbed.load_fashion_mnist("train")
    assert images.shape == (3, 28, 28) and labels.tolist() == [1, 2, 3]
    assert testbed.load_fashion_mnist("test")[0].shape[0] == 10000  # the packaged split still comes first


def test_an_option_only_the_model_can_refuse_fails_before_any_image(tmp_path, capsys, monkeypatch):
    """MCTF's layers past the model's depth are known only once the model is loaded: still one line, exit 2,
    before the baseline (or anything) is evaluated, and no result file."""
    never_evaluated(monkeypatch)
    out = tmp_path / "r.jsonl"
    one_line_error(["eval", "--model", "vit_testbed_fmnist", "--limit", "4", "--method", "mctf", "--keep", "0.5",
                    "--option", "layers=[3,6,12]", "--output", str(out)], capsys, "layers", "12 blocks")
    assert not out.exists()


# --- the output files: three distinct ones, a plot format matplotlib writes, --resume or --overwrite ---------------

@pytest.mark.parametrize("command", ["eval", "eval-vlm"])
@pytest.mark.parametrize("files, fragment", [
    (["--output", "x.csv"], "--output and --output's CSV would be the same file"),
    (["--output", "z.png", "--plot"], "--output and --plot would be the same file"),
    (["--output", "sub/../z.pdf", "--plot", "z.pdf"], "--output and --plot would be the same file"),
])
def test_results_csv_and_plot_are_three_files(tmp_path, capsys, monkeypatch, command, files, fragment):
    """One would overwrite another (and a later --resume would find a CSV or a PNG where its results were)."""
    never_evaluated(monkeypatch)
    monkeypatch.chdir(tmp_path)
    one_line_error([command, "--limit", "2", *files], capsys, fragment, "three different files")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


@pytest.mark.parametrize("command", ["eval", "eval-vlm"])
@pytest.mark.parametrize("name, fragment", [("q.csv", "cannot write .csv"),
                                            ("q", "cannot write a name without an extension")])
def test_a_plot_format_matplotlib_cannot_write_is_refused_before_evaluating(tmp_path, capsys, monkeypatch,
                                                                             command, name, fragment):
    never_evaluated(monkeypatch)
    one_line_error([command, "--limit", "2", "--output", str(tmp_path / "r.jsonl"), "--plot", str(tmp_path / name)],
                   capsys, f"--plot {tmp_path / name}: matplotlib {fragment}", ".png", ".pdf", ".svg")


def test_every_format_matplotlib_writes_is_a_plot_name(tmp_path):
    import argparse

    for name in ("r.pdf", "r.SVG", "r.png"):
        args = argparse.Namespace(data="d", output=str(tmp_path / "r.jsonl"), plot=str(tmp_path / name),
                                  resume=False, overwrite=False)
        assert evaluate_module.output_paths(args, "runs", "m") == (tmp_path / "r.jsonl", tmp_path / name)


@pytest.mark.parametrize("command", ["eval", "eval-vlm"])
def test_resume_and_overwrite_together_are_refused(tmp_path, capsys, monkeypatch, command):
    """--overwrite would delete the results --resume was asked to continue."""
    never_evaluated(monkeypatch)
    out = tmp_path / "r.jsonl"
    out.write_text('{"key": "finished earlier"}\n')
    one_line_error([command, "--limit", "2", "--output", str(out), "--resume", "--overwrite"], capsys,
                   "--overwrite", "not allowed with", "--resume")
    assert out.read_text() == '{"key": "finished earlier"}\n'


# --- the Fashion-MNIST train split (the validation splits' source) missing or broken: one line ---------------------

def broken_train_split(root, how: str):
    """A ``TOKENPRUNE_FMNIST_ROOT`` value for each way the train files can be missing or unreadable."""
    if how == "unset":
        return None
    if how == "no folder":
        return root / "nowhere"
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(6000))
    if how == "truncated":
        write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((6000, 28, 28)))
        whole = (root / "train-images-idx3-ubyte.gz").read_bytes()
        (root / "train-images-idx3-ubyte.gz").write_bytes(whole[:len(whole) // 2])
    return root


@pytest.mark.parametrize("how, fragments", [
    ("unset", ["set TOKENPRUNE_FMNIST_ROOT", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]),
    ("no folder", ["TOKENPRUNE_FMNIST_ROOT=", "nowhere: no such folder", "train-images-idx3-ubyte.gz"]),
    ("labels only", ["TOKENPRUNE_FMNIST_ROOT=", "no train-images-idx3-ubyte.gz there", "train-labels-idx1"]),
    ("truncated", ["train-images-idx3-ubyte.gz: not a readable gzip file", "expected the original Fashion-MNIST"]),
])
def test_missing_or_broken_fashion_mnist_train_files_are_one_line(tmp_path, capsys, monkeypatch, how, fragments):
    never_evaluated(monkeypatch)
    root = broken_train_split(tmp_path, how)
    if root is None:
        monkeypatch.delenv("TOKENPRUNE_FMNIST_ROOT", raising=False)
    else:
        monkeypatch.setenv("TOKENPRUNE_FMNIST_ROOT", str(root))
    one_line_error(["eval", "--data", "fashion-mnist:val", "--output", str(tmp_path / "r.jsonl")], capsys, *fragments)


@pytest.mark.parametrize("argv", [["eval", "--model", "vit_testbed_mosaic", "--data", "fashion-mnist-mosaic:val"],
                                  ["eval-vlm", "--data", "fashion-mnist-vqa:val"]])
def test_every_validation_split_without_the_train_files_is_one_line(tmp_path, capsys, monkeypatch, argv):
    never_evaluated(monkeypatch)
    monkeypatch.delenv("TOKENPRUNE_FMNIST_ROOT", raising=False)
    one_line_error([*argv, "--output", str(tmp_path / "r.jsonl")], capsys, "set TOKENPRUNE_FMNIST_ROOT")


# --- saved datasets folders: the split, what the folder must hold; an image folder with a stray state.json -------

def saved_dataset(path, splits=("validation",)):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    ds = datasets.Dataset.from_dict({"image": [grey(v) for v in (10, 20, 30)], "label": [0, 1, 2]}, features=features)
    if splits is None:
        ds.save_to_disk(str(path))
    else:
        datasets.DatasetDict({s: ds for s in splits}).save_to_disk(str(path))
    return path


def test_a_split_the_saved_folder_lacks_names_those_it_has(tmp_path, capsys, monkeypatch):
    never_evaluated(monkeypatch)
    data = saved_dataset(tmp_path / "hf", ("validation", "test"))
    capsys.readouterr()  # the saving progress
    one_line_error(["eval", "--no-pretrained", "--data", str(data), "--split", "train", "--output",
                    str(tmp_path / "r.jsonl")], capsys, "--split train:", "has the splits validation, test")


@pytest.mark.parametrize("command", ["eval", "eval-vlm"])
@pytest.mark.parametrize("files", [{"dataset_dict.json": "{}"}, {"dataset_dict.json": "not json"},
                                   {"dataset_info.json": "{}", "state.json": "{}"}])
def test_a_saved_dataset_folder_that_does_not_load_is_one_line(tmp_path, capsys, monkeypatch, command, files):
    never_evaluated(monkeypatch)
    data = tmp_path / "hf"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
    one_line_error([command, "--data", str(data), "--output", str(tmp_path / "r.jsonl")], capsys,
                   f"--data {data}: a folder saved with datasets' save_to_disk that does not load",
                   "dataset_dict.json")


def test_an_image_folder_with_a_state_json_is_an_image_folder(tmp_path):
    data = make_folder(tmp_path / "val", corrupt=False)
    (data / "state.json").write_text("{}")  # some tool's, not datasets'
    dataset, what = build_dataset(str(data), tensor, (3, 28, 28))
    assert what == f"image folder {data}" and len(dataset) == 9


def test_a_saved_dataset_of_one_split_says_so_whatever_the_split(tmp_path):
    data = saved_dataset(tmp_path / "hf", None)
    dataset, what = build_dataset(str(data), tensor, (3, 28, 28), split="train")
    assert len(dataset) == 3 and "(its one saved split; --split does not apply)" in what and "train" not in what


@pytest.mark.parametrize("labels, plain, expected", [
    ([0, -1, -1], False, ["2 label(s) outside the model's classes 0..9 (-1)", "unlabeled row", "labeled --split"]),
    ([0, 12, 10], True, ["2 label(s) outside the model's classes 0..9 (10, 12)"]),
])
def test_labels_the_model_cannot_score_are_refused_before_evaluating(tmp_path, capsys, monkeypatch, labels, plain,
                                                                      expected):
    """Scored as they were, a test split's -1 labels counted as skipped images, and a plain integer column's labels
    past the model's classes as misses: both silently."""
    datasets = pytest.importorskip("datasets")
    never_evaluated(monkeypatch)
    label = datasets.Value("int64") if plain else datasets.ClassLabel(names=CLASSES)
    features = datasets.Features({"image": datasets.Image(), "label": label})
    datasets.Dataset.from_dict({"image": [grey(v) for v in (10, 20, 30)], "label": labels},
                               features=features).save_to_disk(str(tmp_path / "hf"))
    capsys.readouterr()  # the saving progress
    one_line_error(["eval", "--no-pretrained", "--data", str(tmp_path / "hf"), "--output", str(tmp_path / "r.jsonl")],
                   capsys, "the dataset's 'label' column has ", *expected)


def test_check_labels_names_the_values_outside_the_model_s_classes():
    from tokenprune.eval.data import check_labels

    check_labels([0, 1, 2, 2], "y", 3)  # every class, the last included
    check_labels([0, 10**6], "y", None)  # no class count known: any label >= 0
    with pytest.raises(ValueError, match=r"'y' column has 8 label\(s\) outside the model's classes 0\.\.2 "
                                         r"\(3, 4, 5, 6, 7, \.\.\.\)$"):
        check_labels([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9], "y", 3)
    with pytest.raises(ValueError, match=r"5 label\(s\) outside the model's classes 0\.\.2 \(3, 4, 5, 6, 7\)$"):
        check_labels([3, 4, 5, 6, 7], "y", 3)
    with pytest.raises(ValueError, match=r"1 label\(s\) outside labels >= 0 \(-2\)$"):
        check_labels([5, -2], "y", None)
    with pytest.raises(ValueError, match=r"1 label\(s\) outside labels >= 0 \(-1\); -1 marks an unlabeled row"):
        check_labels([5, -1], "y", None)
    with pytest.raises(ValueError, match=r"\(3, 4, 5, 6, 7, \.\.\.\)$"):  # six values: the first five shown
        check_labels([3, 4, 5, 6, 7, 8], "y", 3)


def test_a_class_label_column_may_have_as_many_classes_as_the_model():
    datasets = pytest.importorskip("datasets")
    from tokenprune.eval.data import HFImages

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict({"image": [grey(10)], "label": [9]}, features=features)
    assert len(HFImages(ds, tensor, (1, 28, 28), "L", num_classes=10)) == 1
    with pytest.raises(ValueError, match="the dataset has 10 classes but the model has 9"):
        HFImages(ds, tensor, (1, 28, 28), "L", num_classes=9)


def test_each_method_of_a_sweep_gets_the_options_it_declares(tmp_path, capsys, monkeypatch):
    """-o went to every method of the sweep: `-o r=2` failed on zero-tprune's unknown option under the default
    sweep. Now each method gets its own options; an option no method takes is one line, before any image."""
    data = make_folder(tmp_path / "val", corrupt=False)
    out = tmp_path / "r.jsonl"
    code, _, err = run_cli(["eval", "--no-pretrained", "--data", str(data), "--method", "tome", "zero-tprune",
                            "--keep", "0.5", "-o", "r=2", "-o", "eir=False", "--output", str(out)], capsys)
    assert code == 0, err[-2000:]
    options = {row["method"]: row["options"] for row in map(json.loads, out.read_text().splitlines())}
    assert options == {None: {}, "tome": {"r": 2}, "zero-tprune": {"eir": False}}
    never_evaluated(monkeypatch)
    one_line_error(["eval", "--no-pretrained", "--data", str(data), "--method", "tome", "random", "-o", "vhf=False",
                    "-o", "eir=False", "--output", str(tmp_path / "s.jsonl")], capsys,
                   "-o eir: no method of the sweep (tome, random) takes it")  # the first of them, sorted
