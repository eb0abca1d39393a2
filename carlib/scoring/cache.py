"""Where a scoring cut keeps its prefix outputs: the cache planner.

`LayerData` runs a layer's prefix once per scoring batch. Before caching, `plan` weighs the
bytes this needs (the prefix outputs of one probe image, plus its int64 target, times the
number of scoring images) against budgets, and places the cache:

- "device": every batch kept on the model's device, if the cache plus one pass (`max_bytes`)
  fits the device budget;
- "host": kept in host memory (pinned when the model is on CUDA) and copied to the device one
  data batch at a time as it is consumed, if it fits the host budget;
- "recompute": nothing kept; the prefix re-runs on each data batch every time it is read.

Every placement yields the same tensors, so the counts are the same. The device must still
hold one batch's prefix outputs plus one pass; where it cannot, `plan` raises a one-line
CarlibError saying what would fit. A placement given explicitly is used without checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psutil
import torch

from carlib.core.errors import CarlibError
from carlib.scoring.options import ScoringOptions

DEVICE_FRACTION = 0.5  # default device budget: this share of the memory free when planning
HOST_FRACTION = 0.5  # default host budget (CUDA models): this share of the available RAM


def gib(n: float) -> str:
    """A byte count for messages: GiB, MiB, or bytes."""
    if n >= 2**30:
        return f"{n / 2**30:.3g} GiB"
    return f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{int(n)} bytes"


def free_bytes(device: torch.device) -> int:
    """Memory the cut could still use on `device`: free CUDA memory (plus what PyTorch's
    allocator holds unused), or the available RAM for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return psutil.virtual_memory().available


def default_budgets(device: torch.device) -> tuple[int, int]:
    """(device budget, host budget) when none is configured. On the CPU the device is the
    host, so there is no separate host tier (budget 0)."""
    device_budget = int(DEVICE_FRACTION * free_bytes(device))
    if device.type == "cpu":
        return device_budget, 0
    return device_budget, int(HOST_FRACTION * psutil.virtual_memory().available)


def count_images(data: Iterable) -> int | None:
    """Images in `data` without reading the images where possible: the targets of decoded
    `Images` (this process's share of a split set), a DataLoader's sampler length, or the
    targets of an in-memory sequence of batches; else one pass over `data` if it can be read
    again; None for a one-shot iterator (or malformed batches)."""
    targets = getattr(data, "targets", None)  # carlib.data.decoded.Images: no batch is read
    if isinstance(targets, torch.Tensor):
        return len(targets)
    sampler = getattr(data, "sampler", None)
    if sampler is not None:
        try:
            return len(sampler)
        except TypeError:
            pass
    if iter(data) is data:
        return None
    try:
        batches = data if isinstance(data, Sequence) else iter(data)
        return sum(len(batch[1]) for batch in batches)
    except (TypeError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class CachePlan:
    """Where a cut keeps its prefix outputs, and the bytes that decided it.

    `bytes`: what the cache holds (0 when recomputed; None when the image count is unknown);
    `per_image`: prefix output plus target bytes of one image; `batch`: images per data batch.
    """

    placement: str
    bytes: int | None
    per_image: int
    images: int | None
    batch: int
    device_budget: int | None = None
    host_budget: int | None = None


def plan(per_image: int, images: int | None, batch: int, options: ScoringOptions,
         device: torch.device, where: str = "the scoring set") -> CachePlan:
    """Place a cache of `images` x `per_image` bytes (see the module docstring) as `options`
    say (placement, budgets, pass size). Budgets of None are the defaults (`default_budgets`),
    read only when the placement is "auto"."""
    placement, max_bytes = options.placement, options.max_bytes
    device_budget, host_budget = options.cache_budget_bytes, options.host_budget_bytes
    total = None if images is None else per_image * images
    if placement != "auto":
        return CachePlan(placement, 0 if placement == "recompute" else total, per_image, images,
                         batch, device_budget, host_budget)
    if device_budget is None or host_budget is None:
        defaults = default_budgets(device)
        device_budget = defaults[0] if device_budget is None else device_budget
        host_budget = defaults[1] if host_budget is None else host_budget
    work = per_image * batch + max_bytes
    if work > device_budget:
        fit = (device_budget - max_bytes) // per_image
        what = (f"lower data.batch_size to {fit}" if fit >= 1
                else "lower max_bytes (method.scoring.pass_mib)")
        raise CarlibError(
            f"{where} does not fit the cache budget of {gib(device_budget)} on {device.type}: "
            f"one batch of {batch} images needs {gib(per_image * batch)} of prefix outputs plus "
            f"{gib(max_bytes)} per pass; {what}, or raise cache_budget_bytes "
            f"(method.scoring.cache_gib) to {gib(work)}")
    if total is None or total + max_bytes <= device_budget:
        chosen = "device"
    elif total <= host_budget:
        chosen = "host"
    else:
        chosen = "recompute"
    return CachePlan(chosen, 0 if chosen == "recompute" else total, per_image, images, batch,
                     device_budget, host_budget)


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.nbytes for t in tensors)


def stow(t: torch.Tensor, placement: str) -> torch.Tensor:
    """`t` as the cache keeps it: as is on the device, or a (pinned, for CUDA) host copy."""
    if placement != "host" or t.device.type == "cpu":
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)


def fetch(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A cached tensor on `device` (asynchronous from pinned memory; a no-op if there)."""
    return t.to(device, non_blocking=True)
