"""Files carlib writes and the digests that name them.

Every file is written atomically (`atomic_path`: a temporary file beside it, fsync, rename),
so a run killed at any moment leaves the previous file or the new one, never half of one; an
OSError (read-only folder, full disk) becomes a CarlibError naming the path. `digest` is the
one hashing recipe behind cache file names, resume keys and weight fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pandas as pd

from carlib.core.errors import WRITE_HINT, writing


@contextmanager
def atomic_path(path: str | os.PathLike, *, hint: str = WRITE_HINT,
                private: bool = False) -> Iterator[Path]:
    """A temporary path for the body to write `path`'s content to; when the body ends, the
    file is fsynced and renamed to `path` (atomic on POSIX). An OSError becomes a CarlibError
    naming `path` and `hint`; on any failure the temporary file is removed.

    The temporary file is `<name>.tmp` beside `path` (a run killed while writing leaves it to
    the next run, which writes it again), or with `private` (a file parallel jobs may write at
    once, e.g. a cached checkpoint) in a folder of this process's own, `.<name>.<pid>.tmp/`.
    Its name is the same either way: torch.save names its archive after the file.
    """
    path = Path(path)
    work = path.with_name(f".{path.name}.{os.getpid()}.tmp") if private else path.parent
    tmp = work / f"{path.name}.tmp"
    with writing(path, tmp, hint=hint):
        try:
            work.mkdir(parents=True, exist_ok=True)
            yield tmp
            _fsync(tmp)
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        finally:
            if private:
                with suppress(OSError):
                    work.rmdir()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], *,
                 hint: str = WRITE_HINT, private: bool = False) -> Path:
    """`write(tmp)`, then `tmp` moved to `path` atomically (see `atomic_path`); returns `path`."""
    with atomic_path(path, hint=hint, private=private) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, hint: str = WRITE_HINT) -> Path:
    """Write `text` to `path` atomically (see `atomic_path`)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write, hint=hint)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write `df` to `path` atomically (tidy results: one row per measurement, no index)."""
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def save_figure(fig, path: str | Path, dpi: int = 150) -> Path:
    """Save a matplotlib figure atomically, in the format its suffix names."""
    fmt = Path(path).suffix[1:].lower() or None
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight",
                                                      format=fmt))


def digest(obj: object, *, algo: str = "sha256", n: int | None = None) -> str:
    """Hex digest (its first `n` digits, if given) of `obj` with hashlib's `algo`: bytes as
    they are, an iterator of bytes chunk after chunk, anything else as canonical JSON (sorted
    keys; values JSON cannot hold by their str)."""
    h = hashlib.new(algo)
    if isinstance(obj, bytes | bytearray | memoryview):
        h.update(obj)
    elif isinstance(obj, Iterator):
        for chunk in obj:
            h.update(chunk)
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()[:n]
