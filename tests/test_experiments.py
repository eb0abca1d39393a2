"""Hydra configs compose; experiments/prune.py runs end to end; bad input fails in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_BASE
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from carlib.core.provenance import provenance
from carlib.data.datasets import load_dataset
from carlib.data.shapes import ALL_SHAPES
from carlib.models import load_checkpoint
from carlib.scoring.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
COLUMNS = ["model", "dataset", "layer", "criterion", "seed", "step", "removed_filter",
           "filters_remaining", "scoring_acc", "heldout_top1"]
TINY = [*TINY_BASE, "method.scoring.size=60", "method.n_keep=6"]


def run(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "experiments" / "prune.py"), f"paths.cache_dir={tmp}/cache",
            f"paths.output_dir={tmp}/out", f"hydra.run.dir={tmp}/run", "logger.mode=disabled",
            *overrides]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.parametrize("config", ["prune", "train"])
@pytest.mark.parametrize("model", ["alexnet_small", "lenet5", "alexnet", "resnet50"])
@pytest.mark.parametrize("data", ["shapes", "shapes_hard", "fashion_mnist", "cifar10",
                                  "imagenet"])
def test_configs_compose(config, model, data):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config, overrides=[f"model={model}", f"data={data}", "data.root=/x"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["name"] == model and resolved["data"]["name"] == data


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
@pytest.mark.parametrize("config", ["prune", "interpret"])
def test_experiment_presets_compose(config, preset):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config, overrides=[f"experiment={preset}", "data.root=/x"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["method"]["criteria"] and resolved["method"]["layers"]


def test_prune_end_to_end(tmp_path):
    res = run(tmp_path, *TINY)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "run"
    df = pd.read_csv(out / "curves.csv")
    assert list(df.columns[:len(COLUMNS) - 2]) == COLUMNS[:-2]
    assert set(COLUMNS) <= set(df.columns)
    # 2 layers x 6 criteria x (step 0 + 2 removals: 8 -> 6 filters)
    assert len(df) == 2 * 6 * 3
    assert set(df.criterion) == {"car", "car_random_tie", "loss", "random", "l1",
                                 "mean_activation"}
    assert df.groupby(["layer", "criterion"]).size().eq(3).all()
    assert df[df.step == 2].filters_remaining.eq(6).all()
    assert (out / "curves.png").stat().st_size > 10_000
    # the scoring subset: 60 of the 100 training images held out from training (val split),
    # saved as indices into the generated training data
    idx = [int(i) for i in (out / "scoring_indices.txt").read_text().split()]
    bundle = load_dataset("shapes_hard", n_train=600, n_test=200, val_size=100, seed=0)
    assert len(idx) == 60 and set(idx) <= set(bundle.val_indices.tolist())
    # regime.csv: one row per run; the scoring top-1 is the full network's on those images
    regime = pd.read_csv(out / "regime.csv")
    assert len(regime) == 12 and set(regime.scoring_split) == {"val"}
    model, _ = load_checkpoint(next((tmp_path / "cache" / "checkpoints").glob("*.pt")))
    x, y = load_dataset("shapes_hard", n_train=600, n_test=200, seed=0).train.tensors
    top1 = evaluate(model, [(x[idx], y[idx])])["top1"]
    assert regime.scoring_top1.eq(top1).all()
    first = df[df.step == 0].set_index(["layer", "criterion"]).scoring_acc
    by_run = regime.set_index(["layer", "criterion"])
    assert (by_run.scoring_top1 == first.loc[by_run.index]).all()
    assert (regime.removals == 2).all() and regime.decided.between(0, 1).all()
    tied = df[df.step > 0].groupby(["layer", "criterion"]).tie_break.apply(
        lambda s: s.fillna("").ne("").sum())
    assert (by_run.tied == tied.loc[by_run.index]).all()
    assert (by_run.decided == 1 - by_run.tied / 2).all()
    # paired.csv: each of the 3 CAR-family runs against the 5 other runs of its layer
    paired = pd.read_csv(out / "paired.csv")
    assert len(paired) == 2 * 3 * 5 and (paired.n == 200).all()
    ends = df[df.step == 2].set_index(["layer", "criterion"]).heldout_top1
    for r in paired.itertuples():
        assert r.top1 == pytest.approx(ends[(r.layer, r.criterion)])
        assert r.top1_versus == pytest.approx(ends[(r.layer, r.versus)])
        assert r.diff == pytest.approx(r.top1 - r.top1_versus)
        assert r.lo <= r.diff <= r.hi
    # per-class CAR: 2 layers x 8 filters x 10 classes; with 6 scoring images per class, the
    # class mean is the filter's CAR (checked on the first filter CAR removed from each layer)
    pc = pd.read_csv(out / "per_class_car.csv")
    assert len(pc) == 2 * 8 * 10 and set(pc.class_name) == set(ALL_SHAPES[:10])
    first = df[(df.criterion == "car") & (df.step == 1)]
    for r in first.itertuples():
        drops = pc[(pc.layer == r.layer) & (pc["filter"] == r.removed_filter)].car
        assert drops.mean() == pytest.approx(r.score)
        assert r.score_lo <= r.score <= r.score_hi
    # a second run reuses the cached checkpoint and gives the identical CSV
    again = run(tmp_path, *TINY, f"hydra.run.dir={tmp_path}/run2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "trained" not in again.stdout
    assert (tmp_path / "run2" / "curves.csv").read_bytes() == (out / "curves.csv").read_bytes()


@pytest.mark.parametrize("overrides,message", [
    (["method.layers=[conv9]"], "valid: conv1, conv2, conv3, conv4, conv5"),
    (["method.n_keep=99"], "method.n_keep in 1..8"),
    (["model.checkpoint=/nonexistent/model.pt"], "checkpoint not found: /nonexistent/model.pt"),
    (["data=imagenet", "data.root=/nonexistent", "model=alexnet", "method.scoring.split=train"],
     "/nonexistent"),
    (["data=cifar10", "data.root=/nonexistent"], "/nonexistent"),
    (["model=alexnet", "model.weights=null", "model.weights_path=/nonexistent/w.pth",
      "method.scoring.split=train"], "weights file not found: /nonexistent/w.pth"),
    (["data.val_size=0"], "no images were held out from training; set data.val_size > 0"),
    (["data.val_size=600"], "data.val_size=600 must be in 0..599"),
    (["method.scoring.split=test"], "scoring split 'test' is not one of train, val"),
    (["model=alexnet", "model.weights_path=/x/w.pth"],
     "method.scoring.split=val holds images out of training, but the pretrained weights"),
])
def test_bad_input_one_line(tmp_path, overrides, message):
    res = run(tmp_path, *TINY, *overrides)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert message in lines[0]
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_interpret_end_to_end(tmp_path):
    args = [sys.executable, str(ROOT / "experiments" / "interpret.py"),
            f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run",
            "logger.mode=disabled", "interpret.top_k=3", *TINY]
    res = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "run"
    counts = pd.read_csv(out / "color_counts.csv")
    assert len(counts) == 2 * 6 and counts["top_k"].eq(3).all()
    filters = pd.read_csv(out / "filters.csv")
    assert len(filters) == 16 and set(filters.index_used) == {"weight", "response"}
    classes = pd.read_csv(out / "class_importance.csv")
    assert len(classes) == 16 and classes["most_important"].notna().all()
    for name in ("color_counts", "diversity", "gallery_conv1", "gallery_conv2",
                 "class_importance_conv1"):
        assert (out / f"{name}.png").stat().st_size > 5_000


def test_default_run_benchmark_at_tiny_scale(tmp_path):
    """benchmarks/default_run.py runs prune.py cold then warm and reports both (numbers of a
    tiny run: the benchmark's plumbing, not its timing)."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "default_run.py"),
                          *TINY, "method.criteria=[car,l1]", "method.rank_agreement=false",
                          "method.per_class=false", "--keep", str(tmp_path / "kept")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["run", "wall_s", "peak_rss_mb", "train_s"]
    cold, warm = (ln.split() for ln in lines[1:])
    assert cold[0] == "cold" and warm[0] == "warm" and int(warm[3]) == 0
    assert cold[6] == warm[6] and cold[7] == "4"  # same scoring top-1; 2 layers x 2 criteria
    kept = sorted(p.name for p in (tmp_path / "kept").iterdir())
    assert kept == ["config.yaml", "curves.csv", "curves.png", "paired.csv", "provenance.yaml",
                    "regime.csv", "timings.csv"]


PLUGIN = '''
import torch

from carlib.pruning.criteria import register_criterion


def mine(net, layer, cut, kept, metric):
    """Keeps the highest-numbered filters: removes filter 0, then 1, ..."""
    return torch.tensor(kept, dtype=torch.float64), None


register_criterion("mine", mine, depends="weights")
'''


def test_plugin_criterion_named_on_the_command_line(tmp_path):
    """`plugins=[file.py]` imports a module that registers a criterion before the config's
    criteria are checked, so `method.criteria=[mine]` runs it."""
    plugin = tmp_path / "my_criteria.py"
    plugin.write_text(PLUGIN)
    res = run(tmp_path, *TINY, f"plugins=[{plugin}]", "method.criteria=[mine,l1]",
              "method.layers=[conv2]")
    assert res.returncode == 0, res.stderr[-2000:]
    df = pd.read_csv(tmp_path / "run" / "curves.csv")
    assert set(df.criterion) == {"mine", "l1"}
    assert df[df.criterion == "mine"].removed_filter.dropna().tolist() == [0, 1]
    agree = pd.read_csv(tmp_path / "run" / "rank_agreement.csv")
    assert "mine" in set(agree.criterion)  # the live registry: the plugin's criterion too


@pytest.mark.parametrize("plugin,message", [
    ("no_such_module_xyz", "plugins: cannot import 'no_such_module_xyz' (ModuleNotFoundError"),
    ("/nonexistent/crit.py", "plugins: cannot import '/nonexistent/crit.py' (FileNotFoundError"),
])
def test_plugin_that_cannot_be_imported_is_one_line(tmp_path, plugin, message):
    res = run(tmp_path, *TINY, f"plugins=[{plugin}]", "method.criteria=[mine]")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), res.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_example_plugin_of_the_readme(tmp_path):
    """The README's example plugin (experiments/plugins/max_weight.py) runs as documented and
    removes the filters with the smallest largest absolute weight first."""
    import torch

    from carlib.models import load_checkpoint

    plugin = ROOT / "experiments" / "plugins" / "max_weight.py"
    res = run(tmp_path, *TINY, f"plugins=[{plugin}]", "method.criteria=[max_weight]",
              "method.layers=[conv1]", "method.rank_agreement=false", "method.per_class=false")
    assert res.returncode == 0, res.stderr[-2000:]
    df = pd.read_csv(tmp_path / "run" / "curves.csv")
    removed = df[df.criterion == "max_weight"].removed_filter.dropna().astype(int).tolist()
    (ckpt,) = (tmp_path / "cache" / "checkpoints").glob("*.pt")
    weight = load_checkpoint(ckpt)[0].conv1.weight.detach().flatten(1).abs().amax(1)
    assert removed == torch.argsort(weight, stable=True)[:len(removed)].tolist()


