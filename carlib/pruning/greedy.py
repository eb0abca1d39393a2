"""Greedy pruning: score the remaining filters, remove the lowest, re-score, repeat.

`GreedyRun` is the loop: set up once (the masked net traced on one example, the cuts of the
scoring set, a saved state resumed), then `steps()` yields each step, so a caller can inspect,
stop, checkpoint or plot between steps. Two schedules share it and one `Trace` format:

- layer-wise (`greedy_prune`): one layer, from the full network down to `n_keep` filters.
- network-wide (`global_prune`): the filters of all listed layers ranked together; each step
  removes the lowest-scoring filter(s) over all layers, never taking a layer below
  `min_per_layer`. What this costs against layer-wise runs: `carlib.pruning.cost`.

Each step removes `k` filters (default 1, the paper's) and all criteria are recomputed after
every step (or reused where they cannot have changed, `Criterion.depends`). Ties on the score
go by the criterion's tie rule: the smaller loss increase on the scoring set
(`tie_break="loss"`) or a seeded random order (`"random"`, drawn afresh each step), then the
earlier layer (in the order given) and lower filter index (`carlib.pruning.select`). Each row
records how many filters tied on its score and which rule decided (empty when the score alone
did), and `Trace.regime()` sums this up with the full network's scoring top-1: a criterion like
CAR says something only where its scores decide, i.e. where the network does not fit its
scoring set (see REPRODUCING.md). With a `RunState`, the trace is saved after every step and a
run started again with the same key continues where it stopped.

Approximate options of the same loop (`GreedySettings`, off by default; `carlib.pruning.approx`):
`prefilter` screens each layer's remaining filters with the first-order Taylor criterion and
scores only the m least important; `subset` scores on a seeded random subset of the scoring set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from carlib.core.errors import CarlibError
from carlib.core.module import eval_mode
from carlib.core.precision import float32_exact
from carlib.core.stats import METHODS, car_interval
from carlib.network.graph import MaskedNet
from carlib.pruning import budget, confidence
from carlib.pruning.cost import global_cost
from carlib.pruning.criteria import Criterion, get_criterion, taylor
from carlib.pruning.progress import Progress, work_left
from carlib.pruning.select import Candidate, Pick, choose, random_keys
from carlib.pruning.state import RunState, Slot
from carlib.pruning.trace import Trace
from carlib.scoring.counts import Tally, TallyMemo
from carlib.scoring.cuts import Cuts, LayerData, random_subset
from carlib.scoring.evaluate import check_metric, topk_of
from carlib.scoring.inputs import example_of
from carlib.scoring.options import ScoringOptions
from carlib.scoring.tally import check_mode, hit_rates, image_outcomes, tally

__all__ = ["Candidate", "GreedyRun", "GreedySettings", "Step", "Trace", "choose", "global_cost",
           "global_prune", "greedy_prune"]


@dataclass(frozen=True)
class GreedySettings:
    """How a greedy run goes: everything but the model, the data and what runs share.

    `n_remove`: filters to remove, or a function of the masked net that checks and returns it;
    `min_keep`: filters every layer keeps (or per layer). `interval`: "exact" | "bootstrap"
    (`carlib.core.stats`); `mode`: the CAR engine's mode; `options`: its pass sizes, cache
    placement and precision. `prefilter`, `subset`: the approximate options (module doc).
    """

    layers: list[str]
    n_remove: int | Callable[[MaskedNet], int]
    min_keep: dict[str, int] | int
    schedule: str = "layerwise"
    metric: str = "top1"
    seed: int = 0
    k: int = 1
    interval: str = "exact"
    mode: str = "fast"
    options: ScoringOptions | None = None
    progress: bool = True
    log_every: float = 30.0
    prefilter: int | None = None
    subset: int | None = None


@dataclass
class Step:
    """One step of a greedy run: the picks (candidate with its score, how many tied on it, the
    rule that decided), the trace rows it added (`scoring_acc` None until measured) and every
    candidate scored before it."""

    step: int
    picks: list[Pick]
    rows: list[dict]
    candidates: list[Candidate] = field(default_factory=list)


def _interval(t: Tally | None, f: int, metric: str, method: str, seed: int
              ) -> tuple[float, float]:
    """The CAR interval of candidate f from the tally's flip counts (NaN where unavailable)."""
    lost, gained = (t.flips_lost, t.flips_gained) if t is not None else (None, None)
    if lost is None or gained is None or metric == "loss" or f not in t.candidates:
        return math.nan, math.nan
    i = t.candidates.index(f)
    lo, hi = car_interval(int(lost[i]), int(gained[i]), t.n, method=method, seed=seed)
    return float(lo), float(hi)


