"""Measuring a model on data: hits per metric, per-image losses, accuracy."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from carlib.core.errors import CarlibError
from carlib.core.module import eval_mode
from carlib.core.precision import float32_exact
from carlib.dist import shards

METRICS = ("top1", "top5", "loss")


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise CarlibError(f"unknown metric '{metric}'; valid: {', '.join(METRICS)}")


def hits(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Bool per row (over the last dim of logits): target among the top-k predictions."""
    if k == 1:
        return logits.argmax(-1) == targets
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == targets.unsqueeze(-1)).any(-1)


def topk_of(metric: str) -> int:
    """The k whose hits a metric counts (the loss metric still counts top-1 accuracy)."""
    return 5 if metric == "top5" else 1


def losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy in float64 (logits may carry leading batch dims)."""
    flat = logits.reshape(-1, logits.shape[-1]).double()
    t = targets.expand(logits.shape[:-1]).reshape(-1)
    return F.cross_entropy(flat, t, reduction="none").view(logits.shape[:-1])


@torch.no_grad()
def image_hits(model: nn.Module, data: Iterable, k: int = 1) -> torch.Tensor:
    """Bool per image of `data` (in order, on the CPU): the target is among the model's top-k.
    Where `data` is split over processes (`carlib.dist.shards`): every image of the whole set."""
    with eval_mode(model):
        out = [hits(model(x), y, k).cpu() for x, y in data]
    if not out:
        raise CarlibError("evaluation data is empty; check the dataset and subset sizes")
    return torch.cat(shards.in_order(data, out))


@torch.no_grad()
@float32_exact()
def evaluate(model: nn.Module, data: Iterable) -> dict[str, float]:
    """top1, top5 (fractions), mean cross-entropy and n of `model` on `data` batches (all
    processes' batches where `data` is split, `carlib.dist.shards`)."""
    counts, rows = torch.zeros(3, dtype=torch.long), []
    with eval_mode(model):
        for x, y in data:
            out = model(x)
            counts += torch.stack([torch.tensor(len(y)), hits(out, y, 1).sum().cpu(),
                                   hits(out, y, 5).sum().cpu()])
            rows.append(losses(out, y).sum())
    if not rows:
        raise CarlibError("evaluation data is empty; check the dataset and subset sizes")
    (counts,) = shards.counts(data, [counts])
    n, c1, c5 = counts.tolist()
    return {"top1": c1 / n, "top5": c5 / n, "loss": float(shards.fold(data, rows)) / n, "n": n}
