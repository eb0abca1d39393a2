"""The traced network: which conv filters can be removed, where each is masked, and splits.

A filter is *removed* when its output channel contributes nothing downstream. The mask is a
0/1 multiplier on the channel at its *mask point*: the output of the BatchNorm that follows the
conv if there is one (zeroing conv weights would leave the BN bias), else the conv's output
(which includes its bias). From there the channel must reach only conv/linear *consumers*
through zero-preserving, channel-wise ops (ReLU, pooling, dropout, flatten); then a zero channel
is exactly the physically removed one. Channels that reach an addition, a concatenation or the
output (residual-coupled channels) are not single-conv units: `carlib.network.groups` builds those.

`MaskedNet.split` cuts the graph at a mask point (prefix, suffix); `split_at_consumers` cuts the
suffix again into the ops up to the consumers, the consumers, and the rest (see `ConsumerSplit`).

Given an example input, `MaskedNet` also builds the units this analysis leaves out from
torch-pruning's dependency groups (`carlib.network.groups`): residual streams, concatenations,
depthwise and grouped convs, SE gates, LayerNorms; each is masked at every point of its group
and cut where its first mask points are (`split`), and scored on the plain path.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from carlib.core.errors import CarlibError
from carlib.network import groups, ops
from carlib.network.groups import Unit


def _is_consumer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    mod = modules.get(node.target) if node.op == "call_module" else None
    return isinstance(mod, nn.Conv2d) and mod.groups == 1 or isinstance(mod, nn.Linear)


def _passes(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `node` is a zero-preserving, channel-wise op (`carlib.network.ops.PASS`: ReLU,
    pooling, dropout, flatten)."""
    return ops.PASS.matches(node, modules)


def _reach(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[str], str | None]:
    """Consumers reached from `node` through zero-preserving ops, or the reason it can't be."""
    consumers: list[str] = []
    stack, seen = list(node.users), set()
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        if _is_consumer(u, modules):
            consumers.append(str(u.target))
            continue
        if not _passes(u, modules):
            mod = modules.get(u.target) if u.op == "call_module" else None
            what = (type(mod).__name__ if mod is not None
                    else getattr(u.target, "__name__", u.target))
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


