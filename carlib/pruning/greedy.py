"""Greedy pruning: score the remaining filters, remove the lowest, re-score, repeat.

Two schedules share one loop and one `Trace` format:

- layer-wise (`greedy_prune`): one layer, from the full network down to `n_keep` filters.
- network-wide (`global_prune`): the filters of all listed layers ranked together; each step
  removes the lowest-scoring filter(s) over all layers, never taking a layer below
  `min_per_layer`.

Cost of the network-wide schedule. Scores that depend only on a layer's own weights (l1, l2,
random) or on its prefix (mean_activation, apoz) are reused while those are unchanged
(`Criterion.depends`), so a step re-scores only the layer(s) that lost a filter (and, for the
prefix ones, the layers downstream of them). CAR, loss and taylor scores change when a filter
is removed anywhere, so exact greedy CAR re-scores every layer that can still lose a filter at
every step: a step with n_i filters left in layer i costs sum_i n_i candidate passes on the
suffix from layer i, plus a prefix pass for each layer downstream of a removal. Over a run,
`global_cost` counts candidate evaluations: with N filters in all, ceil(n_remove / k) steps
cost about sum_s (N - s*k), against sum_i sum_s (n_i - s*k) over the steps of layer-wise runs
of the same layers; halving L equal layers is about L times the layer-wise cost, halving sizes
n_i about N * sum(n_i) / sum(n_i^2) times. AlexNet-small conv1+conv2 (24 + 48 filters, the
default): 1,962 vs 1,098 evaluations, 1.8x. ResNet-50's five preset layers (64, 64, 128, 256,
512): 393,472 vs 132,352, 3.0x in evaluations, far more in time: the stem, whose candidates run
the whole network, is re-scored at all 512 steps (about 16x its layer-wise work if it loses
filters at the average rate). The stem and all 32 bottleneck conv1/conv2 layers of ResNet-50
(7,616 filters, halved): 21.8M vs 0.95M evaluations, 23x.

Each step removes `k` filters (default 1, the paper's) and all criteria are recomputed after
every step (or reused where they cannot have changed, see above). Ties on the score go by the
criterion's tie rule: the smaller loss increase on the scoring set (`tie_break="loss"`) or a
seeded random order (`"random"`, drawn afresh each step), then the earlier layer (in the order
given) and lower filter index. Each row records
how many filters tied on its score and which rule decided (empty when the score alone did),
and `Trace.regime()` sums this up with the full network's scoring top-1: a criterion like CAR
says something only where its scores decide, i.e. where the network does not fit its scoring
set (see REPRODUCING.md). With a `RunState`, the trace is saved after every step and a run
started again with the same key continues where it stopped.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np
import pandas as pd
import torch
from torch import fx, nn
from tqdm.auto import tqdm

from carlib.analysis.stats import METHODS, car_interval
from carlib.core.errors import CarlibError
from carlib.core.precision import float32_exact
from carlib.network import groups
from carlib.network.graph import MaskedNet
from carlib.pruning.criteria import Criterion, get_criterion
from carlib.pruning.state import RunState
from carlib.scoring.engine import (
    LayerData,
    ScoringOptions,
    Tally,
    TallyMemo,
    check_mode,
    example_of,
    hit_rates,
    tally,
)
from carlib.scoring.evaluate import check_metric, eval_mode, topk_of

log = logging.getLogger(__name__)


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
    scoring_top1: float | None = math.nan  # None: pending in a saved state (see `_prune`)
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

    def pruned(self, model: nn.Module, example_input: torch.Tensor | None = None) -> MaskedNet:
        """A masked view of `model` (sharing its weights) with this trace's filters removed;
        `example_input` (one batch) is needed where the trace removed multi-point units."""
        net = MaskedNet(model, example_input)
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


class _Cuts:
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
        cut = self.valid(layer)
        if cut is None:
            cut = LayerData(self.net, layer, self.data, what=self.what, options=self.options)
            cut.memo = self.memo
            deps = [(n, self.net.mask(n).clone()) for n in _mask_deps(self.net, cut.prefix)]
            self._cuts[layer] = (cut, deps)
        return cut

    def any(self, prefer: Sequence[str]) -> LayerData:
        """A cut of the network as it is now that needs no prefix pass if one exists: the
        first valid one in `prefer` whose prefix outputs are cached, else the first valid one,
        else a new one of prefer[0]. Any cut gives the same network outputs."""
        valid = [c for c in map(self.valid, prefer) if c is not None]
        cached = [c for c in valid if c.filled]
        return (cached or valid or [self.get(prefer[0])])[0]


def _interval(t: Tally | None, f: int, metric: str, method: str, seed: int
              ) -> tuple[float, float]:
    """The CAR interval of candidate f from the tally's flip counts (NaN where unavailable)."""
    lost, gained = (t.flips_lost, t.flips_gained) if t is not None else (None, None)
    if lost is None or gained is None or metric == "loss" or f not in t.candidates:
        return math.nan, math.nan
    i = t.candidates.index(f)
    lo, hi = car_interval(int(lost[i]), int(gained[i]), t.n, method=method, seed=seed)
    return float(lo), float(hi)


