"""Which code and machine made a result: carlib's version and, where carlib runs from a git
checkout, the commit and whether tracked files outside results/ had uncommitted changes
(`git_dirty`: the studies write their CSVs into results/ as they go, which changes no code);
torch's version and the CPU model, because the same code trains slightly different networks on
different CPUs (float sums in the order of each CPU's kernels)."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

# the keys of provenance(), in order
FIELDS = ("carlib_version", "git_commit", "git_dirty", "torch_version", "cpu")


def _git(root: Path, *args: str) -> str | None:
    """`git -C root args` output, stripped; None where git or the checkout is missing."""
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def checkout_state(root: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout at `root`; dirty: tracked files outside results/
    differ from the commit. (None, None) where `root` is not a git checkout."""
    commit = _git(root, "rev-parse", "HEAD") if (root / ".git").exists() else None
    status = (_git(root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                   ":(exclude)results") if commit else None)
    return commit, None if status is None else bool(status)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (`cpuinfo`'s first "model name" line on Linux), else what
    `platform` knows of it."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.cache
def provenance() -> dict:
    """{"carlib_version", "git_commit", "git_dirty", "torch_version", "cpu"} of the run: the
    commit and dirty flag of the checkout holding the package (`checkout_state`; "unknown" and
    None outside a git checkout), torch's version and `cpu_model()`."""
    import torch

    from carlib import __version__

    commit, dirty = checkout_state(Path(__file__).resolve().parents[2])
    return {"carlib_version": __version__, "git_commit": commit or "unknown",
            "git_dirty": dirty, "torch_version": str(torch.__version__), "cpu": cpu_model()}
