"""The family comparison: random's curve, matched-GFLOPs interpolation and the verdicts, by hand; and one
tiny end-to-end run through the eval CLI."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import timm
import torch
from tokenprune.eval import family

import tokenprune
from tokenprune import testbed as tb


def row(method, keep, gflops, top1, seed=None):
    return dict(method=method, keep=keep, gflops=gflops, top1=top1, images=100, data="d",
                options={} if seed is None else {"seed": seed})


ROWS = [
    row(None, None, 1.0, 90.0),
    row("random", 0.5, 0.5, 85.0, 0), row("random", 0.5, 0.5, 86.0, 1), row("random", 0.5, 0.5, 87.0, 2),
    row("random", 0.25, 0.3, 70.0, 0), row("random", 0.25, 0.3, 72.0, 1), row("random", 0.25, 0.3, 71.0, 2),
    row("tome", 0.5, 0.5, 88.5),  # random 86 +- 2: ahead by 2.5 > 2
    row("mctf", 0.5, 0.4, 79.0),  # half way: random 78.5, spread 2.0: within
    row("zero-tprune", 0.5, 0.3, 60.0),  # random 71, spread 2: behind
    row("tome", 0.33, 0.2, 60.0),  # below the sweep
]


def test_random_curve_averages_seeds_and_takes_their_range():
    assert family.random_curve(ROWS) == [(0.3, 71.0, 2.0), (0.5, 86.0, 2.0)]


def test_interpolation_is_linear_in_gflops_and_none_outside():
    curve = [(0.3, 71.0, 2.0), (0.5, 86.0, 4.0)]
    assert family.interpolate(curve, 0.4) == pytest.approx((78.5, 3.0))
    assert family.interpolate(curve, 0.3) == (71.0, 2.0)
    assert family.interpolate(curve, 0.5) == pytest.approx((86.0, 4.0))
    assert family.interpolate(curve, 0.29) is None and family.interpolate(curve, 0.51) is None


def test_verdicts():
    lines = {(s["method"], s["keep"]): s for s in family.summarize("m", ROWS)}
    assert lines[("tome", 0.5)]["verdict"] == "ahead" and lines[("tome", 0.5)]["delta"] == pytest.approx(-1.5)
    assert lines[("mctf", 0.5)]["verdict"] == "within"
    assert lines[("mctf", 0.5)]["random_top1"] == pytest.approx(78.5)
    assert lines[("zero-tprune", 0.5)]["verdict"] == "behind"
    assert lines[("tome", 0.33)]["verdict"] == "outside the random sweep"
    assert family.verdict(80.0, (78.0, 2.0)) == "within"  # exactly the spread is not beyond it
    text = family.markdown("m", ROWS[0], list(lines.values()))
    assert "| tome | 0.5 | 0.500 | 88.50 | -1.50 | 86.00 (2.00) | ahead |" in text


def test_end_to_end_on_a_random_init_testbed(tmp_path):
    # random-init weights stand in for trained ones: the comparison machinery is what is tested
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("vit_testbed_fmnist_gap")
    save_file(model.state_dict(), str(tmp_path / "vit_testbed_fmnist_gap.safetensors"))
    args = ["--keep", "0.5", "--methods", "tome", "--random-keep", "0.4", "0.6", "--seeds", "0", "1", "--limit", "8",
            "--out", str(tmp_path), "--weights-dir", str(tmp_path)]
    family.main(args)  # no --models: every testbed with weights in --weights-dir
    rows = [json.loads(line) for line in (tmp_path / "vit_testbed_fmnist_gap-test.jsonl").read_text().splitlines()]
    assert sorted((r["method"] or "", r["keep"] or 0, r["options"].get("seed", -1)) for r in rows) == [
        ("", 0, -1), ("random", 0.4, 0), ("random", 0.4, 1), ("random", 0.6, 0), ("random", 0.6, 1),
        ("tome", 0.5, -1)]
    assert (tmp_path / "vit_testbed_fmnist_gap-test.png").stat().st_size > 0
    with open(tmp_path / "vit_testbed_fmnist_gap-test.csv") as f:  # the whole comparison, not the last seed's run
        table = list(csv.DictReader(f))
    assert sorted((r["method"], r["keep"], r["options"]) for r in table) == sorted(
        ("baseline" if r["method"] is None else r["method"], "" if r["keep"] is None else str(r["keep"]),
         json.dumps(r["options"])) for r in rows)
    assert all(float(r["delta_top1"]) == float(r["top1"]) - float(table[0]["top1"]) for r in table)
    assert "| tome | 0.5 |" in (tmp_path / "summary-test.md").read_text()
    # a second run resumes: nothing is evaluated again
    before = (tmp_path / "vit_testbed_fmnist_gap-test.jsonl").read_text()
    family.main(["--models", "vit_testbed_fmnist_gap", *args])
    assert (tmp_path / "vit_testbed_fmnist_gap-test.jsonl").read_text() == before


def test_unknown_model_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        family.main(["--models", "deit_small_patch16_224"])
    assert e.value.code == 2 and "not a testbed" in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--keep", "1.5"], "keep must be in (0, 1]"),
    (["--seeds", "-1"], "seed must be an int"),
    (["--random-keep", "0.5", "1.5"], "keep must be in (0, 1]"),
    (["--limit", "0"], "must be an integer >= 1"),  # not dropped as falsy: that ran the whole split
])
def test_bad_input_is_one_line_before_any_evaluation(argv, said, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(family.evaluate, "evaluate_config", lambda *a, **k: pytest.fail("evaluated"))
    with pytest.raises(SystemExit) as e:
        family.main(["--models", "vit_testbed_fmnist", "--limit", "8", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and said in err.strip().splitlines()[-1] and "Traceback" not in err, err


def test_diagnosis_foreground_auc_and_report():
    from tokenprune.eval import zero_tprune_diagnose as diag

    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, 0:2, 2:4] = 200  # patch 1 of the 14x14 grid
    image[0, 27, 27] = 13  # patch 195, just above the threshold
    fg = diag.foreground(image, 14)
    assert fg.shape == (1, 196) and fg[0].nonzero()[:, 0].tolist() == [1, 195]
    score = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert diag.auc(score, torch.tensor([[True, True, False, False]])) == 1.0
    assert diag.auc(score, torch.tensor([[False, False, True, True]])) == 0.0
    assert diag.auc(torch.ones(1, 4), torch.tensor([[True, False, True, False]])) == 0.5
    torch.manual_seed(0)
    model = timm.create_model("vit_testbed_fmnist_plain").eval()
    images = torch.randint(0, 255, (4, 28, 28), dtype=torch.uint8)
    rows = diag.stage_report(model, images, tb.normalize_images(images), {})
    assert [r["layer"] for r in rows] == [1, 3, 5]  # the default pruning layers of 8 blocks
    assert all(0.0 <= r["auc_full_wpr"] <= 1.0 and 0.0 <= r["sink_share"] <= 1.0 for r in rows)
    shares = diag.survivors(model, images, tb.normalize_images(images), 0.5, {"random": ("random", {})})
    assert 0.0 <= shares["random"]["foreground_share"] <= 1.0 and not tokenprune.is_patched(model)
    assert 0.0 <= shares["random"]["uncovered_foreground"] <= 1.0
    everything = diag.survivors(model, images, tb.normalize_images(images), 1.0, {"random": ("random", {})})
    assert everything["random"]["uncovered_foreground"] == 0.0  # nothing dropped, nothing uncovered


def test_diagnosis_finds_the_framed_cell_of_a_mosaic():
    from tokenprune.eval import zero_tprune_diagnose as diag

    images, labels = tb.make_mosaics(torch.randint(0, 200, (8, 28, 28), dtype=torch.uint8), torch.arange(8),
                                     torch.arange(4), torch.Generator().manual_seed(5))
    cell = diag.framed_cell(images, 14).view(4, 14, 14)
    frame = diag.frame_patches(images, 14).view(4, 14, 14)
    for i in range(4):
        rows, cols = cell[i].nonzero().unbind(-1)
        assert cell[i].sum() == 49 and rows.max() - rows.min() == 6 and cols.max() - cols.min() == 6
        r, c = int(rows.min()) * 4, int(cols.min()) * 4  # the cell's pixels hold the frame
        assert (images[i, r, c:c + 28] == 255).all() and (images[i, r:r + 28, c] == 255).all()
        assert frame[i].sum() == 24 and not frame[i][~cell[i]].any()
    assert torch.equal(diag.positives(images, 14), diag.framed_cell(images, 14))


def test_each_run_passes_the_split_weights_threads_and_limit(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(family.evaluate, "main", lambda argv: calls.append(argv) or [row(None, None, 1.0, 9.0)])
    args = argparse.Namespace(out=str(tmp_path), split="val", batch_size=7, weights_dir="w", limit=5, threads=1,
                              methods=["tome"], keep=[0.5], random_keep=[0.3], seeds=[0, 4])
    family.run_model("vit_testbed_mosaic", args)
    assert len(calls) == 3  # the methods, then random once per seed
    for argv in calls:
        flags = {flag: argv[argv.index(flag) + 1] for flag in ("--data", "--batch-size", "--checkpoint", "--limit",
                                                               "--threads")}
        assert flags["--data"] == "fashion-mnist-mosaic:val" and flags["--batch-size"] == "7"
        assert flags["--checkpoint"] == str(Path("w") / "vit_testbed_mosaic.safetensors")
        assert flags["--limit"] == "5" and flags["--threads"] == "1" and "--resume" in argv
    assert calls[2][-2:] == ["-o", "seed=4"]


def test_the_plot_draws_random_s_band_and_one_line_per_method(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {}
    monkeypatch.setattr(plt, "close", lambda fig: drawn.setdefault("fig", fig))
    family.plot(tmp_path / "p.png", "m", ROWS)
    ax = drawn["fig"].axes[0]
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == 70.0 and band[:, 1].max() == 87.0  # min-max over the seeds
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert {"tome", "mctf", "zero-tprune", "baseline"} <= set(lines)
    assert list(lines["tome"].get_xdata()) == [0.2, 0.5] and list(lines["tome"].get_ydata()) == [60.0, 88.5]
    assert (tmp_path / "p.png").stat().st_size > 1000