class GreedyRun:
    """A greedy run over `settings.layers` of `model` (left unchanged: a masked view is pruned).

    Construction checks the settings and sets up once: the criterion, the masked net (traced
    on one example of `data`), the cuts of the scoring set (and of `eval_data`, whose top-1 is
    recorded after every step; of `check_data`, on which every step's candidates are also
    tallied: `carlib.pruning.confidence`), and the trace resumed from `state` (a
    `RunState.slot`) if saved. `steps()` then runs the loop; `run()` runs it to the end.
    Every row records the step's runner-up and the pick's margin over it on the scoring
    images (`carlib.pruning.confidence`).

    Scoring accuracy (top-k hits of the run's metric, loss: top-1) comes without a pass of its
    own where a tally counted it: the chosen filter's count (one removal per step), else the
    next step's tallies, whose base is the network after this step (the step's rows wait
    with `scoring_acc` None, saved so, until then); otherwise, and at the last step, one
    suffix pass over a cached prefix. The same holds for `scoring_top1` at step 0.
    """

    def __init__(self, model: nn.Module, criterion: str | Criterion, data: Iterable,
                 settings: GreedySettings, *, eval_data: Iterable | None = None,
                 check_data: Iterable | None = None, memo: TallyMemo | None = None,
                 state: Slot | None = None) -> None:
        s = self.settings = settings
        _check(s)
        self.model, self.layers, self.state = model, s.layers, state
        if memo is not None:
            memo.check(model, data)
        if memo is not None and s.subset:
            raise CarlibError("subset: a TallyMemo counts the whole scoring set; use no memo")
        network_wide = s.schedule == "global"
        self.criterion = get_criterion(criterion, s.seed, s.layers if network_wide else None,
                                       s.mode)
        name = getattr(criterion, "name", criterion)
        self.trace = Trace("+".join(s.layers) if network_wide else s.layers[0], name, s.metric,
                           s.seed, 0, schedule=s.schedule, layers=s.layers)
        with eval_mode(model), torch.no_grad():
            self._setup(data, eval_data, check_data, memo)
        # scores reused while what they depend on is unchanged (Criterion.depends)
        self._reuse: dict[str, tuple[list[int], LayerData | None, list[float]]] = {}

    def _setup(self, data: Iterable, eval_data: Iterable | None, check_data: Iterable | None,
               memo: TallyMemo | None) -> None:
        """The masked net, the run's size, the saved trace and the cuts; replays its removals."""
        s = self.settings
        self.net = MaskedNet(self.model, example_of(data))
        self.sizes = [self.net.unit(name).num_filters for name in self.layers]
        self.min_keep = (dict.fromkeys(self.layers, s.min_keep) if isinstance(s.min_keep, int)
                         else s.min_keep)
        self.n_remove = s.n_remove(self.net) if callable(s.n_remove) else s.n_remove
        if s.subset:
            data = random_subset(data, s.subset, s.seed)
        self.trace.num_filters = sum(self.sizes)
        saved = self.state.load() if self.state is not None else None
        if saved is not None:
            self.trace = Trace.from_state(saved)
        scored_in = self.criterion.run_metric(s.metric)  # the criterion's own ("loss" for loss)
        self.k_acc, self.k_tally = topk_of(s.metric), topk_of(scored_in)  # the k hits count
        self.cuts = Cuts(self.net, data, memo, options=s.options)
        self.held = (Cuts(self.net, eval_data, what="held-out set (eval_data)",
                          options=s.options) if eval_data is not None else None)
        self.check = (Cuts(self.net, check_data, what="check set (check_data)",
                           options=s.options) if check_data is not None else None)
        for name, f in zip(self.trace.removed_layers, self.trace.removed):
            self.net.remove(name, [f])

    @property
    def done(self) -> bool:
        """Whether every filter the run removes is removed."""
        return len(self.trace.removed) >= self.n_remove

    def run(self) -> Trace:
        """Run every step; the trace."""
        for _ in self.steps():
            pass
        return self.trace

    def steps(self) -> Iterator[Step]:
        """Run the loop, yielding each step once its rows are recorded and saved (the model is
        in eval mode until the loop ends). A caller that stops early may call `finish()` to fill
        in a pending scoring accuracy; a new `GreedyRun` with the same state continues."""
        with eval_mode(self.model):
            with torch.no_grad():
                self._start()
            done, removed = self.trace.steps[-1]["step"], len(self.trace.removed)
            total = done + math.ceil((self.n_remove - removed) / self.settings.k)
            self.progress = Progress(self.trace.layer, self.trace.criterion, total, done,
                                     self.n_remove, removed, self.settings.progress,
                                     self.settings.log_every)
            try:
                while not self.done:
                    with torch.no_grad():
                        step = self._step()
                    yield step
                self.finish()
            finally:
                self.progress.close()

    def _start(self) -> None:
        """Step 0 of a fresh run: the full network's row (its accuracies pending), saved."""
        if not self.trace.steps:
            self.trace.scoring_top1 = None  # pending, like step 0's scoring_acc: see `_fill`
            self._record(0, [], {}, None)
            self._save()

    def finish(self) -> None:
        """Fill in a scoring accuracy still pending (one pass) and save: at the loop's end, or
        by a caller that stopped it early."""
        with eval_mode(self.model), torch.no_grad():
            if self._fill([]):  # only where a run had nothing left to do after a pending step
                self._save()

    def _step(self) -> Step:
        """Score, choose, remove, record and save one step."""
        cands, tallies, fresh = self._score_all()
        self._fill(fresh)  # the previous step's scoring accuracy: the network these tallies scored
        step = self.trace.steps[-1]["step"] + 1
        picks = self._choose(cands, tallies, step)
        sure = self._confidence(cands, picks, tallies, step)  # before the picks are removed
        for c, _, _ in picks:
            self.net.remove(c.layer, [c.filter])
            self.trace.removed.append(c.filter)
            self.trace.removed_layers.append(c.layer)
        rows = self._record(step, picks, tallies, self._accuracy(picks, tallies, fresh), sure)
        self._save()
        self._report(step, picks, fresh)
        return Step(step, picks, rows, cands)

    def _score_all(self) -> tuple[list[Candidate], dict[str, Tally | None], list[Tally]]:
        """Every layer that can still lose a filter, scored: the candidates, each layer's tally
        and the tallies counted now (`fresh`)."""
        cands: list[Candidate] = []
        tallies: dict[str, Tally | None] = {}
        fresh: list[Tally] = []
        for name in self.layers:
            kept = self.net.kept(name)
            if len(kept) <= self.min_keep[name]:
                continue
            scored, values, tallies[name], new = self._score(name, kept)
            if new and tallies[name] is not None:
                fresh.append(tallies[name])
            if name not in self.trace.initial_scores:
                full = [math.nan] * self.net.unit(name).num_filters
                for f, s in zip(scored, values):
                    full[f] = s
                self.trace.initial_scores[name] = full
            cands += [Candidate(name, f, s) for f, s in zip(scored, values)]
        return cands, tallies, fresh

    def _score(self, name: str, kept: list[int]
               ) -> tuple[list[int], list[float], Tally | None, bool]:
        """The layer's scored filters (`kept`, or those the prefilter keeps), their scores, its
        tally, and whether they were computed now."""
        old, depends = self._reuse.get(name), self.criterion.depends
        if old is not None and old[0] == kept and depends == "weights":
            return kept, old[2], None, False
        cut = self.cuts.get(name)
        if old is not None and old[0] == kept and old[1] is cut:  # "prefix": same prefix
            return kept, old[2], None, False
        scored = self._screen(name, cut, kept)
        scores, t = self.criterion(self.net, name, cut, scored, self.settings.metric)
        values = scores.tolist()
        if depends != "network" and t is None and scored is kept:
            self._reuse[name] = (kept, cut if depends == "prefix" else None, values)
        return scored, values, t, True

    def _screen(self, name: str, cut: LayerData, kept: list[int]) -> list[int]:
        """`kept`, or with `prefilter` m the m least important by Taylor (in index order)."""
        m = self.settings.prefilter
        if m is None or m >= len(kept):
            return kept
        importance, _ = taylor(self.net, name, cut, kept, self.settings.metric)
        return sorted(kept[i] for i in importance.argsort(stable=True)[:m].tolist())

    def _room(self) -> dict[str, int]:
        """How many filters each layer can still lose."""
        return {name: len(self.net.kept(name)) - self.min_keep[name] for name in self.layers}

    def _choose(self, cands: list[Candidate], tallies: dict[str, Tally | None], step: int
                ) -> list[Pick]:
        """The step's removals (`carlib.pruning.select.choose`)."""
        picks = choose(cands, min(self.settings.k, self.n_remove - len(self.trace.removed)),
                       self._room(), partial(self._tie_keys, tallies, step), self.layers,
                       self.criterion.tie_break)
        if not picks:  # unreachable when n_remove was checked against the per-layer minimums
            raise CarlibError(f"no filter of {self.trace.layer} can be removed any more")
        return picks

    def _confidence(self, cands: list[Candidate], picks: list[Pick],
                    tallies: dict[str, Tally | None], step: int) -> list[dict]:
        """Per pick: the runner-up, the margin over it on the scoring images, and with check
        data the check columns (`carlib.pruning.confidence`); the network before the step."""
        ru = confidence.runner_up(cands, picks, self._room(), partial(self._tie_keys, tallies,
                                  step), self.layers, self.criterion.tie_break)
        network_wide = self.trace.schedule == "global"
        rows = [confidence.columns(network_wide, self.check is not None) for _ in picks]
        if ru is not None:
            metric = self.criterion.run_metric(self.settings.metric)
            other = self._outcomes(ru, metric)
            for row, (c, _, _) in zip(rows, picks):
                m, lo, hi = confidence.margin(self._outcomes(c, metric), other, metric,
                                              self.settings.interval, self.trace.seed)
                row.update(runner_up=ru.filter, margin=m, margin_lo=lo, margin_hi=hi)
                if network_wide:
                    row["runner_up_layer"] = ru.layer
        if self.check is not None:
            costs, rho = self._on_check(cands)
            for row, extra in zip(rows, confidence.check(picks, costs)):
                row.update(extra, check_rho=rho)
        return rows

    def _outcomes(self, c: Candidate, metric: str) -> torch.Tensor:
        """Per-image outcomes on the scoring images with candidate `c` removed."""
        return image_outcomes(self.cuts.get(c.layer), [c.filter], metric)[0]

    def _on_check(self, cands: list[Candidate]) -> tuple[dict[tuple[str, int], float], float]:
        """Every candidate's cost on the check images, in the run's metric, and the criterion's
        reliability (`confidence.reliability`: its scores there against the step's); one tally
        per layer where the criterion's own tally on the check images counts the metric."""
        metric, crit = self.settings.metric, self.criterion
        reads_images = crit.depends != "weights"
        same_k = topk_of(crit.run_metric(metric)) == topk_of(metric)
        tallies, again = {}, []
        for name in dict.fromkeys(c.layer for c in cands):
            fs = [c.filter for c in cands if c.layer == name]
            cut = self.check.get(name)
            t = None
            if reads_images:
                scores, t = crit(self.net, name, cut, fs, metric)
                again += scores.tolist()
            if t is None or not same_k or t.candidates != fs:
                t = tally(cut, fs, metric, mode=self.settings.mode)
            tallies[name] = t
        by_layer = [c.score for name in tallies for c in cands if c.layer == name]
        rho = confidence.reliability(by_layer, again) if reads_images else math.nan
        return confidence.tally_costs(tallies, metric), rho

    def _tie_keys(self, tallies: dict[str, Tally | None], step: int, group: list[Candidate]
                  ) -> list[float]:
        """Tie-break keys of equal-scored candidates: random draws of this step, or their loss
        increases (from the step's tallies, else counted now)."""
        if self.criterion.tie_break == "random":
            draws = random_keys(self.trace.seed, step, self.layers, self.sizes)
            return [draws[(c.layer, c.filter)] for c in group]
        inc = {}
        for name in dict.fromkeys(c.layer for c in group):
            fs = [c.filter for c in group if c.layer == name]
            t = tallies[name]
            if t is None or not set(fs) <= set(t.candidates):  # none, or base-only
                t = tally(self.cuts.get(name), fs, self.settings.metric)
            inc.update({(name, f): v for f, v in zip(t.candidates, t.loss_increase().tolist())})
        return [inc[(c.layer, c.filter)] for c in group]

    def _accuracy(self, picks: list[Pick], tallies: dict[str, Tally | None],
                  fresh: list[Tally]) -> float | None:
        """The scoring accuracy after the step's removals, or None: pending (`_fill`)."""
        t, f = tallies[picks[0][0].layer], picks[0][0].filter
        if len(picks) == 1 and t is not None and f in t.candidates and self.k_tally == self.k_acc:
            # the chosen filter's count is the network after this step
            return int(t.correct[t.candidates.index(f)]) / t.n
        if self.done or not fresh or self.k_tally != self.k_acc:
            cut = self.cuts.any([picks[-1][0].layer, *self.layers])
            return hit_rates(cut, [self.k_acc])[self.k_acc]
        return None  # pending: the next step's tallies count it

    def _fill(self, fresh: list[Tally]) -> bool:
        """Fill in pending scoring accuracies (of the network as it is now) from a fresh
        tally's base where its hits count the same k, else from one pass. Whether any was."""
        trace, k_acc = self.trace, self.k_acc
        rows = [r for r in trace.steps if r["scoring_acc"] is None]
        ks = ({k_acc} if rows else set()) | ({1} if trace.scoring_top1 is None else set())
        if not ks:
            return False
        rates = {self.k_tally: fresh[0].base_correct / fresh[0].n} if fresh else {}
        if ks - rates.keys():
            last = trace.removed_layers[-1:]
            rates.update(hit_rates(self.cuts.any([*last, *self.layers]), ks - rates.keys()))
        for r in rows:
            r["scoring_acc"] = rates[k_acc]
        if trace.scoring_top1 is None:
            trace.scoring_top1 = rates[1]
        return True

    def _record(self, step: int, picks: list[Pick], tallies: dict[str, Tally | None],
                acc: float | None, sure: list[dict] | None = None) -> list[dict]:
        """Append and return the step's rows; `acc` None: scoring accuracy pending (`_fill`);
        `sure`: each pick's confidence columns (`_confidence`; step 0 has none)."""
        net, layers, trace = self.net, self.layers, self.trace
        network_wide = trace.schedule == "global"
        scored_in = self.criterion.run_metric(trace.metric)
        where = picks[-1][0].layer if picks else layers[0]
        remaining = sum(len(net.kept(n)) for n in layers)
        held = hit_rates(self.held.any([where, *layers]), [1])[1] if self.held else math.nan
        rows = []
        for i, (c, n_tied, rule) in enumerate(picks or [(None, 0, "")]):
            row: dict = {"step": step}
            if network_wide:
                row["layer"] = c.layer if c else None
            row["removed_filter"] = c.filter if c else None
            row["filters_remaining"] = remaining
            if network_wide:
                row["layer_remaining"] = len(net.kept(c.layer)) if c else None
            lo, hi = (_interval(tallies[c.layer], c.filter, scored_in, self.settings.interval,
                                trace.seed) if c else (math.nan, math.nan))
            row.update(score=c.score if c else math.nan, score_lo=lo, score_hi=hi,
                       tie_size=n_tied, tie_break=rule, scoring_acc=acc, heldout_top1=held)
            row.update(sure[i] if sure else confidence.columns(network_wide,
                                                               self.check is not None))
            rows.append(row)
        trace.steps.extend(rows)
        return rows

    def _save(self) -> None:
        """Save the trace under the run's key (with a `RunState`)."""
        if self.state is not None:
            self.state.save(self.trace.to_state())

    def _report(self, step: int, picks: list[Pick], fresh: list[Tally]) -> None:
        """Progress after a step: its work (candidates and bases tallied) and the work left."""
        n_cands = sum(len(t.candidates) for t in fresh)  # 0 for base-only tallies
        acc = next((r["scoring_acc"] for r in reversed(self.trace.steps)
                    if r["scoring_acc"] is not None), None)
        self.progress.update(step, len(picks), self.trace.steps[-1]["filters_remaining"], acc,
                             n_cands + len(fresh) if fresh else 1,
                             work_left(n_cands, len(fresh), self.settings.k,
                                       self.progress.total - step))


