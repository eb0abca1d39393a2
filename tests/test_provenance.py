"""Provenance: the version, commit and dirty flag a run records, against git itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import carlib
from carlib.core.provenance import FIELDS, checkout_state, cpu_model, provenance

ROOT = Path(__file__).resolve().parents[1]


def test_provenance_names_this_checkout():
    p = provenance()
    assert p["carlib_version"] == carlib.__version__
    assert p["torch_version"] == torch.__version__
    assert p["cpu"] == cpu_model() and isinstance(p["cpu"], str) and p["cpu"]
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                             "--untracked-files=no", "--", ".", ":(exclude)results"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert p["git_commit"] == head and p["git_dirty"] == bool(status)


def test_results_written_by_the_studies_do_not_make_the_checkout_dirty(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.csv").write_text("a\n1\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    commit, dirty = checkout_state(tmp_path)
    assert len(commit) == 40 and dirty is False
    (tmp_path / "results" / "summary.csv").write_text("a\n2\n")  # a study rewrote it
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert checkout_state(tmp_path) == (commit, False)
    (tmp_path / "code.py").write_text("x = 2\n")
    assert checkout_state(tmp_path) == (commit, True)
    assert checkout_state(tmp_path / "results") == (None, None)  # not a checkout's root


def test_cpu_model_reads_cpuinfo_and_falls_back(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Foo CPU @ 2.0GHz\nflags\t: x\n")
    assert cpu_model(info) == "Foo CPU @ 2.0GHz"
    assert cpu_model(tmp_path / "missing")  # no cpuinfo: platform's name, never empty


def test_provenance_has_exactly_its_fields():
    assert tuple(provenance()) == FIELDS
