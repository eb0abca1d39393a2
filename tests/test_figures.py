"""experiments/figures.py redraws every figure from the CSVs of real tiny runs;
experiments/aggregate.py concatenates a joblib multirun and summarizes it (brute-force checks)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_BASE

from carlib.analysis.classes import per_class_frame
from carlib.viz.plotting import plot_curves, plot_differences, plot_summary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import aggregate  # noqa: E402
import figures  # noqa: E402

# LeNet-5 learns the shapes to ~78% in 5 s: curves and CAR are not flat
SMALL = ["model=lenet5", "data=shapes", "data.val_size=300", "data.image_size=28",
         "data.n_train=2000", "data.n_test=300",
         "train.epochs=5", "train.lr=0.01", "train.batch_size=64", "method.scoring.size=120",
         "method.keep_fraction=0.5", "progress=false", "threads=1", "logger.mode=disabled"]
TINY = [*TINY_BASE, "method.scoring.size=60", "method.n_keep=6", "logger.mode=disabled"]


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / name), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def pngs(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*.png")}


def assert_drawn(path: Path) -> None:
    """A real figure: not tiny, and neither blank nor one flat color."""
    assert path.stat().st_size > 10_000, path
    img = matplotlib.image.imread(path)[..., :3]
    assert img.std() > 0.05 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50, path


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """results/prune (prune.py) and results/interpret (interpret.py on prune's curves)."""
    tmp = tmp_path_factory.mktemp("figures")
    cache = f"paths.cache_dir={tmp}/cache"
    ok(script("prune.py", cache, f"hydra.run.dir={tmp}/results/prune", *SMALL))
    ok(script("interpret.py", cache, f"hydra.run.dir={tmp}/results/interpret",
              f"interpret.source={tmp}/results/prune", "interpret.top_k=3", *SMALL))
    return tmp / "results"


def test_figures_redrawn_from_csvs(results, tmp_path):
    drawn = (results / "prune" / "curves.png").read_bytes()
    for p in results.rglob("*.png"):
        p.unlink()
    res = ok(script("figures.py", str(results)))
    expected = {"prune/curves.png", "prune/rank_agreement.png",
                "prune/class_importance_conv1.png", "prune/class_importance_conv2.png",
                "interpret/color_counts.png", "interpret/diversity.png"}
    assert pngs(results) == expected
    assert {str(Path(p).relative_to(results)) for p in res.stdout.split()} == expected
    for name in expected:
        assert_drawn(results / name)
    # the same function on the same numbers: prune.py's own figure, byte for byte
    assert (results / "prune" / "curves.png").read_bytes() == drawn


def test_aggregate_runs_copied_without_hydra(results, tmp_path):
    """results/<study>/<run>/*.csv (CSVs copied, no .hydra/): runs are the CSV folders."""
    study = tmp_path / "study"
    for run, src in (("seed0", "prune"), ("interpret_seed0", "interpret")):
        (study / run).mkdir(parents=True)
        for csv in (results / src).glob("*.csv"):
            shutil.copy(csv, study / run)
    assert aggregate.main([str(study)]) == 0
    assert pd.read_csv(study / "runs.csv").run.tolist() == ["interpret_seed0", "seed0"]
    own = pd.read_csv(results / "prune" / "curves.csv")
    curves = pd.read_csv(study / "curves.csv")
    assert curves.run.eq("seed0").all() and len(curves) == len(own)
    summary = pd.read_csv(study / "summary.csv")
    ends = own.groupby(["layer", "criterion"], sort=False).heldout_top1.last()
    assert summary.set_index(["layer", "criterion"]).heldout_top1_mean.to_dict() == ends.to_dict()
    assert summary.n.eq(1).all() and summary.heldout_top1_std.isna().all()
    assert len(pd.read_csv(study / "color_counts.csv")) == 2 * 6  # the default criteria


def test_class_matrix_round_trip():
    """per_class_car.csv rows -> the filters x classes matrix car_scores(per_class=True) gave."""
    g = torch.Generator().manual_seed(0)
    m = torch.rand(6, 4, generator=g, dtype=torch.float64) - 0.3
    m[[1, 4]] = float("nan")        # removed filters: no rows
    m[2, 3] = float("nan")          # a class absent from the scoring set
    rows = per_class_frame(m, ["a", "b", "c", "d"], "conv1")
    rebuilt, classes = figures.class_matrix(rows)
    assert classes == ["a", "b", "c", "d"]
    torch.testing.assert_close(rebuilt, m, equal_nan=True)
    # two runs of the same model: the same matrix (their mean)
    twice, _ = figures.class_matrix(pd.concat([rows, rows]))
    torch.testing.assert_close(twice, m, equal_nan=True)


def test_plot_curves_seeds_and_rows():
    """Seeds: the line is their mean; `row`: one row of panels per configuration."""
    rng = np.random.default_rng(0)
    rows = [{"config": c, "layer": layer, "criterion": crit, "seed": s,
             "filters_remaining": f, "heldout_top1": rng.random()}
            for c in ("a", "b") for layer in ("conv1", "conv2") for crit in ("car", "l1")
            for s in range(3) for f in (8, 7, 6)]
    df = pd.DataFrame(rows)
    fig = plot_curves(df, row="config")
    assert np.array(fig.axes).size == 4
    ax = fig.axes[3]                                       # row b, panel conv2
    assert ax.get_title() == "b\nconv2"
    line = next(ln for ln in ax.lines if ln.get_label() == "l1")
    want = df[(df.config == "b") & (df.layer == "conv2") & (df.criterion == "l1")].groupby(
        "filters_remaining").heldout_top1.mean() * 100
    np.testing.assert_allclose(line.get_ydata(), want.sort_index().to_numpy())
    assert len(plot_curves(df[df.config == "a"]).axes) == 2  # no row: as before


@pytest.mark.parametrize("studies", [1, 12])
def test_plot_differences_title_above_panels_with_little_room(studies):
    """The two-line title sits above every panel, close to the top panels, short or tall."""
    diffs = pd.DataFrame([dict(study=f"s{i}", layer=layer, versus=v, comparison="all",
                               n_seeds=5, diff_mean=0.01, diff_lo=-0.01, diff_hi=0.03)
                          for i in range(studies) for layer in ("conv1", "conv2")
                          for v in ("loss", "l1")])
    fig = plot_differences(diffs, row="study", title="a title\nits second line")
    fig.canvas.draw()
    title = fig._suptitle.get_window_extent()
    tops = [ax.title.get_window_extent().y1 for ax in fig.axes if ax.get_visible()]
    gap = (title.y0 - max(tops)) / fig.dpi  # inches between the title and the top panels
    assert 0 < gap < 0.5 and title.y1 <= fig.bbox.y1


def test_plot_summary_says_when_the_regime_is_pooled():
    rows = [dict(layer="conv1", criterion=c, condition=f"size={n}", n=2, heldout_top1_mean=0.7,
                 heldout_top1_std=0.01, scoring_top1=0.7 + n / 1e5, car_decided=0.9)
            for n in (250, 4000) for c in ("car", "loss")]
    one = plot_summary(pd.DataFrame(rows[:2])).axes[0].get_title()
    both = plot_summary(pd.DataFrame(rows)).axes[0].get_title()
    assert "car decided 90% of removals" in one and "configurations" not in one
    assert both.endswith("scoring top-1 0.72, car decided 90% of removals\n"
                         "(mean over 2 configurations)")


def test_summarize_brute_force():
    """End-of-run held-out top-1: mean, std, n over seeds per configuration, layer, criterion;
    a network-wide run counts as one unit named by its layers."""
    rng = np.random.default_rng(1)
    rows = []
    for metric in ("top1", "loss"):
        for seed in range(3):
            run = f"{metric}-{seed}"
            for layer in ("conv1", "conv2"):
                for crit in ("car", "random"):
                    for step in range(4):
                        rows.append({"run": run, "model": "m", "dataset": "d", "layer": layer,
                                     "criterion": crit, "seed": seed, "step": step,
                                     "filters_remaining": 8 - step,
                                     "heldout_top1": rng.random(), "method.metric": metric,
                                     "method.criteria": "[car,random]"})
    curves = pd.DataFrame(rows)
    conds = aggregate.condition_columns(curves, ["model", "method.metric", "method.criteria",
                                                 "seed", "run"])
    assert conds == ["method.metric"]
    got = aggregate.summarize(curves, conds)
    assert len(got) == 2 * 2 * 2 and got["n"].eq(3).all()
    for r in got.to_dict("records"):
        ends, starts = [], []
        for seed in range(3):
            g = [x for x in rows if x["method.metric"] == r["method.metric"]
                 and x["layer"] == r["layer"] and x["criterion"] == r["criterion"]
                 and x["seed"] == seed]
            ends.append(max(g, key=lambda x: x["step"])["heldout_top1"])
            starts.append(min(g, key=lambda x: x["step"])["heldout_top1"])
        assert r["heldout_top1_mean"] == pytest.approx(np.mean(ends))
        assert r["heldout_top1_std"] == pytest.approx(np.std(ends, ddof=1))
        assert r["heldout_top1_full"] == pytest.approx(np.mean(starts))
        assert r["filters_remaining"] == 5
    # network-wide rows: layer is the removed filter's (empty at step 0)
    glob = pd.DataFrame({"layer": [None, "conv2", "conv1"], "criterion": "car", "seed": 0,
                         "step": [0, 1, 2], "filters_remaining": [24, 23, 22],
                         "layer_remaining": [None, 15, 7], "heldout_top1": [0.9, 0.8, 0.7]})
    assert aggregate.pruned_unit(glob).tolist() == ["conv1+conv2"] * 3
    s = aggregate.summarize(glob)
    assert s[["layer", "n", "heldout_top1_mean"]].values.tolist() == [["conv1+conv2", 1, 0.7]]


def test_decisions_brute_force():
    """decisions.csv per size, layer and criterion: end top-1 and gap with scipy's t-interval
    over seeds (none for one seed), shares pooled over removals, checked seeds only for the
    check columns, seconds of fresh (not resumed) runs."""
    from scipy import stats
    rng = np.random.default_rng(3)
    curves, regime, timings = [], [], []
    for size in (250, 1000):
        for seed in range(3 if size == 250 else 1):
            run = f"n{size}-s{seed}"
            for crit in ("car", "l1"):
                for step in range(3):
                    curves.append({"run": run, "model": "m", "dataset": "d", "layer": "conv1",
                                   "criterion": crit, "seed": seed, "step": step,
                                   "filters_remaining": 6 - step, "heldout_top1": rng.random(),
                                   "scoring_acc": rng.random(), "method.scoring.size": size})
                checked = seed == 0
                regime.append({"run": run, "model": "m", "dataset": "d", "layer": "conv1",
                               "criterion": crit, "seed": seed, "scoring_top1": 0.7,
                               "removals": 2 + seed, "resolved": rng.random(),
                               "check_same": rng.random() if checked else np.nan,
                               "check_regret": rng.random() if checked else np.nan,
                               "check_rho": rng.random() if checked else np.nan,
                               "method.scoring.size": size})
                timings.append({"run": run, "model": "m", "dataset": "d", "layer": "conv1",
                                "criterion": crit, "seed": seed, "seconds": 10.0 + seed,
                                "resumed_at": 1 if seed == 2 else 0,
                                "method.scoring.size": size})
    curves, regime, timings = map(pd.DataFrame, (curves, regime, timings))
    got = aggregate.decisions(curves, regime, ["method.scoring.size"], timings)
    assert len(got) == 4
    for r in got.to_dict("records"):
        mine = curves[(curves.criterion == r["criterion"])
                      & (curves["method.scoring.size"] == r["method.scoring.size"])]
        ends = mine.loc[mine.groupby("seed").step.idxmax()]
        reg = regime[(regime.criterion == r["criterion"])
                     & (regime["method.scoring.size"] == r["method.scoring.size"])]
        assert r["n_seeds"] == len(ends)
        for col, v in (("heldout_top1", ends.heldout_top1),
                       ("gap", ends.scoring_acc - ends.heldout_top1)):
            assert r[col] == pytest.approx(v.mean())
            if len(v) > 1:
                ci = stats.ttest_1samp(v, 0).confidence_interval(0.95)
                assert (r[f"{col}_lo"], r[f"{col}_hi"]) == pytest.approx((ci.low, ci.high))
            else:
                assert np.isnan(r[f"{col}_lo"]) and np.isnan(r[f"{col}_hi"])
        w = reg.removals
        assert r["resolved"] == pytest.approx((reg.resolved * w).sum() / w.sum())
        c = reg[reg.seed == 0]
        assert r["check_seeds"] == 1
        assert r["check_same"] == pytest.approx(c.check_same.iat[0])
        assert r["check_rho"] == pytest.approx(c.check_rho.iat[0])
        assert r["seconds"] == pytest.approx(10.5 if len(ends) == 3 else 10.0)


def test_comparisons_brute_force():
    """comparisons.csv: CAR minus each criterion per seed (matched by seed across runs), scipy's
    t-test, Holm over the folder's family (statsmodels), TOST only against the ablations."""
    from scipy import stats
    from statsmodels.stats.multitest import multipletests
    rng = np.random.default_rng(5)
    rows = []
    for seed in range(4):
        for run, crits in (("a", ("car", "loss")), ("b", ("l1",))):
            for crit in crits:
                for step in range(2):
                    rows.append({"run": f"{run}{seed}", "model": "m", "dataset": "d",
                                 "layer": "conv1", "criterion": crit, "seed": seed,
                                 "step": step, "filters_remaining": 4 - step,
                                 "heldout_top1": 0.6 + (crit == "car") * 0.01 * step
                                 + 0.01 * rng.standard_normal()})
    curves = pd.DataFrame(rows)
    got = aggregate.comparisons(curves).set_index("versus")
    end = curves[curves.step == 1].set_index(["criterion", "seed"]).heldout_top1
    p = {}
    for other in ("loss", "l1"):
        d = (end["car"] - end[other]).to_numpy()
        t = stats.ttest_1samp(d, 0.0)
        assert got.loc[other, "diff_mean"] == pytest.approx(d.mean())
        assert got.loc[other, "p_value"] == pytest.approx(t.pvalue)
        p[other] = t.pvalue
    holm = multipletests([p["loss"], p["l1"]], method="holm")[1]
    assert got.loc[["loss", "l1"], "p_holm"].tolist() == pytest.approx(holm.tolist())
    assert np.isnan(got.loc["l1", "p_tost"]) and not np.isnan(got.loc["loss", "p_tost"])
    assert got.loc["loss", "p_tost_holm"] == pytest.approx(got.loc["loss", "p_tost"])
    assert set(got["verdict"]) <= {"higher", "lower", "inconclusive", "equivalent within ±2 pp"}


def test_joblib_multirun_aggregates(tmp_path):
    """2 criteria x 2 seeds with the joblib launcher, aggregated and plotted."""
    multi = tmp_path / "multi"
    ok(script("prune.py", "-m", "hydra/launcher=local", f"paths.cache_dir={tmp_path}/cache",
              f"hydra.sweep.dir={multi}", *TINY, "method.criteria=[car],[random]", "seed=0,1"))
    jobs = [multi / str(i) for i in range(4)]
    assert aggregate.main([str(multi)]) == 0     # in-process: the same code as the command
    runs = pd.read_csv(multi / "runs.csv")
    assert runs.run.tolist() == [0, 1, 2, 3]
    assert runs["method.criteria"].tolist() == ["[car]", "[car]", "[random]", "[random]"]
    assert runs.seed.tolist() == [0, 1, 0, 1]
    # one row per measurement: 4 runs x 2 layers x (step 0 + 2 removals)
    curves = pd.read_csv(multi / "curves.csv")
    assert len(curves) == 4 * 2 * 3
    for i, job in enumerate(jobs):
        own = pd.read_csv(job / "curves.csv")
        mine = curves[curves.run == i].drop(columns=["run", *runs.columns.drop(["run", "seed"])])
        # (an all-empty column of one run reads as float, of all runs as str: values compared)
        pd.testing.assert_frame_equal(mine.reset_index(drop=True), own, check_dtype=False)
    ranks = pd.read_csv(multi / "rank_agreement.csv")
    assert len(ranks) == 4 * 2 * 7 and set(ranks.seed) == {0, 1}   # seed: not a column before
    assert len(pd.read_csv(multi / "per_class_car.csv")) == 4 * 2 * 8 * 10
    summary = pd.read_csv(multi / "summary.csv")
    assert len(summary) == 2 * 2 and summary.n.eq(2).all()
    for r in summary.itertuples():
        ends = [pd.read_csv(j / "curves.csv").query("layer == @r.layer and criterion == "
                                                    "@r.criterion").heldout_top1.iat[-1]
                for j in jobs if (pd.read_csv(j / "curves.csv").criterion == r.criterion).any()]
        assert len(ends) == 2
        assert r.heldout_top1_mean == pytest.approx(np.mean(ends))
        assert r.heldout_top1_std == pytest.approx(np.std(ends, ddof=1))
    before = pngs(multi)
    tables = ["curves.csv", "rank_agreement.csv", "per_class_car.csv", "summary.csv"]
    assert figures.main([str(multi / name) for name in tables]) == 0
    # per-class CAR differs only by seed, and each job's folder holds its own table: the
    # class-importance figures belong there, not in the aggregate
    new = {"curves.png", "rank_agreement.png", "summary.png"}
    assert pngs(multi) - before == new
    for name in new:
        assert_drawn(multi / name)
    assert figures.main([str(jobs[0])]) == 0
    assert {"class_importance_conv1.png", "class_importance_conv2.png"} <= {
        p.name for p in jobs[0].glob("*.png")}


def test_bad_input_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert aggregate.main([str(empty)]) == 2
    assert figures.main([str(tmp_path / "missing")]) == 2
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "curves.csv").write_text("layer,criterion\nconv1,car\n")
    assert aggregate.main([str(run)]) == 2          # would write into the run folder
    assert figures.main([str(run)]) == 2            # curves.csv without its columns
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)
    assert "no run folders" in err[0] and "does not exist" in err[1]
    assert "--out" in err[2] and "curves.csv: cannot plot" in err[3]


