"""Approximate CAR greedy pruning: faster, not exact. Every option is off by default.

- `taylor_m`: pre-screen the remaining filters with the first-order Taylor criterion
  (`carlib.pruning.criteria.taylor`) and score exactly (CAR) only the m least important.
- `k`: remove the k lowest-scoring filters per rescoring instead of one.
- `subset`: score on a seeded random subset of that many scoring images.

With all options off, `approx_greedy` removes the same filters as `greedy_prune` (same CAR
tallies, same tie rules: `carlib.pruning.greedy.choose`). benchmarks/approx_agreement.py measures
how far each option drifts from exact greedy.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from carlib.core.errors import CarlibError
from carlib.network.graph import MaskedNet
from carlib.pruning.criteria import taylor
from carlib.pruning.greedy import Candidate, choose
from carlib.scoring.engine import LayerData, example_of, tally
from carlib.scoring.evaluate import check_metric, eval_mode


def random_subset(data: Iterable, size: int, seed: int = 0) -> list:
    """A seeded random subset of `size` images of `data`, as one batch."""
    xs, ys = zip(*data, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    if not 0 < size <= len(y):
        raise CarlibError(f"subset={size} must be between 1 and the {len(y)} scoring images")
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:size].sort()[0]
    return [(x[idx], y[idx])]


def _step(net: MaskedNet, layer: str, cut: LayerData, kept: list[int], taylor_m: int | None,
          k: int, metric: str) -> list[int]:
    """The filters one greedy step removes: the k lowest CAR among the Taylor-screened."""
    cands = kept
    if taylor_m is not None and taylor_m < len(kept):
        importance, _ = taylor(net, layer, cut, kept, metric)
        cands = sorted(kept[i] for i in importance.argsort(stable=True)[:taylor_m].tolist())
    t = tally(cut, cands, metric)
    inc = dict(zip(cands, t.loss_increase().tolist(), strict=True))
    picks = choose([Candidate(layer, f, s) for f, s in zip(cands, t.scores(metric).tolist(),
                                                           strict=True)],
                   k, {layer: k}, lambda group: [inc[c.filter] for c in group], [layer])
    return [c.filter for c, _, _ in picks]


@torch.no_grad()
def approx_greedy(model: nn.Module, layer: str, data: Iterable, n_keep: int, *,
                  taylor_m: int | None = None, k: int = 1, subset: int | None = None,
                  metric: str = "top1", seed: int = 0) -> list[int]:
    """Filters of conv `layer` in the order greedy CAR with the given shortcuts removes them.

    Prunes down to `n_keep` filters; the model is left unchanged. Options: see module doc.
    """
    check_metric(metric)
    if k < 1 or taylor_m is not None and taylor_m < 1:
        raise CarlibError(f"k={k} and taylor_m={taylor_m} must be at least 1")
    with eval_mode(model):
        net = MaskedNet(model, example_of(data))
        if not 1 <= n_keep <= net.unit(layer).num_filters:
            raise CarlibError(f"n_keep={n_keep} is out of range for {layer}")
        cut = LayerData(net, layer, random_subset(data, subset, seed) if subset else data)
        removed: list[int] = []
        while len(kept := net.kept(layer)) > n_keep:
            step = _step(net, layer, cut, kept, taylor_m, min(k, len(kept) - n_keep), metric)
            net.remove(layer, step)
            removed += step
    return removed
