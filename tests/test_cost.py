"""Cost report against hand counts; experiments/compress.py end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from carlib.core.errors import CarlibError
from carlib.models import build_model
from carlib.physical.cost import COLUMNS, cost_report, count_flops, count_params
from carlib.physical.removal import load_pruned, prune_physically

ROOT = Path(__file__).resolve().parents[1]


def conv(cout: int, cin: int, k: int, hw: int) -> tuple[int, int]:
    """(params, FLOPs) of a k x k conv with bias producing hw x hw outputs; 2 FLOPs per MAC."""
    return cout * cin * k * k + cout, 2 * cout * cin * k * k * hw * hw


def linear(cout: int, cin: int) -> tuple[int, int]:
    return cout * cin + cout, 2 * cout * cin


def lenet5_cost(c1: int, c2: int) -> tuple[int, int]:
    """LeNet-5 (28x28, 10 classes) with c1 conv1 and c2 conv2 filters, counted by hand."""
    parts = [conv(c1, 1, 5, 28), conv(c2, c1, 5, 10), linear(120, c2 * 5 * 5), linear(84, 120),
             linear(10, 84)]
    return sum(p for p, _ in parts), sum(f for _, f in parts)


def test_params_and_flops_match_hand_counts():
    model = build_model("lenet5", 10, 1)
    x = torch.zeros(1, 1, 28, 28)
    assert (count_params(model), count_flops(model, x)) == lenet5_cost(6, 16)
    assert lenet5_cost(6, 16)[0] == 61706
    pruned = prune_physically(model, {"conv1": [0, 4], "conv2": [3, 7, 15]}, x)
    assert (count_params(pruned), count_flops(pruned, x)) == lenet5_cost(4, 13)


def test_cost_report():
    model = build_model("resnet_small", 6)
    pruned = prune_physically(model, {"stem": [0, 1], "layer2.0.conv1": list(range(16))},
                              torch.zeros(1, 3, 32, 32))
    df = cost_report({"original": model, "pruned": pruned}, (3, 32, 32), "resnet_small",
                     batch_size=4, runs=3, warmup=1)
    assert list(df.columns) == COLUMNS
    assert list(df.variant) == ["original", "pruned"] and set(df.model) == {"resnet_small"}
    orig, small = df.iloc[0], df.iloc[1]
    assert small.params < orig.params and small.flops < orig.flops
    assert orig.params == count_params(model)
    assert (df[["latency_ms_b1", "latency_ms_bN"]] > 0).all().all()
    assert (df.batch_size == 4).all()
    assert model.training and pruned.training  # modes restored after measuring


def _compress(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    tiny = ["data.n_train=300", "data.n_test=100", "data.val_size=50", "train.epochs=1",
            "++model.widths=[8,8,8,8,8]", "progress=false", "logger.mode=disabled",
            "cost.runs=2", "cost.warmup=1", "cost.batch_size=4"]
    args = [sys.executable, str(ROOT / "experiments" / "compress.py"),
            f"paths.cache_dir={tmp}/cache", f"hydra.run.dir={tmp}/run", *tiny, *overrides]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)


def _curves(path: Path) -> None:
    """A layer-wise curves.csv of alexnet_small on shapes_hard: CAR runs of conv1 and conv2."""
    rows = [{"model": "alexnet_small", "dataset": "shapes_hard", "layer": layer,
             "criterion": "car", "seed": 0, "step": s, "removed_filter": f, "heldout_top1": 0.5}
            for layer, order in (("conv1", [None, 3, 0]), ("conv2", [None, 5, 1, 7]))
            for s, f in enumerate(order)]
    pd.DataFrame(rows).astype({"removed_filter": "Int64"}).to_csv(path, index=False)


def test_compress_end_to_end(tmp_path):
    _curves(tmp_path / "curves.csv")
    res = _compress(tmp_path, f"source.curves={tmp_path}/curves.csv", "source.layer=conv2")
    assert res.returncode == 0, res.stderr[-2000:]
    df = pd.read_csv(tmp_path / "run" / "cost.csv")
    assert list(df.columns) == [*COLUMNS, "heldout_top1"]
    assert list(df.variant) == ["original", "pruned"]
    assert df.params.iat[1] < df.params.iat[0] and df.flops.iat[1] < df.flops.iat[0]
    pruned = load_pruned(tmp_path / "run" / "pruned.pt")
    assert pruned.conv2.out_channels == 5 and pruned.conv1.out_channels == 8
    assert count_params(pruned) == df.params.iat[1]

    bad = _compress(tmp_path, f"source.curves={tmp_path}/curves.csv",
                    f"hydra.run.dir={tmp_path}/run2")
    lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-2000:]
    assert "layer-wise runs of conv1, conv2" in lines[0]
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize("overrides,message", [
    (["source.curves=/nonexistent/curves.csv"], "curves file not found: /nonexistent/curves.csv"),
    ([], "nothing to remove"),
    (["source.curves=CURVES", "model=lenet5"], "is for model ['alexnet_small'], not 'lenet5'"),
    (["source.curves=CURVES", "source.criterion=l1"], "no rows for criterion 'l1'"),
])
def test_compress_bad_source(tmp_path, monkeypatch, overrides, message):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    from compress import removed_filters

    _curves(tmp_path / "curves.csv")
    overrides = [o.replace("CURVES", str(tmp_path / "curves.csv")) for o in overrides]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("compress", overrides=overrides)
    with pytest.raises(CarlibError, match=re.escape(message)):
        removed_filters(cfg)
