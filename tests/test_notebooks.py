"""Every notebook in notebooks/ runs top to bottom (a failing cell fails the suite), and is stored without
outputs (so diffs stay readable and no stale numbers sit in git)."""
from __future__ import annotations

from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_method_comparison.ipynb",
                                          "03_vlm_hiprune.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    dirty = [i for i, cell in enumerate(book.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} keep outputs; clear them (Jupyter: Edit > Clear All Outputs, "
                       f"or `jupyter nbconvert --clear-output --inplace {path.name}`)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    book = nbformat.read(path, as_version=4)
    # The notebooks evaluate 500 test images (a top-1 worth reading); the test runs the same code on 100 (a
    # testbed forward of 500 images is seconds, and notebooks 01 and 02 run 19 of them)
    for cell in book.cells:
        if cell.cell_type == "code":
            cell.source = cell.source.replace("[:500]", "[:100]")
    # The per-cell timeout guards against a hang, it is not a speed test: notebook 02's sweep (12 configurations
    # on 500 images, 2 threads) ran within 300 s in CI alone, and past it on a machine shared with other jobs.
    nbclient.NotebookClient(book, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
