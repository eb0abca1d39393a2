"""Units as dependency groups: the channels removed together, and every place to mask them.

A *unit* is a set of output channels that can only be removed together: torch-pruning's
dependency group of a conv's output channels (`tp.DependencyGraph`). Unit channel i is, at
every member, the channel torch-pruning would remove with root channel i. A unit is masked at
its *mask points*; zeroing channel i at all of them equals removing it physically (the
coverage tests check this against torch-pruning's removal on torchvision models):

- the output of every BatchNorm in the group (a zero channel through BN becomes its bias
  term): the writers' BNs, a depthwise conv's BN, and the BNs of concatenation readers
  (DenseNet's norm1, where a reader normalizes the concatenated channels);
- the output of every writer conv (or Linear) not followed by a BN of the group: its bias;
- every LayerNorm of the group (ConvNeXt's, across channels): replaced by `MaskedLayerNorm`,
  whose mean and variance run over the kept channels only, as in the pruned network; every
  GroupNorm likewise (`MaskedGroupNorm`: each group's statistics over its kept channels).

Where masked channels meet, the ops between are zero-preserving (ReLU, pooling, additions of
masked writers, products with a masked operand as in SE gates, concatenation, split), which
`check_zero` verifies on an example input: every consumer (conv/linear reading the channels)
sees exact zeros. Units are labelled by what their group holds (`Unit.kind`): conv (one writer,
masked once: the scoring engine's fast path applies), residual, concat, split, gate (SE),
depthwise, grouped (a grouped conv reads them), layernorm, groupnorm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import fx, nn

from carlib.scoring.evaluate import eval_mode

KINDS = ("conv", "residual", "concat", "split", "gate", "depthwise", "grouped", "layernorm",
         "groupnorm")
_CHANNELWISE = (nn.BatchNorm2d, nn.InstanceNorm2d)  # a zero channel becomes its bias: mask after


@dataclass(frozen=True)
class MaskPoint:
    """Where a unit is masked: the output of fx node `node` (module `module`), along `dim`.

    `index[i]` is the channel there of unit channel i (None: the same i, all `channels` of
    it); `norm`: the node is a LayerNorm or GroupNorm whose statistics must skip removed
    channels.
    """

    node: str
    module: str
    channels: int
    dim: int = 1
    index: tuple[int, ...] | None = None
    norm: bool = False


@dataclass
class Unit:
    """One prunable unit: `num_filters` channels, removed together from every conv in `convs`.

    `mask_node` is the fx node of its (first) mask point, `consumers` the conv/linear layers
    that read its channels (`reads`: with the input channels of each); a plain `conv` unit
    has one mask point and the scoring engine's fast path; others list every mask point in
    `points` (see the module docstring).
    """

    name: str
    num_filters: int
    mask_node: str
    consumers: list[str] = field(default_factory=list)
    kind: str = "conv"
    convs: tuple[str, ...] = ()
    points: tuple[MaskPoint, ...] = field(default=(), repr=False)
    reads: tuple[tuple[str, tuple[int, ...]], ...] = field(default=(), repr=False)

    @property
    def multi(self) -> bool:
        """Whether the unit is masked through `points` (not the plain single-point mask)."""
        return bool(self.points)


def _is_layernorm2d(mod: nn.Module) -> bool:
    """torchvision's LayerNorm2d (normalizes dim 1 of NCHW), by name: no torchvision import."""
    return isinstance(mod, nn.LayerNorm) and type(mod).__name__ == "LayerNorm2d"


