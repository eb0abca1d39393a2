"""Image sets split over processes by whole batches, with totals that are one process's, bit
for bit.

Under torchrun (`carlib.dist.collectives.join`), each of W processes can hold every W-th batch of
the scoring and held-out sets: global batches r, r + W, r + 2W, ... on rank r (`split`, a
`Shard` on `carlib.data.decoded.Images.shard`). It reads, decodes and scores only those. Whatever
a pass over such a set sums is then made whole on every rank:

- counts (hits, flips, images, per-class hits) are summed over the processes (`counts`, an
  all-reduce): integers, so exactly one process's;
- float sums (loss, activation and gradient sums) are kept as one partial sum per batch,
  gathered and added in global batch order (`fold`): the very additions one process makes,
  in its order, so the totals are one process's to the last bit (`fold` also runs alone:
  one process adds its batches' partial sums the same way);
- per-image values (the paired held-out hits) are put back in image order (`in_order`);
- a value measured on the first batch alone (the engine guard's error probe) is rank 0's,
  which holds global batch 0 (`agree`).

Every rank therefore takes the same greedy decisions; each batch is computed as one process
computes it (same images, same pass shapes), so the counts, losses and scores do not depend on
the number of processes. Each collective is called by all ranks at the same point of their
identical runs; a set without a shard, or one process, needs none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from carlib.core.errors import CarlibError
from carlib.dist.collectives import broadcast, collective

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """The batches that process `rank` of `world` holds of a set of `size` images in batches
    of `batch_size`: global batches rank, rank + world, ..."""

    rank: int
    world: int
    size: int
    batch_size: int

    @property
    def batches(self) -> int:
        """Batches of the whole set."""
        return -(-self.size // self.batch_size)

    @property
    def ids(self) -> range:
        """Global indices of this process's batches, in order."""
        return range(self.rank, self.batches, self.world)

    def indices(self) -> torch.Tensor:
        """Positions in the whole set of this process's images, in order."""
        b = self.batch_size
        return torch.cat([torch.arange(i * b, min((i + 1) * b, self.size)) for i in self.ids])


def split(n: int, batch_size: int, rank: int, world: int, what: str = "scoring set") -> Shard:
    """Process `rank`'s shard of `n` images in batches of `batch_size`; every process needs at
    least one batch."""
    shard = Shard(rank, world, n, batch_size)
    if shard.batches < world:
        raise CarlibError(f"the {what} has {shard.batches} batch(es) of {batch_size} images for "
                          f"{world} processes; lower data.batch_size to at most "
                          f"{max(1, n // world)} or start fewer processes")
    return shard


def of(data: object) -> Shard | None:
    """The shard `data` holds, None for a whole set."""
    return getattr(data, "shard", None)


def _spread(data: object) -> Shard | None:
    """The shard of `data` where the set is split over several processes, else None."""
    shard = of(data)
    if shard is None or shard.world == 1:
        return None
    if not dist.is_initialized() or dist.get_world_size() != shard.world:
        raise CarlibError(f"the data is split over {shard.world} processes, but this process "
                          "is not in a process group of that size; start the processes with "
                          "torchrun (carlib.dist.collectives.join) or use the whole set")
    return shard


def counts(data: object, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Integer tensors summed over the processes that hold `data`'s batches (on the CPU, in
    their shapes); as given, on the CPU, for a whole set."""
    device = next((v.device for v in values if v.device.type != "cpu"), torch.device("cpu"))
    flat = torch.cat([v.detach().reshape(-1).long().to(device) for v in values]).cpu()  # 1 sync
    if _spread(data) is not None:
        collective(lambda: dist.all_reduce(flat))
    out, at = [], 0
    for v in values:
        out.append(flat[at:at + v.numel()].view(v.shape))
        at += v.numel()
    return out


def in_order(data: object, items: list[T]) -> list[T]:
    """One item per batch of this process (in its order) -> the items of every batch of the
    whole set, in global batch order, on every process."""
    shard = _spread(data)
    if shard is None:
        return items
    got: list = [None] * shard.world
    collective(lambda: dist.all_gather_object(got, items))
    return [got[b % shard.world][b // shard.world] for b in range(shard.batches)]


def fold(data: object, rows: Iterable[torch.Tensor]) -> torch.Tensor:
    """Per-batch partial sums (float64, one tensor per batch of this process) added up in
    global batch order, starting from zero: the sums one process computes. On the CPU."""
    local = list(rows)
    if not local:
        raise CarlibError("nothing to add up: the data has no batch")
    rows = in_order(data, list(torch.stack([r.detach() for r in local]).double().cpu()))
    total = torch.zeros_like(rows[0])
    for r in rows:
        total += r
    return total


def take(data: Iterable, positions: Sequence[int]) -> torch.Tensor:
    """The inputs at `positions` of the whole set (in that order, on the CPU), read where they
    are: each process contributes those among its batches."""
    want = set(map(int, positions))
    shard, found, at = of(data), {}, 0
    for j, (x, _) in enumerate(data):
        start = at if shard is None else shard.ids[j] * shard.batch_size
        for i in sorted(want.intersection(range(start, start + len(x)))):
            found[i] = x[i - start].cpu()
        at += len(x)
    if _spread(data) is not None:
        got: list = [None] * dist.get_world_size()
        collective(lambda: dist.all_gather_object(got, found))
        found = {i: t for part in got for i, t in part.items()}
    missing = want - found.keys()
    if missing:
        raise CarlibError(f"the data has no image at position {min(missing)} (it holds "
                          f"{len(found)} of those asked for)")
    return torch.stack([found[int(i)] for i in positions])


def agree(data: object, value: T) -> T:
    """Rank 0's `value` (measured on global batch 0) where `data` is split; else `value`."""
    return value if _spread(data) is None else broadcast(value)
