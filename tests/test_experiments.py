"""Hydra configs compose; experiments/prune.py runs end to end; bad input fails in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
COLUMNS = ["model", "dataset", "layer", "criterion", "seed", "step", "removed_filter",
           "filters_remaining", "scoring_acc", "heldout_top1"]
TINY = ["data.n_train=600", "data.n_test=200", "train.epochs=1", "method.scoring.size=60",
        "++model.widths=[8,8,8,8,8]", "method.n_keep=6", "progress=false", "threads=1"]


def run(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "experiments" / "prune.py"), f"paths.cache_dir={tmp}/cache",
            f"paths.output_dir={tmp}/out", f"hydra.run.dir={tmp}/run", "logger.mode=disabled",
            *overrides]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.parametrize("config", ["prune", "train"])
@pytest.mark.parametrize("model", ["alexnet_small", "lenet5", "alexnet", "resnet50"])
@pytest.mark.parametrize("data", ["shapes", "fashion_mnist", "cifar10", "imagenet"])
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
    # 2 layers x 3 criteria x (step 0 + 2 removals: 8 -> 6 filters)
    assert len(df) == 2 * 3 * 3
    assert df.groupby(["layer", "criterion"]).size().eq(3).all()
    assert df[df.step == 2].filters_remaining.eq(6).all()
    assert (out / "curves.png").stat().st_size > 10_000
    idx = (out / "scoring_indices.txt").read_text().split()
    assert len(idx) == 60
    # per-class CAR: 2 layers x 8 filters x 6 classes; with 10 scoring images per class, the
    # class mean is the filter's CAR (checked on the first filter CAR removed from each layer)
    pc = pd.read_csv(out / "per_class_car.csv")
    assert len(pc) == 2 * 8 * 6 and set(pc.class_name) == {"circle", "square", "triangle",
                                                           "cross", "star", "ring"}
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
    (["data=imagenet", "data.root=/nonexistent", "model=alexnet"], "/nonexistent"),
    (["data=cifar10", "data.root=/nonexistent"], "/nonexistent"),
    (["model=alexnet", "model.weights=null", "model.weights_path=/nonexistent/w.pth"],
     "weights file not found: /nonexistent/w.pth"),
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
    assert len(counts) == 2 * 3 and counts["top_k"].eq(3).all()
    filters = pd.read_csv(out / "filters.csv")
    assert len(filters) == 16 and set(filters.index_used) == {"weight", "response"}
    classes = pd.read_csv(out / "class_importance.csv")
    assert len(classes) == 16 and classes["most_important"].notna().all()
    for name in ("color_counts", "diversity", "gallery_conv1", "gallery_conv2",
                 "class_importance_conv1"):
        assert (out / f"{name}.png").stat().st_size > 5_000