def _calls(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    out: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.setdefault(str(n.target), []).append(n)
    return out


def _tags(items: Sequence, dg: tp.DependencyGraph) -> set[str]:
    """What the group holds: the `KINDS` besides conv."""
    tags = set()
    writers = [m for d, _ in items if isinstance(m := d.target.module, (nn.Conv2d, nn.Linear))
               and dg.is_out_channel_pruning_fn(d.handler)]
    for dep, _ in items:
        mod, what = dep.target.module, repr(dep.target.module)
        if type(mod).__name__ == "_ConcatOp":
            tags.add("concat")
        elif type(mod).__name__ in ("_SplitOp", "_UnbindOp"):
            tags.add("split")
        elif "AddBackward" in what and len(writers) > 1:
            tags.add("residual")
        elif "SigmoidBackward" in what or "HardsigmoidBackward" in what:
            tags.add("gate")
        elif isinstance(mod, nn.Conv2d) and mod.groups > 1:
            tags.add("depthwise" if mod.groups == mod.in_channels == mod.out_channels
                     else "grouped")
        elif isinstance(mod, nn.LayerNorm):
            tags.add("layernorm")
        elif isinstance(mod, nn.GroupNorm):
            tags.add("groupnorm")
    return tags


def group_units(model: nn.Module, gm: fx.GraphModule, example_input: torch.Tensor,
                simple: dict[str, Unit]) -> tuple[dict[str, Unit], dict[str, str]]:
    """Every unit of `model` (traced as `gm`) from torch-pruning's dependency groups, in model
    order, and the reason for each conv left out. Units in `simple` (single-point, fast path)
    are kept as they are."""
    from carlib.physical.removal import _graph  # torch-pruning's graph, traced in eval mode

    try:
        dg = _graph(model, example_input)
    except Exception as e:  # noqa: BLE001 - torch-pruning raises many types; report one line
        why = f"torch-pruning cannot trace it ({type(e).__name__}: {str(e).splitlines()[0]})"
        return dict(simple), {n: why for n, m in model.named_modules()
                              if isinstance(m, nn.Conv2d) and n not in simple}
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    calls = _calls(gm)
    order = {nd.name: i for i, nd in enumerate(gm.graph.nodes)}
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    units, excluded, covered = {}, {}, set()
    for name in convs:
        if name in covered:
            continue
        conv = modules[name]
        if name in simple:
            units[name] = simple[name]
            covered.add(name)
            continue
        try:
            group = dg.get_pruning_group(conv, tp.prune_conv_out_channels,
                                         idxs=list(range(conv.out_channels)))
        except Exception as e:  # noqa: BLE001
            excluded[name] = f"torch-pruning has no group for it ({str(e).splitlines()[0]})"
            continue
        unit, why = _unit(name, conv.out_channels, group.items, dg, names, modules, calls,
                          order)
        members = unit.convs if unit is not None else (name,)
        covered.update(members)
        if why is not None:
            for m in members:
                excluded[m] = why
        else:
            units[name] = unit
    rank = {n: i for i, n in enumerate(convs)}
    return dict(sorted(units.items(), key=lambda kv: rank[kv[0]])), excluded


def _unit(name: str, n: int, items: Sequence, dg: tp.DependencyGraph,
          names: dict[nn.Module, str], modules: dict[str, nn.Module],
          calls: dict[str, list[fx.Node]], order: dict[str, int]
          ) -> tuple[Unit | None, str | None]:
    """The unit of conv `name`'s group `items`, or (unit or None, why it cannot be masked)."""
    outs, consumers, points, reads = [], [], [], []
    for dep, idxs in items:
        mod = dep.target.module
        mname = names.get(mod)
        out = dg.is_out_channel_pruning_fn(dep.handler)
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and not out:
            consumers.append(mname)
            reads.append((mname, tuple(int(i) for i in idxs)))
        elif isinstance(mod, nn.Conv2d) and out:
            outs.append(mname)
        elif isinstance(mod, nn.LocalResponseNorm) or (
                isinstance(mod, nn.modules.batchnorm._NormBase)
                and not isinstance(mod, _CHANNELWISE)):
            return None, f"{type(mod).__name__} {mname} normalizes across its channels"
        elif isinstance(mod, nn.Linear) and out:
            outs.append(mname)
    convs = tuple(dict.fromkeys(m for m in outs if isinstance(modules[m], nn.Conv2d)))
    if not consumers:
        return Unit(name, n, "", convs=convs), "its channels reach no conv or linear layer"
    for dep, idxs in items:
        mod, mname = dep.target.module, names.get(dep.target.module)
        if mname is None or not dg.is_out_channel_pruning_fn(dep.handler):
            continue
        norm = isinstance(mod, (nn.LayerNorm, nn.GroupNorm))
        if not isinstance(mod, (nn.Conv2d, nn.Linear, *_CHANNELWISE)) and not norm:
            continue
        nodes = calls.get(mname, [])
        if len(nodes) != 1:
            return Unit(name, n, "", convs=convs), f"{mname} runs {len(nodes)} times"
        node = nodes[0]
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            users = list(node.users)
            if (len(users) == 1 and users[0].op == "call_module"
                    and isinstance(modules[users[0].target], (*_CHANNELWISE, nn.GroupNorm))
                    and any(names.get(d.target.module) == users[0].target for d, _ in items)):
                continue  # its norm is a mask point
        channels = (mod.out_channels if isinstance(mod, nn.Conv2d)
                    else mod.out_features if isinstance(mod, nn.Linear)
                    else mod.num_features if isinstance(mod, _CHANNELWISE)
                    else mod.num_channels if isinstance(mod, nn.GroupNorm)
                    else mod.normalized_shape[-1])
        if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) != 1:
            return Unit(name, n, "", convs=convs), f"LayerNorm {mname} normalizes several dims"
        idx = tuple(int(i) for i in idxs)
        if len(idx) != n:
            return Unit(name, n, "", convs=convs), f"{mname} maps {n} channels to {len(idx)}"
        dim = (1 if isinstance(mod, (nn.Conv2d, *_CHANNELWISE, nn.GroupNorm))
               or _is_layernorm2d(mod) else -1)
        points.append(MaskPoint(node.name, mname, channels, dim,
                                None if idx == tuple(range(channels)) else idx, norm))
    if not points:
        return Unit(name, n, "", convs=convs), "no BatchNorm, conv or LayerNorm output to mask"
    tags = _tags(items, dg)
    kind = "+".join(k for k in KINDS if k in tags) or "conv"
    points.sort(key=lambda p: order[p.node])
    return Unit(name, n, points[0].node, sorted(set(consumers)), kind, convs, tuple(points),
                tuple(reads)), None


