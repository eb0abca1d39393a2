"""CAR's regime and its isolation: the tie rules, the loss criterion, the regime numbers, the
shared tally memo, paired differences, the held-out scoring split and the hard shapes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import randomize_bn, self_labelled
from test_greedy import Toy, groups

from carlib import CarlibError, greedy_prune
from carlib.core.stats import car_interval, mean_interval, paired_difference
from carlib.data.datasets import hold_out, load_dataset, scoring_subset, targets
from carlib.data.shapes import ALL_SHAPES, HARD, make_shapes
from carlib.models import build_model
from carlib.pruning.criteria import Criterion, get_criterion, make_car, register_criterion
from carlib.pruning.select import Candidate, choose, random_keys
from carlib.scoring.counts import TallyMemo
from carlib.scoring.evaluate import evaluate, image_hits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import aggregate  # noqa: E402

# ----------------------------------------------------------------------------- tie rules


def test_random_tie_rule_is_seeded_and_recorded():
    # every filter serves 2 images: each step is a tie that the rule alone decides
    model, data = Toy([0, 1, 2, 3], [3.0, 1.0, 2.0, 1.0]), groups([2, 2, 2, 2], 4)
    runs = {seed: greedy_prune(model, "conv1", data, 1, "car_random_tie", seed=seed,
                               progress=False) for seed in range(6)}
    df = runs[0].to_frame()
    assert df.tie_break.tolist()[1:] == ["random", "random", "random"]
    assert df.tie_size.tolist()[1:] == [4, 3, 2]
    # the order follows the seeded draws of each step, not the loss (which removes 1, 3, 2)
    for seed, t in runs.items():
        kept, order = [0, 1, 2, 3], []
        for step in (1, 2, 3):
            keys = random_keys(seed, step, ["conv1"], [4])
            pick = min(kept, key=lambda f: keys[("conv1", f)])
            order.append(pick)
            kept.remove(pick)
        assert t.removed == order
        assert greedy_prune(model, "conv1", data, 1, "car_random_tie", seed=seed,
                            progress=False).removed == order  # the same seed, the same order
    assert len({tuple(t.removed) for t in runs.values()}) > 1
    assert greedy_prune(model, "conv1", data, 1, progress=False).removed == [1, 3, 2]


def test_choose_reports_the_rule_that_decided():
    cands = [Candidate("a", f, s) for f, s in enumerate([0.0, 0.0, 0.5])]
    picks = choose(cands, 1, {"a": 3}, lambda g: [0.7, 0.2][:len(g)], ["a"], "random")
    assert [(c.filter, n, rule) for c, n, rule in picks] == [(1, 2, "random")]
    picks = choose(cands, 2, {"a": 3}, lambda g: [1.0] * len(g), ["a"], "random")
    assert [rule for *_, rule in picks] == ["", ""]  # both tied filters go: nothing to break
    with pytest.raises(CarlibError, match="tie_break='coin'"):
        Criterion("x", make_car(), tie_break="coin")


def _bn_case(n: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("alexnet_small", 6, 3, batchnorm=True, widths=(8, 12, 16, 16, 8))
    model = randomize_bn(model, seed).double().eval()
    x = torch.randn(n, 3, 32, 32, dtype=torch.float64)
    y = self_labelled(model, x, flip=0.4, seed=seed)
    return model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def test_loss_criterion_is_car_on_the_loss_whatever_the_metric(one_thread):
    model, data = _bn_case()
    loss = greedy_prune(model, "conv2", data, 6, "loss", metric="top5", progress=False)
    ref = greedy_prune(model, "conv2", data, 6, "car", metric="loss", progress=False)
    assert loss.removed == ref.removed
    a, b = loss.to_frame(), ref.to_frame()
    assert a.score.tolist() == pytest.approx(b.score.tolist(), nan_ok=True)
    assert a.score_lo.isna().all()  # no CAR interval for a loss
    assert (a.tie_break.fillna("") == "").all()
    # scoring_acc is in the run's metric (top5) for every criterion
    car5 = greedy_prune(model, "conv2", data, 6, "car", metric="top5", progress=False)
    assert a.scoring_acc.iat[0] == car5.to_frame().scoring_acc.iat[0]


def test_registered_criterion_runs_by_name():
    model, data = Toy([0, 1, 2, 3], [1, 1, 1, 1]), groups([3, 1, 4, 2], 4)

    def by_index(net, layer, cut, kept, metric):
        return -torch.tensor(kept, dtype=torch.float64), None

    register_criterion("test_last_first", by_index)
    assert get_criterion("test_last_first").name == "test_last_first"
    assert greedy_prune(model, "conv1", data, 1, "test_last_first",
                        progress=False).removed == [3, 2, 1]
    spec = Criterion("mine", by_index)
    t = greedy_prune(model, "conv1", data, 2, spec, progress=False)
    assert t.criterion == "mine" and t.removed == [3, 2]
    with pytest.raises(CarlibError, match="give fn or factory"):
        register_criterion("bad")


# ----------------------------------------------------------------------------- regime


def test_regime_counts_ties_and_scoring_top1():
    model, data = Toy([0, 1, 2, 3], [3.0, 1.0, 2.0, 1.0]), groups([2, 2, 2, 2], 4)
    t = greedy_prune(model, "conv1", data, 1, progress=False)
    # every removal tied: margin 0 over the runner-up, so none resolved
    assert t.regime() == {"scoring_top1": 1.0, "removals": 3, "tied": 3, "decided": 0.0,
                          "resolved": 0.0}
    distinct = greedy_prune(Toy([0, 1, 2, 3], [1, 1, 1, 1]), "conv1", groups([3, 1, 4, 2], 4),
                            1, progress=False)
    assert distinct.regime()["decided"] == 1.0
    m2, d2 = _bn_case()
    t2 = greedy_prune(m2, "conv1", d2, 6, "l1", metric="top5", progress=False)
    assert t2.scoring_top1 == evaluate(m2, d2)["top1"]
    state = t2.to_state()
    assert type(t2).from_state(state).regime() == t2.regime()


def test_memo_gives_identical_traces_and_saves_work(one_thread):
    model, data = _bn_case(seed=1)
    plain = {c: greedy_prune(model, "conv2", data, 5, c, progress=False).to_frame()
             for c in ("car", "car_random_tie", "loss")}
    memo = TallyMemo()
    shared = {c: greedy_prune(model, "conv2", data, 5, c, progress=False, memo=memo).to_frame()
              for c in ("car", "car_random_tie", "loss")}
    for c in plain:
        pd.testing.assert_frame_equal(plain[c], shared[c])
    assert memo.hits >= 2  # at least the first step of car_random_tie and of loss
    other, _ = _bn_case(seed=2)
    with pytest.raises(CarlibError, match="one model and one scoring set"):
        greedy_prune(other, "conv2", data, 5, progress=False, memo=memo)


# ----------------------------------------------------------------------------- statistics


def test_paired_difference_against_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.random(300) < 0.7, rng.random(300) < 0.6
    d = paired_difference(a, b)
    assert d["diff"] == pytest.approx(a.mean() - b.mean())
    assert d["n_ab"] == int((a & ~b).sum()) and d["n_ba"] == int((b & ~a).sum())
    lo, hi = car_interval(d["n_ab"], d["n_ba"], 300)
    assert (d["lo"], d["hi"]) == (pytest.approx(float(lo)), pytest.approx(float(hi)))
    assert d["lo"] < d["diff"] < d["hi"]
    same = paired_difference(a, a)
    assert same["diff"] == 0 and same["lo"] == same["hi"] == 0
    with pytest.raises(CarlibError, match="equal, non-empty"):
        paired_difference(a, b[:10])


def test_mean_interval_is_student_t():
    m, lo, hi = mean_interval([1.0, 2.0, 3.0])
    assert m == 2 and hi - m == pytest.approx(4.302653 / np.sqrt(3), rel=1e-6)
    assert mean_interval([0.5]) == (0.5, 0.5, 0.5)
    assert all(np.isnan(mean_interval([])))


def test_image_hits_match_evaluate():
    model, data = _bn_case()
    hits = image_hits(model, data)
    assert hits.dtype == torch.bool and len(hits) == 64
    assert hits.double().mean().item() == pytest.approx(evaluate(model, data)["top1"])


def test_summary_regime_and_differences_on_known_tables():
    rows = []
    for seed, ends in ((0, {"car": 0.6, "loss": 0.55, "l1": 0.3, "car_random_tie": 0.6}),
                       (1, {"car": 0.7, "loss": 0.6, "l1": 0.2, "car_random_tie": 0.68})):
        for c, end in ends.items():
            rows += [{"model": "m", "dataset": "d", "layer": "conv1", "criterion": c,
                      "seed": seed, "step": 0, "filters_remaining": 4, "heldout_top1": 0.8},
                     {"model": "m", "dataset": "d", "layer": "conv1", "criterion": c,
                      "seed": seed, "step": 2, "filters_remaining": 2, "heldout_top1": end}]
    curves = pd.DataFrame(rows)
    regime = pd.DataFrame([{"model": "m", "dataset": "d", "layer": "conv1", "criterion": c,
                            "seed": s, "scoring_top1": 0.7 + 0.1 * s, "removals": 2,
                            "tied": int(c == "car" and s == 1)}
                           for s in (0, 1) for c in ("car", "loss", "l1", "car_random_tie")])
    summary = aggregate.summarize(curves, [], regime).set_index("criterion")
    assert summary.scoring_top1.tolist() == pytest.approx([0.75] * 4)
    assert summary.loc["car", "decided"] == 0.75 and summary.loc["l1", "decided"] == 1.0
    assert summary.car_decided.eq(0.75).all()
    paired = pd.DataFrame([{"model": "m", "dataset": "d", "layer": "conv1", "seed": s,
                            "criterion": "car", "versus": v, "diff": diff, "lo": diff - 0.02,
                            "hi": diff + 0.02}
                           for s, (dl, d1, dr) in enumerate(((0.05, 0.3, 0.0),
                                                             (0.1, 0.5, 0.02)))
                           for v, diff in (("loss", dl), ("l1", d1), ("car_random_tie", dr))])
    diffs = aggregate.differences(paired, summary.reset_index()).set_index("comparison")
    assert diffs.loc["next best", "versus"] == "loss"  # best mean other than CAR and its tie
    assert diffs.loc["best baseline", "versus"] == "l1"
    assert diffs.loc["loss", "diff_mean"] == pytest.approx(0.075)
    m, lo, hi = mean_interval([0.05, 0.1])
    assert (diffs.loc["loss", "diff_lo"], diffs.loc["loss", "diff_hi"]) == (
        pytest.approx(lo), pytest.approx(hi))
    assert diffs.loc["loss", "seeds_above"] == 2 and diffs.loc["random tie", "seeds_above"] == 0
    assert diffs.n_seeds.eq(2).all()


# ----------------------------------------------------------------------------- data


def test_hold_out_is_a_stratified_seeded_part_of_train():
    full = load_dataset("shapes", n_train=600, n_test=60, seed=3)
    b = load_dataset("shapes", n_train=600, n_test=60, seed=3, val_size=120)
    assert len(b.train) == 480 and len(b.val) == 120
    assert torch.equal(b.val_indices, scoring_subset(targets(full.train), 120, 3))
    both = torch.cat([b.train_indices, b.val_indices]).sort().values
    assert torch.equal(both, torch.arange(600))  # disjoint, and together all of train
    x, y = full.train.tensors
    assert torch.equal(b.val.tensors[0], x[b.val_indices])
    assert torch.equal(b.train.tensors[1], y[b.train_indices])
    assert torch.bincount(targets(b.val)).tolist() == [20] * 6
    assert b.split("val")[0] is b.val and b.split("train")[0] is b.train
    assert hold_out(full, 0, 3) is full
    with pytest.raises(CarlibError, match="no images were held out"):
        full.split("val")
    with pytest.raises(CarlibError, match="must be in 0..599"):
        hold_out(full, 600, 0)


def test_fashion_padded_to_32(tmp_path):
    from test_data import _write_idx

    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz",
                   rng.integers(1, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    native = load_dataset("fashion_mnist", root=str(tmp_path))
    b = load_dataset("fashion_mnist", root=str(tmp_path), image_size=32, val_size=10)
    assert b.image_size == 32 and b.test.tensors[0].shape == (10, 1, 32, 32)
    x = b.test.tensors[0]
    black = (0 - 0.2860) / 0.3530
    assert torch.allclose(x[:, :, :2], torch.full_like(x[:, :, :2], black))
    assert torch.equal(x[:, :, 2:30, 2:30], native.test.tensors[0])
    with pytest.raises(CarlibError, match="28 \\(native\\) or 32"):
        load_dataset("fashion_mnist", root=str(tmp_path), image_size=64)


def test_hard_shapes_preset_and_knobs():
    conf = yaml.safe_load((ROOT / "conf" / "data" / "shapes_hard.yaml").read_text())
    gen = conf["generator"]
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in gen.items()} == HARD
    x, y, names = make_shapes(280, 0, classes=14, distractors=2, occluders=1)
    assert names == list(ALL_SHAPES) and torch.bincount(y).tolist() == [20] * 14
    plain = make_shapes(280, 0, classes=14)
    assert torch.equal(plain[1], y) and not torch.equal(plain[0], x)  # clutter, same labels
    hard = load_dataset("shapes_hard", n_train=100, n_test=20)
    assert hard.classes == list(ALL_SHAPES[:HARD["classes"]])
    assert torch.equal(hard.train.tensors[1], make_shapes(100, 0, **HARD)[1])
    # low contrast: the luma gap of shape and background stays in the window
    x, _, _ = make_shapes(50, 1, noise=0.0, contrast=(0.1, 0.2), distractors=0)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    y_img = (x.float() / 255 * luma).sum(1)
    gap = (y_img.amax((1, 2)) - y_img.amin((1, 2)))
    assert gap.max() <= 0.2 + 0.01
    for bad, msg in (({"contrast": (0.5, 0.2)}, "contrast"), ({"radius": (0.1, 0.7)}, "radius"),
                     ({"classes": 15}, "classes=15"), ({"distractors": -1}, "counts >= 0")):
        with pytest.raises(CarlibError, match=msg):
            make_shapes(10, 0, **bad)
    with pytest.raises(CarlibError, match="unknown data.generator keys"):
        load_dataset("shapes", n_train=10, n_test=10, generator={"blur": 1})



def test_pooled_color_count_is_the_exact_convolution():
    from scipy.stats import hypergeom

    from carlib.analysis.color import pooled_color_count

    runs = [{"layer_live": 24, "layer_color_selective": 20, "live_in_top_k": 12,
             "color_selective": 11},
            {"layer_live": 48, "layer_color_selective": 5, "live_in_top_k": 20,
             "color_selective": 4}]
    got = pooled_color_count(runs)
    # brute force: every pair of outcomes of the two independent draws
    tail = sum(hypergeom.pmf(a, 24, 20, 12) * hypergeom.pmf(b, 48, 5, 20)
               for a in range(13) for b in range(21) if a + b >= 15)
    assert got["p_value"] == pytest.approx(tail)
    assert got["color_selective"] == 15 and got["live_in_top_k"] == 32 and got["runs"] == 2
    assert got["expected_random"] == pytest.approx(12 * 20 / 24 + 20 * 5 / 48)
    one = pooled_color_count(runs[:1])
    assert one["p_value"] == pytest.approx(hypergeom.sf(10, 24, 20, 12))
