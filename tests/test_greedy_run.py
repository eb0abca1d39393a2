"""GreedyRun: the loop yields its steps; a caller can stop, finish and resume between them."""

from __future__ import annotations

import pandas as pd
import pytest
from test_schedules import small_case

from carlib.pruning.approx import approx_greedy
from carlib.pruning.greedy import GreedyRun, GreedySettings, global_prune, greedy_prune
from carlib.pruning.state import RunState

LAYERS = ["conv1", "conv2", "conv3"]


def settings(**kw: object) -> GreedySettings:
    return GreedySettings(LAYERS, 7, 2, schedule="global", k=2, progress=False, **kw)


@pytest.mark.usefixtures("one_thread")
def test_steps_yield_the_trace_rows_and_match_the_driver():
    model, data = small_case()
    want = global_prune(model, LAYERS, data, 7, "car", k=2, min_per_layer=2, progress=False)
    run = GreedyRun(model, "car", data, settings())
    steps = list(run.steps())
    assert [s.step for s in steps] == [1, 2, 3, 4]
    assert [(c.layer, c.filter) for s in steps for c, _, _ in s.picks] == list(
        zip(want.removed_layers, want.removed))
    assert [r for s in steps for r in s.rows] == run.trace.steps[1:]
    assert all(len(s.candidates) >= len(s.picks) for s in steps)
    pd.testing.assert_frame_equal(run.trace.to_frame(), want.to_frame())


@pytest.mark.usefixtures("one_thread")
def test_stop_finish_and_resume_between_steps(tmp_path):
    model, data = small_case()
    want = greedy_prune(model, "conv2", data, 1, "car", k=2, progress=False)
    state, key = RunState(tmp_path), {"run": "conv2"}
    layer = GreedySettings(["conv2"], 5, 1, k=2, progress=False)
    run = GreedyRun(model, "car", data, layer, state=state.slot(**key))
    for step in run.steps():
        if step.step == 2:
            break
    assert run.trace.steps[-1]["scoring_acc"] is None  # k=2: pending until the next tallies
    run.finish()
    assert run.trace.steps[-1]["scoring_acc"] == want.steps[-2]["scoring_acc"]
    again = GreedyRun(model, "car", data, layer, state=state.slot(**key))
    assert again.trace.resumed_at == 2
    pd.testing.assert_frame_equal(again.run().to_frame(), want.to_frame())


@pytest.mark.usefixtures("one_thread")
def test_approximate_options_are_options_of_the_loop():
    model, data = small_case()
    run = GreedyRun(model, "car", data, GreedySettings(
        ["conv2"], 5, 1, k=2, progress=False, prefilter=3, subset=40))
    assert run.run().removed == approx_greedy(model, "conv2", data, 1, taylor_m=3, k=2,
                                              subset=40)
    run = GreedyRun(model, "car", data, settings(prefilter=2))
    steps = list(run.steps())
    assert len(run.trace.removed) == 7
    assert all(sum(c.layer == n for c in s.candidates) <= 2 for s in steps for n in LAYERS)