def _check(s: GreedySettings) -> None:
    """CarlibError for a metric, mode, k or interval method that does not exist."""
    check_metric(s.metric)
    check_mode(s.mode)
    if s.k < 1:
        raise CarlibError(f"k={s.k}: remove at least one filter per step (k >= 1)")
    if s.interval not in METHODS:
        raise CarlibError(f"unknown interval method '{s.interval}'; valid: {', '.join(METHODS)}")
    if s.prefilter is not None and s.prefilter < 1:
        raise CarlibError(f"prefilter={s.prefilter} must be at least 1")


def _precision_part(options: ScoringOptions | None) -> dict[str, str]:
    """Part of a saved state's key: a reduced precision (its loss tie-breaks are approximate,
    so a tie may go another way); nothing for float32, so older states still match."""
    if options is None or options.precision == "float32":
        return {}
    return {"precision": options.precision}


def _layer_removals(layer: str, n_keep: int, net: MaskedNet) -> int:
    """The filters a layer-wise run removes to keep `n_keep` of `layer` (checked)."""
    n_filters = net.unit(layer).num_filters
    if not 1 <= n_keep <= n_filters:
        raise CarlibError(f"n_keep={n_keep} is out of range for {layer}: "
                          f"use 1..{n_filters} (it has {n_filters} filters)")
    return n_filters - n_keep


