"""Training and fine-tuning: one plain loop (AdamW or SGD; one-cycle, cosine or constant lr)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from carlib.core.errors import CarlibError
from carlib.core.module import model_device

SCHEDULES = ("onecycle", "cosine", "none")


def _scheduler(opt: torch.optim.Optimizer, schedule: str, lr: float,
               total: int) -> torch.optim.lr_scheduler.LRScheduler:
    if schedule == "onecycle":  # 15% warm-up to lr, then cosine decay
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total,
                                                   pct_start=0.15)
    if schedule == "cosine":  # cosine decay from lr to 0, no warm-up (fine-tuning)
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if schedule == "none":
        return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    raise CarlibError(f"unknown lr schedule '{schedule}'; valid: {', '.join(SCHEDULES)}")


def fit(model: nn.Module, loader: Iterable, epochs: int, lr: float = 2e-3,
        weight_decay: float = 5e-4, optimizer: str = "adamw", progress: bool = True,
        schedule: str = "onecycle") -> nn.Module:
    """Train `model` in place on `loader` for `epochs`; the lr follows `schedule` per step.

    Batches are moved to the model's device (a no-op where they already are). Only
    parameters with `requires_grad` are updated. `schedule`: `onecycle` (default: 15%
    warm-up to `lr`, then cosine decay), `cosine` (decay from `lr` to 0) or `none` (constant).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise CarlibError(f"unknown optimizer '{optimizer}'; valid: adamw, sgd")
    total = epochs * len(loader)
    sched = _scheduler(opt, schedule, lr, max(total, 1))
    dev = model_device(model)
    model.train()
    bar = tqdm(total=total, desc="train", leave=False,
               disable=None if progress else True)  # None: only on a terminal
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()
