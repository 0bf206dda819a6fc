"""The eval CLI end to end on small data the tests make: folders, HF datasets, resume, outputs."""
from __future__ import annotations

import copy
import csv
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image
from tokenprune.eval.evaluate import format_table, load_model
from tokenprune.eval.evaluate import main as evaluate

import tokenprune
from tokenprune.cli import main as cli

CLASSES = ["bag", "boot", "coat"]
COMMON = ["--no-pretrained", "--batch-size", "4", "--method", "tome", "random", "--keep", "0.5", "0.25"]


REAL_COMPILE = torch.compile


def compile_with_eager_backend(monkeypatch, wrap=lambda model, graph: graph):
    """``torch.compile`` replaced by dynamo's eager backend (no inductor: quick), its result passed through
    ``wrap(model, graph)`` (a test's way to make a compiled model differ from the eager one)."""
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: wrap(model, REAL_COMPILE(model, backend="eager")))


def make_folder(root, per_class=3, corrupt=True):
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / c / f"{i}.png")
    if corrupt:
        (root / CLASSES[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_folder_with_a_corrupt_file_gives_every_output(tmp_path, capsys):
    data = make_folder(tmp_path / "val")
    out = tmp_path / "res" / "run.jsonl"
    rows = evaluate(COMMON + ["--data", str(data), "--output", str(out), "--plot"])
    printed = capsys.readouterr().out
    assert [r["method"] for r in rows] == [None, "tome", "tome", "random", "random"]
    assert all(r["images"] == 9 and r["skipped"] == 1 for r in rows)
    assert rows[0]["delta_top1"] == 0 and rows[0]["speedup"] == 1
    gflops = [r["gflops"] for r in rows]
    assert gflops[0] > gflops[1] > gflops[2] and gflops[0] > gflops[3] > gflops[4]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["keep"]) for r in lines] == [(r["method"], r["keep"]) for r in rows]
    with open(out.with_suffix(".csv")) as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["baseline", "tome", "tome", "random", "random"]
    assert float(table[1]["top1"]) == pytest.approx(rows[1]["top1"])
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "skipped 1 unreadable image" in printed and "top-1" in printed


def test_resume_skips_finished_configurations(tmp_path, capsys):
    data = make_folder(tmp_path / "val", corrupt=False)
    out = tmp_path / "run.jsonl"
    first = evaluate(COMMON + ["--data", str(data), "--output", str(out)])
    # An interruption during the fourth configuration: three finished lines and half a line.
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    with pytest.raises(ValueError, match="--resume"):
        evaluate(COMMON + ["--data", str(data), "--output", str(out)])
    capsys.readouterr()
    second = evaluate(COMMON + ["--data", str(data), "--output", str(out), "--resume"])
    assert capsys.readouterr().out.count("[resume]") == 3
    assert [r["top1"] for r in second] == [r["top1"] for r in first]
    assert [r["gflops"] for r in second] == [r["gflops"] for r in first]
    finished = [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]
    assert len({r["key"] for r in finished}) == 5


def test_hf_dataset_saved_locally(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    images = [Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)) for _ in range(6)]
    # one corrupt image: one skipped sample, not a failed batch (the column is decoded lazily, per sample)
    broken = {"bytes": b"\x89PNG\r\n\x1a\n not really a png", "path": None}
    ds = datasets.Dataset.from_dict({"image": images + [broken], "label": [0, 1, 2, 0, 1, 2, 0]}, features=features)
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "hf"))
    rows = evaluate(["--no-pretrained", "--data", str(tmp_path / "hf"), "--method", "tome", "--keep", "0.5",
                     "--output", str(tmp_path / "hf.jsonl")])
    assert [r["images"] for r in rows] == [6, 6] and [r["skipped"] for r in rows] == [1, 1]


