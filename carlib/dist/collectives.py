"""Several processes (torchrun, SLURM tasks): the process group and its collectives.

`join` joins the group torchrun describes (gloo, on CPUs and GPUs alike); `broadcast`,
`gather` and `barrier` carry Python objects between the ranks, and a rank that is lost while
another waits for it becomes `PeerFailed`. experiments/prune.py uses them in both of its ways
to spread a job: whole greedy runs per process (`assign`: longest first by estimated cost,
traces gathered on rank 0), or the scoring and held-out images split by batches over the
processes (`carlib.dist.shards`, whose exact totals are collectives of this module). Either way
every run is computed exactly as in one process and the results are byte-identical.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist

from carlib.core.errors import CarlibError

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join(timeout_s: float = 7 * 24 * 3600) -> tuple[int, int]:
    """Join the process group that torchrun (or `env://` variables) describes, when
    WORLD_SIZE > 1: gloo, which carries Python objects between processes on any device (runs
    are exchanged whole, no tensor collective needs NCCL). `timeout_s`: how long a process
    may wait for the others (a rank that finished its runs waits for the slowest); a process
    that dies is noticed by torchrun, which stops the others at once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return rank_world()


def assign(costs: Sequence[float], world: int) -> list[int]:
    """The rank of each task: longest first (by cost, then index) to the least loaded rank
    (then the lowest); deterministic, so every rank computes the same assignment."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


class PeerFailed(CarlibError):
    """Another process of the group stopped while this one waited for it."""


def collective(fn: Callable[[], T]) -> T:
    """`fn()`, a collective: a lost peer (gloo's connection error) becomes `PeerFailed`."""
    try:
        return fn()
    except RuntimeError as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise PeerFailed(f"another process of this run stopped while process "
                         f"{dist.get_rank()} waited for it ({why})") from None


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (`obj` itself without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    collective(lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def gather(obj: object) -> list | None:
    """Every rank's `obj` on rank 0, in rank order (None on the others); [obj] alone."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    rank, world = rank_world()
    got: list | None = [None] * world if rank == 0 else None
    collective(lambda: dist.gather_object(obj, got, dst=0))
    return got


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        collective(dist.barrier)


def leave() -> None:
    """Leave the process group, if joined."""
    if dist.is_initialized():
        dist.destroy_process_group()
