"""A greedy run's progress: a bar on a terminal, else rate-limited log lines with an ETA."""

from __future__ import annotations

import logging
import math
import sys
import time

from tqdm.auto import tqdm

# the greedy loop's logger: Hydra's job log and the tests read lines from this name
log = logging.getLogger("carlib.pruning.greedy")


def duration(seconds: float) -> str:
    """45s, 1m02s, 2h05m (? when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def is_terminal(stream: object) -> bool:
    """Whether `stream` is a terminal (False for a closed stream or one without isatty)."""
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def work_left(candidates: int, bases: int, k: int, steps: int) -> float:
    """Work of the `steps` steps left after one that scored `candidates` filters in `bases`
    tallies (every step loses k candidates); steps that do not tally count 1 each."""
    if not bases:
        return float(steps)
    return float(sum(max(candidates - j * k, 0) + bases for j in range(1, steps + 1)))


class Progress:
    """A greedy run's progress: a tqdm bar when stderr is a terminal, else one line per step
    with elapsed time and ETA (batch jobs, SLURM and Hydra logs), at most one every
    `log_every` seconds but always for the first and the last step. Lines go to the
    `carlib.pruning.greedy` logger at INFO (Hydra writes it to <run dir>/<job>.log and the
    console), or to stderr where logging is not configured. `enabled=False`: neither.

    `total` steps of which `done` are finished; `n_remove` filters of which `removed` are.
    The ETA is the elapsed time per unit of work so far times the work left, a step's work
    being its candidate evaluations plus base passes for criteria that tally, else 1.
    """

    def __init__(self, layer: str, criterion: str, total: int, done: int, n_remove: int,
                 removed: int, enabled: bool, log_every: float) -> None:
        tty = is_terminal(sys.stderr)
        self.bar = tqdm(total=n_remove, initial=removed, leave=False,
                        desc=f"{criterion:>6} {layer}", disable=not (enabled and tty))
        self.lines = enabled and not tty
        self.desc, self.total, self.first = f"{layer} {criterion}", total, done + 1
        self.log_every = log_every
        self.clock = time.monotonic
        self.start = self.clock()
        self.last: float | None = None  # when the last line was written
        self.work = 0.0  # done in this process

    def update(self, step: int, removed: int, left: int, acc: float | None, work: float,
               work_left: float) -> None:
        """Step `step` removed `removed` filters, `left` remain; `work` done, `work_left`."""
        self.bar.update(removed)
        if acc is not None:
            self.bar.set_postfix(acc=f"{acc:.3f}")
        if not self.lines:
            return
        now = self.clock()
        self.work += work
        if (step not in (self.first, self.total) and self.last is not None
                and now - self.last < self.log_every):
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / self.work * work_left if self.work > 0 else math.nan
        line = (f"{self.desc}: step {step}/{self.total}, {left} filters left, "
                f"elapsed {duration(elapsed)}, ETA {duration(eta)}")
        if log.hasHandlers():
            log.info(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()