def test_embedded_default_and_bad_input(tmp_path, capsys):
    rows = evaluate(["--no-pretrained", "--limit", "8", "--method", "tome", "--keep", "0.5",
                     "--output", str(tmp_path / "e.jsonl")])
    assert rows[0]["images"] == 8 and "Fashion-MNIST" in rows[0]["data"]
    # the demo's default sweep: every encoder method (hiprune needs a VLM and is left out)
    rows = evaluate(["--no-pretrained", "--limit", "4", "--keep", "0.5", "--output", str(tmp_path / "d.jsonl")])
    assert [r["method"] for r in rows] == [None, "mctf", "random", "tome", "zero-tprune"]
    assert cli(["eval", "--keep", "1.5", "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "keep must be in (0, 1]" in capsys.readouterr().err
    assert cli(["eval", "--method", "nope", "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert cli(["eval", "--data", "./missing/folder", "--no-pretrained"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_report_merges_result_files(tmp_path, capsys):
    from tokenprune.eval.report import main as report

    data = make_folder(tmp_path / "val", corrupt=False)
    common = ["--no-pretrained", "--data", str(data), "--keep", "0.5"]
    evaluate(common + ["--method", "tome", "--output", str(tmp_path / "a.jsonl")])
    evaluate(common + ["--method", "random", "--output", str(tmp_path / "b.jsonl")])
    capsys.readouterr()
    report([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--plot", str(tmp_path / "ab.png")])
    table = capsys.readouterr().out.splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["baseline", "tome", "random"]
    assert (tmp_path / "ab.png").stat().st_size > 5000


def _result(model, method, top1, images=100, dtype="fp32", limit=None, compiled=False, **settings):
    """A result row as ``tokenprune eval`` writes it (its key holds the run's settings; dtype and compile only
    where they are not fp32 and eager; ``settings``: others, such as the batch size, which older keys lack)."""
    run = dict(model=model, checkpoint=None, pretrained=True, data="fashion-mnist", split="validation",
               limit=limit, amp=False, seed=None, **({"dtype": dtype} if dtype != "fp32" else {}),
               **({"compile": True} if compiled else {}), **settings)
    keep = None if method is None else 0.5
    key = json.dumps({**run, "method": method, "keep": keep, "options": {}}, sort_keys=True)
    return dict(key=key, model=model, data="fmnist", method=method, keep=keep, options={}, dtype=dtype,
                gflops=1.0 if method is None else 0.6, top1=top1, top5=99.0, images=images, skipped=0,
                skip_reasons={}, images_per_s=100.0)


def test_report_keeps_runs_apart(tmp_path, capsys):
    """Another model's, dtype's or --limit's rows are neither dropped as duplicates nor compared with the
    first file's baseline: a table per run, each delta against its own baseline."""
    from tokenprune.eval.report import main as report

    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    a = write("a.jsonl", [_result("A", None, 90.0), _result("A", "tome", 89.0)])
    b = write("b.jsonl", [_result("B", None, 70.0), _result("B", "tome", 60.0)])
    half = write("h.jsonl", [_result("A", None, 85.0, dtype="bf16"), _result("A", "tome", 80.0, dtype="bf16")])
    first = write("l.jsonl", [_result("A", None, 80.0, images=50, limit=50),
                              _result("A", "tome", 79.0, images=50, limit=50)])
    alone = write("c.jsonl", [_result("C", None, 50.0, compiled=True)])  # a run of its baseline alone
    report([a, b, half, first, a, alone])
    out = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")]
    body = [(r[0], r[3], r[4]) for r in rows if r[0] != "method" and not r[0].startswith("-")]
    assert body == [("baseline", "90.00", ""), ("tome", "89.00", "-1.00"),
                    ("baseline", "70.00", ""), ("tome", "60.00", "-10.00"),
                    ("baseline", "85.00", ""), ("tome", "80.00", "-5.00"),
                    ("baseline", "80.00", ""), ("tome", "79.00", "-1.00"), ("baseline", "50.00", "")]
    assert "**B** on fmnist" in out and "dtype=bf16" in out and "limit=50" in out
    headings = [line for line in out.splitlines() if line.startswith("**")]
    assert [h.count("compile=False") for h in headings] == [1, 1, 1, 1, 0]
    assert headings[-1].startswith("**C** on fmnist (") and "compile=True" in headings[-1]
    with pytest.raises(SystemExit) as exit_:  # one plot would draw all four runs as one line per method
        report([a, b, "--plot", str(tmp_path / "ab.png")])
    assert exit_.value.code == 2 and "plot them separately" in capsys.readouterr().err
    assert not (tmp_path / "ab.png").exists()



def test_report_refuses_what_is_not_an_eval_result_in_one_line(tmp_path, capsys):
    """A missing file, a bench --json, an eval-vlm result: one line, exit 2, neither a traceback nor a silently
    empty table; a file whose only line was torn by an interruption is no error."""
    from tokenprune.eval.report import main as report

    bench = tmp_path / "bench.json"  # what `tokenprune bench --json` writes: one JSON array over many lines
    bench.write_text(json.dumps([{"model": "m", "method": "tome", "measured_speedup": 1.2}], indent=2))
    vlm = tmp_path / "vlm.jsonl"
    vlm.write_text(json.dumps({"key": "{}", "model": "m", "method": None, "keep": None, "options": {},
                               "metric": "exact match", "accuracy": 50.0}) + "\n")
    for path, said in ((tmp_path / "missing.jsonl", "cannot be read (No such file or directory)"),
                       (bench, "holds no tokenprune eval results"),
                       (vlm, "line 1: not a tokenprune eval result (no top1, top5, gflops, images, images_per_s)")):
        with pytest.raises(SystemExit) as exit_:
            report([str(path)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and said in err and "Traceback" not in err and len(err.splitlines()) == 1
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(_result("A", None, 90.0)) + "\n")
    (tmp_path / "a-file").write_text("")
    for plot, said in (("ab.xyz", "matplotlib cannot write .xyz"), ("a-file/ab.png", "--plot")):
        with pytest.raises(SystemExit) as exit_:
            report([str(good), "--plot", str(tmp_path / plot)])
        captured = capsys.readouterr()
        assert exit_.value.code == 2 and said in captured.err and "Traceback" not in captured.err
        assert captured.out == ""  # refused before the table, not after it
    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps(_result("A", None, 90.0))[:40])
    report([str(torn)])
    assert capsys.readouterr().out.count("\n") == 2  # the table's head alone

def report_cells(printed: str) -> list[list[str]]:
    """The body rows of the report's markdown tables, as lists of cells."""
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in printed.splitlines() if line.startswith("| ")]
    return [r for r in rows if r[0] != "method" and not r[0].startswith("-")]


def test_report_of_a_run_without_its_baseline_leaves_the_delta_empty(tmp_path, capsys):
    """A file holding a run's pruned rows but not its baseline (another file has it, or it was never run): the delta
    is empty, not a TypeError."""
    from tokenprune.eval.report import main as report

    row = _result("A", "tome", 89.0)
    path = tmp_path / "no-baseline.jsonl"
    path.write_text(json.dumps(row) + "\n")
    report([str(path)])
    [cells] = report_cells(capsys.readouterr().out)
    assert (cells[0], cells[3], cells[4]) == ("tome", f"{row['top1']:.2f}", "")


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: results"),
    (["--nope", "a.jsonl"], "unrecognized arguments: --nope"),
])
def test_report_usage_errors_are_one_line(capsys, argv, message):
    from tokenprune.eval.report import main as report

    with pytest.raises(SystemExit) as exit_:
        report(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_report_keeps_rows_keyed_before_the_timing_settings_apart_and_says_so(tmp_path, capsys):
    """Rows written before the batch size, device and threads were keyed still load: they are a run of their own,
    their settings shown as unrecorded, never merged into (or deduplicated against) a run that records them."""
    from tokenprune.eval.report import main as report

    settings = dict(batch_size=4, device="cpu", processes=1, threads=2)
    old = [_result("A", None, 90.0), _result("A", "tome", 89.0)]
    new = [_result("A", None, 80.0, **settings), _result("A", "tome", 78.0, **settings)]
    path = tmp_path / "both.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in old + new))
    report([str(path)])
    printed = capsys.readouterr().out
    assert [(c[0], c[3], c[4]) for c in report_cells(printed)] == [
        (r["method"] or "baseline", f"{r['top1']:.2f}", "" if r["method"] is None else f"{r['top1'] - base:+.2f}")
        for rows in (old, new) for base in [rows[0]["top1"]] for r in rows]
    headings = [line for line in printed.splitlines() if line.startswith("**")]
    assert len(headings) == 2 and all(f"{name}=unrecorded" in headings[0] for name in settings)
    assert all(f"{name}={value}" in headings[1] for name, value in settings.items())


def test_resume_with_another_class_map_or_other_images_is_another_run(tmp_path, capsys):
    """A run's key holds the class indices and the number of images: --resume never reuses a top-1 scored against
    other labels or on other images, and the report shows each run apart."""
    from tokenprune.eval.report import main as report

    data = make_folder(tmp_path / "val", corrupt=False)
    out = tmp_path / "run.jsonl"
    args = ["--no-pretrained", "--data", str(data), "--method", "tome", "--keep", "0.5"]
    maps = []
    for n, order in enumerate((CLASSES, CLASSES[::-1])):
        maps.append(tmp_path / f"classes{n}.json")
        maps[-1].write_text(json.dumps({name: index for index, name in enumerate(order)}))
    evaluate(args + ["--class-map", str(maps[0]), "--output", str(out)])
    capsys.readouterr()
    resumed = evaluate(args + ["--class-map", str(maps[1]), "--output", str(out), "--resume"])
    assert "[resume]" not in capsys.readouterr().out
    alone = evaluate(args + ["--class-map", str(maps[1]), "--output", str(tmp_path / "alone.jsonl")])
    assert [r["top1"] for r in resumed] == [r["top1"] for r in alone]
    Image.open(next((data / CLASSES[0]).iterdir())).save(data / CLASSES[0] / "another.png")
    capsys.readouterr()
    grown = evaluate(args + ["--class-map", str(maps[1]), "--output", str(out), "--resume"])
    assert "[resume]" not in capsys.readouterr().out
    assert [r["images"] for r in grown] == [r["images"] + 1 for r in resumed]
    report([str(out)])
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("**")]) == 3


@pytest.fixture
def restore_threads():
    """--threads sets torch's threads for the whole process: the tests after this one get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_resume_at_another_batch_size_or_thread_count_is_another_run(tmp_path, capsys, restore_threads):
    """The speedups are timings against the baseline's (and the seeded random method draws by position in the batch):
    a resume under another batch size, device or thread count evaluates afresh, and resumes only its own run."""
    data = make_folder(tmp_path / "val", corrupt=False)
    out = tmp_path / "run.jsonl"
    args = ["--no-pretrained", "--data", str(data), "--method", "random", "--keep", "0.5", "--device", "cpu"]
    evaluate(args + ["--batch-size", "4", "--threads", "1", "--output", str(out)])
    for other in (["--batch-size", "2", "--threads", "1"], ["--batch-size", "4", "--threads", "2"]):
        capsys.readouterr()
        resumed = evaluate(args + other + ["--output", str(out), "--resume"])
        assert "[resume]" not in capsys.readouterr().out, other
    alone = evaluate(args + ["--batch-size", "4", "--threads", "2", "--output", str(tmp_path / "alone.jsonl")])
    assert [r["top1"] for r in resumed] == [r["top1"] for r in alone]
    capsys.readouterr()
    again = evaluate(args + ["--batch-size", "2", "--threads", "1", "--output", str(out), "--resume"])
    assert capsys.readouterr().out.count("[resume]") == len(again)
    keys = [json.loads(json.loads(line)["key"]) for line in out.read_text().splitlines()]
    assert {(k["device"], k["batch_size"], k["threads"]) for k in keys} == {("cpu", 4, 1), ("cpu", 2, 1), ("cpu", 4, 2)}


def test_a_repeated_method_or_keep_is_evaluated_once(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    rows = evaluate(["--no-pretrained", "--limit", "4", "--method", "tome", "tome", "--keep", "0.5", "0.25", "0.5",
                     "--output", str(out)])
    assert [(r["method"], r["keep"]) for r in rows] == [(None, None), ("tome", 0.5), ("tome", 0.25)]
    assert [json.loads(line)["key"] for line in out.read_text().splitlines()] == [r["key"] for r in rows]
    printed = capsys.readouterr().out
    assert "note: --method tome given more than once: evaluated once" in printed
    assert "note: --keep 0.5 given more than once: evaluated once" in printed


def test_an_interrupted_plot_leaves_the_old_file(tmp_path, monkeypatch):
    """The plot is written beside its name and renamed over it: killed halfway, the old plot is still whole."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    from tokenprune.eval.evaluate import plot

    png = tmp_path / "p.png"
    png.write_bytes(b"the old plot")

    def killed_halfway(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half of it")
        raise KeyboardInterrupt
    monkeypatch.setattr(Figure, "savefig", killed_halfway)
    rows = [dict(method=None, keep=None, gflops=1.0, top1=90.0), dict(method="tome", keep=0.5, gflops=0.6, top1=89.0)]
    with pytest.raises(KeyboardInterrupt):
        plot(png, rows, "title")
    plt.close("all")
    assert png.read_bytes() == b"the old plot" and [p.name for p in tmp_path.iterdir()] == ["p.png"]


def test_transformers_classifier_from_a_local_folder(tmp_path):
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-vit"
    config = ViTConfig(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96,
                       image_size=32, patch_size=4, num_labels=len(CLASSES))
    ViTForImageClassification(config).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    data = make_folder(tmp_path / "val", corrupt=False)
    args = ["--model", str(model_dir), "--data", str(data), "--batch-size", "4", "--method", "tome", "mctf",
            "--keep", "0.25", "--output", str(tmp_path / "hf.jsonl")]
    rows = evaluate(args)
    assert [r["method"] for r in rows] == [None, "tome", "mctf"]
    assert all(r["images"] == 9 for r in rows)
    assert rows[0]["gflops"] > 1.3 * rows[1]["gflops"] > 0 and rows[0]["gflops"] > 1.3 * rows[2]["gflops"] > 0
    saved = ViTForImageClassification.from_pretrained(model_dir).state_dict()
    loaded = load_model(str(model_dir), pretrained=True, checkpoint=None).model.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    fresh = load_model(str(model_dir), pretrained=False, checkpoint=None, seed=5).model.state_dict()
    assert not torch.equal(fresh["classifier.weight"], saved["classifier.weight"])


def test_the_processor_gives_the_input_size():
    from tokenprune.eval.evaluate import processor_input_size
    from transformers import CLIPImageProcessor, DeiTImageProcessor, ViTConfig, ViTImageProcessor

    config = ViTConfig(image_size=224, num_channels=3)
    assert processor_input_size(ViTImageProcessor(size={"height": 192, "width": 160}), config) == (3, 192, 160)
    assert processor_input_size(CLIPImageProcessor(size={"shortest_edge": 256}, crop_size=200), config) == (3, 200,
                                                                                                          200)
    assert processor_input_size(DeiTImageProcessor(), config) == (3, 224, 224)  # 256 x 256, then a 224 crop
    uncropped = CLIPImageProcessor(size={"shortest_edge": 96}, do_center_crop=False)
    assert processor_input_size(uncropped, ViTConfig(image_size=224, num_channels=1)) == (1, 96, 96)
    # a processor that names no size: the model's
    assert processor_input_size(types.SimpleNamespace(size=None), config) == (3, 224, 224)
    # a crop size it does not apply (no do_center_crop): the resize target
    loose = types.SimpleNamespace(size={"height": 96, "width": 80}, crop_size={"height": 64, "width": 64})
    assert processor_input_size(loose, config) == (3, 96, 80)
    # a config that names no channel count: RGB
    assert processor_input_size(ViTImageProcessor(), types.SimpleNamespace(image_size=64)) == (3, 224, 224)


def test_table_columns_line_up_with_long_method_names_and_options():
    row = dict(top1=89.9, top5=99.85, gflops=0.7118, images_per_s=136.8)
    rows = [dict(row, method=None, keep=None, options={}, delta_top1=None, speedup=1.0),
            dict(row, method="zero-tprune", keep=0.5, options={"layers": [3, 6, 9], "s_fraction": 0.5},
                 delta_top1=-0.25, speedup=1.56)]
    lines = format_table(rows).splitlines()
    columns = {line.index("top-1") + len("top-1") if i == 0 else line.index("89.90") + len("89.90")
               for i, line in enumerate(lines) if i != 1}
    assert len(columns) == 1, format_table(rows)


def test_compile_gives_the_eager_accuracies_and_keeps_its_results_apart(tmp_path, capsys, monkeypatch):
    """--compile runs every configuration through torch.compile (inductor's real compile is covered by
    `tokenprune bench --compile`; here the eager backend keeps the test quick): same accuracies, the
    compiled module is what is evaluated, and its results do not resume eager ones."""
    import torch

    real_compile, compiled_calls = torch.compile, []

    def compile_eager(model, **kwargs):
        assert kwargs == {"options": {"cpp_wrapper": True}}  # tokenprune.compiled's, for a CPU model
        compiled_calls.append(model)
        return real_compile(model, backend="eager")
    monkeypatch.setattr(torch, "compile", compile_eager)
    data = make_folder(tmp_path / "val", corrupt=False)
    out = tmp_path / "run.jsonl"
    eager = evaluate(COMMON + ["--data", str(data), "--output", str(out)])
    capsys.readouterr()
    compiled = evaluate(COMMON + ["--data", str(data), "--output", str(out), "--resume", "--compile"])
    printed = capsys.readouterr().out
    assert "[resume]" not in printed  # compiled results are not the eager ones
    assert len(compiled_calls) == len(eager)  # every configuration, the baseline too
    # each compiled configuration was checked against eager on its first batch (and 3 probe batches: 16 samples), and
    # at the last batch's size (9 images: batches of 4, 4 and 1) on the first batch's first sample (and 15 probes)
    for label in ["baseline", "tome keep=0.5", "tome keep=0.25", "random keep=0.5", "random keep=0.25"]:
        assert f"compiled vit_testbed_fmnist ({label}) for batch 4 in " in printed
        assert f"compiled vit_testbed_fmnist ({label}) for batch 1 in " in printed
    assert printed.count("output equals eager on 16 samples") == 2 * len(eager)
    assert [r["top1"] for r in compiled] == [r["top1"] for r in eager]
    assert [r["gflops"] for r in compiled] == [r["gflops"] for r in eager]


def test_compile_checks_near_ties_against_the_unpatched_model(tmp_path, monkeypatch):
    """How far a near-tie token choice may move a sample is measured against how far the reduction moved it: each
    patched configuration's check is given the unpatched forward, a copy with the patch removed (the model itself
    stays patched, and is what is evaluated), made only when the check calls it and once per configuration; the
    baseline's is the model itself."""
    import tokenprune.eval.evaluate as evaluation

    real_verify, checked, copies = evaluation.verify_compiled, [], []
    monkeypatch.setattr(evaluation, "copy", types.SimpleNamespace(deepcopy=lambda m: copies.append(m) or
                                                                   copy.deepcopy(m)))

    def verify(compiled, eager, x, what, compute_dtype=None, *, stock):
        line = real_verify(compiled, eager, x, what, compute_dtype, stock=stock)  # nothing moves: no copy made
        checked.append((what, tokenprune.is_patched(eager), stock is eager, len(copies)))
        with torch.inference_mode():
            if stock is not eager:  # the unpatched model's output
                assert not torch.equal(stock(x), eager(x))
                assert torch.equal(stock(x), tokenprune.remove(copy.deepcopy(eager))(x))
                assert tokenprune.is_patched(eager)
        return line
    monkeypatch.setattr(evaluation, "verify_compiled", verify)
    compile_with_eager_backend(monkeypatch)
    data = make_folder(tmp_path / "val", corrupt=False)
    evaluate(COMMON + ["--data", str(data), "--output", str(tmp_path / "run.jsonl"), "--compile"])
    labels = ["baseline", "tome keep=0.5", "tome keep=0.25", "random keep=0.5", "random keep=0.25"]
    # two batch sizes each; before the first stock call of a configuration, its copy is not made; then once
    assert checked == [(f"vit_testbed_fmnist ({label})", label != "baseline", label == "baseline",
                        max(0, i - 1) + (size == 1 and label != "baseline"))
                       for i, label in enumerate(labels) for size in (0, 1)]
    assert all(tokenprune.is_patched(m) for m in copies)  # each a copy of the patched model, the patch then removed


def test_compile_stops_where_the_compiled_model_gives_another_output(tmp_path, capsys, monkeypatch):
    """A compiled configuration whose output is not the eager model's is not evaluated under its name: the CLI says
    so in one line and exits 1, the configurations finished before it are kept, and --resume goes on from there."""
    patched_models = []

    def wrong_when_patched(model, graph):  # a patched model's logits moved by 1
        if not tokenprune.is_patched(model):
            return graph
        patched_models.append(model)
        return lambda x: graph(x) + 1.0
    compile_with_eager_backend(monkeypatch, wrong_when_patched)
    data = make_folder(tmp_path / "val", corrupt=False)
    out = tmp_path / "run.jsonl"
    args = ["eval"] + COMMON + ["--data", str(data), "--output", str(out), "--compile"]
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = err.replace("\r", "\n").strip().splitlines()[-1]  # after the progress bar's
    assert err.startswith("tokenprune eval: torch.compile changed vit_testbed_fmnist (tome keep=0.5)'s output") \
        and "in 16 of 16 samples; " in err and err.endswith("); not using it"), err
    assert [json.loads(line)["method"] for line in out.read_text().splitlines()] == [None]  # the baseline kept
    assert len(patched_models) == 1  # stopped at the first wrong configuration, nothing after it compiled
    compile_with_eager_backend(monkeypatch)
    assert cli(args + ["--resume"]) == 0
    assert len(out.read_text().splitlines()) == 5


def test_compile_checks_the_smaller_last_batch_before_evaluating(tmp_path, capsys, monkeypatch):
    """A smaller last batch compiles as another graph: it is checked before the evaluation too, so a compiled model
    that is right at the first batch's size and wrong at the last one's is not evaluated under its name (one line,
    exit 1, the baseline kept). The check reads the sizes from the batch sampler: none for an iterable dataset."""
    from tokenprune.eval.evaluate import other_batch_sizes
    from torch.utils.data import DataLoader, IterableDataset, TensorDataset

    def wrong_below_four(model, graph):  # a patched model's logits moved by 1 in batches smaller than 4
        return graph if not tokenprune.is_patched(model) else lambda x: graph(x) + float(len(x) < 4)
    compile_with_eager_backend(monkeypatch, wrong_below_four)
    data = make_folder(tmp_path / "val", corrupt=False)  # 9 images: batches of 4, 4 and 1
    out = tmp_path / "run.jsonl"
    assert cli(["eval"] + COMMON + ["--data", str(data), "--output", str(out), "--compile"]) == 1
    captured = capsys.readouterr()
    assert "compiled vit_testbed_fmnist (tome keep=0.5) for batch 4 in " not in captured.out  # one verdict, after both
    err = captured.err.replace("\r", "\n").strip().splitlines()[-1]
    assert err.startswith("tokenprune eval: torch.compile changed vit_testbed_fmnist (tome keep=0.5)'s output") \
        and "in 16 of 16 samples; " in err and err.endswith("); not using it"), err
    assert [json.loads(line)["method"] for line in out.read_text().splitlines()] == [None]

    assert other_batch_sizes(DataLoader(TensorDataset(torch.zeros(11, 1)), batch_size=4), 4) == [3]
    assert other_batch_sizes(DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=4), 4) == []
    assert other_batch_sizes(DataLoader(TensorDataset(torch.zeros(9, 1)), batch_size=8), 2) == [8, 1]

    class Endless(IterableDataset):
        def __iter__(self):
            while True:
                yield torch.zeros(1)
    assert other_batch_sizes(DataLoader(Endless(), batch_size=4), 4) == []
    assert other_batch_sizes(object(), 4) == []


def test_compile_stops_where_dynamo_would_go_on_eagerly(tmp_path, capsys, monkeypatch):
    """A compiled evaluation whose recompile reaches dynamo's limit (here: a limit of 1, and a smaller last batch that
    compiles once more) is an error, not eager timings reported as compiled ones: one line, exit 1."""
    compile_with_eager_backend(monkeypatch)
    data = make_folder(tmp_path / "val", corrupt=False)  # 9 images: batches of 4, 4 and 1
    out = tmp_path / "run.jsonl"
    with torch._dynamo.config.patch(recompile_limit=1):  # (monkeypatch's undo would delete dynamo's setting)
        assert cli(["eval", "--no-pretrained", "--batch-size", "4", "--method", "tome", "--keep", "0.5",
                    "--data", str(data), "--output", str(out), "--compile"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.replace("\r", "\n").strip().splitlines()[-1].startswith(
        "tokenprune eval: torch.compile reached one of dynamo's recompile limits")
    assert not out.exists() or out.read_text() == ""  # the baseline's last batch already reached it


def test_compile_with_amp_checks_the_graph_it_evaluates(tmp_path, capsys, monkeypatch):
    """Under --amp the evaluation runs the model under autocast, which dynamo compiles as another graph: the check runs
    under the same autocast, so the graph it checked is the one evaluated (no second compile: with a recompile limit
    of 1 and batches of one size, a graph compiled outside autocast would reach it at the first batch)."""
    compile_with_eager_backend(monkeypatch)
    data = make_folder(tmp_path / "val", per_class=4, corrupt=False)  # 12 images: three batches of 4
    with torch._dynamo.config.patch(recompile_limit=1):
        assert cli(["eval", "--no-pretrained", "--batch-size", "4", "--method", "tome", "--keep", "0.5", "--amp",
                    "--data", str(data), "--output", str(tmp_path / "run.jsonl"), "--compile"]) == 0
    assert capsys.readouterr().out.count("output equals eager on 16 samples") == 2


def test_amp_runs_every_forward_under_the_devices_autocast(tmp_path, monkeypatch):
    """--amp: bfloat16 autocast on CPU (float16 elsewhere) around the evaluated forwards; without it, none."""
    from tokenprune.eval.evaluate import amp_context, amp_dtype

    assert amp_dtype(torch.device("cpu")) == torch.bfloat16 and amp_dtype(torch.device("cuda")) == torch.float16
    seen = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        if isinstance(module, torch.nn.Linear) else None)
    try:
        for amp in (True, False):
            seen.clear()
            with amp_context(torch.device("cpu"), amp):
                torch.nn.Linear(2, 2)(torch.zeros(1, 2))
            assert seen == [(amp, torch.bfloat16)]
        data = make_folder(tmp_path / "val", per_class=1, corrupt=False)
        seen.clear()
        evaluate(["--no-pretrained", "--method", "tome", "--keep", "0.5", "--amp", "--data", str(data),
                  "--output", str(tmp_path / "amp.jsonl")])
        # the evaluated forwards (the FLOPs count and the model's loading run outside): the baseline's and ToMe's, at
        # least the 4 linears (qkv, proj, fc1, fc2) of each of the testbed's 12 blocks, and the last one
        assert seen.count((True, torch.bfloat16)) >= 2 * 12 * 4 and seen[-1] == (True, torch.bfloat16)
    finally:
        hook.remove()


def test_compile_with_amp_allows_the_autocast_dtypes_rounding(tmp_path, capsys, monkeypatch):
    """Under --amp the compiled output is compared with bfloat16's tolerance (the dtype the forward computes in): a
    compiled model off by 1e-2 passes there, and is refused in float32 (1e-4 of the logits' scale)."""
    compile_with_eager_backend(monkeypatch, lambda model, graph: lambda x: graph(x) + 1e-2)
    data = make_folder(tmp_path / "val", per_class=4, corrupt=False)
    args = ["eval", "--no-pretrained", "--batch-size", "4", "--method", "tome", "--keep", "0.5", "--data", str(data),
            "--compile"]
    assert cli(args + ["--amp", "--output", str(tmp_path / "amp.jsonl")]) == 0
    assert cli(args + ["--output", str(tmp_path / "fp32.jsonl")]) == 1
    assert "vit_testbed_fmnist (baseline)'s output" in capsys.readouterr().err


def test_compile_with_amp_runs_the_unpatched_model_under_the_same_autocast(tmp_path, capsys, monkeypatch):
    """The reduction's own move, which bounds how far a near tie may move a sample, is measured against the unpatched
    model run under --amp's autocast too: an unpatched forward in float32 would count bfloat16's rounding as part of
    the reduction's move, and loosen the bound. Here the compiled patched model moves its first sample, so the check
    runs the unpatched copy (then refuses the graph)."""
    calls = []

    def first_sample_moved(model, graph):  # the first sample the compiled patched model sees, and no other
        if not tokenprune.is_patched(model):
            return graph

        def moved(x):
            out = graph(x).clone()
            if not calls:
                out[0] += 1e3
            calls.append(len(x))
            return out
        return moved
    compile_with_eager_backend(monkeypatch, first_sample_moved)
    unpatched_runs = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: unpatched_runs.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        if calls and type(module).__name__ == "VisionTransformer" and not tokenprune.is_patched(module) else None)
    data = make_folder(tmp_path / "val", per_class=4, corrupt=False)
    try:
        assert cli(["eval", "--no-pretrained", "--batch-size", "4", "--method", "tome", "--keep", "0.5", "--amp",
                    "--data", str(data), "--output", str(tmp_path / "amp.jsonl"), "--compile"]) == 1
    finally:
        hook.remove()
    assert "(sample 0 of 16 moved 1.00e+03: the reduction moved it" in capsys.readouterr().err
    # the unpatched forwards after the patched graph's first call: the check's, on the 16 samples
    assert unpatched_runs and set(unpatched_runs) == {(True, torch.bfloat16)}


def test_a_busy_machine_flags_the_speedup_column(tmp_path, capsys, monkeypatch):
    """Configurations run one after another: another process's busy spell skews their speedups, so the share of
    the CPUs other processes used is recorded per configuration and a line under the table says when it passed
    5%. Here the machine's CPU counters are replaced: idle for the baseline, busy for the method."""
    from tokenprune.eval.evaluate import busy_note

    from tokenprune import timing

    data = make_folder(tmp_path / "val", per_class=2, corrupt=False)
    readings = iter([0.0, 0.3])  # foreign shares, in the order the configurations run

    def fake_exit(self, *exc):
        self.value = next(readings)
    monkeypatch.setattr(timing.ForeignLoad, "__exit__", fake_exit)
    rows = evaluate(["--no-pretrained", "--method", "tome", "--keep", "0.5", "--data", str(data),
                     "--output", str(tmp_path / "r.jsonl")])
    printed = capsys.readouterr().out
    assert [r["foreign_load"] for r in rows] == [0.0, 0.3]
    assert "note: other processes used up to 30% of the CPUs while this ran (tome): the speedup column is " \
           "unreliable; `tokenprune bench` times configurations interleaved" in printed
    with open(tmp_path / "r.csv") as f:
        assert [float(r["foreign_load"]) for r in csv.DictReader(f)] == [0.0, 0.3]
    # the threshold, rows without a figure (a GPU, several processes, files from before), the busiest named
    assert busy_note([{"method": None, "foreign_load": 0.05}, {"method": "tome", "foreign_load": None}]) is None
    assert busy_note([{"method": None}]) is None
    assert busy_note([{"method": None, "foreign_load": 0.01}]) is None  # under the threshold, not only at it
    assert "up to 6% of the CPUs while this ran (baseline)" in busy_note(
        [{"method": None, "foreign_load": 0.06}, {"method": "mctf", "foreign_load": 0.051}])


def test_the_foreign_share_is_measured_on_cpu(tmp_path):
    data = make_folder(tmp_path / "val", per_class=2, corrupt=False)
    rows = evaluate(["--no-pretrained", "--method", "tome", "--keep", "0.5", "--data", str(data),
                     "--output", str(tmp_path / "r.jsonl")])
    assert all(isinstance(r["foreign_load"], float) and 0.0 <= r["foreign_load"] <= 1.0 for r in rows)


@pytest.mark.parametrize("foreign_ticks, share", [(3, 1.0), (0.5, 0.25), (-1, 0.0)])
def test_the_foreign_share_is_a_fraction_of_the_cpus_however_coarse_the_clock(monkeypatch, foreign_ticks, share):
    """Other processes' share of all CPUs, from clocks counting 10 ms ticks: over a short block a tick or two more
    (or fewer) than was used is a ratio above 1 (or below 0); the share is clamped to [0, 1], exact in between."""
    from tokenprune import timing

    cpus, start = 2, (812.34, 56.78, 4021.5)  # (busy, own, wall) seconds: the clocks' readings, not zero
    end = (start[0] + 0.01 * foreign_ticks + 0.005, start[1] + 0.005, start[2] + 0.01)
    samples = iter([start, end])
    monkeypatch.setattr(timing.os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(timing.ForeignLoad, "_sample", staticmethod(lambda: next(samples)))
    with timing.ForeignLoad() as load:
        pass
    assert load.value == pytest.approx(share)
    for unreadable in ([None, end], [start, None]):  # /proc/stat unreadable (not Linux): no figure, no error
        samples = iter(unreadable)
        with timing.ForeignLoad() as load:
            pass
        assert load.value is None


def test_accuracy_and_throughput_are_counted_as_defined(monkeypatch):
    """evaluate_config against counts made by hand: top-1 and top-5 over the readable images only (a skipped image,
    negative label, is neither a hit nor a miss), and images/s over every image fed to the forward."""
    import torch
    from accelerate import Accelerator
    from tokenprune.eval.data import SKIPPED, skip_label, skip_reason
    from tokenprune.eval.evaluate import evaluate_config

    ranking = torch.tensor([6.0, 5, 4, 3, 2, 1, 0])  # class 0 first ... class 6 last
    batches = [(torch.zeros(2, 3, 4, 4), torch.tensor([0, 3])),  # a top-1 hit; a top-5 hit (4th)
               (torch.zeros(2, 3, 4, 4), torch.tensor([6, skip_label(EOFError())]))]  # 7th: a miss; skipped
    monkeypatch.setattr("tokenprune.timing.timed", lambda call, device=None: (call(), 0.3))
    model = lambda x: ranking.expand(x.shape[0], -1)  # noqa: E731
    result = evaluate_config(model, batches, Accelerator(cpu=True), amp=False)
    assert result["images"] == 3 and result["skipped"] == 1
    assert result["top1"] == 100 * 1 / 3 and result["top5"] == 100 * 2 / 3
    assert result["images_per_s"] == 4 / (2 * 0.3)  # four images through two timed forwards
    assert result["skip_reasons"] == {skip_reason(SKIPPED - 2): 1}
    monkeypatch.setattr("tokenprune.timing.timed", lambda call, device=None: (call(), 0.0))  # a clock too coarse
    assert result["images_per_s"] < evaluate_config(model, batches, Accelerator(cpu=True), amp=False)["images_per_s"]


def test_a_compiled_output_changed_in_one_process_stops_every_process(tmp_path):
    """Two CPU processes under torchrun with --compile, and the second process's compiled model wrong: both stop with
    one line (the first names the other process), none waits in a gather for the one that stopped."""
    import os
    import subprocess
    import sys

    script = tmp_path / "run_eval.py"
    script.write_text(
        "import os, sys, torch\n"
        "from tokenprune.cli import main\n"
        "real_compile = torch.compile\n"
        "def compile_eager(model, **kwargs):  # the eager backend; the second process's logits moved by 1\n"
        "    graph = real_compile(model, backend='eager')\n"
        "    return (lambda x: graph(x) + 1.0) if os.environ['RANK'] == '1' else graph\n"
        "torch.compile = compile_eager\n"
        "sys.exit(main(['eval'] + sys.argv[1:]))\n")
    data = make_folder(tmp_path / "val", per_class=2, corrupt=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), "--no-pretrained", "--data", str(data), "--method", "tome", "--keep", "0.5",
                             "--batch-size", "2", "--compile", "--output", str(tmp_path / "two.jsonl")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "tokenprune eval: torch.compile changed vit_testbed_fmnist (baseline)'s output in another process; " \
           "not using it" in result.stderr, result.stderr[-2000:]
    assert "tokenprune eval: torch.compile changed vit_testbed_fmnist (baseline)'s output (max difference" \
           in result.stderr  # (torchrun's own traceback follows: a process exited 1)


def test_two_processes_give_the_one_process_results(tmp_path):
    """Two CPU processes under torchrun, no --device: accelerate joins them (each ran alone before and every one
    wrote every result); seven images (one process gets a padded shard) count exactly as in one process."""
    import os
    import subprocess
    import sys

    data = make_folder(tmp_path / "val", per_class=2)  # 6 images and a corrupt one
    argv = ["--no-pretrained", "--data", str(data), "--method", "tome", "--keep", "0.5", "--batch-size", "2"]
    alone = evaluate(argv + ["--output", str(tmp_path / "one.jsonl")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "tokenprune.eval", *argv, "--output", str(tmp_path / "two.jsonl")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [(r["method"], r["images"], r["skipped"]) for r in rows] == [(None, 6, 1), ("tome", 6, 1)]
    assert [r["top1"] for r in rows] == [r["top1"] for r in alone] and [r["top5"] for r in rows] == [
        r["top5"] for r in alone]
    assert [r["foreign_load"] for r in rows] == [None, None]  # processes count each other: no figure


def test_the_kernels_are_built_before_any_forward_is_timed(tmp_path, monkeypatch):
    """In a fresh environment the CPU build compiles (about 30 s) on its first use: that was inside the first
    method's timed forward, and ``make demo`` showed that method at 0.3x the baseline's speed."""
    import tokenprune.timing
    from tokenprune import extension

    events = []
    kernels_in_use, timed = extension.kernels_in_use, tokenprune.timing.timed

    def recording_kernels(*args, **kwargs):
        events.append("kernels")
        return kernels_in_use(*args, **kwargs)

    def recording_timed(*args, **kwargs):
        events.append("timed")
        return timed(*args, **kwargs)

    monkeypatch.setattr(extension, "kernels_in_use", recording_kernels)
    monkeypatch.setattr(tokenprune.timing, "timed", recording_timed)
    evaluate(["--no-pretrained", "--limit", "4", "--method", "tome", "--keep", "0.5",
              "--output", str(tmp_path / "e.jsonl")])
    assert events[0] == "kernels" and events.count("kernels") == 1 and events.count("timed") == 2


def test_the_busy_time_counts_guests_once(monkeypatch, tmp_path):
    """``/proc/stat``'s guest and guest_nice are already inside user and nice: a VM host running guests read them
    twice as busy."""
    import os

    from tokenprune import timing

    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal, guest, guest_nice = 500, 20, 100, 9000, 40, 3, 7, 11, 400, 10
    assert timing.busy_seconds([user, nice, system, idle, iowait, irq, softirq, steal, guest, guest_nice]) == \
        pytest.approx((user + nice + system + irq + softirq + steal) / ticks)
    assert timing.busy_seconds([user, nice, system, idle, iowait, irq, softirq]) == \
        pytest.approx((user + nice + system + irq + softirq) / ticks)  # an old kernel's shorter line
    stat = tmp_path / "stat"
    stat.write_text(f"cpu  {user} {nice} {system} {idle} {iowait} {irq} {softirq} {steal} {guest} {guest_nice}\n")
    monkeypatch.setattr(timing.ForeignLoad, "STAT", str(stat))
    # this process's own time: its user and system time, not its children's (os.times: user, system, children's
    # user, children's system, elapsed)
    monkeypatch.setattr(timing.os, "times", lambda: (1.5, 0.25, 7.0, 9.0, 100.0))
    busy, own, _ = timing.ForeignLoad._sample()
    assert busy == pytest.approx((user + nice + system + irq + softirq + steal) / ticks) and own == 1.75
    monkeypatch.setattr(timing.ForeignLoad, "STAT", str(tmp_path / "absent"))  # not Linux: no sample, no error
    assert timing.ForeignLoad._sample() is None
