"""Network-wide and k-per-step schedules on constructed networks and against a brute force."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import self_labelled
from test_experiments import TINY, run
from torch import nn

import carlib.pruning.criteria
from carlib import CarlibError, MaskedNet, greedy_prune
from carlib.core.stats import car_interval
from carlib.pruning.greedy import global_prune
from carlib.scoring.tally import naive_tally


class TwoLayer(nn.Module):
    """conv1: 4 filters copying input channels; conv2: g0 = c0 + c1, g1 = c2 + c3; class 1 =
    g0 + g1 > 0.5. Image group i has only input channel i on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1, bias=False)
        self.conv1.weight.data = torch.eye(4).view(4, 4, 1, 1)
        self.conv2 = nn.Conv2d(4, 2, 1, bias=False)
        self.conv2.weight.data = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]]).view(2, 4, 1, 1)
        self.fc = nn.Linear(2, 2)
        self.fc.weight.data = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
        self.fc.bias.data = torch.tensor([0.5, 0.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(h, 1))


def groups(sizes: list[int], negatives: int = 5) -> list[tuple]:
    xs = [torch.zeros(negatives, 4, 1, 1)]
    ys = [torch.zeros(negatives, dtype=torch.long)]
    for i, n in enumerate(sizes):
        x = torch.zeros(n, 4, 1, 1)
        x[:, i] = 1.0
        xs.append(x)
        ys.append(torch.ones(n, dtype=torch.long))
    return [(torch.cat(xs), torch.cat(ys))]


def test_global_schedule_on_two_layer_toy():
    data = groups([3, 1, 4, 2])  # n = 15; CAR conv1 f_i = size_i / n; conv2 g0 = 4/n, g1 = 6/n
    t = global_prune(TwoLayer(), ["conv1", "conv2"], data, n_remove=4, progress=False)
    df = t.to_frame()
    # 1: conv1 f1 (1/n); 2: conv1 f3 (2/n); 3: conv1 f0 and conv2 g0 tie at 3/n with equal
    # loss increase (they cut the same images), the earlier layer goes; 4: conv1 is at its
    # minimum of one filter, so conv2 g0 (now 0: its images are already lost)
    assert list(zip(t.removed_layers, t.removed)) == [("conv1", 1), ("conv1", 3), ("conv1", 0),
                                                      ("conv2", 0)]
    assert df["layer"].tolist()[1:] == ["conv1", "conv1", "conv1", "conv2"]
    assert df["score"].tolist()[1:] == pytest.approx([1 / 15, 2 / 15, 3 / 15, 0.0])
    assert df["tie_size"].tolist()[1:] == [1, 1, 2, 1]
    assert df["tie_break"].tolist()[1:] == ["", "", "index", ""]
    assert df["filters_remaining"].tolist() == [6, 5, 4, 3, 2]
    assert df["layer_remaining"].tolist()[1:] == [3, 2, 1, 1]
    assert df["scoring_acc"].tolist() == pytest.approx([1, 14 / 15, 12 / 15, 9 / 15, 9 / 15])
    assert t.initial_scores["conv2"] == pytest.approx([4 / 15, 6 / 15])
    # the layer-wise schedule of conv1 alone is the global one restricted to conv1
    assert greedy_prune(TwoLayer(), "conv1", data, 1, progress=False).removed == [1, 3, 0]


def test_global_keep_fraction_and_bounds():
    data = groups([3, 1, 4, 2])
    t = global_prune(TwoLayer(), ["conv1", "conv2"], data, keep_fraction=0.5, progress=False)
    assert len(t.removed) == 3
    with pytest.raises(CarlibError, match="use n_remove in 0..4"):
        global_prune(TwoLayer(), ["conv1", "conv2"], data, n_remove=5, progress=False)
    with pytest.raises(CarlibError, match="n_remove in 0..2"):
        global_prune(TwoLayer(), ["conv1", "conv2"], data, 3, min_per_layer=2, progress=False)


def test_k_per_step():
    data = groups([3, 1, 4, 2])
    t = greedy_prune(TwoLayer(), "conv1", data, 1, k=2, progress=False)
    df = t.to_frame()
    assert t.removed == [1, 3, 0]
    assert df["step"].tolist() == [0, 1, 1, 2]
    assert df["filters_remaining"].tolist() == [4, 2, 2, 1]
    assert df["scoring_acc"].tolist() == pytest.approx([1, 12 / 15, 12 / 15, 9 / 15])
    # removing 2 at once misses redundancy that re-scoring after each removal sees: conv2's
    # filters are copies of each other here, so both score 0 at the start
    model = TwoLayer()
    model.conv2.weight.data = torch.ones(2, 4, 1, 1)
    one = greedy_prune(model, "conv2", data, 1, k=1, progress=False)
    assert one.to_frame()["scoring_acc"].tolist() == pytest.approx([1, 1])
    assert global_prune(model, ["conv1", "conv2"], data, 2, k=2, progress=False).removed_layers \
        == ["conv2", "conv1"]  # conv2 may lose only one filter: the other pick is from conv1


def brute_force_global(model: nn.Module, layers: list[str], data: list, n_remove: int, k: int
                       ) -> list[set[tuple[str, int]]]:
    """Global CAR greedy with a full forward per candidate (naive_tally), no caching: the
    (layer, filter) pairs removed at each step."""
    net = MaskedNet(model.eval())
    out: list[set[tuple[str, int]]] = []
    while sum(map(len, out)) < n_remove:
        cands = []
        for rank, layer in enumerate(layers):
            kept = net.kept(layer)
            if len(kept) > 1:
                t = naive_tally(net, layer, data, kept)
                cands += [(s, inc, rank, f, layer) for f, s, inc in
                          zip(kept, t.scores("top1").tolist(), t.loss_increase().tolist())]
        room = {layer: len(net.kept(layer)) - 1 for layer in layers}
        step = []
        for *_, f, layer in sorted(cands):  # (score, loss increase, layer rank, filter)
            if len(step) < min(k, n_remove - sum(map(len, out))) and room[layer] > 0:
                step.append((layer, f))
                room[layer] -= 1
        for layer, f in step:
            net.remove(layer, [f])
        out.append(set(step))
    return out


class Small(nn.Module):
    """Three 3x3 conv layers with ReLU on 8x8 input, then a linear classifier."""

    def __init__(self, width: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = torch.relu(self.conv3(nn.functional.max_pool2d(x, 2)))
        return self.fc(torch.flatten(x, 1))


def small_case() -> tuple[nn.Module, list]:
    """A seeded float64 `Small` and 64 self-labelled scoring images in two batches."""
    torch.manual_seed(0)
    model = Small()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    model = model.double().eval()
    x = torch.randn(64, 3, 8, 8, dtype=torch.float64)
    y = self_labelled(model, x)
    return model, [(x[:32], y[:32]), (x[32:], y[32:])]


@pytest.mark.parametrize("k", [1, 3])
def test_global_car_matches_brute_force(k, one_thread):
    model, data = small_case()
    layers = ["conv1", "conv2", "conv3"]
    t = global_prune(model, layers, data, 9, k=k, progress=False)
    df = t.to_frame().iloc[1:]
    got = [set(zip(g["layer"], g["removed_filter"])) for _, g in df.groupby("step")]
    assert got == brute_force_global(model, layers, data, 9, k)
    assert len(set(t.removed_layers)) > 1, "case is uninformative"


def test_intervals_come_from_the_flip_counts_of_the_chosen_filter(monkeypatch):
    data = groups([3, 1, 4, 2])
    seen = []
    real = carlib.pruning.criteria.tally

    def spy(cut, candidates, metric="top1", *args, **kw):
        t = real(cut, candidates, metric, *args, **kw)
        seen.append(t)
        return t

    monkeypatch.setattr(carlib.pruning.criteria, "tally", spy)
    for method in ("exact", "bootstrap"):
        seen.clear()
        trace = greedy_prune(TwoLayer(), "conv1", data, 2, interval=method, progress=False)
        df = trace.to_frame()
        assert math.isnan(df["score_lo"].iat[0])
        for t, row in zip(seen, df.iloc[1:].itertuples(), strict=True):
            i = t.candidates.index(row.removed_filter)
            lo, hi = car_interval(int(t.flips_lost[i]), int(t.flips_gained[i]), t.n,
                                  method=method)
            assert (row.score_lo, row.score_hi) == pytest.approx((float(lo), float(hi)))
            assert row.score_lo <= row.score <= row.score_hi
    l1 = greedy_prune(TwoLayer(), "conv1", data, 2, "l1", progress=False).to_frame()
    assert l1["score_lo"].isna().all()


def test_prune_script_global_schedule(tmp_path):
    res = run(tmp_path, *TINY, "method=global", "method.criteria=[car,random]",
              "method.n_remove=5", "method.k=2")
    assert res.returncode == 0, res.stderr[-2000:]
    df = pd.read_csv(tmp_path / "run" / "curves.csv")
    assert df.groupby("criterion").size().eq(1 + 5).all()  # step 0 + one row per removal
    assert df.groupby("criterion")["step"].max().eq(3).all()  # 2 + 2 + 1
    assert set(df["layer"].dropna()) <= {"conv1", "conv2"} and df["layer"].isna().sum() == 2
    assert df.groupby("criterion")["filters_remaining"].min().eq(16 - 5).all()
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    assert len(pd.read_csv(tmp_path / "run" / "rank_agreement.csv")) == 2 * 7


def test_greedy_trace_is_the_same_in_every_scoring_mode(one_thread):
    model, data = small_case()
    traces = {m: greedy_prune(model, "conv2", data, 2, mode=m, progress=False).to_frame()
              for m in ("fast", "plain", "naive")}
    pd.testing.assert_frame_equal(traces["fast"], traces["naive"])
    pd.testing.assert_frame_equal(traces["plain"], traces["naive"])
    assert (traces["naive"].score.iloc[1:] != 0).any(), "case is uninformative"
    with pytest.raises(CarlibError, match="unknown scoring mode"):
        greedy_prune(model, "conv2", data, 2, mode="quick", progress=False)