def test_figures_command_rebuilds_every_committed_figure(tmp_path):
    """Every PNG in results/ (except model-drawn galleries) comes back from its CSVs alone."""
    results = ROOT / "results"
    committed = {p.relative_to(results) for p in results.rglob("*.png")
                 if not p.name.startswith("gallery_")}
    if not committed:
        pytest.skip("results/ holds no figures")
    copy = tmp_path / "results"
    shutil.copytree(results, copy, ignore=shutil.ignore_patterns("*.png"))
    written, failed = figures.write_figures([copy])
    assert not failed
    assert {p.relative_to(copy) for p in written} == committed


def test_negative_margin_is_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert aggregate.main([str(tmp_path / "run"), "--margin", "-0.02"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--margin" in err[0]


def test_class_importance_left_to_each_run_folder(tmp_path):
    """A swept setting x seeds: every run's folder holds its own per-class table, so the
    aggregate draws no class-importance figure; without those folders it draws one per
    setting and seed."""
    rows = [{"layer": "conv1", "filter": f, "class_index": k, "class_name": f"c{k}",
             "car": 0.01 * (f - k), "seed": s, "run": f"seed{s}-k{kk}", "method.k": kk}
            for s in (0, 1) for kk in (1, 4) for f in range(3) for k in range(2)]
    df = pd.DataFrame(rows)
    table = figures.Table(df, ["method.k"], "", tmp_path / "per_class_car.csv")
    drawn = figures.per_class_figures(table)
    assert len(drawn) == 4 and all(n.startswith("class_importance_conv1_") for n in drawn)
    for run, g in df.groupby("run"):
        (tmp_path / run).mkdir()
        g.to_csv(tmp_path / run / "per_class_car.csv", index=False)
    assert figures.per_class_figures(table) == {}
    (tmp_path / "seed1-k4" / "per_class_car.csv").unlink()   # one run without its table
    assert len(figures.per_class_figures(table)) == 4
