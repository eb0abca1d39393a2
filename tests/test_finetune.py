"""The retraining comparison (experiments/finetune.py) end to end on real tiny runs, and the
tests over seeds built on it and on the color counts, against brute force and known answers."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from carlib.analysis.color import paired_color_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import aggregate  # noqa: E402
import figures  # noqa: E402

# LeNet-5 learns the shapes to ~78% in a few seconds: pruning and fine-tuning change top-1
SMALL = ["model=lenet5", "data=shapes", "data.val_size=300", "data.image_size=28",
         "data.n_train=1300", "data.n_test=300", "train.epochs=4", "train.lr=0.01",
         "train.batch_size=64", "progress=false", "threads=1", "logger.mode=disabled"]


def script(name: str, tmp: Path, run: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / name), *SMALL,
                           f"paths.cache_dir={tmp}/cache", f"hydra.run.dir={tmp}/{run}", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """Two seeds of prune.py (car, loss, l1) and finetune.py on each, like run_studies.sh."""
    tmp = tmp_path_factory.mktemp("finetune")
    for seed in (0, 1):
        res = script("prune.py", tmp, f"study/seed{seed}", f"seed={seed}",
                     "method.scoring.size=120", "method.keep_fraction=0.5",
                     "method.criteria=[car,loss,l1]", "method.rank_agreement=false",
                     "method.per_class=false")
        assert res.returncode == 0, res.stderr[-3000:]
        res = script("finetune.py", tmp, f"study/finetune_seed{seed}", f"seed={seed}",
                     f"source.curves={tmp}/study/seed{seed}/curves.csv", "retrain.epochs=1")
        assert res.returncode == 0, res.stderr[-3000:]
    return tmp


def test_finetune_rows_agree_with_the_pruning_run(study):
    for seed in (0, 1):
        curves = pd.read_csv(study / f"study/seed{seed}/curves.csv")
        df = pd.read_csv(study / f"study/finetune_seed{seed}/finetuned.csv")
        assert list(df.columns) == ["model", "dataset", "seed", "layer", "criterion", "removed",
                                    "filters_remaining", "heldout_top1_full",
                                    "heldout_top1_masked", "heldout_top1_before",
                                    "heldout_top1", "val_top1", "retrain_epochs",
                                    "retrain_steps", "retrain_seconds"]
        assert set(zip(df.layer, df.criterion)) == set(zip(curves.layer, curves.criterion))
        assert (df.seed == seed).all() and (df.retrain_epochs == 1).all()
        assert (df.retrain_steps == 16).all()  # 1,000 training images in batches of 64
        # physically pruned = masked (the curve's end) on the same held-out images
        assert np.allclose(df.heldout_top1_before, df.heldout_top1_masked, atol=1e-9)
        for r in df.itertuples():
            rows = curves[(curves.layer == r.layer) & (curves.criterion == r.criterion)]
            assert r.removed == rows.removed_filter.notna().sum()
            assert r.filters_remaining == rows.filters_remaining.iloc[-1]
            assert r.heldout_top1_full == pytest.approx(rows.heldout_top1.iloc[0])
        assert (df.heldout_top1 != df.heldout_top1_before).any()  # fine-tuning did something
        assert df.val_top1.between(0, 1).all()


def test_finetune_is_deterministic(study):
    res = script("finetune.py", study, "again", "seed=0", "retrain.epochs=1",
                 f"source.curves={study}/study/seed0/curves.csv", "source.criteria=[l1]",
                 "source.layers=[conv2]")
    assert res.returncode == 0, res.stderr[-3000:]
    again = pd.read_csv(study / "again/finetuned.csv").drop(columns="retrain_seconds")
    first = pd.read_csv(study / "study/finetune_seed0/finetuned.csv")
    first = first[(first.criterion == "l1") & (first.layer == "conv2")]
    pd.testing.assert_frame_equal(again, first.drop(columns="retrain_seconds")
                                  .reset_index(drop=True))


def test_finetune_bad_input_is_one_line(study):
    curves = f"source.curves={study}/study/seed0/curves.csv"
    for args, says in ((["source.criteria=[taylor]"], "source.criteria ['taylor'] not in"),
                       (["seed=3"], "is for seed 0, not 3"),
                       (["train.epochs=1"], "is not the checkpoint that run pruned"),
                       ([], "no pruning run given")):
        res = script("finetune.py", study, "bad", *([curves] if args != [] else []), *args)
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
        assert says in lines[0]
    assert not (study / "bad").exists()


def test_aggregate_and_figures_of_the_finetuned_study(study, tmp_path):
    written = aggregate.aggregate([study / "study"], tmp_path / "agg")
    names = {p.name for p in written}
    assert {"finetuned.csv", "finetuned_summary.csv", "comparisons_finetuned.csv"} <= names
    tuned = pd.read_csv(tmp_path / "agg/finetuned.csv")
    summary = pd.read_csv(tmp_path / "agg/finetuned_summary.csv")
    for r in summary.itertuples():  # brute force: means over the two seeds
        g = tuned[(tuned.layer == r.layer) & (tuned.criterion == r.criterion)]
        assert r.n_seeds == 2 and r.heldout_top1 == pytest.approx(g.heldout_top1.mean())
        assert r.heldout_top1_before == pytest.approx(g.heldout_top1_before.mean())
    assert summary.loc[summary.best_baseline, "criterion"].unique().tolist() == ["l1"]
    comp = pd.read_csv(tmp_path / "agg/comparisons_finetuned.csv")
    assert set(comp.versus) == {"loss", "l1"} and (comp.criterion == "car").all()
    for r in comp.itertuples():
        pivot = tuned[tuned.layer == r.layer].pivot(index="seed", columns="criterion",
                                                    values="heldout_top1")
        assert r.diff_mean == pytest.approx((pivot["car"] - pivot[r.versus]).mean())
    out, failed = figures.write_figures([tmp_path / "agg"])
    assert not failed
    assert {"finetuned.png", "differences_finetuned.png"} <= {p.name for p in out}


def _relabel_p(runs) -> float:
    """Brute force of paired_color_count: every way of handing each run's filters picked by
    one criterion only back to A (as many as A had), equally likely; two-sided p."""
    pools = []
    for a, b, sel, dead in runs:
        live = ~dead
        only = sorted(({f for f in a if live[f]} - {f for f in b if live[f]})
                      | ({f for f in b if live[f]} - {f for f in a if live[f]}))
        k = len({f for f in a if live[f]} - {f for f in b if live[f]})
        pools.append([sum(bool(sel[f]) for f in c) for c in itertools.combinations(only, k)])
    totals = [sum(t) for t in itertools.product(*pools)]
    obs = sum(sum(bool(sel[f]) for f in set(a) - set(b) if not dead[f])
              for a, b, sel, dead in runs)
    n = len(totals)
    return min(1.0, 2 * min(sum(t >= obs for t in totals) / n, sum(t <= obs for t in totals) / n))


def test_paired_color_count_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        runs = []
        for _ in range(rng.integers(1, 4)):
            n = int(rng.integers(6, 10))
            a = rng.permutation(n)[:4].tolist()
            b = rng.permutation(n)[:4].tolist()
            sel = torch.tensor(rng.random(n) < 0.5)
            dead = torch.tensor(rng.random(n) < 0.15)
            runs.append((a, b, sel, dead))
        got = paired_color_count(runs)
        assert got["p_value"] == pytest.approx(_relabel_p(runs), abs=1e-12)
        assert got["runs"] == len(runs)


def test_paired_color_count_known_answers():
    sel = torch.tensor([True, True, False, False, True, False])
    # the same top-K: nothing to compare, p = 1
    same = paired_color_count([([0, 2, 4], [4, 2, 0], sel, None)])
    assert same["only_a"] == 0 and same["diff"] == 0 and same["p_value"] == 1
    # A picked the 2 color filters {0, 1}, B the 2 others {2, 3}: 1 of 6 splits, p = 2/6
    one = paired_color_count([([0, 1, 4], [2, 3, 4], sel, None)])
    assert one["diff"] == 2 and one["color_only_a"] == 2 and one["expected_only_a"] == 1
    assert one["p_value"] == pytest.approx(1 / 3)


def test_finetuned_summary_picks_the_baseline_on_validation():
    rows = []
    for seed, layer in itertools.product((0, 1), ("conv1", "conv2")):
        for crit, val, held in (("car", 0.9, 0.9), ("l1", 0.5, 0.8), ("taylor", 0.7, 0.6)):
            rows.append({"model": "m", "dataset": "d", "seed": seed, "layer": layer,
                         "criterion": crit, "filters_remaining": 4, "heldout_top1_full": 1.0,
                         "heldout_top1_before": held - 0.1, "heldout_top1": held,
                         "val_top1": val, "retrain_epochs": 2})
    out = aggregate.finetuned_summary(pd.DataFrame(rows))
    assert out.loc[out.best_baseline, "criterion"].tolist() == ["taylor", "taylor"]


def test_compression_choice_on_validation_known_answer():
    rows = []
    # (criterion, sparsity, bits, ratio, val after, held-out after); pruned: val 0.80
    plan = [("car", 0.6, 4, 20, 0.795, 0.70), ("car", 0.8, 3, 40, 0.792, 0.60),
            ("loss", 0.6, 4, 20, 0.79, 0.70), ("loss", 0.8, 3, 40, 0.77, 0.75)]
    for seed in (0, 1):
        for crit, sp, bits, ratio, val, held in plan:
            base = {"model": "m", "dataset": "d", "layer": "conv1", "seed": seed,
                    "source.criterion": crit, "layer_compression.sparsity": sp,
                    "layer_compression.bits": bits}
            rows += [{**base, "stage": "car_pruned", "ratio": 2.0, "val_top1": 0.80,
                      "heldout_top1": 0.71},
                     {**base, "stage": "huffman", "ratio": ratio, "val_top1": val,
                      "heldout_top1": held + seed / 100}]
    comp = pd.DataFrame(rows)
    choice = aggregate.compression_choice(comp)
    chosen = choice[choice.chosen].set_index("criterion")["setting"]
    # car: 0.8/3 keeps validation within 1 pp (its held-out drop is not looked at)
    assert chosen.to_dict() == {"car": "sparsity 0.8, 3 bits", "loss": "sparsity 0.6, 4 bits"}
    row = choice[(choice.criterion == "car") & choice.chosen].iloc[0]
    assert row.heldout_top1 == pytest.approx(0.605) and row.ratio == 40
    ends = aggregate.compressed_ends(comp, choice)
    assert len(ends) == 4 and set(ends.stage) == {"huffman"}
    diff = aggregate.compare(ends)
    assert diff.diff_mean.iat[0] == pytest.approx(0.60 - 0.70)