class UnitMask(nn.Module):
    """The 0/1 mask of one multi-point unit, applied at each of its points (`forward(x, i)`).

    `mask` (1, C, 1, 1) is the unit's state; `rows`, when set, is an (R, C) mask per batch
    row that overrides it (the plain scoring path: R images, each with its own candidate).
    """

    def __init__(self, unit: Unit, device: torch.device | None) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(1, unit.num_filters, 1, 1, device=device))
        self.rows: torch.Tensor | None = None
        self.points = unit.points
        for i, p in enumerate(unit.points):
            idx = None if p.index is None else torch.tensor(p.index, device=device)
            self.register_buffer(f"index_{i}", idx)

    def vector(self, i: int) -> torch.Tensor:
        """(1 or R, channels) mask at point i."""
        m = self.rows if self.rows is not None else self.mask.flatten(1)
        idx = getattr(self, f"index_{i}")
        if idx is None:
            return m
        return m.new_ones(len(m), self.points[i].channels).index_copy(1, idx, m)

    def shaped(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The mask at point i, shaped to broadcast against x (batch first, channels at dim)."""
        m = self.vector(i)
        dim = self.points[i].dim % x.dim()
        shape = [1] * x.dim()
        shape[0], shape[dim] = len(m), m.shape[1]
        return m.view(shape)

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x * self.shaped(i, x)


class MaskedLayerNorm(nn.Module):
    """A LayerNorm over channels whose statistics skip removed channels (as in the pruned
    network), output zero there; the plain LayerNorm while nothing is removed."""

    def __init__(self, norm: nn.LayerNorm, mask: UnitMask, point: int) -> None:
        super().__init__()
        self.norm, self.point = norm, point
        self.unit = [mask]  # not a submodule: the mask module is registered once, in the net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.unit[0]
        if mask.rows is None and bool(mask.mask.all()):
            return self.norm(x)
        dim = mask.points[self.point].dim % x.dim()
        xc = x.movedim(dim, -1)
        m = mask.shaped(self.point, x).movedim(dim, -1)
        count = m.sum(-1, keepdim=True).clamp_min(1)
        mean = (xc * m).sum(-1, keepdim=True) / count
        var = ((xc - mean) ** 2 * m).sum(-1, keepdim=True) / count
        y = (xc - mean) * torch.rsqrt(var + self.norm.eps)
        if self.norm.weight is not None:
            y = y * self.norm.weight
        if self.norm.bias is not None:
            y = y + self.norm.bias
        return (y * m).movedim(-1, dim)


class MaskedGroupNorm(MaskedLayerNorm):
    """A GroupNorm whose group statistics skip removed channels (a removed channel leaves its
    group, as in the pruned network), output zero there; the plain GroupNorm while nothing is
    removed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.unit[0]
        if mask.rows is None and bool(mask.mask.all()):
            return self.norm(x)
        norm, groups = self.norm, self.norm.num_groups
        n, c = x.shape[:2]
        m = mask.shaped(self.point, x)  # (1 or R, C, 1, ...)
        xg = x.reshape(n, groups, c // groups, -1)
        mg = m.reshape(len(m), groups, c // groups, 1)
        count = (mg.sum((2, 3), keepdim=True) * xg.shape[-1]).clamp_min(1)
        mean = (xg * mg).sum((2, 3), keepdim=True) / count
        var = ((xg - mean) ** 2 * mg).sum((2, 3), keepdim=True) / count
        y = ((xg - mean) * torch.rsqrt(var + norm.eps)).reshape(x.shape)
        if norm.affine:
            shape = [1, c] + [1] * (x.dim() - 2)
            y = y * norm.weight.view(shape) + norm.bias.view(shape)
        return y * m


def insert(gm: fx.GraphModule, unit: Unit, attr: str, device: torch.device | None) -> UnitMask:
    """Insert `unit`'s mask at each of its points of `gm` (a UnitMask registered as `attr`)."""
    mask = UnitMask(unit, device)
    gm.add_submodule(attr, mask)
    nodes = {n.name: n for n in gm.graph.nodes}
    for i, p in enumerate(unit.points):
        node = nodes[p.node]
        if p.norm:
            norm_attr = f"{attr}_norm{i}"
            module = gm.get_submodule(node.target)
            cls = MaskedGroupNorm if isinstance(module, nn.GroupNorm) else MaskedLayerNorm
            gm.add_submodule(norm_attr, cls(module, mask, i))
            node.target = norm_attr
            continue
        with gm.graph.inserting_after(node):
            mul = gm.graph.call_module(attr, (node, i))
        node.replace_all_uses_with(mul, delete_user_cb=lambda u, m=mul: u is not m)
    return mask


def mask_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The unit mask buffers `module` reads when called: a UnitMask's own, a MaskedLayerNorm's
    unit's; none for any other module."""
    if isinstance(module, UnitMask):
        return [module.mask]
    if isinstance(module, MaskedLayerNorm):  # or MaskedGroupNorm
        return [module.unit[0].mask]
    return []


@torch.no_grad()
def check_zero(gm: fx.GraphModule, units: dict[str, Unit], masks: dict[str, UnitMask],
               example_input: torch.Tensor) -> dict[str, str]:
    """Units whose consumers do not see exact zeros with all their channels masked (all units
    at once, on `example_input`), with the reason: the ops between do not preserve zero."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    readers = {c for name in masks for c, _ in units[name].reads}
    for c in readers:
        def hook(mod: nn.Module, args: tuple, c: str = c) -> None:
            seen[c] = args[0]
        hooks.append(gm.get_submodule(c).register_forward_pre_hook(hook))
    saved = {name: m.mask.clone() for name, m in masks.items()}
    try:
        for m in masks.values():
            m.mask.zero_()
        with eval_mode(gm):  # BatchNorm statistics used, not updated
            gm(example_input)
    finally:
        for h in hooks:
            h.remove()
        for name, m in masks.items():
            m.mask.copy_(saved[name])
    bad = {}
    for name in masks:
        for c, idx in units[name].reads:
            x = seen.get(c)
            if x is None:
                continue
            dim = 1 if isinstance(gm.get_submodule(c), nn.Conv2d) else -1
            part = x.index_select(dim, torch.tensor(idx, device=x.device))
            if bool(part.ne(0).any()):
                bad[name] = f"{c} still reads non-zero values from it when it is masked"
                break
    return bad