def test_check_images_are_disjoint_from_the_scoring_set(tmp_path):
    """method.scoring.check=K: K further images of the scoring split (val), none of them a
    scoring image; every removal row carries its check columns, regime.csv their shares."""
    res = run(tmp_path, *TINY, "method.scoring.check=30", "method.criteria=[car,l1]",
              "method.layers=[conv2]", "method.rank_agreement=false", "method.per_class=false")
    assert res.returncode == 0, res.stderr[-2000:]
    folder = tmp_path / "run"
    scoring = set(map(int, (folder / "scoring_indices.txt").read_text().split()))
    check = list(map(int, (folder / "check_indices.txt").read_text().split()))
    assert len(check) == len(set(check)) == 30 and not scoring & set(check)
    curves = pd.read_csv(folder / "curves.csv")
    rows = curves[curves.step > 0]
    assert rows.check_same.notna().all() and (rows.check_regret >= 0).all()
    regime = pd.read_csv(folder / "regime.csv")
    for _, r in regime.iterrows():
        mine = rows[rows.criterion == r.criterion]
        assert r.check_same == pytest.approx(mine.check_same.astype(float).mean())
        assert r.check_regret == pytest.approx(mine.check_regret.mean())


def test_size_study_at_tiny_scale(tmp_path):
    """The sizes study's path end to end: runs at two scoring-set sizes (one checked), their
    timings.csv, aggregated into decisions.csv (a row per size and criterion) and decisions.png."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import aggregate
    import figures

    common = [*TINY, "method.criteria=[car,l1]", "method.layers=[conv2]",
              "method.rank_agreement=false", "method.per_class=false"]
    for n, k in ((30, 30), (60, 0)):
        res = run(tmp_path, *common, f"method.scoring.size={n}", f"method.scoring.check={k}",
                  f"hydra.run.dir={tmp_path}/study/n{n}")
        assert res.returncode == 0, res.stderr[-2000:]
        t = pd.read_csv(tmp_path / "study" / f"n{n}" / "timings.csv")
        assert t.criterion.tolist() == ["car", "l1"] and (t.seconds > 0).all()
        assert (t.resumed_at == 0).all()
        made = OmegaConf.load(tmp_path / "study" / f"n{n}" / "provenance.yaml")
        assert made == OmegaConf.create(provenance())  # also in regime.csv and timings.csv
        regime = pd.read_csv(tmp_path / "study" / f"n{n}" / "regime.csv")
        for frame in (t, regime):
            assert (frame.carlib_version == made.carlib_version).all()
            assert (frame.git_commit == made.git_commit).all()
    assert aggregate.main([str(tmp_path / "study")]) == 0
    d = pd.read_csv(tmp_path / "study" / "decisions.csv")
    assert sorted(zip(d["method.scoring.size"], d.criterion)) == [
        (30, "car"), (30, "l1"), (60, "car"), (60, "l1")]
    assert d.check_seeds.tolist() == [1, 1, 0, 0] or d.check_seeds.tolist() == [0, 0, 1, 1]
    assert d.resolved.between(0, 1).all() and (d.seconds > 0).all()
    # l1 reads no images: the same removals at both sizes, so the same end top-1
    l1 = d[d.criterion == "l1"].heldout_top1
    assert l1.nunique() == 1
    drawn = figures.make_figures(tmp_path / "study" / "decisions.csv")
    assert list(drawn) == ["decisions.png"]


def test_check_larger_than_what_is_left_is_one_line(tmp_path):
    res = run(tmp_path, *TINY, "method.scoring.check=41")  # val_size 100 - scoring 60 = 40
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "method.scoring.check=41: only 40 images" in lines[0]
