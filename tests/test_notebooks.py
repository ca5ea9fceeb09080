"""Every notebook run the way Jupyter's Run All runs it: a real kernel, `__name__ == "__main__"`, the cells in order.

`nbdev-test` runs cells in its own IPython shell and skips `#| eval: false` cells, a directive Jupyter ignores, so a
cell that crashes in JupyterLab can pass it. Here only the cells flagged with one of the project's `tst_flags` (slow,
gpu, notest) and the `nbdev_export()` cell (it would rewrite gat_tutorial/) are left out. One test per notebook:
`pytest tests/test_notebooks.py -k 10_train`.
"""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbdev.config import get_config
from nbdev.process import NBProcessor

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds, nbdev-test's default: a hung cell fails instead of stalling the run


def jupyter_cells(path):
    "A notebook of the code cells at `path` that Run All executes, less the tst_flags cells and the export cell."
    skip = set(get_config(ROOT).tst_flags.split())
    cells = NBProcessor(path, rm_directives=False, process=True).nb.cells  # nbdev's own reading of `#|` directives
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c.source) for c in cells if c.cell_type == "code"
                                           and "nbdev_export(" not in c.source and not skip & c.directives_.keys()])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_a_jupyter_kernel(path):
    client = NotebookClient(jupyter_cells(path), timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})  # the kernel starts in nbs/, as Jupyter's does
    client.execute()
