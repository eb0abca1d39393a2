"""Cuts of the network at a layer: `LayerData` (the scoring batches cut at one layer, the
prefix outputs computed once and cached where `carlib.scoring.cache` plans), `Cuts` (one per
layer, kept while valid, as the greedy loop reads them), and a seeded random subset of the
scoring set (an approximate run's scoring set)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace

import torch
from torch import fx

from carlib.core.errors import CarlibError
from carlib.core.module import model_device
from carlib.network import groups
from carlib.network.graph import MaskedNet
from carlib.scoring import cache
from carlib.scoring.cache import CachePlan
from carlib.scoring.counts import TallyMemo
from carlib.scoring.engine import Engine
from carlib.scoring.inputs import checked
from carlib.scoring.options import ScoringOptions


class LayerData:
    """Batches cut at `layer`: (prefix outputs, targets), computed once per scoring batch.

    Where the prefix outputs are kept is planned from the first batch (`plan`, `placement`;
    see `carlib.scoring.cache`); `cache=False` recomputes them on every read. A cache stays valid
    while only this layer's mask changes (the prefix does not read it). The data is checked
    as it is first read (`checked`; `what` names it in errors). `options` (default:
    `ScoringOptions.for_device` of the model's device) also set the tallies' defaults.
    """

    def __init__(self, net: MaskedNet, layer: str, data: Iterable, cache: bool = True,
                 what: str = "scoring set", options: ScoringOptions | None = None) -> None:
        self.net, self.layer = net, layer
        self.prefix, self.suffix = net.split(layer)
        self.data, self.cache, self.what = data, cache, what
        self.device = model_device(net)
        self.options = options if options is not None else ScoringOptions.for_device(self.device)
        self._batches: list[tuple[tuple, torch.Tensor]] | None = None
        self._plan: CachePlan | None = None
        self.cached_bytes = 0  # bytes the cache holds, once filled
        self._engine: Engine | None = None
        self.fallback: str | None = None  # why the fast path is not used, once known
        self.item_bytes: int | None = None  # peak suffix activation bytes per image, x3
        self.memo: TallyMemo | None = None  # tallies shared with other runs (see TallyMemo)

    @property
    def placement(self) -> str:
        """Where the prefix outputs are kept: device, host or recompute (`plan`)."""
        return self.plan().placement

    def plan(self) -> CachePlan:
        """The cache plan (placement and bytes), made from the first batch, read now if the
        cut has not been read yet (all of a one-shot iterator, which is then cached)."""
        if self._plan is None:
            if iter(self.data) is self.data:
                for _ in self:
                    pass
            else:
                x, y = next(checked(self.net, self.data, self.what))
                self._plan = self._make_plan(x, y)
        return self._plan

    @torch.no_grad()
    def _make_plan(self, x: torch.Tensor, y: torch.Tensor) -> CachePlan:
        """Place the cache from one probe image's prefix outputs (`carlib.scoring.cache.plan`)."""
        per_image = cache.nbytes(self.prefix(x[:1].clone())) + y[:1].nbytes
        opts = self.options if self.cache else replace(self.options, placement="recompute")
        images = cache.count_images(self.data) if self.cache else None
        return cache.plan(per_image, images, len(y), opts, self.device,
                          f"the {self.what} cut at {self.layer}")

    @property
    def filled(self) -> bool:
        """Whether the prefix outputs are cached (iterating needs no prefix pass)."""
        return self._batches is not None

    @torch.no_grad()
    def __iter__(self) -> Iterator[tuple[tuple, torch.Tensor]]:
        if self._batches is not None:
            for outs, y in self._batches:
                yield (tuple(cache.fetch(t, self.device) for t in outs),
                       cache.fetch(y, self.device))
            return
        batches = []
        for x, y in checked(self.net, self.data, self.what):
            if self._plan is None:
                self._plan = self._make_plan(x, y)
            item = (tuple(self.prefix(x)), y)
            where = self._plan.placement
            if where != "recompute":
                batches.append((tuple(cache.stow(t, where) for t in item[0]),
                                cache.stow(y, where)))
            yield item
        if self._plan is not None and self._plan.placement != "recompute":
            self._batches = batches
            self.cached_bytes = sum(cache.nbytes((*outs, y)) for outs, y in batches)

    def engine(self, h: torch.Tensor) -> Engine | None:
        """The fast path's pieces, or None (reason in `fallback`) where they do not apply."""
        if self._engine is None and self.fallback is None:
            try:
                self._engine = Engine(self.net.split_at_consumers(self.layer), h)
            except CarlibError as e:
                self.fallback = str(e)
        return self._engine

    def pass_shape(self, h: torch.Tensor, extras: Sequence[torch.Tensor], chunk: int,
                   max_bytes: int) -> tuple[int, int]:
        """(candidates, images) per batched pass so that one pass needs about max_bytes."""
        if self.item_bytes is None:
            self.item_bytes = 3 * _peak_bytes(self.suffix, *[t[:1].clone() for t in (h, *extras)])
        m = max(1, min(chunk, max_bytes // self.item_bytes))
        return m, max(1, min(len(h), max_bytes // (m * self.item_bytes)))


class _Peak(fx.Interpreter):
    """Runs a GraphModule and records the largest tensor any node produced."""

    peak = 0

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.peak = max(self.peak, out.nbytes)
        return out


def _peak_bytes(module: fx.GraphModule, *args: torch.Tensor) -> int:
    interp = _Peak(module)
    interp.run(*args)
    return interp.peak


def mask_deps(net: MaskedNet, module: fx.GraphModule) -> list[str]:
    """Prunable layers whose mask `module` reads: a single-point unit's mask buffer, or a
    multi-point unit's mask module (`carlib.network.groups.UnitMask`, also read by its
    LayerNorms)."""
    ids = {id(net.mask(name)): name for name in net.units}
    found = []
    for n in module.graph.nodes:
        if n.op == "get_attr" and n.users:
            found.append(id(getattr(module, n.target, None)))
        elif n.op == "call_module":
            found.extend(id(m) for m in groups.mask_buffers(module.get_submodule(n.target)))
    return list(dict.fromkeys(ids[i] for i in found if i in ids))


class Cuts:
    """`LayerData` per layer, rebuilt when a mask its (cached) prefix reads has changed; their
    tallies go through `memo` if given."""

    def __init__(self, net: MaskedNet, data: Iterable, memo: TallyMemo | None = None,
                 what: str = "scoring set", options: ScoringOptions | None = None) -> None:
        self.net, self.data, self.memo, self.what = net, data, memo, what
        self.options = options
        self._cuts: dict[str, tuple[LayerData, list[tuple[str, torch.Tensor]]]] = {}

    def valid(self, layer: str) -> LayerData | None:
        """The layer's cut if one was made and the masks its prefix reads are unchanged."""
        entry = self._cuts.get(layer)
        if entry is None or any(not torch.equal(self.net.mask(n), m) for n, m in entry[1]):
            return None
        return entry[0]

    def get(self, layer: str) -> LayerData:
        """The layer's cut: the valid one, else a new one (the masks its prefix reads noted)."""
        cut = self.valid(layer)
        if cut is None:
            cut = LayerData(self.net, layer, self.data, what=self.what, options=self.options)
            cut.memo = self.memo
            deps = [(n, self.net.mask(n).clone()) for n in mask_deps(self.net, cut.prefix)]
            self._cuts[layer] = (cut, deps)
        return cut

    def any(self, prefer: Sequence[str]) -> LayerData:
        """A cut of the network as it is now that needs no prefix pass if one exists: the
        first valid one in `prefer` whose prefix outputs are cached, else the first valid one,
        else a new one of prefer[0]. Any cut gives the same network outputs."""
        valid = [c for c in map(self.valid, prefer) if c is not None]
        cached = [c for c in valid if c.filled]
        return (cached or valid or [self.get(prefer[0])])[0]


def random_subset(data: Iterable, size: int, seed: int = 0) -> list:
    """A seeded random subset of `size` images of `data`, as one batch."""
    xs, ys = zip(*data, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    if not 0 < size <= len(y):
        raise CarlibError(f"subset={size} must be between 1 and the {len(y)} scoring images")
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:size].sort()[0]
    return [(x[idx], y[idx])]
