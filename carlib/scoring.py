"""CAR scoring: network accuracy with each candidate filter removed, as exact counts.

For a layer, the network is cut at the layer's mask point (`MaskedNet.split`): the prefix runs
once per scoring batch, and each candidate filter re-runs only the suffix, with that channel
zeroed, several candidates batched in one pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from carlib.evaluate import check_metric, eval_mode, hits, losses, topk_of
from carlib.graph import MaskedNet


class LayerData:
    """Batches cut at `layer`: (prefix outputs, targets), computed once and kept if `cache`.

    The cache stays valid while only this layer's mask changes (the prefix does not read it).
    """

    def __init__(self, net: MaskedNet, layer: str, data: Iterable, cache: bool = True) -> None:
        self.prefix, self.suffix = net.split(layer)
        self.data, self.cache = data, cache
        self._batches: list[tuple[tuple, torch.Tensor]] | None = None

    @torch.no_grad()
    def __iter__(self) -> Iterator[tuple[tuple, torch.Tensor]]:
        if self._batches is not None:
            yield from self._batches
            return
        batches = []
        for x, y in self.data:
            item = (tuple(self.prefix(x)), y)
            if self.cache:
                batches.append(item)
            yield item
        if self.cache:
            self._batches = batches


@dataclass
class Tally:
    """Totals over n scoring images with each candidate removed, and with none removed.

    `correct` counts hits of the metric's top-k (exact integers, so ties are exact);
    `loss` sums cross-entropy in float64.
    """

    candidates: list[int]
    n: int
    correct: torch.Tensor
    loss: torch.Tensor
    base_correct: int
    base_loss: float

    def scores(self, metric: str) -> torch.Tensor:
        """CAR per candidate: metric with the filter minus metric without it (loss: increase)."""
        if metric == "loss":
            return (self.loss - self.base_loss) / self.n
        return (self.base_correct - self.correct).double() / self.n

    def loss_increase(self) -> torch.Tensor:
        return (self.loss - self.base_loss) / self.n


@torch.no_grad()
def tally(cut: LayerData, candidates: list[int], metric: str = "top1",
          chunk: int = 8) -> Tally:
    """Count hits and loss with each candidate channel of the cut zeroed, `chunk` at a time."""
    check_metric(metric)
    k = topk_of(metric)
    nc = len(candidates)
    correct = torch.zeros(nc, dtype=torch.long)
    loss = torch.zeros(nc, dtype=torch.float64)
    n, base_correct, base_loss = 0, 0, 0.0
    for (h, *rest), y in cut:
        b = len(y)
        n += b
        base = cut.suffix(h, *rest)
        base_correct += int(hits(base, y, k).sum())
        base_loss += float(losses(base, y).sum())
        for s in range(0, nc, chunk):
            cs = torch.as_tensor(candidates[s:s + chunk])
            m = len(cs)
            hb = h.unsqueeze(0).repeat(m, *[1] * h.dim())
            hb[torch.arange(m), :, cs] = 0
            rb = [r.repeat(m, *[1] * (r.dim() - 1)) for r in rest]
            out = cut.suffix(hb.flatten(0, 1), *rb).view(m, b, -1)
            correct[s:s + m] += hits(out, y, k).sum(1)
            loss[s:s + m] += losses(out, y).sum(1)
    return Tally(list(candidates), n, correct, loss, base_correct, base_loss)


@torch.no_grad()
def measure(cut: LayerData, metric: str = "top1") -> tuple[float, float]:
    """(metric hits fraction, mean loss) of the masked network on the cut's data."""
    k = topk_of(metric)
    n, c, loss = 0, 0, 0.0
    for (h, *rest), y in cut:
        out = cut.suffix(h, *rest)
        n += len(y)
        c += int(hits(out, y, k).sum())
        loss += float(losses(out, y).sum())
    return c / n, loss / n


def car_scores(model: nn.Module, layer: str, data: Iterable, metric: str = "top1", *,
               removed: dict[str, list[int]] | None = None) -> torch.Tensor:
    """CAR importance of every filter of conv `layer` on `data` ((inputs, targets) batches).

    Value = accuracy (a fraction; top-1 or top-5 per `metric`) of the network minus its
    accuracy with that filter removed, given the filters in `removed` ({layer: [indices]})
    already removed; with metric="loss", the mean cross-entropy increase. Filters already
    removed get NaN. The model is left as it was found.
    """
    check_metric(metric)
    with eval_mode(model):
        net = MaskedNet(model)
        for name, idx in (removed or {}).items():
            net.remove(name, idx)
        kept = net.kept(layer)
        t = tally(LayerData(net, layer, data, cache=False), kept, metric)
    out = torch.full((net.unit(layer).num_filters,), float("nan"), dtype=torch.float64)
    out[kept] = t.scores(metric)
    return out
