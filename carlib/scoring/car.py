"""`car_scores`: CAR importance of every filter of a layer, the public one-call entry point."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from carlib.core.errors import CarlibError
from carlib.core.module import eval_mode
from carlib.dist import shards
from carlib.network.graph import MaskedNet
from carlib.scoring.cuts import LayerData
from carlib.scoring.evaluate import check_metric
from carlib.scoring.inputs import example_of
from carlib.scoring.options import ScoringOptions
from carlib.scoring.tally import tally


def car_scores(model: nn.Module, layer: str, data: Iterable, metric: str = "top1", *,
               removed: dict[str, list[int]] | None = None, per_class: bool = False,
               options: ScoringOptions | None = None) -> torch.Tensor:
    """CAR importance of every filter of conv `layer` on `data` ((inputs, targets) batches).

    Value = accuracy (a fraction; top-1 or top-5 per `metric`) of the network minus its
    accuracy with that filter removed, given the filters in `removed` ({layer: [indices]})
    already removed; with metric="loss", the mean cross-entropy increase. Filters already
    removed get NaN. The model is left as it was found.

    `per_class=True` returns a (filters, classes) matrix instead: per class, the accuracy on
    that class's scoring images minus it with the filter removed (NaN for absent classes).
    `options`: how the tally runs (`ScoringOptions`); the prefix outputs are not cached.
    """
    check_metric(metric)
    if per_class and metric == "loss":
        raise CarlibError("per_class CAR needs an accuracy metric (top1 or top5), not loss")
    with eval_mode(model):
        net = MaskedNet(model, example_of(data))
        for name, idx in (removed or {}).items():
            net.remove(name, idx)
        kept = net.kept(layer)
        cut = LayerData(net, layer, data, cache=False, options=options)
        t = tally(cut, kept, metric, per_class=per_class)
    n_filters = net.unit(layer).num_filters
    if per_class:
        k = t.base_correct_per_class.numel()
        ys = torch.cat([y.flatten().cpu() for _, y in data])
        (n_k,) = shards.counts(data, [torch.bincount(ys, minlength=k)[:k]])
        n_k = n_k.double()
        drops = (t.base_correct_per_class - t.correct_per_class).double() / n_k
        out = torch.full((n_filters, k), float("nan"), dtype=torch.float64)
        out[kept] = torch.where(n_k > 0, drops, torch.full_like(drops, float("nan")))
        return out
    out = torch.full((n_filters,), float("nan"), dtype=torch.float64)
    out[kept] = t.scores(metric)
    return out
