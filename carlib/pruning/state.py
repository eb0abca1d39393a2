"""Resumable runs: a greedy run's state saved after every step, atomically, under a key.

A state file holds one run's trace so far (filters removed, one row per step). Its name is a
hash of everything that determines the run: a `RunState` is made with the run's context (e.g.
the model's weights fingerprint, the scoring indices, the data config) and each run adds its
own parts (layer, criterion, metric, seed, target, ...); the key also holds the state format
`VERSION` and `carlib.__version__`, so a state saved by other code is not resumed. Files are
replaced atomically (temporary file, fsync, rename), so a run killed at any moment leaves
either the previous state or the new one, never a partial file. A state file that cannot be
read anyway (e.g. truncated by hand or by a full disk) is ignored with a warning and the run
starts over (`RunState.load`); a folder that cannot be written is a CarlibError.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from carlib.core.io import atomic_write_text, digest

VERSION = 1


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes and values)."""
    return digest(_tensor_bytes(model))


def _tensor_bytes(model: nn.Module) -> Iterator[bytes]:
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        yield f"{name}|{t.dtype}|{tuple(t.shape)}|".encode()
        yield t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


class RunState:
    """State files under `directory`, one per key = hash(context, parts)."""

    def __init__(self, directory: str | Path, **context: object) -> None:
        self.directory = Path(directory)
        self.context = context

    def key(self, **parts: object) -> str:
        import carlib

        return digest({"version": VERSION, "carlib": carlib.__version__,
                       "context": self.context, "parts": parts})

    def path(self, **parts: object) -> Path:
        return self.directory / f"{self.key(**parts)[:20]}.json"

    def load(self, **parts: object) -> dict | None:
        """The state saved under these parts, or None: the run starts over.

        None where there is no state file, or one saved under another key (another run, state
        format or carlib version: silently, that is what keys are for). A file that cannot be
        read or is not a state (corrupt or truncated JSON, another structure) is reported with
        a `StaleStateWarning` on stderr and ignored, not an error: the state only saves work,
        and the run that starts over overwrites it.
        """
        path = self.path(**parts)
        if not path.is_file():
            return None
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as e:  # ValueError: bad JSON or UTF-8
            return _stale(path, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        if not isinstance(payload, dict) or not isinstance(payload.get("state"), dict):
            return _stale(path, "not a run state")
        return payload["state"] if payload.get("key") == self.key(**parts) else None

    def save(self, state: dict, **parts: object) -> Path:
        """Replace the state saved under these parts (atomically); CarlibError if the folder
        is not writable."""
        payload = {"key": self.key(**parts), "parts": parts, "state": state}
        return atomic_write_text(self.path(**parts), json.dumps(payload, default=str),
                                 hint="choose a writable hydra.run.dir / method.state_dir")


    def slot(self, **parts: object) -> Slot:
        """One run's place among these states: its state loaded and saved under `parts`."""
        return Slot(self, parts)


@dataclass(frozen=True)
class Slot:
    """A run's saved state: `RunState` files under one key (`RunState.slot`)."""

    states: RunState
    parts: dict

    def load(self) -> dict | None:
        return self.states.load(**self.parts)

    def save(self, state: dict) -> Path:
        return self.states.save(state, **self.parts)


class StaleStateWarning(UserWarning):
    """A saved run state that cannot be used (see `RunState.load`)."""


def _stale(path: Path, why: str) -> None:
    warnings.warn(f"ignoring the unreadable run state {path} ({why}); starting over",
                  StaleStateWarning, stacklevel=3)
    return None