class _Tracer(fx.Tracer):
    """fx's tracer, keeping LayerNorm subclasses (torchvision's LayerNorm2d) as one module
    call, so a unit can mask them (`carlib.network.groups.MaskedLayerNorm`)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.LayerNorm) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:  # noqa: BLE001 - fx raises many types; report one line
        raise CarlibError(f"cannot trace {type(model).__name__} with torch.fx "
                          f"({str(e).splitlines()[0]}); carlib needs an fx-traceable "
                          "model") from None


def prunable_layers(model: nn.Module, example_input: torch.Tensor | None = None) -> list[str]:
    """Names (as in `model.named_modules()`) of the units whose filters can be removed: each
    conv masked alone; with `example_input`, also every dependency group (`units`), named by
    its first conv."""
    return list(MaskedNet(model, example_input).units)


def units(model: nn.Module, example_input: torch.Tensor) -> list[Unit]:
    """Every prunable unit of `model` (traced on `example_input`, one N x C x H x W batch):
    name, kind, channels, the convs it removes filters from (see `carlib.network.groups`)."""
    return list(MaskedNet(model, example_input).units.values())


def coverage(model: nn.Module, example_input: torch.Tensor) -> dict[str, object]:
    """How much of `model` CAR can score: conv filters in a unit / all conv filters, the
    excluded convs with their reasons, and the units by kind."""
    net = MaskedNet(model, example_input)
    sizes = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    covered = {c for u in net.units.values() for c in (u.convs or (u.name,))}
    kinds: dict[str, int] = {}
    for u in net.units.values():
        kinds[u.kind] = kinds.get(u.kind, 0) + 1
    return {"filters": sum(sizes.values()),
            "scorable": sum(sizes[c] for c in covered if c in sizes),
            "units": len(net.units), "kinds": kinds, "excluded": dict(net.excluded)}


class MaskedNet(nn.Module):
    """A traced view of `model` (sharing its parameters) with a 0/1 mask per prunable layer.

    `masks[layer][c] == 0` removes filter c of `layer`. `split(layer)` cuts the graph at that
    layer's mask point, so the part before it can be computed once and reused for every
    candidate filter.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor | None = None) -> None:
        super().__init__()
        gm = _trace(model)
        self.units, self.excluded = analyze(gm)
        param = next(model.parameters(), None)
        if example_input is not None and param is not None:
            example_input = example_input.to(param.device, param.dtype)
        self.grouped = example_input is not None  # multi-point units were looked for
        if example_input is not None:
            self.units, self.excluded = groups.group_units(model, gm, example_input, self.units)
        self.model_name = type(model).__name__
        self._device = param.device if param is not None else None  # masks live with weights
        self.gm = self._insert(gm)
        if example_input is not None and self._unit_masks:
            bad = groups.check_zero(self.gm, self.units, self._unit_masks, example_input)
            if bad:  # rebuild without them
                for name, why in bad.items():
                    for c in self.units.pop(name).convs or (name,):
                        self.excluded[c] = why
                self.gm = self._insert(_trace(model))
        self._alias = {c: u.name for u in self.units.values() for c in u.convs}

    def _insert(self, gm: fx.GraphModule) -> fx.GraphModule:
        """`gm` with every unit's mask inserted at its mask point(s)."""
        self._mask_names: dict[str, str] = {}
        self._unit_masks: dict[str, groups.UnitMask] = {}
        dev = self._device
        nodes = {n.name: n for n in gm.graph.nodes}
        for i, unit in enumerate(self.units.values()):
            attr = f"carlib_mask_{i}"
            if unit.multi:
                self._unit_masks[unit.name] = groups.insert(gm, unit, attr, dev)
                self._mask_names[unit.name] = f"{attr}.mask"
                continue
            gm.register_buffer(attr, torch.ones(1, unit.num_filters, 1, 1, device=dev))
            point = nodes[unit.mask_node]
            with gm.graph.inserting_after(point):
                get = gm.graph.get_attr(attr)
            with gm.graph.inserting_after(get):
                mul = gm.graph.call_function(operator.mul, (point, get))
            point.replace_all_uses_with(mul, delete_user_cb=lambda u, m=mul: u is not m)
            self._mask_names[unit.name] = attr
        gm.recompile()
        return gm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm(x)

    def unit(self, layer: str) -> Unit:
        """The prunable unit called `layer` (or holding conv `layer`), or a one-line error
        listing the valid names."""
        layer = self._alias.get(layer, layer)
        if layer not in self.units:
            why = f" ({self.excluded[layer]})" if layer in self.excluded else ""
            if not self.grouped and layer in self.excluded:
                why += (" as a single conv; an example input (MaskedNet(model, x[:1]), or "
                        "re-iterable data) finds the unit it belongs to")
            if not self.units:
                convs = "; ".join(f"{n}: {r}" for n, r in list(self.excluded.items())[:3])
                raise CarlibError(
                    f"'{layer}' is not a prunable layer{why}; this model ({self.model_name}) has "
                    "none: carlib prunes Conv2d filters whose channels reach only conv or linear "
                    "layers" + (f" (not prunable: {convs})" if convs and not why else ""))
            raise CarlibError(f"'{layer}' is not a prunable layer{why}; valid: "
                              f"{', '.join(self.units)}")
        return self.units[layer]

    def mask(self, layer: str) -> torch.Tensor:
        """The layer's mask buffer, shape (1, C, 1, 1); write zeros into it to remove filters."""
        return self.gm.get_buffer(self._mask_names[self.unit(layer).name])

    def unit_mask(self, layer: str) -> groups.UnitMask | None:
        """The mask module of a multi-point unit (None for a single-point one)."""
        return self._unit_masks.get(self.unit(layer).name)

    def kept(self, layer: str) -> list[int]:
        return torch.nonzero(self.mask(layer).flatten()).flatten().tolist()

    def remove(self, layer: str, filters: list[int] | torch.Tensor) -> None:
        self.mask(layer).view(-1)[torch.as_tensor(filters, dtype=torch.long)] = 0.0

    def _cut(self, layer: str) -> tuple[fx.Node, set[fx.Node], list[fx.Node]]:
        """(mask point node, nodes downstream of it, boundary = [point, *outside inputs])."""
        graph = self.gm.graph
        unit = self.unit(layer)
        nodes = {n.name: n for n in graph.nodes}
        cuts = [nodes[unit.mask_node]]
        if unit.multi:  # every mask point not downstream of another (a norm: at its input)
            points = [nodes[p.node].args[0] if p.norm else nodes[p.node] for p in unit.points]
            after = set().union(*(_downstream(p) for p in points))
            cuts = list(dict.fromkeys(p for p in points if p not in after))
        down = set().union(*(_downstream(c) for c in cuts))
        boundary = cuts + [a for n in graph.nodes if n in down for a in n.all_input_nodes
                           if a not in down and a not in cuts and a.op != "get_attr"]
        return cuts[0], down, list(dict.fromkeys(boundary))

    def split(self, layer: str) -> tuple[fx.GraphModule, fx.GraphModule]:
        """(prefix, suffix) with `suffix(*prefix(x)) == self(x)`.

        prefix returns a tuple whose first item is the layer's channels *before* its mask; the
        rest are values computed earlier that the suffix still needs (e.g. a residual input).
        """
        _, down, boundary = self._cut(layer)
        before = {n for n in self.gm.graph.nodes if n not in down and n.op != "output"}
        return (_extract(self.gm, before, [], boundary),
                _extract(self.gm, down, boundary, None))

    def split_at_consumers(self, layer: str) -> ConsumerSplit:
        """The suffix of `split(layer)` cut once more, at the layer's consumers.

        Raises CarlibError (with the reason) where channel c of the mask point does not map to
        input channel c (conv) or feature block c (linear after flatten) of every consumer.
        """
        unit = self.unit(layer)
        if unit.multi:
            raise CarlibError(f"{unit.name} is a {unit.kind} unit masked at {len(unit.points)} "
                              "points: no single cut at its consumers")
        cut, down, boundary = self._cut(layer)
        modules = dict(self.gm.named_modules())
        start = next(iter(cut.users))  # the mask multiplication MaskedNet inserted
        between, consumers, stack = {start}, [], list(start.users)
        while stack:
            n = stack.pop()
            if _is_consumer(n, modules):
                consumers.append(n)
            elif n not in between:
                between.add(n)
                stack.extend(n.users)
        consumers = [n for n in self.gm.graph.nodes if n in set(consumers)]
        for c in consumers:
            _check_path(c, start, modules)
        rest = down - between - set(consumers)
        outside = [a for n in rest for a in n.all_input_nodes if a.op != "get_attr"
                   and a not in rest and a not in consumers and a not in boundary]
        if outside:
            raise CarlibError(f"{outside[0].name} feeds both a consumer and later layers")
        return ConsumerSplit(
            _extract(self.gm, between, [cut], [c.args[0] for c in consumers]),
            [modules[c.target] for c in consumers], [str(c.target) for c in consumers],
            _extract(self.gm, rest, consumers + boundary[1:], None))


