"""Rank agreement: known correlations, reuse of greedy step-0 scores, and the plot."""

from __future__ import annotations

import math

import pytest
import torch
from test_criteria import _bn_case

from carlib import car_scores, greedy_prune
from carlib.analysis.agreement import (
    COLUMNS,
    EngineSettings,
    layer_scores,
    rank_agreement,
    scores_from_traces,
)
from carlib.core.errors import CarlibError
from carlib.core.io import save_figure
from carlib.viz.plotting import plot_rank_agreement


def test_known_correlations():
    scores = {"conv1": {"car": [1, 2, 3, 4], "same": [10, 20, 30, 40], "rev": [4, 3, 2, 1],
                        "swap": [1, 3, 2, 4], "flat": [5, 5, 5, 5]},
              "conv2": {"car": [0.1, float("nan"), 0.3], "other": [1, 7, 2]}}
    df = rank_agreement(scores)
    assert list(df.columns) == COLUMNS
    got = df.set_index(["layer", "criterion"])
    assert got.loc[("conv1", "same"), ["spearman", "kendall"]].tolist() == pytest.approx([1, 1])
    assert got.loc[("conv1", "rev"), ["spearman", "kendall"]].tolist() == pytest.approx([-1, -1])
    # one adjacent swap of 4: rho = 1 - 6 * 2 / (4 * 15) = 0.8; tau = (5 - 1) / 6
    assert got.loc[("conv1", "swap"), ["spearman", "kendall"]].tolist() == pytest.approx(
        [0.8, 4 / 6])
    assert math.isnan(got.loc[("conv1", "flat"), "spearman"])
    assert got.loc[("conv2", "other"), "n_filters"] == 2  # NaN left out pairwise
    assert got.loc[("conv2", "other"), "spearman"] == pytest.approx(1.0)


def test_step0_scores_of_greedy_traces_are_the_full_layer_scores(tmp_path):
    model, data = _bn_case(32)
    traces = [greedy_prune(model, "conv2", data, 10, c, progress=False)
              for c in ("car", "taylor", "random")]
    known = scores_from_traces(traces)
    assert set(known["conv2"]) == {"car", "taylor", "random"}
    fresh = layer_scores(model, "conv2", data, ["car", "taylor", "random", "apoz"])
    for name, values in known["conv2"].items():
        assert torch.allclose(torch.tensor(values, dtype=torch.float64), fresh[name])
    assert torch.equal(fresh["car"], car_scores(model, "conv2", data))
    reused = layer_scores(model, "conv2", data, ["car", "apoz"],
                          known={"car": [float(i) for i in range(12)]})
    assert reused["car"].tolist() == list(range(12))
    df = rank_agreement({"conv2": fresh, "conv1": layer_scores(model, "conv1", data,
                                                               ["car", "l1", "apoz"])})
    assert len(df) == 3 + 2
    path = save_figure(plot_rank_agreement(df), tmp_path / "rank.png")
    assert path.stat().st_size > 10_000


def test_layer_scores_engine_settings():
    """The scoring engine's mode and options reach CAR (the naive reference agrees)."""
    model, data = _bn_case(32)
    fast = layer_scores(model, "conv2", data, ["car"])
    naive = layer_scores(model, "conv2", data, ["car"], engine=EngineSettings(mode="naive"))
    assert torch.equal(fast["car"], naive["car"])
    with pytest.raises(CarlibError, match="scoring mode .nope."):
        layer_scores(model, "conv2", data, ["car"], engine=EngineSettings(mode="nope"))
