"""User-facing errors: one clear line, no traceback (the scripts' guard, experiments/common.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

WRITE_HINT = "choose a writable hydra.run.dir / paths.cache_dir"


class CarlibError(Exception):
    """Bad input or missing file. The message says what was wrong and what to do."""


@contextmanager
def writing(path: str | os.PathLike, *temporary: str | os.PathLike,
            hint: str = WRITE_HINT) -> Iterator[None]:
    """Turn an OSError (read-only folder, full disk, a file where a folder should be) raised
    while writing `path` into a CarlibError naming the path and `hint`; the `temporary` files
    of an atomic write are removed first."""
    try:
        yield
    except OSError as e:
        for tmp in temporary:
            with suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        why = e.strerror or str(e) or type(e).__name__
        raise CarlibError(f"cannot write {path} ({why}); {hint}") from e
