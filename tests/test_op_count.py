"""tokenprune.eval.op_count: the operations a forward launches (what bounds an eager forward on a GPU at small
batches; docs/performance.md)."""
import os

import pytest
import torch
from conftest import images, tiny_timm
from tokenprune.eval import op_count

import tokenprune


def test_the_counter_counts_kernels_not_views():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    with op_count.OpCounter() as counter:
        c = (a + b).view(4, 3).t()
        torch.mm(c, a.t())
        wide = torch.ones(2, dtype=torch.float64)  # an operation's keyword arguments reach it
    assert counter.counts["add"] == 1 and counter.counts["mm"] == 1 and counter.counts["view"] == 1
    assert counter.launching == 3  # the views and the transposes launch nothing
    assert wide.dtype == torch.float64


@pytest.mark.parametrize("setting", [None, "all"])
def test_count_ops_counts_the_pytorch_ops_and_restores_the_setting(monkeypatch, setting):
    if setting is None:
        monkeypatch.delenv("TOKENPRUNE_EXT", raising=False)
    else:
        monkeypatch.setenv("TOKENPRUNE_EXT", setting)
    seen = []
    model = tokenprune.apply(tiny_timm(), "tome", keep=0.5)
    model.register_forward_pre_hook(lambda *_: seen.append((os.environ.get("TOKENPRUNE_EXT"),
                                                            torch.is_grad_enabled())))
    counter = op_count.count_ops(model, images(1))
    # a warm-up forward, then the counted one, both on the reference path and without autograd's recording
    assert seen == [("off", False), ("off", False)]
    assert os.environ.get("TOKENPRUNE_EXT") == setting
    assert counter.counts["index_add"] > 0  # ToMe's merge as PyTorch ops (the CPU build would be one call)


def test_rows_on_the_testbed():
    rows = {r.method: r for r in op_count.op_rows("vit_testbed_fmnist", ["tome", "random"], keep=0.5, batch=2)}
    tome, random = rows["tome"], rows["random"]
    assert tome.unpatched == random.unpatched and tome.blocks == 12
    assert tome.ceiling == tome.unpatched and random.ceiling == random.unpatched  # the truncation costs nothing
    # random drops with one gather where ToMe matches and merges
    assert 0 < random.added_per_block < tome.added_per_block
    assert tome.added_per_block == (tome.patched - tome.unpatched) / 12
    table = op_count.format_rows(list(rows.values()))
    assert f"| vit_testbed_fmnist | tome | 0.5 | 2 | {tome.unpatched} | {tome.patched} | {tome.ceiling} |" in table
    assert op_count.OpRow("m", "x", 0.5, 1, blocks=4, unpatched=10, patched=15, ceiling=10).added_per_block == 1.25


def test_main_prints_the_table_and_refuses_a_bad_model_in_one_line(capsys):
    assert op_count.main(["--model", "vit_testbed_fmnist", "--method", "random"]) == 0
    assert "| vit_testbed_fmnist | random | 0.5 | 1 |" in capsys.readouterr().out  # keep 0.5 and batch 1 by default
    assert op_count.main(["--model", "no_such_model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("op_count: error:") and "no_such_model" in err and err.count("\n") == 1


@pytest.mark.parametrize("method", ["tome", "mctf", "zero-tprune", "random"])
def test_off_the_cpu_no_method_launches_more_operations_for_a_larger_batch(method):
    """On a GPU an eager forward's time follows its launches: none may grow with the batch (a product per sample
    did: MCTF at batch 256 on an H200). The meta device stands for a GPU (what is not the CPU), and runs no data."""
    model = tokenprune.apply(tiny_timm(), method, keep=0.5).to("meta")
    counts = [op_count.count_ops(model, torch.randn(batch, 3, 32, 32, device="meta")).launching for batch in (2, 5)]
    assert counts[0] == counts[1]
