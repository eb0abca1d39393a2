"""Approximate CAR greedy pruning: faster, not exact. Every option is off by default.

- `taylor_m`: pre-screen the remaining filters with the first-order Taylor criterion
  (`carlib.pruning.criteria.taylor`) and score exactly (CAR) only the m least important.
- `k`: remove the k lowest-scoring filters per rescoring instead of one.
- `subset`: score on a seeded random subset of that many scoring images.

These are options of the greedy loop itself (`carlib.pruning.greedy.GreedySettings`:
`prefilter`, `k`, `subset`); `approx_greedy` runs it with them. With all options off it removes
the same filters as `greedy_prune` (same CAR tallies, same tie rules:
`carlib.pruning.select.choose`). benchmarks/approx_agreement.py measures how far each option
drifts from exact greedy.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from torch import nn

from carlib.core.errors import CarlibError
from carlib.network.graph import MaskedNet
from carlib.pruning.greedy import GreedyRun, GreedySettings
from carlib.scoring.cuts import random_subset
from carlib.scoring.evaluate import check_metric

__all__ = ["approx_greedy", "random_subset"]


def _removals(layer: str, n_keep: int, net: MaskedNet) -> int:
    """Filters removed to keep `n_keep` of `layer` (checked)."""
    if not 1 <= n_keep <= net.unit(layer).num_filters:
        raise CarlibError(f"n_keep={n_keep} is out of range for {layer}")
    return net.unit(layer).num_filters - n_keep


def approx_greedy(model: nn.Module, layer: str, data: Iterable, n_keep: int, *,
                  taylor_m: int | None = None, k: int = 1, subset: int | None = None,
                  metric: str = "top1", seed: int = 0) -> list[int]:
    """Filters of conv `layer` in the order greedy CAR with the given shortcuts removes them.

    Prunes down to `n_keep` filters; the model is left unchanged. Options: see module doc.
    """
    check_metric(metric)
    if k < 1 or taylor_m is not None and taylor_m < 1:
        raise CarlibError(f"k={k} and taylor_m={taylor_m} must be at least 1")
    settings = GreedySettings([layer], partial(_removals, layer, n_keep), n_keep, metric=metric,
                              seed=seed, k=k, progress=False, prefilter=taylor_m, subset=subset)
    return GreedyRun(model, "car", data, settings).run().removed
