"""The scoring set as the greedy loop reads it: cuts at each layer kept while valid, and a
seeded random subset (an approximate run's scoring set)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import fx

from carlib.core.errors import CarlibError
from carlib.network import groups
from carlib.network.graph import MaskedNet
from carlib.scoring.engine import LayerData, ScoringOptions, TallyMemo


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
