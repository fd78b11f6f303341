"""notebooks/analysis.ipynb executes top to bottom on a sweep store and writes its four figures.

:func:`execute_notebook` runs the notebook with nbclient in a kernel on this interpreter (``sys.executable``,
through a kernelspec written to a temp dir, so a user-level ``python3`` kernelspec pointing elsewhere cannot
be picked up) and with the notebook's settings passed as environment variables.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import nbformat

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"
SWEEP_STORE = REPO / "tests" / "evaluation" / "sweep_store.py"
KERNEL = "mcl-test-python"
FIGURES = (
    "matrices.png",
    "task_curves.png",
    "leaderboard.png",
    "stability_plasticity.png",
    "order_sensitivity.png",
)


def load_sweep_store() -> ModuleType:
    """The store builder of tests/evaluation/sweep_store.py (the module already imported, if any)."""
    if "sweep_store" in sys.modules:
        return sys.modules["sweep_store"]
    spec = importlib.util.spec_from_file_location("sweep_store", SWEEP_STORE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sweep_store"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def execute_notebook(
    tracking_uri: str,
    sweep: str | None,
    figures_dir: str | Path,
    experiment: str = "mcl-sweeps",
    timeout: int = 600,
) -> nbformat.NotebookNode:
    """Execute notebooks/analysis.ipynb on ``sweep`` (None = the newest) and return the executed notebook.

    The kernel runs ``sys.executable`` with ``MLFLOW_TRACKING_URI``, ``MCL_SWEEP``, ``MCL_EXPERIMENT`` and
    ``MCL_FIGURES_DIR`` set, in ``figures_dir`` as working directory. A failing cell raises
    :class:`nbclient.exceptions.CellExecutionError` with its traceback.
    """
    import nbclient
    import nbformat
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    figures = Path(figures_dir).resolve()
    figures.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MCL_SWEEP": sweep or "",
        "MCL_EXPERIMENT": experiment,
        "MCL_FIGURES_DIR": str(figures),
        "MPLBACKEND": "Agg",
    }
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with tempfile.TemporaryDirectory(prefix="mcl-kernels-") as kernels:
        write_kernel_spec(Path(kernels) / KERNEL)  # argv: this interpreter, -m ipykernel_launcher
        specs = KernelSpecManager(kernel_dirs=[kernels])
        assert specs.get_kernel_spec(KERNEL).argv[0] == sys.executable
        km = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)
        client = nbclient.NotebookClient(
            nb, km=km, kernel_name=KERNEL, timeout=timeout, resources={"metadata": {"path": str(figures)}}
        )
        client.execute(env=env)
    return nb


def cell_outputs(nb: nbformat.NotebookNode) -> str:
    """The text of every stream and plain-text output of the notebook, concatenated."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def check_executed(nb: nbformat.NotebookNode, figures_dir: Path) -> None:
    """Every code cell ran without error, and the figures are real PNGs."""
    from PIL import Image

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells and all(c.execution_count for c in code_cells), "some code cells did not run"
    errors = [o for c in code_cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    for name in FIGURES:
        path = figures_dir / name
        assert path.exists(), f"the notebook did not write {path}"
        assert path.stat().st_size > 10_000, f"{path} is only {path.stat().st_size} bytes"
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 200, (path, image.format, image.size)


@pytest.mark.slow
def test_notebook_runs_on_a_sweep_store_and_writes_the_figures(tmp_path):
    store = load_sweep_store()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    unfinished = store.TrialSpec("replay", 2, store.MATRICES[("replay", 0)], finished=False)
    # sequential_lora also in a second task order (its matrices in that order): the order cells have 2 orders.
    second_order = [t for t in store.order_trials() if t.order == 1]
    store.build_sweep(uri, "alpha", store.default_trials() + second_order + [unfinished])
    store.build_sweep(uri, "beta", store.default_trials(("replay",)))  # newer: the default sweep
    figures = tmp_path / "figures"

    nb = execute_notebook(uri, "alpha", figures)

    check_executed(nb, figures)
    text = cell_outputs(nb)
    assert f"python:       {sys.executable}" in text  # the kernel ran this interpreter
    assert "sweep 'alpha'" in text and "6 usable trials, 1 skipped" in text
    assert "shape > count > color" in text  # the order table lists sequential_lora's second order
    assert "mfn_order_std" in text  # the leaderboard's order-sensitivity column
    assert "unfinished: status RUNNING" in text
    assert "beta" in text  # the across-sweeps table compares alpha with the newer sweep
    # The evalpolicy- cells: the zero-shot row and the sweep store's probe (retention 0.5).
    ran = {c.id: c for c in nb.cells if c.id.startswith("evalpolicy-") and c.cell_type == "code"}
    assert len(ran) == 2 and all(c.execution_count for c in ran.values())
    assert "zero_shot" in cell_outputs(nbformat_cells(ran["evalpolicy-01"]))
    assert "vqa" in cell_outputs(nbformat_cells(ran["evalpolicy-03"]))


def nbformat_cells(cell):
    """A notebook holding only ``cell`` (to read one cell's outputs with :func:`cell_outputs`)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [cell]
    return nb
