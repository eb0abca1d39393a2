"""Tidy results: one row per measurement, written atomically so no CSV is ever half-written."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from carlib.core.errors import writing


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write `df` to `path` via a temporary file and a rename (atomic on POSIX); an OSError
    (read-only folder, full disk) becomes a CarlibError naming the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    return path


def save_figure(fig, path: str | Path, dpi: int = 150) -> Path:
    """Save a matplotlib figure atomically (temporary file, then rename); an OSError becomes a
    CarlibError naming the path."""
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    with writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    return path
