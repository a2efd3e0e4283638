"""Runs every notebook in `notebooks/` top to bottom, in fast mode.

Each notebook is executed in memory with `nbclient` (the committed file is
not modified), in a temporary working directory, with
`KERAS_MTP_NOTEBOOK_FAST=1` (a few training steps) and the JAX backend. Any
cell that raises fails the test. The committed notebooks must also carry
the outputs of a real run: at least one embedded PNG plot, and no errors.
"""

import glob
import hashlib
import os

import pytest

# requirements.txt installs them; a missing one fails, it does not skip.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
CELL_TIMEOUT_S = 600

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("KERAS_BACKEND", "jax") != "jax",
        reason="the notebooks run under JAX; one backend leg is enough",
    ),
]


def _ids(paths):
    return [os.path.basename(path) for path in paths]


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_notebooks_exist():
    names = _ids(NOTEBOOKS)
    assert "quickstart.ipynb" in names and "mtp_ablation.ipynb" in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_committed_outputs(path):
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    outputs = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    ]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, f"{path} was committed with an error output"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path} has no committed PNG output: run it and commit"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_in_fast_mode(path, tmp_path):
    import nbclient
    import nbformat

    before = _digest(path)
    notebook = nbformat.read(path, as_version=4)
    env = dict(
        os.environ,
        KERAS_MTP_NOTEBOOK_FAST="1",
        KERAS_BACKEND="jax",
        TMPDIR=str(tmp_path),  # the notebooks' temporary directories
        PYTHONPATH=os.pathsep.join(
            p for p in (ROOT, os.environ.get("PYTHONPATH")) if p
        ),
    )
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=env)  # raises CellExecutionError on any error
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert images, f"{path} produced no plot in fast mode"
    assert _digest(path) == before, f"{path} was modified by the test"
