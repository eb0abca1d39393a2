"""Several processes (torchrun, SLURM tasks): whole greedy runs per process, or image shards.

experiments/prune.py joins the group (`join`: gloo, on CPUs and GPUs alike), divides its
greedy runs over the processes (`assign`: longest first by estimated cost) and gathers their
traces on rank 0 (`gather`), so every run is computed exactly as in one process and the
results are byte-identical.

A single scoring round can instead be split by images: each process scores a shard of the
scoring batches.

Hit counts are integers, so summing them over processes (`all_reduce_tally`) gives exactly the
one-process counts and CAR scores; loss sums are float64 and agree to rounding (the order of
summation differs). Launch with, e.g.,

    python -m torch.distributed.run --nproc_per_node=2 my_script.py

where my_script.py calls `init_from_env()`, scores `shard(batches)` with
`carlib.scoring.tally`, and combines the result with `all_reduce_tally`. Backend: gloo on
CPU, nccl when CUDA is available.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from carlib.errors import CarlibError
from carlib.scoring import LayerData, Tally, tally

T = TypeVar("T")


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes when WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batches: Iterable, rank: int | None = None, world: int | None = None) -> list:
    """This process's scoring batches: every `world`-th one, starting at `rank` (kept while
    iterating once: the other batches are passed over, never held)."""
    if rank is None or world is None:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(itertools.islice(batches, rank, None, world))
    if not mine:
        raise CarlibError(f"process {rank} of {world} has no scoring batch; use at least "
                          f"{world} batches (smaller batches or fewer processes)")
    return mine


def all_reduce_tally(t: Tally) -> Tally:
    """Sum a Tally over all processes (a no-op without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    per_class = t.correct_per_class is not None
    ints = [torch.tensor([t.n, t.base_correct, t.rechecked]), t.correct, t.flips_lost,
            t.flips_gained]
    if per_class:
        ints += [t.correct_per_class.flatten(), t.base_correct_per_class]
    ints_t = torch.cat(ints).to(device)
    floats = torch.cat([torch.tensor([t.base_loss], dtype=torch.float64), t.loss]).to(device)
    dist.all_reduce(ints_t)
    dist.all_reduce(floats)
    ints_t, floats = ints_t.cpu(), floats.cpu()
    nc = len(t.candidates)
    n, base_correct, rechecked = ints_t[:3].tolist()
    correct, lost, gained = ints_t[3:3 + 3 * nc].view(3, nc)
    rest = ints_t[3 + 3 * nc:]
    cpc = base_cpc = None
    if per_class:
        classes = t.base_correct_per_class.numel()
        cpc, base_cpc = rest[:nc * classes].view(nc, classes), rest[nc * classes:]
    return Tally(list(t.candidates), n, correct, floats[1:], base_correct, float(floats[0]),
                 cpc, base_cpc, rechecked, lost, gained)


def distributed_tally(cut: LayerData, candidates: list[int], metric: str = "top1",
                      **options: object) -> Tally:
    """`tally` on this process's cut (built on `shard(...)` data), summed over processes."""
    return all_reduce_tally(tally(cut, candidates, metric, **options))


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


def _collective(fn: Callable[[], T]) -> T:
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
    _collective(lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def gather(obj: object) -> list | None:
    """Every rank's `obj` on rank 0, in rank order (None on the others); [obj] alone."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    rank, world = rank_world()
    got: list | None = [None] * world if rank == 0 else None
    _collective(lambda: dist.gather_object(obj, got, dst=0))
    return got


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        _collective(dist.barrier)


def leave() -> None:
    """Leave the process group, if joined."""
    if dist.is_initialized():
        dist.destroy_process_group()
