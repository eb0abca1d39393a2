"""Filter-pruning criteria: a score per remaining filter; the lowest score is removed first.

Each criterion is a function (net, layer, cut, kept, metric) -> (scores, tally or None),
recomputed after every removal so all criteria follow the same greedy schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from carlib.errors import CarlibError
from carlib.graph import MaskedNet
from carlib.scoring import LayerData, Tally, tally

Scores = tuple[torch.Tensor, Tally | None]
Criterion = Callable[[MaskedNet, str, LayerData, list[int], str], Scores]


def _conv_weight(net: MaskedNet, layer: str) -> torch.Tensor:
    return net.gm.get_submodule(layer).weight.detach()


def car(net: MaskedNet, layer: str, cut: LayerData, kept: list[int], metric: str) -> Scores:
    """Classification accuracy reduction: metric drop when the filter is removed."""
    t = tally(cut, kept, metric)
    return t.scores(metric), t


def l1(net: MaskedNet, layer: str, cut: LayerData, kept: list[int], metric: str) -> Scores:
    """Sum of absolute filter weights (Li et al. 2016)."""
    return _conv_weight(net, layer).abs().flatten(1)[kept].sum(1).double(), None


def make_random(seed: int) -> Criterion:
    """Random order, fixed by `seed` (a seeded permutation of the layer's filters)."""

    def random(net: MaskedNet, layer: str, cut: LayerData, kept: list[int], metric: str) -> Scores:
        n = net.unit(layer).num_filters
        priority = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).double()
        return priority[kept], None

    return random


CRITERIA = ("car", "random", "l1")


def get_criterion(name: str, seed: int = 0) -> Criterion:
    """The criterion called `name` (see CRITERIA)."""
    table: dict[str, Criterion] = {"car": car, "l1": l1, "random": make_random(seed)}
    if name not in table:
        raise CarlibError(f"unknown criterion '{name}'; valid: {', '.join(CRITERIA)}")
    return table[name]