def _global_removals(net: MaskedNet, layers: Sequence[str], n_remove: int | None,
                     keep_fraction: float | None, min_per_layer: int) -> int:
    """The filters a network-wide run removes (checked against the per-layer minimum)."""
    total = sum(net.unit(name).num_filters for name in layers)
    most = total - len(layers) * min_per_layer
    if n_remove is None and (keep_fraction is None or not 0 < keep_fraction <= 1):
        raise CarlibError(f"keep_fraction={keep_fraction}: set n_remove, or keep_fraction "
                          "in (0, 1]")
    n = budget.removals(total, n_remove, keep_fraction)
    if min_per_layer < 1 or not 0 <= n <= most:
        raise CarlibError(f"cannot remove {n} of {total} filters keeping {min_per_layer} "
                          f"per layer (min_per_layer >= 1); use n_remove in 0..{most}")
    return n


@float32_exact()
def greedy_prune(model: nn.Module, layer: str, data: Iterable, n_keep: int,
                 criterion: str | Criterion = "car", *, metric: str = "top1",
                 eval_data: Iterable | None = None, seed: int = 0, k: int = 1,
                 interval: str = "exact", progress: bool = True, log_every: float = 30.0,
                 state: RunState | None = None, mode: str = "fast",
                 memo: TallyMemo | None = None, options: ScoringOptions | None = None,
                 check_data: Iterable | None = None) -> Trace:
    """Prune conv `layer` greedily down to `n_keep` filters, `k` per step; model unchanged.

    `data` is the scoring set ((inputs, targets) batches); `eval_data`, if given, is the held-out
    set whose top-1 accuracy is recorded after every step. Criteria: see `carlib.pruning.criteria`
    (a name or a `Criterion`; "car" with `metric`: top1 | top5 | loss).
    `interval` ("exact" | "bootstrap", `carlib.core.stats`) gives CAR rows `score_lo`/`score_hi`
    where the scoring engine provides flip counts. With `state`, progress is saved after every
    step and resumed from there. `progress`: a bar when stderr is a terminal, else a line per
    step with elapsed time and ETA (at most one every `log_every` seconds) to the
    `carlib.pruning.greedy` logger (stderr where logging is not configured); False: neither. `mode`:
    the CAR scoring engine's mode (`carlib.scoring.tally`; "naive" is the slow reference). `memo`:
    a `carlib.scoring.counts.TallyMemo` shared by runs on the same model and `data`, so the pruned
    networks they share are counted once (same results, less work). `options`: the engine's
    pass sizes, cache placement and precision (`carlib.scoring.options.ScoringOptions`; None: the
    defaults of the model's device). `check_data`: further images of the scoring set's split,
    disjoint from it, on which every step's candidates are also tallied (the rows'
    `check_same`, `check_regret`: `carlib.pruning.confidence`).
    """
    settings = GreedySettings([layer], partial(_layer_removals, layer, n_keep), n_keep,
                              metric=metric, seed=seed, k=k, interval=interval, mode=mode,
                              options=options, progress=progress, log_every=log_every)
    key = {"schedule": "layerwise", "layer": layer,
           "criterion": getattr(criterion, "name", criterion), "metric": metric, "seed": seed,
           "n_keep": n_keep, "k": k, "interval": interval, **_precision_part(options)}
    if check_data is not None:
        key["check"] = True
    return GreedyRun(model, criterion, data, settings, eval_data=eval_data,
                     check_data=check_data, memo=memo,
                     state=state.slot(**key) if state is not None else None).run()