def _duration(seconds: float) -> str:
    """45s, 1m02s, 2h05m (? when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _is_terminal(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Progress:
    """A greedy run's progress: a tqdm bar when stderr is a terminal, else one line per step
    with elapsed time and ETA (batch jobs, SLURM and Hydra logs), at most one every
    `log_every` seconds but always for the first and the last step. Lines go to the
    `carlib.pruning.greedy` logger at INFO (Hydra writes it to <run dir>/<job>.log and the console),
    or to stderr where logging is not configured. `enabled=False`: neither.

    The ETA is the elapsed time per unit of work so far times the work left, a step's work
    being its candidate evaluations plus base passes for criteria that tally, else 1.
    """

    def __init__(self, desc: str, bar_desc: str, total: int, done: int, n_remove: int,
                 removed: int, enabled: bool, log_every: float,
                 clock: Callable[[], float] | None = None) -> None:
        tty = _is_terminal(sys.stderr)
        self.bar = tqdm(total=n_remove, initial=removed, leave=False, desc=bar_desc,
                        disable=not (enabled and tty))
        self.lines = enabled and not tty
        self.desc, self.total, self.first, self.log_every = desc, total, done + 1, log_every
        self.clock = clock or time.monotonic
        self.start = self.clock()
        self.last: float | None = None  # when the last line was written
        self.work = 0.0  # done in this process

    def update(self, step: int, removed: int, left: int, acc: float | None, work: float,
               work_left: float) -> None:
        self.bar.update(removed)
        if acc is not None:
            self.bar.set_postfix(acc=f"{acc:.3f}")
        if not self.lines:
            return
        now = self.clock()
        self.work += work
        if (step not in (self.first, self.total) and self.last is not None
                and now - self.last < self.log_every):
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / self.work * work_left if self.work > 0 else math.nan
        line = (f"{self.desc}: step {step}/{self.total}, {left} filters left, "
                f"elapsed {_duration(elapsed)}, ETA {_duration(eta)}")
        if log.hasHandlers():
            log.info(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def _work_left(candidates: int, bases: int, k: int, steps: int) -> float:
    """Work of the `steps` steps left after one that scored `candidates` filters in `bases`
    tallies (every step loses k candidates); steps that do not tally count 1 each."""
    if not bases:
        return float(steps)
    return float(sum(max(candidates - j * k, 0) + bases for j in range(1, steps + 1)))


def _prune(net: MaskedNet, trace: Trace, score_fn: Criterion, data: Iterable,
           eval_data: Iterable | None, n_remove: int, min_keep: dict[str, int], k: int,
           interval: str, progress: bool, log_every: float, save: Callable[[Trace], None],
           memo: TallyMemo | None, options: ScoringOptions | None = None) -> Trace:
    """The shared greedy loop over `trace.layers`; continues `trace` where it stopped.

    Scoring accuracy (top-k hits of the run's metric, loss: top-1) comes without a pass of its
    own where a tally counted it: the chosen filter's count (one removal per step), else the
    next step's tallies, whose base is the network after this step (the step's rows wait
    with `scoring_acc` None, saved so, until then); otherwise, and at the last step, one
    suffix pass over a cached prefix. The same holds for `scoring_top1` at step 0.
    """
    layers, metric, network_wide = trace.layers, trace.metric, trace.schedule == "global"
    scored_in = score_fn.run_metric(metric)  # the criterion's own metric (loss: "loss")
    k_acc, k_tally = topk_of(metric), topk_of(scored_in)  # the k their hits count
    cuts = _Cuts(net, data, memo, options=options)
    held = (_Cuts(net, eval_data, what="held-out set (eval_data)", options=options)
            if eval_data is not None else None)
    sizes = [net.unit(name).num_filters for name in layers]
    for name, f in zip(trace.removed_layers, trace.removed):
        net.remove(name, [f])
    # scores reused while what they depend on is unchanged (Criterion.depends)
    reuse: dict[str, tuple[list[int], LayerData | None, list[float]]] = {}

    def score(name: str, kept: list[int]) -> tuple[list[float], Tally | None, bool]:
        """The layer's scores of `kept`, its tally, and whether they were computed now."""
        old = reuse.get(name)
        if old is not None and old[0] == kept and score_fn.depends == "weights":
            return old[2], None, False
        cut = cuts.get(name)
        if old is not None and old[0] == kept and old[1] is cut:  # "prefix": same prefix
            return old[2], None, False
        scores, t = score_fn(net, name, cut, kept, metric)
        values = scores.tolist()
        if score_fn.depends != "network" and t is None:
            reuse[name] = (kept, cut if score_fn.depends == "prefix" else None, values)
        return values, t, True

    def fill(fresh: list[Tally]) -> bool:
        """Fill in pending scoring accuracies (of the network as it is now) from a fresh
        tally's base where its hits count the same k, else from one pass. Whether any was."""
        rows = [r for r in trace.steps if r["scoring_acc"] is None]
        ks = ({k_acc} if rows else set()) | ({1} if trace.scoring_top1 is None else set())
        if not ks:
            return False
        rates = {k_tally: fresh[0].base_correct / fresh[0].n} if fresh else {}
        if ks - rates.keys():
            last = trace.removed_layers[-1:]
            rates.update(hit_rates(cuts.any([*last, *layers]), ks - rates.keys()))
        for r in rows:
            r["scoring_acc"] = rates[k_acc]
        if trace.scoring_top1 is None:
            trace.scoring_top1 = rates[1]
        return True

    def record(step: int, picks: list[tuple[Candidate, int, str]], tallies: dict,
               acc: float | None) -> None:
        """The step's rows; `acc` None: scoring accuracy pending (see `fill`)."""
        where = picks[-1][0].layer if picks else layers[0]
        after = {"filters_remaining": sum(len(net.kept(n)) for n in layers),
                 "scoring_acc": acc,
                 "heldout_top1": (hit_rates(held.any([where, *layers]), [1])[1] if held
                                  else math.nan)}
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
        trace.scoring_top1 = None  # pending, like step 0's scoring_acc: see `fill`
        record(0, [], {}, None)
        save(trace)
    done = trace.steps[-1]["step"]
    prog = _Progress(f"{trace.layer} {trace.criterion}", f"{trace.criterion:>6} {trace.layer}",
                     done + math.ceil((n_remove - len(trace.removed)) / k), done, n_remove,
                     len(trace.removed), progress, log_every)
    while len(trace.removed) < n_remove:
        cands: list[Candidate] = []
        tallies: dict[str, Tally | None] = {}
        fresh: list[Tally] = []
        for name in layers:
            kept = net.kept(name)
            if len(kept) <= min_keep[name]:
                continue
            values, tallies[name], new = score(name, kept)
            if new and tallies[name] is not None:
                fresh.append(tallies[name])
            if name not in trace.initial_scores:
                full = [math.nan] * net.unit(name).num_filters
                for f, s in zip(kept, values):
                    full[f] = s
                trace.initial_scores[name] = full
            cands += [Candidate(name, f, s) for f, s in zip(kept, values)]
        fill(fresh)  # the previous step's scoring accuracy: the network these tallies scored

        step = trace.steps[-1]["step"] + 1

        def tie_key(group: list[Candidate], tallies: dict = tallies, step: int = step
                    ) -> list[float]:
            if score_fn.tie_break == "random":
                draws = random_keys(trace.seed, step, layers, sizes)
                return [draws[(c.layer, c.filter)] for c in group]
            inc = {}
            for name in dict.fromkeys(c.layer for c in group):
                fs = [c.filter for c in group if c.layer == name]
                t = tallies[name]
                if t is None or not set(fs) <= set(t.candidates):  # none, or base-only
                    t = tally(cuts.get(name), fs, metric)
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
        acc = None  # pending: the next step's tallies count it (see `fill`)
        t, f = tallies[picks[0][0].layer], picks[0][0].filter
        if len(picks) == 1 and t is not None and f in t.candidates and k_tally == k_acc:
            # the chosen filter's count is the network after this step's
            acc = int(t.correct[t.candidates.index(f)]) / t.n
        elif len(trace.removed) == n_remove or not fresh or k_tally != k_acc:
            acc = hit_rates(cuts.any([picks[-1][0].layer, *layers]), [k_acc])[k_acc]
        record(step, picks, tallies, acc)
        save(trace)
        n_cands = sum(len(t.candidates) for t in fresh)  # 0 for base-only tallies
        prog.update(step, len(picks), trace.steps[-1]["filters_remaining"],
                    next((r["scoring_acc"] for r in reversed(trace.steps)
                          if r["scoring_acc"] is not None), None),
                    n_cands + len(fresh) if fresh else 1,
                    _work_left(n_cands, len(fresh), k, prog.total - step))
    if fill([]):  # only where a run had nothing left to do after a pending step was saved
        save(trace)
    prog.close()
    return trace


