"""Greedy pruning: score the remaining filters, remove the lowest, re-score, repeat.

Two schedules share one loop and one `Trace` format:

- layer-wise (`greedy_prune`): one layer, from the full network down to `n_keep` filters.
- network-wide (`global_prune`): the filters of all listed layers ranked together; each step
  removes the lowest-scoring filter(s) over all layers, never taking a layer below
  `min_per_layer`. Every step re-scores every remaining filter of every layer that can still
  lose one. For CAR that is one tally per layer per step, i.e. about as many candidate
  evaluations per step as filters remain in all layers together (the default two layers:
  about 2x the layer-wise runs of both layers), and the cached prefix of a layer is recomputed
  whenever a mask upstream of it changed.

Each step removes `k` filters (default 1, the paper's) and all criteria are recomputed after
every step. Ties on the score go by the criterion's tie rule: the smaller loss increase on the
scoring set (`tie_break="loss"`) or a seeded random order (`"random"`, drawn afresh each
step), then the earlier layer (in the order given) and lower filter index. Each row records
how many filters tied on its score and which rule decided (empty when the score alone did),
and `Trace.regime()` sums this up with the full network's scoring top-1: a criterion like CAR
says something only where its scores decide, i.e. where the network does not fit its scoring
set (see REPRODUCING.md). With a `RunState`, the trace is saved after every step and a run
started again with the same key continues where it stopped.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np
import pandas as pd
import torch
from torch import fx, nn
from tqdm.auto import tqdm

from carlib.checkpointing import RunState
from carlib.criteria import Criterion, get_criterion
from carlib.errors import CarlibError
from carlib.evaluate import check_metric, eval_mode, topk_of
from carlib.graph import MaskedNet
from carlib.scoring import LayerData, Tally, TallyMemo, check_mode, measure, tally
from carlib.stats import METHODS, car_interval


@dataclass
class Trace:
    """What a greedy run did: filters in removal order and one row per removed filter.

    Step 0 (one row, nothing removed) is the start. With `k` > 1 a step removes several
    filters: one row each, sharing `step` and the measurements taken after the whole step
    (`filters_remaining`, `scoring_acc`, `heldout_top1`). The network-wide schedule adds a
    `layer` (the removed filter's; empty at step 0) and `layer_remaining` to every row, and
    `filters_remaining` counts all listed layers. `initial_scores[layer]` holds the
    criterion's score of every filter of the layer on the full network (its first scoring);
    `scoring_top1` is the full network's top-1 accuracy on the scoring set.
    """

    layer: str
    criterion: str
    metric: str
    seed: int
    num_filters: int
    removed: list[int] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    schedule: str = "layerwise"
    layers: list[str] = field(default_factory=list)
    removed_layers: list[str] = field(default_factory=list)
    initial_scores: dict[str, list[float]] = field(default_factory=dict)
    scoring_top1: float = math.nan
    resumed_at: int = 0  # finished steps loaded from a saved state (not saved itself)

    def to_frame(self) -> pd.DataFrame:
        """One row per removed filter (plus step 0); `removed_filter` is <NA> at step 0."""
        df = pd.DataFrame(self.steps)
        if "layer" in df:
            df.insert(0, "layer", df.pop("layer"))
        else:
            df.insert(0, "layer", self.layer)
        df.insert(1, "criterion", self.criterion)
        df.insert(2, "seed", self.seed)
        if self.schedule == "global":  # the run's unit: every listed layer, in order
            df.insert(1, "layers", "+".join(self.layers))
        for col in ("removed_filter", "layer_remaining"):
            if col in df:
                df[col] = df[col].astype("Int64")
        return df

    def regime(self) -> dict:
        """Whether the run is in CAR's regime: the full network's scoring top-1, and how many
        removals the score decided alone (`decided`: the share without a tie to break)."""
        rows = [r for r in self.steps if r["step"] > 0]
        tied = sum(1 for r in rows if r["tie_break"])
        return {"scoring_top1": self.scoring_top1, "removals": len(rows), "tied": tied,
                "decided": 1 - tied / len(rows) if rows else math.nan}

    def pruned(self, model: nn.Module) -> MaskedNet:
        """A masked view of `model` (sharing its weights) with this trace's filters removed."""
        net = MaskedNet(model)
        for name, f in zip(self.removed_layers, self.removed):
            net.remove(name, [f])
        return net

    def to_state(self) -> dict:
        """The trace as JSON-ready data (see `from_state`)."""
        return {k: v for k, v in vars(self).items() if k != "resumed_at"}

    @classmethod
    def from_state(cls, state: dict) -> Trace:
        trace = cls(**state)
        trace.resumed_at = len({row["step"] for row in trace.steps}) - 1
        return trace


@dataclass(frozen=True)
class Candidate:
    layer: str
    filter: int
    score: float


def choose(cands: list[Candidate], m: int, room: dict[str, int],
           tie_key: Callable[[list[Candidate]], list[float]], order: Sequence[str],
           rule: str = "loss") -> list[tuple[Candidate, int, str]]:
    """The `m` lowest-scoring candidates, at most `room[layer]` from each layer.

    Among equal scores the smaller `tie_key` (the loss increase, or a random draw; asked only
    when a tie has to be broken) wins, then the earlier layer in `order`, then the lower index.
    Returns (candidate, number tied on its score, rule) per pick, with rule "" where no tie had
    to be broken, else `rule` if its key beat every passed-over tied filter's, else "index".
    """
    room, rank = dict(room), {name: i for i, name in enumerate(order)}
    picks: list[tuple[Candidate, int, str]] = []
    ranked = sorted(cands, key=lambda c: (c.score, rank[c.layer], c.filter))
    for _, grp in groupby(ranked, key=lambda c: c.score):
        group = list(grp)
        eligible = [c for c in group if room[c.layer] > 0]
        slots = m - len(picks)
        if slots == 0:
            break
        key = {}
        per_layer = Counter(c.layer for c in eligible)
        if min(slots, sum(min(v, room[n]) for n, v in per_layer.items())) < len(eligible):
            key = dict(zip(eligible, tie_key(eligible)))
            eligible.sort(key=lambda c: (key[c], rank[c.layer], c.filter))
        chosen = []
        for c in eligible:
            if len(chosen) < slots and room[c.layer] > 0:
                chosen.append(c)
                room[c.layer] -= 1
        passed = [key[c] for c in eligible if c not in chosen]
        for c in chosen:
            how = "" if not passed else rule if key[c] < min(passed) else "index"
            picks.append((c, len(group), how))
    return picks


def random_keys(seed: int, step: int, layers: Sequence[str], sizes: Sequence[int]
                ) -> dict[tuple[str, int], float]:
    """The random tie rule's keys at `step`: one uniform draw per filter of every layer, from
    a generator seeded by (seed, step), so a resumed run draws the same."""
    draws = np.random.default_rng([seed, step]).random(sum(sizes))
    start = np.cumsum([0, *sizes])
    return {(name, f): float(draws[start[i] + f]) for i, name in enumerate(layers)
            for f in range(sizes[i])}


def _mask_deps(net: MaskedNet, module: fx.GraphModule) -> list[str]:
    """Prunable layers whose mask `module` reads."""
    ids = {id(net.mask(name)): name for name in net.units}
    return [ids[id(getattr(module, n.target))] for n in module.graph.nodes
            if n.op == "get_attr" and n.users and id(getattr(module, n.target, None)) in ids]


class _Cuts:
    """`LayerData` per layer, rebuilt when a mask its (cached) prefix reads has changed; their
    tallies go through `memo` if given."""

    def __init__(self, net: MaskedNet, data: Iterable, memo: TallyMemo | None = None,
                 what: str = "scoring set") -> None:
        self.net, self.data, self.memo, self.what = net, data, memo, what
        self._cuts: dict[str, tuple[LayerData, list[tuple[str, torch.Tensor]]]] = {}

    def get(self, layer: str) -> LayerData:
        entry = self._cuts.get(layer)
        if entry is None or any(not torch.equal(self.net.mask(n), m) for n, m in entry[1]):
            cut = LayerData(self.net, layer, self.data, what=self.what)
            cut.memo = self.memo
            deps = [(n, self.net.mask(n).clone()) for n in _mask_deps(self.net, cut.prefix)]
            self._cuts[layer] = entry = (cut, deps)
        return entry[0]


def _interval(t: Tally | None, f: int, metric: str, method: str, seed: int
              ) -> tuple[float, float]:
    """The CAR interval of candidate f from the tally's flip counts (NaN where unavailable)."""
    lost, gained = (t.flips_lost, t.flips_gained) if t is not None else (None, None)
    if lost is None or gained is None or metric == "loss":
        return math.nan, math.nan
    i = t.candidates.index(f)
    lo, hi = car_interval(int(lost[i]), int(gained[i]), t.n, method=method, seed=seed)
    return float(lo), float(hi)


def _prune(net: MaskedNet, trace: Trace, score_fn: Criterion, data: Iterable,
           eval_data: Iterable | None, n_remove: int, min_keep: dict[str, int], k: int,
           interval: str, progress: bool, save: Callable[[Trace], None],
           memo: TallyMemo | None) -> Trace:
    """The shared greedy loop over `trace.layers`; continues `trace` where it stopped."""
    layers, metric, network_wide = trace.layers, trace.metric, trace.schedule == "global"
    scored_in = score_fn.run_metric(metric)  # the criterion's own metric (loss: "loss")
    cuts = _Cuts(net, data, memo)
    held = _Cuts(net, eval_data, what="held-out set (eval_data)") if eval_data is not None else None
    sizes = [net.unit(name).num_filters for name in layers]
    for name, f in zip(trace.removed_layers, trace.removed):
        net.remove(name, [f])

    def record(step: int, picks: list[tuple[Candidate, int, str]], tallies: dict,
               acc: float | None) -> None:
        where = picks[-1][0].layer if picks else layers[0]
        if acc is None:
            acc = measure(cuts.get(where), metric)[0]
        after = {"filters_remaining": sum(len(net.kept(n)) for n in layers),
                 "scoring_acc": acc,
                 "heldout_top1": measure(held.get(where), "top1")[0] if held else math.nan}
        for c, n_tied, rule in picks or [(None, 0, "")]:
            row: dict = {"step": step}
            if network_wide:
                row["layer"] = c.layer if c else None
            row["removed_filter"] = c.filter if c else None
            row["filters_remaining"] = after["filters_remaining"]
            if network_wide:
                row["layer_remaining"] = len(net.kept(c.layer)) if c else None
            lo, hi = (_interval(tallies[c.layer], c.filter, scored_in, interval, trace.seed)
                      if c else (math.nan, math.nan))
            row.update(score=c.score if c else math.nan, score_lo=lo, score_hi=hi,
                       tie_size=n_tied, tie_break=rule, scoring_acc=after["scoring_acc"],
                       heldout_top1=after["heldout_top1"])
            trace.steps.append(row)

    if not trace.steps:
        trace.scoring_top1 = measure(cuts.get(layers[0]), "top1")[0]
        record(0, [], {}, trace.scoring_top1 if metric == "top1" else None)
        save(trace)
    bar = tqdm(total=n_remove, initial=len(trace.removed), leave=False,
               desc=f"{trace.criterion:>6} {trace.layer}",
               disable=None if progress else True)  # None: only on a terminal
    while len(trace.removed) < n_remove:
        cands: list[Candidate] = []
        tallies: dict[str, Tally | None] = {}
        for name in layers:
            kept = net.kept(name)
            if len(kept) <= min_keep[name]:
                continue
            scores, tallies[name] = score_fn(net, name, cuts.get(name), kept, metric)
            values = scores.tolist()
            if name not in trace.initial_scores:
                full = [math.nan] * net.unit(name).num_filters
                for f, s in zip(kept, values):
                    full[f] = s
                trace.initial_scores[name] = full
            cands += [Candidate(name, f, s) for f, s in zip(kept, values)]

        step = trace.steps[-1]["step"] + 1

        def tie_key(group: list[Candidate], tallies: dict = tallies, step: int = step
                    ) -> list[float]:
            if score_fn.tie_break == "random":
                draws = random_keys(trace.seed, step, layers, sizes)
                return [draws[(c.layer, c.filter)] for c in group]
            inc = {}
            for name in dict.fromkeys(c.layer for c in group):
                t = tallies[name] or tally(cuts.get(name), [c.filter for c in group
                                                             if c.layer == name], metric)
                inc.update({(name, f): v for f, v in zip(t.candidates,
                                                          t.loss_increase().tolist())})
            return [inc[(c.layer, c.filter)] for c in group]

        room = {name: len(net.kept(name)) - min_keep[name] for name in layers}
        picks = choose(cands, min(k, n_remove - len(trace.removed)), room, tie_key, layers,
                       score_fn.tie_break)
        if not picks:  # unreachable when n_remove was checked against the per-layer minimums
            raise CarlibError(f"no filter of {trace.layer} can be removed any more")
        for c, _, _ in picks:
            net.remove(c.layer, [c.filter])
            trace.removed.append(c.filter)
            trace.removed_layers.append(c.layer)
        acc = None  # the tally of the removed filter already counted the new accuracy
        if (len(picks) == 1 and tallies[picks[0][0].layer] is not None and metric != "loss"
                and topk_of(scored_in) == topk_of(metric)):
            t, f = tallies[picks[0][0].layer], picks[0][0].filter
            acc = int(t.correct[t.candidates.index(f)]) / t.n
        record(step, picks, tallies, acc)
        save(trace)
        bar.update(len(picks))
        bar.set_postfix(acc=f"{trace.steps[-1]['scoring_acc']:.3f}")
    bar.close()
    return trace


def _run(model: nn.Module, trace: Trace, criterion: str | Criterion, data: Iterable,
         eval_data: Iterable | None, n_remove: int | Callable[[MaskedNet], int],
         min_keep: dict[str, int] | int, k: int, interval: str, progress: bool,
         state: RunState | None, parts: dict, mode: str, memo: TallyMemo | None) -> Trace:
    """Set up the masked net and the saved state, then run the greedy loop."""
    check_metric(trace.metric)
    check_mode(mode)
    if k < 1:
        raise CarlibError(f"k={k}: remove at least one filter per step (k >= 1)")
    if interval not in METHODS:
        raise CarlibError(f"unknown interval method '{interval}'; valid: {', '.join(METHODS)}")
    layers = trace.layers
    if memo is not None:
        memo.check(model, data)
    score_fn = get_criterion(criterion, trace.seed,
                             layers if trace.schedule == "global" else None, mode)
    with eval_mode(model), torch.no_grad():
        net = MaskedNet(model)
        sizes = {name: net.unit(name).num_filters for name in layers}
        if isinstance(min_keep, int):
            min_keep = dict.fromkeys(layers, min_keep)
        n = n_remove(net) if callable(n_remove) else n_remove
        trace.num_filters = sum(sizes.values())
        saved = state.load(**parts) if state is not None else None
        if saved is not None:
            trace = Trace.from_state(saved)
        return _prune(net, trace, score_fn, data, eval_data, n, min_keep, k, interval, progress,
                      (lambda t: state.save(t.to_state(), **parts)) if state else lambda t: None,
                      memo)


def greedy_prune(model: nn.Module, layer: str, data: Iterable, n_keep: int,
                 criterion: str | Criterion = "car", *, metric: str = "top1",
                 eval_data: Iterable | None = None, seed: int = 0, k: int = 1,
                 interval: str = "exact", progress: bool = True,
                 state: RunState | None = None, mode: str = "fast",
                 memo: TallyMemo | None = None) -> Trace:
    """Prune conv `layer` greedily down to `n_keep` filters, `k` per step; model unchanged.

    `data` is the scoring set ((inputs, targets) batches); `eval_data`, if given, is the held-out
    set whose top-1 accuracy is recorded after every step. Criteria: see `carlib.criteria` (a
    name or a `Criterion`; "car" with `metric`: top1 | top5 | loss).
    `interval` ("exact" | "bootstrap", `carlib.stats`) gives CAR rows `score_lo`/`score_hi`
    where the scoring engine provides flip counts. With `state`, progress is saved after every
    step and resumed from there. `progress` shows a bar when output is a terminal. `mode`:
    the CAR scoring engine's mode (`carlib.scoring`; "naive" is the slow reference). `memo`: a
    `carlib.scoring.TallyMemo` shared by runs on the same model and `data`, so the pruned
    networks they share are counted once (same results, less work).
    """

    def n_remove(net: MaskedNet) -> int:
        n_filters = net.unit(layer).num_filters
        if not 1 <= n_keep <= n_filters:
            raise CarlibError(f"n_keep={n_keep} is out of range for {layer}: "
                              f"use 1..{n_filters} (it has {n_filters} filters)")
        return n_filters - n_keep

    name = getattr(criterion, "name", criterion)
    trace = Trace(layer, name, metric, seed, 0, layers=[layer])
    parts = {"schedule": "layerwise", "layer": layer, "criterion": name, "metric": metric,
             "seed": seed, "n_keep": n_keep, "k": k, "interval": interval}
    return _run(model, trace, criterion, data, eval_data, n_remove, n_keep, k, interval,
                progress, state, parts, mode, memo)


def global_prune(model: nn.Module, layers: Sequence[str], data: Iterable,
                 n_remove: int | None = None, criterion: str | Criterion = "car", *,
                 keep_fraction: float | None = None, min_per_layer: int = 1, k: int = 1,
                 metric: str = "top1", eval_data: Iterable | None = None, seed: int = 0,
                 interval: str = "exact", progress: bool = True,
                 state: RunState | None = None, mode: str = "fast",
                 memo: TallyMemo | None = None) -> Trace:
    """Network-wide greedy pruning of `layers` together (see the module docstring).

    Removes `n_remove` filters, or, if None, down to round(keep_fraction x all their filters);
    `k` per step, keeping at least `min_per_layer` in every layer. Other arguments as in
    `greedy_prune`. The trace's rows carry the removed filter's `layer`.
    """
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise CarlibError("global pruning needs at least one layer")

    def count(net: MaskedNet) -> int:
        total = sum(net.unit(name).num_filters for name in layers)
        most = total - len(layers) * min_per_layer
        if n_remove is None and (keep_fraction is None or not 0 < keep_fraction <= 1):
            raise CarlibError(f"keep_fraction={keep_fraction}: set n_remove, or keep_fraction "
                              "in (0, 1]")
        n = n_remove if n_remove is not None else total - round(keep_fraction * total)
        if min_per_layer < 1 or not 0 <= n <= most:
            raise CarlibError(f"cannot remove {n} of {total} filters keeping {min_per_layer} "
                              f"per layer (min_per_layer >= 1); use n_remove in 0..{most}")
        return n

    name = getattr(criterion, "name", criterion)
    trace = Trace("+".join(layers), name, metric, seed, 0, schedule="global", layers=layers)
    parts = {"schedule": "global", "layers": layers, "criterion": name, "metric": metric,
             "seed": seed, "n_remove": n_remove, "keep_fraction": keep_fraction,
             "min_per_layer": min_per_layer, "k": k, "interval": interval}
    return _run(model, trace, criterion, data, eval_data, count, min_per_layer, k, interval,
                progress, state, parts, mode, memo)
