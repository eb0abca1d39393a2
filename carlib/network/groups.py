"""Units as dependency groups: the channels removed together, and every place to mask them.

A *unit* is a set of output channels that can only be removed together: torch-pruning's
dependency group of a conv's output channels (`tp.DependencyGraph`, walked once in
`carlib.network.deps`; physical removal reads the same walk). Unit channel i is, at
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

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from carlib.core.module import eval_mode
from carlib.network.deps import Deps, Group, Member
from carlib.network.ops import MASK_AFTER

KINDS = ("conv", "residual", "concat", "split", "gate", "depthwise", "grouped", "layernorm",
         "groupnorm")


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


def _tags(group: Group) -> set[str]:
    """What the group holds: the `KINDS` besides conv."""
    tags = set()
    writers = [m for m in group.members if m.writer]
    for m in group.members:
        mod, what = m.module, repr(m.module)
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
    try:
        deps = Deps.build(model, example_input)
    except Exception as e:  # noqa: BLE001 - torch-pruning raises many types; report one line
        why = f"torch-pruning cannot trace it ({type(e).__name__}: {str(e).splitlines()[0]})"
        return dict(simple), {n: why for n, m in model.named_modules()
                              if isinstance(m, nn.Conv2d) and n not in simple}
    sites = _Sites(dict(model.named_modules()), _calls(gm),
                   {nd.name: i for i, nd in enumerate(gm.graph.nodes)})
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    units, excluded, covered = {}, {}, set()
    for name in convs:
        if name in covered:
            continue
        if name in simple:
            units[name] = simple[name]
            covered.add(name)
            continue
        try:
            group = deps.walk(name)
        except Exception as e:  # noqa: BLE001
            excluded[name] = f"torch-pruning has no group for it ({str(e).splitlines()[0]})"
            continue
        unit, why = _unit(group, sites)
        members = unit.convs if unit is not None else (name,)
        covered.update(members)
        if why is not None:
            excluded.update(dict.fromkeys(members, why))
        else:
            units[name] = unit
    rank = {n: i for i, n in enumerate(convs)}
    return dict(sorted(units.items(), key=lambda kv: rank[kv[0]])), excluded


@dataclass(frozen=True)
class _Sites:
    """Where a group's modules run in the fx graph: `modules` by name, the `calls` of each
    (call_module nodes) and every node's position (`order`)."""

    modules: dict[str, nn.Module]
    calls: dict[str, list[fx.Node]]
    order: dict[str, int]


def _across(m: Member) -> bool:
    """Whether `m` is a norm whose statistics mix channels (masking cannot remove one)."""
    return isinstance(m.module, nn.LocalResponseNorm) or (
        isinstance(m.module, nn.modules.batchnorm._NormBase)
        and not isinstance(m.module, MASK_AFTER))


def _unit(group: Group, sites: _Sites) -> tuple[Unit | None, str | None]:
    """The unit of conv `group.layer`'s group, or (unit or None, why it cannot be masked)."""
    name = group.layer
    n = sites.modules[name].out_channels
    across = next((m for m in group.members if _across(m)), None)
    if across is not None:
        return None, f"{type(across.module).__name__} {across.name} normalizes across its channels"
    convs = group.convs()
    readers = group.readers()
    if not readers:
        return Unit(name, n, "", convs=convs), "its channels reach no conv or linear layer"
    points, why = _points(group, n, sites)
    if why is None and not points:
        why = "no BatchNorm, conv or LayerNorm output to mask"
    if why is not None:
        return Unit(name, n, "", convs=convs), why
    tags = _tags(group)
    kind = "+".join(k for k in KINDS if k in tags) or "conv"
    points.sort(key=lambda p: sites.order[p.node])
    return Unit(name, n, points[0].node, sorted({m.name for m in readers}), kind, convs,
                tuple(points), tuple((m.name, m.idxs) for m in readers)), None


def _points(group: Group, n: int, sites: _Sites) -> tuple[list[MaskPoint], str | None]:
    """The mask points of a group of `n` channels, or (those so far, why it cannot be masked):
    every output of a member BatchNorm, LayerNorm, GroupNorm, or conv/linear not followed by
    one of the group's norms."""
    points = []
    for m in group.members:
        norm = isinstance(m.module, (nn.LayerNorm, nn.GroupNorm))
        if m.name is None or not m.out or not (
                norm or isinstance(m.module, (nn.Conv2d, nn.Linear, *MASK_AFTER))):
            continue
        nodes = sites.calls.get(m.name, [])
        if len(nodes) != 1:
            return points, f"{m.name} runs {len(nodes)} times"
        if isinstance(m.module, (nn.Conv2d, nn.Linear)) and _norm_follows(nodes[0], group,
                                                                          sites):
            continue  # its norm is a mask point
        point, why = _point(m, nodes[0], n, norm)
        if why is not None:
            return points, why
        points.append(point)
    return points, None


def _norm_follows(node: fx.Node, group: Group, sites: _Sites) -> bool:
    """Whether a conv/linear output `node` is read only by a channel-wise norm of `group`."""
    users = list(node.users)
    return (len(users) == 1 and users[0].op == "call_module"
            and isinstance(sites.modules[users[0].target], (*MASK_AFTER, nn.GroupNorm))
            and any(m.name == users[0].target for m in group.members))


def _point(m: Member, node: fx.Node, n: int, norm: bool) -> tuple[MaskPoint | None, str | None]:
    """The mask point at member `m`'s output `node`, or (None, why it cannot be one)."""
    mod = m.module
    channels = (mod.out_channels if isinstance(mod, nn.Conv2d)
                else mod.out_features if isinstance(mod, nn.Linear)
                else mod.num_features if isinstance(mod, MASK_AFTER)
                else mod.num_channels if isinstance(mod, nn.GroupNorm)
                else mod.normalized_shape[-1])
    if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) != 1:
        return None, f"LayerNorm {m.name} normalizes several dims"
    if len(m.idxs) != n:
        return None, f"{m.name} maps {n} channels to {len(m.idxs)}"
    dim = (1 if isinstance(mod, (nn.Conv2d, *MASK_AFTER, nn.GroupNorm))
           or _is_layernorm2d(mod) else -1)
    index = None if m.idxs == tuple(range(channels)) else m.idxs
    return MaskPoint(node.name, m.name, channels, dim, index, norm), None


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
