"""Decision confidence: each step's runner-up and margin, and the check on further images,
against an independent per-image computation (full forward passes of masked copies, scipy's
intervals), and on cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from test_schedules import small_case

from carlib import MaskedNet, global_prune, greedy_prune
from carlib.pruning.confidence import resolved


def outcomes(model, data, removed: list[tuple[str, int]], metric: str) -> np.ndarray:
    """Per image: hit (0/1) or cross-entropy of `model` with `removed` filters removed, from
    full forward passes of a fresh masked copy (no cut, no cache, no engine)."""
    net = MaskedNet(model)
    for layer, f in removed:
        net.remove(layer, [f])
    with torch.no_grad():
        out = [(net(x), y) for x, y in data]
    if metric == "loss":
        return torch.cat([F.cross_entropy(o.double(), y, reduction="none") for o, y in out]).numpy()
    return torch.cat([(o.argmax(1) == y).double() for o, y in out]).numpy()


def exact_interval(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Accuracy of a minus b on the same images with the exact interval (Clopper-Pearson on the
    discordant pairs, from scipy's binomtest), written out here independently of carlib."""
    n = len(a)
    n_ab, n_ba = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    m = n_ab + n_ba
    if m == 0:
        return 0.0, 0.0, 0.0
    ci = stats.binomtest(n_ab, m).proportion_ci(0.95, method="exact")
    return (n_ab - n_ba) / n, m * (2 * ci.low - 1) / n, m * (2 * ci.high - 1) / n


def steps_of(trace) -> list[tuple[list[tuple[str, int]], dict]]:
    """(filters removed before the step, the step's row) for every removal."""
    order = list(zip(trace.removed_layers, trace.removed))
    rows = [r for r in trace.steps if r["step"] > 0]
    before = {}
    for i, r in enumerate(rows):
        before.setdefault(r["step"], i)
    return [(order[:before[r["step"]]], r) for r in rows]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("criterion", ["car", "l1"])
def test_margin_is_the_paired_difference_of_pick_and_runner_up(criterion):
    model, data = small_case()
    trace = greedy_prune(model, "conv2", data, 2, criterion, progress=False)
    for prior, row in steps_of(trace):
        pick = outcomes(model, data, [*prior, ("conv2", row["removed_filter"])], "top1")
        ru = outcomes(model, data, [*prior, ("conv2", row["runner_up"])], "top1")
        want = exact_interval(pick, ru)
        assert (row["margin"], row["margin_lo"], row["margin_hi"]) == pytest.approx(want,
                                                                                   abs=1e-12)
        assert row["runner_up"] != row["removed_filter"]


@pytest.mark.usefixtures("one_thread")
def test_car_runner_up_is_the_next_lowest_car():
    """The runner-up's CAR (brute force) is the lowest among the filters not picked, and the
    margin is the runner-up's CAR minus the pick's: 0 exactly where the pick was tied."""
    model, data = small_case()
    trace = greedy_prune(model, "conv2", data, 2, "car", progress=False)
    for prior, row in steps_of(trace):
        base = outcomes(model, data, prior, "top1").mean()
        net = MaskedNet(model)
        for layer, f in prior:
            net.remove(layer, [f])
        car = {f: base - outcomes(model, data, [*prior, ("conv2", f)], "top1").mean()
               for f in net.kept("conv2")}
        rest = {f: v for f, v in car.items() if f != row["removed_filter"]}
        assert car[row["runner_up"]] == pytest.approx(min(rest.values()), abs=1e-12)
        assert row["margin"] == pytest.approx(car[row["runner_up"]] - car[row["removed_filter"]],
                                              abs=1e-12)
        if row["tie_size"] > 1:
            assert row["margin"] == 0 and not resolved(row["margin_lo"], row["margin_hi"])


@pytest.mark.usefixtures("one_thread")
def test_loss_margin_is_a_t_interval_of_per_image_loss_differences():
    model, data = small_case()
    trace = greedy_prune(model, "conv2", data, 3, "loss", progress=False)
    for prior, row in steps_of(trace):
        pick = outcomes(model, data, [*prior, ("conv2", row["removed_filter"])], "loss")
        ru = outcomes(model, data, [*prior, ("conv2", row["runner_up"])], "loss")
        d = ru - pick
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        assert row["margin"] == pytest.approx(d.mean(), rel=1e-9)
        assert (row["margin_lo"], row["margin_hi"]) == pytest.approx(
            (d.mean() - half, d.mean() + half), rel=1e-9)
        assert row["margin"] >= 0  # the loss criterion picks the smallest loss increase