def _run(model: nn.Module, trace: Trace, criterion: str | Criterion, data: Iterable,
         eval_data: Iterable | None, n_remove: int | Callable[[MaskedNet], int],
         min_keep: dict[str, int] | int, k: int, interval: str, progress: bool,
         log_every: float, state: RunState | None, parts: dict, mode: str,
         memo: TallyMemo | None, options: ScoringOptions | None) -> Trace:
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
        net = MaskedNet(model, example_of(data))
        sizes = {name: net.unit(name).num_filters for name in layers}
        if isinstance(min_keep, int):
            min_keep = dict.fromkeys(layers, min_keep)
        n = n_remove(net) if callable(n_remove) else n_remove
        trace.num_filters = sum(sizes.values())
        saved = state.load(**parts) if state is not None else None
        if saved is not None:
            trace = Trace.from_state(saved)
        save = (lambda t: state.save(t.to_state(), **parts)) if state else lambda t: None
        return _prune(net, trace, score_fn, data, eval_data, n, min_keep, k, interval, progress,
                      log_every, save, memo, options)


def _precision_part(options: ScoringOptions | None) -> dict[str, str]:
    """Part of a saved state's key: a reduced precision (its loss tie-breaks are approximate,
    so a tie may go another way); nothing for float32, so older states still match."""
    if options is None or options.precision == "float32":
        return {}
    return {"precision": options.precision}


