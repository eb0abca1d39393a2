"""Filter-pruning criteria: a score per remaining filter; the lowest score is removed first.

A criterion is a `Criterion`: a name, a scoring function (net, layer, cut, kept, metric) ->
(scores, tally or None), with `scores[i]` the importance of filter `kept[i]` (higher = more
important), recomputed after every removal so all criteria follow the same greedy schedule, and
the rule that breaks ties on the score. The tally (`carlib.scoring.counts.Tally`, hits in `metric`'s
top-k) counts the candidates `kept`, or none (a base-only tally: the network's own hits, which
greedy runs record as scoring accuracy instead of measuring it again). `cut` is the layer's
`LayerData` on the scoring set; its prefix output is the layer's channels at the mask point,
*before* the mask.
`register_criterion` adds one; `greedy_prune(criterion=...)` takes a name or a `Criterion`.

- `car`: classification accuracy reduction (Abbasi-Asl & Yu): metric drop on removal
  (`method.metric`, default top-1); equal CAR goes to the smaller loss increase.
- `car_random_tie`: the same CAR, equal CAR broken by a seeded random draw (an ablation: what
  CAR decides by itself, without the loss increase deciding its ties).
- `loss`: the cross-entropy increase on removal (the "oracle" of Molchanov et al. 2017/2019),
  whatever `method.metric` says.
- `random`: a seeded permutation (over the layer's filters, or over all listed layers' filters
  for the network-wide schedule).
- `l1`, `l2`: L1 / L2 norm of the filter's conv weights (bias excluded; Li et al. 2016); for a
  multi-point unit (`carlib.network.groups`), of the weights of every conv that loses the channel.
- `mean_activation`: mean of a(c) over scoring images and spatial positions, where a(c) is the
  channel at its mask point (conv output, or its BatchNorm's output) passed through ReLU when a
  ReLU is the op that follows the mask point (as in conv -> [BN] -> ReLU, looking through
  identity modules and dropout), else taken as is.
- `apoz`: 1 - APoZ, with APoZ (Hu et al. 2016) the fraction of zeros of that same a(c) over
  scoring images and positions: high APoZ = unimportant = removed first. (A multi-point
  unit's a(c) is taken at its first mask point.)
- `taylor`: first-order Taylor (Molchanov et al. 2019): per scoring batch b, the channel's
  gate gradient G_b(c) = d L_b / d m_c = sum over the channel's elements of a * dL_b/da, with
  m_c a multiplier on the channel at its mask point (at all of a multi-point unit's) and L_b
  the batch's mean cross-entropy;
  importance = mean over batches of G_b(c)^2 (so it depends on the batch size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from carlib.core.errors import CarlibError
from carlib.dist import shards
from carlib.network import ops
from carlib.network.graph import MaskedNet
from carlib.scoring.counts import Tally
from carlib.scoring.cuts import LayerData
from carlib.scoring.evaluate import hits, losses, topk_of
from carlib.scoring.tally import tally

Scores = tuple[torch.Tensor, Tally | None]
ScoreFn = Callable[[MaskedNet, str, LayerData, list[int], str], Scores]
TIE_BREAKS = ("loss", "random")
DEPENDS = ("weights", "prefix", "network")


@dataclass(frozen=True)
class Criterion:
    """A named filter score and its tie rule; calling it scores the kept filters.

    `tie_break`: "loss" (equal scores go to the smaller loss increase on the scoring set,
    then the lower index) or "random" (a seeded random order). `metric`, if set, is the metric
    the criterion always uses (the loss criterion), else the run's `metric` applies.
    `depends`: what a filter's score depends on besides which filters of its layer are kept,
    so the network-wide schedule can reuse a layer's scores while that is unchanged:
    "weights" (the layer's own weights: l1, l2, random), "prefix" (also the scoring data
    through the layer's prefix, i.e. the masks of the layers upstream: mean_activation,
    apoz) or "network" (every mask: car, loss, taylor; the default, always re-scored).
    `counts_flips`: the scores are counts of the scoring engine (`make_car`: car,
    car_random_tie, loss), whose runs cost candidate evaluations and whose paired held-out
    differences the scripts report against every other criterion.
    """

    name: str
    fn: ScoreFn
    tie_break: str = "loss"
    metric: str | None = None
    depends: str = "network"
    counts_flips: bool = False

    def __post_init__(self) -> None:
        if self.tie_break not in TIE_BREAKS:
            raise CarlibError(f"tie_break='{self.tie_break}' for criterion '{self.name}'; "
                              f"valid: {', '.join(TIE_BREAKS)}")
        if self.depends not in DEPENDS:
            raise CarlibError(f"depends='{self.depends}' for criterion '{self.name}'; "
                              f"valid: {', '.join(DEPENDS)}")

    def __call__(self, net: MaskedNet, layer: str, cut: LayerData, kept: list[int],
                 metric: str) -> Scores:
        return self.fn(net, layer, cut, kept, self.metric or metric)

    def run_metric(self, metric: str) -> str:
        """The metric this criterion's scores (and CAR intervals) are in, given the run's."""
        return self.metric or metric


def _filter_weights(net: MaskedNet, layer: str) -> list[torch.Tensor]:
    """(filters, fan-in) weights of every conv that loses the unit's channels: the layer's
    own conv, or (multi-point units) each writer of the unit (e.g. a residual stream's)."""
    unit = net.unit(layer)
    convs = [net.gm.get_submodule(c) for c in (unit.convs or (unit.name,))]
    return [c.weight.detach().flatten(1) for c in convs if c.out_channels == unit.num_filters]


def make_car(mode: str = "fast") -> ScoreFn:
    """CAR counted by the scoring engine in `mode` (`carlib.scoring.tally`: fast | plain | naive;
    all give the same counts, naive is the slow reference)."""

    def car(net: MaskedNet, layer: str, cut: LayerData, kept: list[int], metric: str) -> Scores:
        """Classification accuracy reduction: metric drop when the filter is removed."""
        t = tally(cut, kept, metric, mode=mode)
        return t.scores(metric), t

    return car


car = make_car()


def l1(net: MaskedNet, layer: str, cut: LayerData, kept: list[int], metric: str) -> Scores:
    """Sum of absolute filter weights (Li et al. 2016)."""
    ws = _filter_weights(net, layer)
    if len(ws) == 1:
        return ws[0].abs()[kept].sum(1).double().cpu(), None
    return sum(w.abs().sum(1).double() for w in ws)[kept].cpu(), None


def l2(net: MaskedNet, layer: str, cut: LayerData, kept: list[int], metric: str) -> Scores:
    """Euclidean norm of the filter's weights."""
    ws = _filter_weights(net, layer)
    if len(ws) == 1:
        return ws[0][kept].double().norm(dim=1).cpu(), None
    return sum((w.double() ** 2).sum(1) for w in ws)[kept].sqrt().cpu(), None


def relu_follows(net: MaskedNet, layer: str) -> bool:
    """Whether the ops reading the layer's (masked) mask point are ReLUs, looking through
    identity modules (nn.Identity, e.g. a disabled BatchNorm, and dropout, identity in eval)."""
    point = next(n for n in net.gm.graph.nodes if n.name == net.unit(layer).mask_node)
    (mul,) = point.users  # the mask multiplication MaskedNet inserted
    modules = dict(net.gm.named_modules())
    return bool(mul.users) and all(_is_relu(u, modules) for u in mul.users)


def _is_relu(n: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `n` is a ReLU (in place or not), or an identity module read only by ReLUs."""
    if ops.IDENTITY.matches(n, modules):
        return bool(n.users) and all(_is_relu(u, modules) for u in n.users)
    return (ops.RELU | ops.RELU_INPLACE).matches(n, modules)


def _channel_mean(net: MaskedNet, layer: str, cut: LayerData, kept: list[int],
                  stat: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Mean of stat(a) over scoring images and positions, per kept channel (float64; batch
    sums added in batch order, over all processes where the data is split: `carlib.dist.shards`).

    a = the channel at its mask point, through ReLU where one follows (see module docstring).
    """
    act = torch.relu if relu_follows(net, layer) else (lambda t: t)
    rows, count = [], 0
    for (h, *_), _y in cut:
        a = act(h[:, kept]).transpose(0, 1).reshape(len(kept), -1)
        rows.append(stat(a).double().sum(1))
        count += a.shape[1]
    if count == 0:
        raise CarlibError("the scoring set is empty; check method.scoring.size")
    (count,) = shards.counts(cut.data, [torch.tensor(count)])
    return shards.fold(cut.data, rows) / int(count)


def mean_activation(net: MaskedNet, layer: str, cut: LayerData, kept: list[int],
                    metric: str) -> Scores:
    """Mean post-ReLU activation of the channel on the scoring set."""
    return _channel_mean(net, layer, cut, kept, lambda a: a), None


def apoz(net: MaskedNet, layer: str, cut: LayerData, kept: list[int], metric: str) -> Scores:
    """1 - Average Percentage of Zeros of the post-ReLU channel (Hu et al. 2016)."""
    return 1.0 - _channel_mean(net, layer, cut, kept, lambda a: (a == 0).double()), None


def _gated(net: MaskedNet, layer: str, cut: LayerData, gate: torch.Tensor, h: torch.Tensor,
           extras: Sequence[torch.Tensor]) -> torch.Tensor:
    """Suffix logits with the unit's channels multiplied by `gate` at its mask point, or at
    every mask point of a multi-point unit (its mask times the gate, per row)."""
    mask = net.unit_mask(layer)
    if mask is None:
        return cut.suffix(h * gate, *extras)
    mask.rows = (mask.mask.flatten(1) * gate.flatten(1)).expand(len(h), -1)
    try:
        return cut.suffix(h, *extras)
    finally:
        mask.rows = None


def taylor(net: MaskedNet, layer: str, cut: LayerData, kept: list[int], metric: str) -> Scores:
    """First-order Taylor importance (Molchanov et al. 2019): mean over batches of G_b(c)^2
    (over all processes' batches where the data is split: `carlib.dist.shards`)."""
    rows, n, correct = [], 0, 0
    for (h, *extras), y in cut:
        with torch.enable_grad():
            gate = torch.ones(1, h.shape[1], *[1] * (h.dim() - 2), dtype=h.dtype,
                              device=h.device, requires_grad=True)
            logits = _gated(net, layer, cut, gate, h, extras)
            loss = F.cross_entropy(logits, y)
            (g,) = torch.autograd.grad(loss, gate)
        n += len(y)  # the forward pass also measured the network: a base-only tally
        correct += int(hits(logits.detach(), y, topk_of(metric)).sum())
        rows.append(torch.cat([g.flatten().double() ** 2,
                               losses(logits.detach(), y).sum().view(1)]))
    if not rows:
        raise CarlibError("the scoring set is empty; check method.scoring.size")
    total = shards.fold(cut.data, rows)
    batches, n, correct = (int(v) for v in shards.counts(cut.data, [
        torch.tensor([len(rows), n, correct])])[0])
    base = Tally([], n, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64),
                 correct, float(total[-1]))
    return (total[:-1] / batches)[kept], base


def make_random(seed: int, layers: Sequence[str] | None = None) -> ScoreFn:
    """Random order fixed by `seed`: a seeded permutation of the layer's filters, or, with
    `layers`, one permutation of all their filters (layer after layer) for ranking across them.
    """

    def random(net: MaskedNet, layer: str, cut: LayerData, kept: list[int], metric: str) -> Scores:
        names = [layer] if layers is None else list(layers)
        sizes = [net.unit(n).num_filters for n in names]
        gen = torch.Generator().manual_seed(seed)
        priority = torch.randperm(sum(sizes), generator=gen).double()
        start = sum(sizes[:names.index(layer)])
        return priority[start:start + sizes[names.index(layer)]][kept], None

    return random


# name -> factory(seed, layers, mode) -> Criterion; see register_criterion
_REGISTRY: dict[str, Callable[[int, Sequence[str] | None, str], Criterion]] = {
    "car": lambda seed, layers, mode: Criterion("car", make_car(mode), counts_flips=True),
    "car_random_tie": lambda seed, layers, mode: Criterion("car_random_tie", make_car(mode),
                                                           tie_break="random",
                                                           counts_flips=True),
    "loss": lambda seed, layers, mode: Criterion("loss", make_car(mode), metric="loss",
                                                 counts_flips=True),
    "random": lambda seed, layers, mode: Criterion("random", make_random(seed, layers),
                                                   depends="weights"),
    "l1": lambda seed, layers, mode: Criterion("l1", l1, depends="weights"),
    "l2": lambda seed, layers, mode: Criterion("l2", l2, depends="weights"),
    "mean_activation": lambda seed, layers, mode: Criterion("mean_activation", mean_activation,
                                                            depends="prefix"),
    "apoz": lambda seed, layers, mode: Criterion("apoz", apoz, depends="prefix"),
    "taylor": lambda seed, layers, mode: Criterion("taylor", taylor),
}
CRITERIA: tuple[str, ...] = tuple(_REGISTRY)  # the built-in ones (`registered`: all)


def register_criterion(name: str, fn: ScoreFn | None = None, *, tie_break: str = "loss",
                       factory: Callable[[int, Sequence[str] | None, str], Criterion] | None
                       = None, depends: str = "network", counts_flips: bool = False,
                       replace: bool = False) -> None:
    """Make criterion `name` available to `get_criterion`, `greedy_prune` and the configs
    (`method.criteria`): a scoring function `fn` (see the module docstring) with its tie rule,
    `depends` and `counts_flips` (see `Criterion`), or a `factory(seed, layers, mode) ->
    Criterion` for criteria that depend on those. A name already registered is an error,
    unless `replace`."""
    if (fn is None) == (factory is None):
        raise CarlibError(f"register_criterion('{name}'): give fn or factory, not both")
    if name in _REGISTRY and not replace:
        raise CarlibError(f"criterion '{name}' is already registered; choose another name, or "
                          "pass replace=True to replace it")
    if factory is None:
        spec = Criterion(name, fn, tie_break, depends=depends,  # type: ignore[arg-type]
                         counts_flips=counts_flips)
        factory = lambda seed, layers, mode: spec  # noqa: E731
    _REGISTRY[name] = factory


def registered() -> tuple[str, ...]:
    """The names of every criterion registered now: the built-in ones, then the user's."""
    return tuple(_REGISTRY)


def counts_flips(name: str | Criterion) -> bool:
    """Whether the criterion (a name in the registry now, or a `Criterion`) counts flips with
    the scoring engine (`Criterion.counts_flips`: the CAR family); False for a name not
    registered (e.g. read from the results of a run that registered it)."""
    if not isinstance(name, Criterion) and name not in _REGISTRY:
        return False
    return get_criterion(name).counts_flips


def get_criterion(name: str | Criterion, seed: int = 0, layers: Sequence[str] | None = None,
                  mode: str = "fast") -> Criterion:
    """The criterion called `name` (see `registered`), or `name` itself if a Criterion; `layers`:
    see `make_random`; `mode`: the scoring engine's mode for the CAR family (`make_car`)."""
    if isinstance(name, Criterion):
        return name
    if name not in _REGISTRY:
        raise CarlibError(f"unknown criterion '{name}'; valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[name](seed, layers, mode)