@float32_exact()
def global_prune(model: nn.Module, layers: Sequence[str], data: Iterable,
                 n_remove: int | None = None, criterion: str | Criterion = "car", *,
                 keep_fraction: float | None = None, min_per_layer: int = 1, k: int = 1,
                 metric: str = "top1", eval_data: Iterable | None = None, seed: int = 0,
                 interval: str = "exact", progress: bool = True, log_every: float = 30.0,
                 state: RunState | None = None, mode: str = "fast",
                 memo: TallyMemo | None = None, options: ScoringOptions | None = None,
                 check_data: Iterable | None = None) -> Trace:
    """Network-wide greedy pruning of `layers` together (see the module docstring).

    Removes `n_remove` filters, or, if None, down to round(keep_fraction x all their filters);
    `k` per step, keeping at least `min_per_layer` in every layer. Other arguments as in
    `greedy_prune`. The trace's rows carry the removed filter's `layer`.
    """
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise CarlibError("global pruning needs at least one layer")
    count = partial(_global_removals, layers=layers, n_remove=n_remove,
                    keep_fraction=keep_fraction, min_per_layer=min_per_layer)
    settings = GreedySettings(layers, count, min_per_layer, schedule="global", metric=metric,
                              seed=seed, k=k, interval=interval, mode=mode, options=options,
                              progress=progress, log_every=log_every)
    key = {"schedule": "global", "layers": layers,
           "criterion": getattr(criterion, "name", criterion), "metric": metric, "seed": seed,
           "n_remove": n_remove, "keep_fraction": keep_fraction,
           "min_per_layer": min_per_layer, "k": k, "interval": interval,
           **_precision_part(options)}
    if check_data is not None:
        key["check"] = True
    return GreedyRun(model, criterion, data, settings, eval_data=eval_data,
                     check_data=check_data, memo=memo,
                     state=state.slot(**key) if state is not None else None).run()
