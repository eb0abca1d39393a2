"""How sure a greedy step is of its pick: the runner-up, and the pick against it.

**Margin (every run).** A step's runner-up is the candidate the step would have removed next:
the selection (`carlib.pruning.select.choose`, same tie rule) run once more over the step's
candidates less its picks, with the room the layers had before the step. The pick and the
runner-up are then compared on the scoring images as two networks, each with its filter
removed from the network before the step, image by image, in the criterion's metric (the
run's `metric`; the loss criterion's: loss). `margin` is the pick's accuracy minus the
runner-up's (for loss: the runner-up's mean cross-entropy minus the pick's), so > 0 means the
pick costs less on the scoring images. Its 95% interval (`margin_lo`, `margin_hi`) is exact
for counts (`carlib.core.stats.paired_difference`: Clopper-Pearson on the discordant images,
conditional on their number) and a Student-t interval of the per-image differences for loss.
A decision is **resolved** where the interval excludes 0. Tied picks have margin 0 and are
never resolved. The cost: the picks' and the runner-up's per-image outcomes, one plain
suffix pass over cached prefix outputs.

**Check (opt-in, `check_data`).** Every candidate of the step is also tallied on further
images from the same split as the scoring set, disjoint from it: `check_same` says whether the
pick is also among the k best there (k = the step's picks; ties count as best) and
`check_regret` how much more it costs there than the k-th best (accuracy fraction, or loss),
0 when it is among them. The check uses the run's metric for every criterion, so criteria are
compared on one yardstick: the accuracy their removals cost on images they did not score.
`check_rho` is the criterion's reliability: the Spearman correlation between the step's
candidate scores on the scoring images and the same criterion's scores on the check images
(test-retest on two disjoint image sets; NaN for criteria that read no images, such as the
weight norms and random, and where fewer than 3 candidates or constant scores leave it
undefined).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import stats

from carlib.core.stats import mean_interval, paired_difference
from carlib.pruning.select import Candidate, Pick, choose
from carlib.scoring.counts import Tally


def columns(network_wide: bool, checked: bool) -> dict:
    """A row's confidence columns, empty (step 0, or a step without a runner-up), in order:
    runner_up, runner_up_layer (network-wide), margin, margin_lo, margin_hi, and check_same,
    check_regret, check_rho (with check data)."""
    row: dict = {"runner_up": None}
    if network_wide:
        row["runner_up_layer"] = None
    row.update(margin=math.nan, margin_lo=math.nan, margin_hi=math.nan)
    if checked:
        row.update(check_same=None, check_regret=math.nan, check_rho=math.nan)
    return row


def runner_up(cands: Sequence[Candidate], picks: Sequence[Pick], room: dict[str, int],
              tie_key: Callable[[list[Candidate]], list[float]], order: Sequence[str],
              rule: str) -> Candidate | None:
    """The candidate the step would have removed next (None where there is none)."""
    picked = {(c.layer, c.filter) for c, _, _ in picks}
    rest = [c for c in cands if (c.layer, c.filter) not in picked]
    nxt = choose(rest, 1, room, tie_key, order, rule)
    return nxt[0][0] if nxt else None


def margin(pick: torch.Tensor, other: torch.Tensor, metric: str, method: str = "exact",
           seed: int = 0) -> tuple[float, float, float]:
    """(margin, low, high) of the pick's per-image outcomes against the runner-up's (module
    doc): hits (0/1) for top1/top5, cross-entropy for loss."""
    if metric == "loss":
        d = (other - pick).double().numpy()
        if not d.any():  # the same losses: no spread to estimate, the interval is the point
            return 0.0, 0.0, 0.0
        m, lo, hi = mean_interval(d)
        return m, lo, hi
    r = paired_difference(pick.bool().numpy(), other.bool().numpy(), method=method, seed=seed)
    return float(r["diff"]), r["lo"], r["hi"]


def resolved(lo: float, hi: float) -> bool | float:
    """Whether a margin's interval excludes 0 (NaN where there is no margin)."""
    if math.isnan(lo) or math.isnan(hi):
        return math.nan
    return lo > 0 or hi < 0


def check(picks: Sequence[Pick], costs: dict[tuple[str, int], float]) -> list[dict]:
    """`check_same` and `check_regret` of each pick, from every candidate's cost on the check
    images (`costs[(layer, filter)]`: the metric lost by removing it; module doc)."""
    k = len(picks)
    kth = sorted(costs.values())[k - 1]
    rows = []
    for c, _, _ in picks:
        cost = costs[(c.layer, c.filter)]
        rows.append({"check_same": bool(cost <= kth), "check_regret": max(0.0, cost - kth)})
    return rows


def reliability(scoring: Sequence[float], check: Sequence[float]) -> float:
    """Spearman correlation of the candidates' scores on the scoring and the check images (NaN
    with fewer than 3 candidates or where either set of scores is constant)."""
    a, b = np.asarray(scoring, dtype=float), np.asarray(check, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def tally_costs(tallies: dict[str, Tally], metric: str) -> dict[tuple[str, int], float]:
    """Each candidate's cost on the check images, from one tally per layer: its CAR in the
    metric (the loss increase for loss)."""
    return {(name, f): v for name, t in tallies.items()
            for f, v in zip(t.candidates, t.scores(metric).tolist())}