@float32_exact()
def greedy_prune(model: nn.Module, layer: str, data: Iterable, n_keep: int,
                 criterion: str | Criterion = "car", *, metric: str = "top1",
                 eval_data: Iterable | None = None, seed: int = 0, k: int = 1,
                 interval: str = "exact", progress: bool = True, log_every: float = 30.0,
                 state: RunState | None = None, mode: str = "fast",
                 memo: TallyMemo | None = None, options: ScoringOptions | None = None) -> Trace:
    """Prune conv `layer` greedily down to `n_keep` filters, `k` per step; model unchanged.

    `data` is the scoring set ((inputs, targets) batches); `eval_data`, if given, is the held-out
    set whose top-1 accuracy is recorded after every step. Criteria: see `carlib.pruning.criteria`
    (a name or a `Criterion`; "car" with `metric`: top1 | top5 | loss).
    `interval` ("exact" | "bootstrap", `carlib.analysis.stats`) gives CAR rows `score_lo`/`score_hi`
    where the scoring engine provides flip counts. With `state`, progress is saved after every
    step and resumed from there. `progress`: a bar when stderr is a terminal, else a line per
    step with elapsed time and ETA (at most one every `log_every` seconds) to the
    `carlib.pruning.greedy` logger (stderr where logging is not configured); False: neither. `mode`:
    the CAR scoring engine's mode (`carlib.scoring.engine`; "naive" is the slow reference). `memo`:
    a `carlib.scoring.engine.TallyMemo` shared by runs on the same model and `data`, so the pruned
    networks they share are counted once (same results, less work). `options`: the engine's
    pass sizes, cache placement and precision (`carlib.scoring.engine.ScoringOptions`; None: the
    defaults of the model's device).
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
             "seed": seed, "n_keep": n_keep, "k": k, "interval": interval,
             **_precision_part(options)}
    return _run(model, trace, criterion, data, eval_data, n_remove, n_keep, k, interval,
                progress, log_every, state, parts, mode, memo, options)


@float32_exact()
def global_prune(model: nn.Module, layers: Sequence[str], data: Iterable,
                 n_remove: int | None = None, criterion: str | Criterion = "car", *,
                 keep_fraction: float | None = None, min_per_layer: int = 1, k: int = 1,
                 metric: str = "top1", eval_data: Iterable | None = None, seed: int = 0,
                 interval: str = "exact", progress: bool = True, log_every: float = 30.0,
                 state: RunState | None = None, mode: str = "fast",
                 memo: TallyMemo | None = None, options: ScoringOptions | None = None) -> Trace:
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
             "min_per_layer": min_per_layer, "k": k, "interval": interval,
             **_precision_part(options)}
    return _run(model, trace, criterion, data, eval_data, count, min_per_layer, k, interval,
                progress, log_every, state, parts, mode, memo, options)


def global_cost(sizes: Sequence[int], n_remove: int, k: int = 1,
                layer_remove: Sequence[int] | None = None) -> dict[str, float]:
    """CAR candidate evaluations of the network-wide schedule and of layer-wise runs of the
    same layers (one evaluation: the suffix from the candidate's layer over the scoring set
    with that filter removed), and their ratio.

    Network-wide: ceil(n_remove / k) steps, each tallying every layer that can still lose a
    filter, N - s*k candidates before step s (N = sum(sizes)): exact while no layer is at its
    minimum, an upper bound after. Layer-wise: layer i alone from sizes[i] filters, removing
    layer_remove[i] (default: its share, sizes[i] - round(sizes[i] * (1 - n_remove / N))).
    Per-candidate cost differs by layer (an earlier layer has a longer suffix), and the
    network-wide schedule also recomputes a layer's prefix after a removal upstream of it.
    """
    total = sum(sizes)
    if layer_remove is None:
        keep = 1 - n_remove / total
        layer_remove = [n - round(n * keep) for n in sizes]

    def run(n: int, r: int) -> int:
        return sum(n - s * k for s in range(math.ceil(r / k)))

    glob, layerwise = run(total, n_remove), sum(map(run, sizes, layer_remove))
    return {"global": glob, "layerwise": layerwise,
            "ratio": glob / layerwise if layerwise else math.nan}
