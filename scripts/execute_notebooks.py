"""Execute the notebooks in place, so they are committed with their outputs and figures.

    .venv/bin/python scripts/execute_notebooks.py              # every notebooks/*.ipynb
    .venv/bin/python scripts/execute_notebooks.py notebooks/02_results.ipynb

Each notebook runs from scratch (old outputs cleared) in its own folder, headless, on this
interpreter's kernel (the venv's; one OpenMP thread), with no execution timings recorded, so a
rerun on the same results changes only what changed. 02_results.ipynb shows what `results/`
holds: rerun it after regenerating the studies. A cell error stops with exit status 1 and the
notebook is left as it was.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]


def clear(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook without outputs and execution counts."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
    return nb


def execute(path: Path, kernel: str = "python3", timeout: int = 600) -> nbformat.NotebookNode:
    """Run `path` from scratch in its folder; returns the executed notebook (not written)."""
    nb = clear(nbformat.read(path, as_version=4))
    NotebookClient(nb, timeout=timeout, kernel_name=kernel, record_timing=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def kernel_here(folder: Path) -> None:
    """A 'python3' kernel spec running this interpreter, first on JUPYTER_PATH."""
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    os.environ["JUPYTER_PATH"] = f"{folder}{os.pathsep}{os.environ.get('JUPYTER_PATH', '')}"
    os.environ["OMP_NUM_THREADS"] = "1"


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    with tempfile.TemporaryDirectory(prefix="carlib-kernel-") as tmp:
        kernel_here(Path(tmp))
        for path in paths:
            try:
                nb = execute(path.resolve())
            except CellExecutionError as e:
                print(f"error: {path}: a cell failed:\n{e}", file=sys.stderr)
                return 1
            nbformat.write(nb, path)
            images = sum("image/png" in o.get("data", {}) for c in nb.cells
                         if c.cell_type == "code" for o in c.outputs)
            print(f"{path}: executed, {images} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