@dataclass
class ConsumerSplit:
    """A layer's suffix in three parts: `between` -> `consumers` -> `rest`.

    `suffix(h, *extras) == rest(*[f(x) for f, x in zip(consumers, between(h))], *extras)` where
    (h, *extras) is what `MaskedNet.split(layer)`'s prefix returns. `between` applies the mask
    and the zero-preserving, channel-wise ops up to the consumers, so channel c of h reaches
    only input channel c of a conv consumer, or the c-th block of in_features/C inputs of a
    linear consumer (after a flatten from dim 1).
    """

    between: fx.GraphModule
    consumers: list[nn.Module]
    consumer_names: list[str]
    rest: fx.GraphModule


def _downstream(node: fx.Node) -> set[fx.Node]:
    down: set[fx.Node] = set()
    stack = list(node.users)
    while stack:
        n = stack.pop()
        if n not in down:
            down.add(n)
            stack.extend(n.users)
    return down


def _extract(gm: fx.GraphModule, keep: set[fx.Node], inputs: list[fx.Node],
             outputs: list[fx.Node] | None) -> fx.GraphModule:
    """The nodes `keep` of `gm` (plus the attributes they read) as a module of `inputs`.

    Returns the tuple `outputs`, or what gm's own output node returns when `outputs` is None.
    """
    g: fx.Graph = fx.Graph()
    env = {i: g.placeholder(f"in_{i.name}") for i in inputs}
    for n in gm.graph.nodes:
        if n in keep or n.op == "get_attr" and any(u in keep for u in n.users):
            env[n] = g.node_copy(n, lambda a: env[a])
    if outputs is not None:
        g.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(gm, g)


def _flatten_dims(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[int, int] | None:
    """(start_dim, end_dim) of a flatten node (`carlib.network.ops.FLATTEN`), None for any
    other op."""
    if not ops.FLATTEN.matches(node, modules):
        return None
    if node.op == "call_module":
        mod = modules[node.target]
        return mod.start_dim, mod.end_dim
    args = [*node.args[1:], None, None]
    start = node.kwargs.get("start_dim", args[0] if args[0] is not None else 0)
    return start, node.kwargs.get("end_dim", args[1] if args[1] is not None else -1)


def _check_path(consumer: fx.Node, start: fx.Node, modules: dict[str, nn.Module]) -> None:
    """Raise unless channel c at `start` is input channel / feature block c of `consumer`."""
    mod = modules[consumer.target]
    flattens, n = [], consumer.args[0]
    while n is not start:
        if (d := _flatten_dims(n, modules)) is not None:
            flattens.append(d)
        n = n.args[0] if n.args else None
        if not isinstance(n, fx.Node):
            raise CarlibError(f"cannot follow the channels from {start.name} to {consumer.name}")
    if isinstance(mod, nn.Conv2d) and (flattens or mod.padding_mode != "zeros"):
        raise CarlibError(f"consumer {consumer.target} is a conv after a flatten or with "
                          f"padding_mode={mod.padding_mode!r}")
    if isinstance(mod, nn.Linear) and flattens != [(1, -1)]:
        raise CarlibError(f"consumer {consumer.target} is a linear layer not after one flatten "
                          "from dim 1")