@pytest.mark.usefixtures("one_thread")
def test_regime_resolved_share_counts_intervals_that_exclude_zero():
    model, data = small_case()
    trace = global_prune(model, ["conv1", "conv2"], data, 6, "l2", progress=False)
    rows = [r for r in trace.steps if r["step"] > 0]
    want = np.mean([r["margin_lo"] > 0 or r["margin_hi"] < 0 for r in rows])
    assert trace.regime()["resolved"] == pytest.approx(want)
    assert all(r["runner_up_layer"] in ("conv1", "conv2") for r in rows)


@pytest.mark.usefixtures("one_thread")
def test_check_on_the_scoring_images_agrees_with_car():
    """Known answer: checked on its own scoring images, CAR's pick is always the best there."""
    model, data = small_case()
    trace = global_prune(model, ["conv1", "conv2"], data, 5, "car", k=2, progress=False,
                         check_data=data)
    rows = [r for r in trace.steps if r["step"] > 0]
    assert all(r["check_same"] is True and r["check_regret"] == 0 for r in rows)
    assert trace.regime()["check_same"] == 1 and trace.regime()["check_regret"] == 0


@pytest.mark.usefixtures("one_thread")
def test_check_on_fresh_images_matches_brute_force():
    model, data = small_case()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(48, 3, 8, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (48,), generator=g)
    fresh = [(x[:20], y[:20]), (x[20:], y[20:])]
    trace = greedy_prune(model, "conv2", data, 2, "l1", progress=False, check_data=fresh)
    for prior, row in steps_of(trace):
        net = MaskedNet(model)
        for layer, f in prior:
            net.remove(layer, [f])
        acc = {f: outcomes(model, fresh, [*prior, ("conv2", f)], "top1").mean()
               for f in net.kept("conv2")}
        best = max(acc.values())
        assert row["check_same"] == (acc[row["removed_filter"]] == best)
        assert row["check_regret"] == pytest.approx(best - acc[row["removed_filter"]], abs=1e-12)


def test_curve_titles_count_resolved_removals_over_seeds():
    """regime_notes sums resolved removals over seeds (share x removals), and leaves them out
    for regime.csv files written before the column existed."""
    import pandas as pd

    from carlib.viz.plotting import regime_notes

    rows = pd.DataFrame({"layer": ["conv1"] * 3, "criterion": ["car", "car", "l1"],
                         "scoring_top1": [0.7, 0.8, 0.75], "removals": [12, 12, 12],
                         "tied": [1, 0, 0], "resolved": [0.25, 0.5, 1.0]})
    assert regime_notes(rows)["conv1"] == ("scoring top-1 0.75, car decided 23/24\n"
                                           "car resolved 9/24 (margin interval excludes 0)")
    assert regime_notes(rows.drop(columns="resolved"))["conv1"] == (
        "scoring top-1 0.75, car decided 23/24")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("criterion", ["car", "loss"])
def test_check_rho_is_the_spearman_of_scores_on_both_image_sets(criterion):
    """check_rho against brute force: every candidate's CAR (loss: loss increase) from full
    forward passes on the scoring and on the fresh images, ranked by scipy."""
    model, data = small_case()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, 3, 8, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    fresh = [(x[:25], y[:25]), (x[25:], y[25:])]
    metric = "loss" if criterion == "loss" else "top1"
    trace = greedy_prune(model, "conv2", data, 2, criterion, progress=False, check_data=fresh)
    checked = 0
    for prior, row in steps_of(trace):
        kept = [f for f in range(model.conv2.out_channels) if ("conv2", f) not in prior]

        def cost(images, f, prior=prior):
            before = outcomes(model, images, prior, metric).mean()
            after = outcomes(model, images, [*prior, ("conv2", f)], metric).mean()
            return after - before if metric == "loss" else before - after

        a = [cost(data, f) for f in kept]
        b = [cost(fresh, f) for f in kept]
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            assert math.isnan(row["check_rho"])
            continue
        assert row["check_rho"] == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-9)
        checked += 1
    assert checked > 0
    assert trace.regime()["check_rho"] == pytest.approx(
        np.nanmean([r["check_rho"] for _, r in steps_of(trace)]))


@pytest.mark.usefixtures("one_thread")
def test_check_rho_is_undefined_for_criteria_that_read_no_images():
    model, data = small_case()
    trace = greedy_prune(model, "conv2", data, 2, "l1", progress=False, check_data=data)
    assert all(math.isnan(r["check_rho"]) for _, r in steps_of(trace))
    assert math.isnan(trace.regime()["check_rho"])
