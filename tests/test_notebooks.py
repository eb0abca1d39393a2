"""The notebooks run headless, top to bottom, without an error (from scratch, their committed
outputs cleared): the API tour, and the results notebook on results/ as committed and on a
results folder filled by tiny real runs. They are committed executed, with their figures
(scripts/execute_notebooks.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import TINY_BASE

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "scripts"))
import aggregate  # noqa: E402
import execute_notebooks  # noqa: E402

TINY = [*TINY_BASE, "method.scoring.size=60", "method.n_keep=5", "logger.mode=disabled"]


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A 'python3' kernel spec running this interpreter (whatever venv pytest runs in),
    ahead of any other on JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return "python3"


def execute(name: str, kernel: str) -> nbformat.NotebookNode:
    """Run notebooks/<name> from scratch in its folder (as Jupyter would); raises on any cell
    error."""
    return execute_notebooks.execute(NOTEBOOKS / name, kernel, timeout=300)


def outputs(nb: nbformat.NotebookNode, kind: str) -> int:
    return sum(kind in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.outputs)


def test_car_api_notebook(kernel):
    nb = execute("01_car_api.ipynb", kernel)
    assert outputs(nb, "image/png") == 2   # class importance and curves


def test_results_notebook_as_committed(kernel):
    execute("02_results.ipynb", kernel)


def test_results_notebook_on_runs(kernel, tmp_path, monkeypatch):
    """results/ filled from real runs: an aggregated prune run, an interpret run, and a study
    with only a curves.csv; the notebook's figures (SHOWN) are drawn for each of them."""
    results = tmp_path / "results"

    def script(name: str, *args: str) -> None:
        res = subprocess.run([sys.executable, str(ROOT / "experiments" / name), *args],
                             capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]

    cache = f"paths.cache_dir={tmp_path}/cache"
    script("prune.py", cache, f"hydra.run.dir={tmp_path}/prune", *TINY)
    assert aggregate.main([str(tmp_path / "prune"), "--out", str(results / "prune")]) == 0
    script("interpret.py", cache, f"hydra.run.dir={results}/interpret", "interpret.top_k=3",
           f"interpret.source={tmp_path}/prune", *TINY)
    (results / "curves_only").mkdir()
    shutil.copy(tmp_path / "prune" / "curves.csv", results / "curves_only")
    monkeypatch.setenv("CARLIB_RESULTS", str(results))
    nb = execute("02_results.ipynb", kernel)
    # prune: curves, summary, differences; interpret: color counts; curves_only: curves
    assert outputs(nb, "image/png") == 5
    # summary tables: the aggregated prune study's and the one computed from curves_only
    assert outputs(nb, "text/html") >= 2 + 3


@pytest.mark.parametrize("name", ["01_car_api.ipynb", "02_results.ipynb"])
def test_committed_executed_with_figures(name):
    """Opened on GitHub or in Jupyter, each notebook shows its figures: committed executed, top
    to bottom, without an error output."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
        f"{name}: run scripts/execute_notebooks.py"
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    assert outputs(nb, "image/png") >= 2
