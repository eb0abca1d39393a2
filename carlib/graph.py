"""The traced network: which conv filters can be removed, where each is masked, and splits.

A filter is *removed* when its output channel contributes nothing downstream. The mask is a
0/1 multiplier on the channel at its *mask point*: the output of the BatchNorm that follows the
conv if there is one (zeroing conv weights would leave the BN bias), else the conv's output
(which includes its bias). From there the channel must reach only conv/linear *consumers*
through zero-preserving, channel-wise ops (ReLU, pooling, dropout, flatten); then a zero channel
is exactly the physically removed one. Channels that reach an addition, a concatenation or the
output (residual-coupled channels) are not prunable here.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from carlib.errors import CarlibError

_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten)
_PASS_FUNCTIONS = {torch.flatten, torch.relu, F.relu, F.max_pool2d, F.avg_pool2d,
                   F.adaptive_avg_pool2d, F.dropout}
_PASS_METHODS = {"relu", "flatten"}


@dataclass
class Unit:
    """One prunable conv layer: its filters, mask point and consumers."""

    name: str
    num_filters: int
    mask_node: str
    consumers: list[str] = field(default_factory=list)


def _reach(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[str], str | None]:
    """Consumers reached from `node` through zero-preserving ops, or the reason it can't be."""
    consumers: list[str] = []
    stack, seen = list(node.users), set()
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        mod = modules.get(u.target) if u.op == "call_module" else None
        if isinstance(mod, nn.Conv2d) and mod.groups == 1 or isinstance(mod, nn.Linear):
            consumers.append(str(u.target))
            continue
        passes = (isinstance(mod, _PASS_MODULES)
                  or u.op == "call_function" and u.target in _PASS_FUNCTIONS
                  or u.op == "call_method" and u.target in _PASS_METHODS)
        if not passes:
            what = type(mod).__name__ if mod is not None else getattr(u.target, "__name__", u.target)
            return [], f"its channels reach {what} ({u.name})"
        stack.extend(u.users)
    return consumers, None


def analyze(gm: fx.GraphModule) -> tuple[dict[str, Unit], dict[str, str]]:
    """Prunable units of a traced model, and the reason for each conv that is not prunable."""
    modules = dict(gm.named_modules())
    units, excluded = {}, {}
    for node in gm.graph.nodes:
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d):
            continue
        if conv.groups != 1:
            excluded[node.target] = "grouped convolution"
            continue
        point = node
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(
                modules[users[0].target], nn.BatchNorm2d):
            point = users[0]
        consumers, reason = _reach(point, modules)
        if reason is None and not consumers:
            reason = "its channels reach no conv or linear layer"
        if reason is not None:
            excluded[node.target] = reason
        else:
            units[node.target] = Unit(node.target, conv.out_channels, point.name, consumers)
    return units, excluded


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types; report one line
        raise CarlibError(f"cannot trace {type(model).__name__} with torch.fx "
                          f"({str(e).splitlines()[0]}); carlib needs an fx-traceable model") from None


def prunable_layers(model: nn.Module) -> list[str]:
    """Names (as in `model.named_modules()`) of the conv layers whose filters can be removed."""
    units, _ = analyze(_trace(model))
    return list(units)


class MaskedNet(nn.Module):
    """A traced view of `model` (sharing its parameters) with a 0/1 mask per prunable layer.

    `masks[layer][c] == 0` removes filter c of `layer`. `split(layer)` cuts the graph at that
    layer's mask point, so the part before it can be computed once and reused for every
    candidate filter.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        gm = _trace(model)
        self.units, self.excluded = analyze(gm)
        self._mask_names: dict[str, str] = {}
        nodes = {n.name: n for n in gm.graph.nodes}
        for i, unit in enumerate(self.units.values()):
            attr = f"carlib_mask_{i}"
            gm.register_buffer(attr, torch.ones(1, unit.num_filters, 1, 1))
            point = nodes[unit.mask_node]
            with gm.graph.inserting_after(point):
                get = gm.graph.get_attr(attr)
            with gm.graph.inserting_after(get):
                mul = gm.graph.call_function(operator.mul, (point, get))
            point.replace_all_uses_with(mul, delete_user_cb=lambda u, m=mul: u is not m)
            self._mask_names[unit.name] = attr
        gm.recompile()
        self.gm = gm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm(x)

    def unit(self, layer: str) -> Unit:
        """The prunable unit called `layer`, or a one-line error listing the valid names."""
        if layer not in self.units:
            why = f" ({self.excluded[layer]})" if layer in self.excluded else ""
            raise CarlibError(f"'{layer}' is not a prunable layer{why}; valid: "
                              f"{', '.join(self.units)}")
        return self.units[layer]

    def mask(self, layer: str) -> torch.Tensor:
        """The layer's mask buffer, shape (1, C, 1, 1); write zeros into it to remove filters."""
        return getattr(self.gm, self._mask_names[self.unit(layer).name])

    def kept(self, layer: str) -> list[int]:
        return torch.nonzero(self.mask(layer).flatten()).flatten().tolist()

    def remove(self, layer: str, filters: list[int] | torch.Tensor) -> None:
        self.mask(layer).view(-1)[torch.as_tensor(filters, dtype=torch.long)] = 0.0

    def split(self, layer: str) -> tuple[fx.GraphModule, fx.GraphModule]:
        """(prefix, suffix) with `suffix(*prefix(x)) == self(x)`.

        prefix returns a tuple whose first item is the layer's channels *before* its mask; the
        rest are values computed earlier that the suffix still needs (e.g. a residual input).
        """
        graph = self.gm.graph
        cut = next(n for n in graph.nodes if n.name == self.unit(layer).mask_node)
        down: set[fx.Node] = set()
        stack = list(cut.users)
        while stack:
            n = stack.pop()
            if n not in down:
                down.add(n)
                stack.extend(n.users)
        boundary = [cut] + [a for n in graph.nodes if n in down for a in n.all_input_nodes
                            if a not in down and a is not cut and a.op != "get_attr"]
        boundary = list(dict.fromkeys(boundary))

        pre, env = fx.Graph(), {}
        for n in graph.nodes:
            if n not in down and n.op != "output":
                env[n] = pre.node_copy(n, lambda a: env[a])
        pre.output(tuple(env[b] for b in boundary))

        suf, env2 = fx.Graph(), {}
        for b in boundary:
            env2[b] = suf.placeholder(f"in_{b.name}")
        for n in graph.nodes:
            if n.op == "get_attr" and any(u in down for u in n.users):
                env2[n] = suf.node_copy(n, lambda a: env2[a])
            elif n in down:
                env2[n] = suf.node_copy(n, lambda a: env2[a])
        return fx.GraphModule(self.gm, pre), fx.GraphModule(self.gm, suf)
