"""Greedy runs without wasted work: scoring accuracy from tallies, reused network-wide scores,
and `global_cost` against the candidates actually tallied."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pandas as pd
import pytest
from test_schedules import small_case

import carlib.pruning.criteria
import carlib.pruning.greedy
from carlib.network.graph import MaskedNet
from carlib.pruning.criteria import get_criterion
from carlib.pruning.greedy import Trace, global_cost, global_prune, greedy_prune
from carlib.scoring.evaluate import evaluate

LAYERS = ["conv1", "conv2", "conv3"]
pytestmark = pytest.mark.usefixtures("one_thread")


def run(schedule: str, criterion: object, k: int, metric: str = "top1", **kw: object) -> Trace:
    model, data = small_case()
    if schedule == "global":
        return global_prune(model, LAYERS, data, 7, criterion, k=k, metric=metric,
                            progress=False, **kw)
    return greedy_prune(model, "conv2", data, 2, criterion, k=k, metric=metric, progress=False,
                        **kw)


def reference_accuracy(trace: Trace) -> tuple[float, list[float]]:
    """The old way: scoring top-1 of the full network, and scoring accuracy (the metric's
    top-k; loss: top-1) of the network after each step, by a plain evaluation."""
    model, data = small_case()
    key = "top5" if trace.metric == "top5" else "top1"
    net = MaskedNet(model)
    accs, rows = [], trace.to_frame()
    for step, g in rows.groupby("step"):
        if step > 0:
            for layer, f in zip(g["layer"], g["removed_filter"]):
                net.remove(layer, [int(f)])
        accs += [evaluate(net, data)[key]] * len(g)
    return evaluate(model, data)["top1"], accs


@pytest.mark.parametrize("schedule", ["layerwise", "global"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("criterion", ["car", "loss", "l1", "random", "mean_activation",
                                       "taylor"])
def test_scoring_accuracy_is_the_pruned_networks(schedule, k, criterion):
    trace = run(schedule, criterion, k)
    top1, accs = reference_accuracy(trace)
    assert trace.scoring_top1 == top1
    assert trace.to_frame()["scoring_acc"].tolist() == accs  # exact: hit counts / n


@pytest.mark.parametrize("metric", ["top5", "loss"])
def test_scoring_accuracy_in_other_metrics(metric):
    for schedule in ("layerwise", "global"):
        trace = run(schedule, "car", 2, metric)
        top1, accs = reference_accuracy(trace)
        assert trace.scoring_top1 == top1
        assert trace.to_frame()["scoring_acc"].tolist() == accs


def passes(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts greedy's own suffix passes over the scoring set (not the held-out set's)."""
    count: Counter = Counter()
    real = carlib.pruning.greedy.hit_rates

    def counted(cut, ks):
        count[cut.what] += 1
        return real(cut, ks)

    monkeypatch.setattr(carlib.pruning.greedy, "hit_rates", counted)
    return count


@pytest.mark.parametrize(("schedule", "criterion", "k", "want"), [
    # the old code measured step 0, then every step unless one filter went and a tally
    # counted it: car k=1 1 pass (now 0), car/loss k=2 1 + steps = 3 layer-wise, 5 global
    # (now only a last step of 2 filters needs one), taylor 1 + steps (now the last step's)
    ("layerwise", "car", 1, 0), ("global", "car", 1, 0),
    ("layerwise", "car", 2, 1), ("global", "car", 2, 0),  # global: 7 = 2+2+2+1
    ("layerwise", "loss", 2, 1), ("layerwise", "taylor", 1, 1), ("global", "taylor", 2, 1),
    ("layerwise", "l1", 1, 5),  # no tally: one pass per step (step 0 included), as before
])
def test_suffix_passes_for_scoring_accuracy(monkeypatch, schedule, criterion, k, want):
    count = passes(monkeypatch)
    model, data = small_case()
    trace = run(schedule, criterion, k, eval_data=data[:1])
    assert count["scoring set"] == want
    assert count["held-out set (eval_data)"] == trace.to_frame()["step"].max() + 1


def counted_criterion(name: str, depends: str | None = None) -> tuple[object, list[str]]:
    """The registered criterion (for the global run's layers), with calls recorded, and
    optionally another `depends`."""
    spec = get_criterion(name, 0, LAYERS)
    calls: list[str] = []

    def fn(net, layer, cut, kept, metric):
        calls.append(layer)
        return spec.fn(net, layer, cut, kept, metric)

    return dataclasses.replace(spec, fn=fn, depends=depends or spec.depends), calls


@pytest.mark.parametrize("criterion", ["l1", "l2", "random", "mean_activation", "apoz"])
@pytest.mark.parametrize("k", [1, 3])
def test_global_reuses_unchanged_scores_with_identical_results(criterion, k):
    reused, calls = counted_criterion(criterion)
    assert reused.depends in ("weights", "prefix")
    every, all_calls = counted_criterion(criterion, depends="network")  # the old schedule
    got, want = run("global", reused, k), run("global", every, k)
    pd.testing.assert_frame_equal(got.to_frame(), want.to_frame())
    assert got.initial_scores == want.initial_scores and got.removed == want.removed
    assert len(calls) < len(all_calls)
    if reused.depends == "weights":  # after the first scoring, only the layers that lost one
        steps = want.to_frame().iloc[1:].groupby("step")["layer"].nunique()
        assert len(calls) == len(LAYERS) + steps.iloc[:-1].sum()


def candidates(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records how many candidates every CAR tally of a criterion counts."""
    seen: list[int] = []
    real = carlib.pruning.criteria.tally

    def counted(cut, cands, *args, **kw):
        seen.append(len(cands))
        return real(cut, cands, *args, **kw)

    monkeypatch.setattr(carlib.pruning.criteria, "tally", counted)
    return seen


@pytest.mark.parametrize(("n_remove", "k"), [(4, 1), (6, 3)])  # no layer reaches its minimum
def test_global_cost_counts_the_tallied_candidates(monkeypatch, n_remove, k):
    seen = candidates(monkeypatch)
    model, data = small_case()
    global_prune(model, LAYERS, data, n_remove, "car", k=k, progress=False)
    sizes = [6, 6, 6]
    per_layer = [2, 1, 3] if n_remove == 6 else [1, 2, 1]
    cost = global_cost(sizes, n_remove, k, per_layer)
    assert sum(seen) == cost["global"]
    seen.clear()
    for layer, n, r in zip(LAYERS, sizes, per_layer):
        greedy_prune(model, layer, data, n - r, "car", k=k, progress=False)
    assert sum(seen) == cost["layerwise"] and cost["ratio"] == cost["global"] / sum(seen)


def test_global_cost_worked_numbers():
    assert global_cost([24, 48], 36) == {"global": 1962, "layerwise": 1098,
                                         "ratio": pytest.approx(1.787, abs=1e-3)}
    resnet50 = global_cost([64, 64, 128, 256, 512], 512)
    assert (resnet50["global"], resnet50["layerwise"]) == (393_472, 132_352)
    assert global_cost([32] * 10, 160)["ratio"] == pytest.approx(10, rel=0.03)  # L equal: ~L
