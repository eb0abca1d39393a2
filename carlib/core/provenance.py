"""Which code made a result: carlib's version and, where carlib runs from a git checkout, the
commit and whether tracked files had uncommitted changes (`git_dirty`)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path


def _git(root: Path, *args: str) -> str | None:
    """`git -C root args` output, stripped; None where git or the checkout is missing."""
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@functools.cache
def provenance() -> dict:
    """{"carlib_version", "git_commit", "git_dirty"} of the carlib being run: commit and dirty
    flag of the checkout holding the package ("unknown" and None outside a git checkout)."""
    from carlib import __version__

    root = Path(__file__).resolve().parents[2]
    commit = _git(root, "rev-parse", "HEAD") if (root / ".git").exists() else None
    status = _git(root, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {"carlib_version": __version__, "git_commit": commit or "unknown",
            "git_dirty": None if status is None else bool(status)}
