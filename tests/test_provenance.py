"""Provenance: the version, commit and dirty flag a run records, against git itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import carlib
from carlib.core.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]


def test_provenance_names_this_checkout():
    p = provenance()
    assert p["carlib_version"] == carlib.__version__
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                             "--untracked-files=no"], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert p["git_commit"] == head and p["git_dirty"] == bool(status)
