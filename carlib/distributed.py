"""CAR scoring over several processes (torchrun): each scores a shard of the scoring batches.

Hit counts are integers, so summing them over processes (`all_reduce_tally`) gives exactly the
one-process counts and CAR scores; loss sums are float64 and agree to rounding (the order of
summation differs). Launch with, e.g.,

    python -m torch.distributed.run --nproc_per_node=2 my_script.py

where my_script.py calls `init_from_env()`, scores `shard(batches)` with
`carlib.scoring.tally`, and combines the result with `all_reduce_tally`. Backend: gloo on
CPU, nccl when CUDA is available.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

from carlib.errors import CarlibError
from carlib.scoring import LayerData, Tally, tally


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
    """This process's scoring batches: every `world`-th one, starting at `rank`."""
    if rank is None or world is None:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(batches)[rank::world]
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
