"""Physical removal (torch-pruning) against carlib's masks and zeroed channels; pruned files."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import randomize_bn
from torch import nn

from carlib import CarlibError, MaskedNet, prunable_layers
from carlib.models import build_model
from carlib.physical.cost import count_params
from carlib.physical.removal import (
    load_pruned,
    prune_coupled,
    prune_physically,
    removal_rows,
    removal_units,
    removed_per_layer,
    save_pruned,
)

SHAPES = {"lenet5": (1, 28, 28), "alexnet": (3, 96, 96), "resnet50": (3, 64, 64)}


def _model(name: str, bn: bool = False, classes: int = 10) -> nn.Module:
    """`name` with random weights and BatchNorm statistics, in float64 and eval mode."""
    shape = SHAPES.get(name, (3, 32, 32))
    model = build_model(name, classes, shape[0], batchnorm=bn)
    return randomize_bn(model).double().eval()


def _input(name: str, n: int = 2) -> torch.Tensor:
    return torch.randn(n, *SHAPES.get(name, (3, 32, 32)), dtype=torch.float64)


@pytest.mark.parametrize("name,bn,removed", [
    ("lenet5", False, {"conv1": [0, 4], "conv2": [3, 7, 15]}),
    ("alexnet_small", False, {"conv1": [0, 5, 31], "conv3": [2], "conv5": [0, 1, 63]}),
    ("alexnet_small", True, {"conv1": [1, 2, 3], "conv2": [10, 40], "conv5": [7]}),
    ("resnet_small", False, {"stem": [0, 9], "layer1.0.conv1": [3], "layer2.1.conv1": [0, 31],
                             "layer3.0.conv1": list(range(0, 64, 3))}),
    ("alexnet", False, {"features.0": [0, 63], "features.3": [5, 6], "features.10": [100]}),
    ("resnet50", False, {"conv1": [0, 1, 17], "layer1.0.conv1": [2, 60],
                         "layer2.1.conv2": list(range(0, 128, 5))}),
])
def test_physical_equals_masked(name, bn, removed):
    model = _model(name, bn)
    x = _input(name)
    net = MaskedNet(model)
    for layer, idx in removed.items():
        net.remove(layer, idx)
    pruned = prune_physically(model, removed, x[:1])
    with torch.no_grad():
        full, want, got = model(x), net(x), pruned(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - full).abs().max() > 0.01 * full.abs().max(), "uninformative: nothing changed"
    for layer, idx in removed.items():
        n = model.get_submodule(layer).out_channels
        assert pruned.get_submodule(layer).out_channels == n - len(idx)
    assert count_params(pruned) < count_params(model)


@pytest.mark.parametrize("name,layer,convs,consumers", [
    ("resnet_small", "layer2.0.conv2", ("layer2.0.conv2", "layer2.0.downsample.0",
                                        "layer2.1.conv2"),
     ("layer2.1.conv1", "layer3.0.conv1", "layer3.0.downsample.0")),
    # a bottleneck stage's residual stream: every conv3 and the downsample of layer1
    ("resnet50", "layer1.0.conv3", ("layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3",
                                     "layer1.2.conv3"),
     ("layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1", "layer2.0.downsample.0")),
])
def test_coupled_unit_equals_zeroed_residual_stream(name, layer, convs, consumers):
    """Removing a coupled unit == zeroing its channels after every one of its convs' BN."""
    model = _model(name)
    x = _input(name)
    idx = [1, 4, 30]
    pruned = prune_coupled(model, {layer: idx}, x[:1])
    bns = [c.replace("conv", "bn") if "conv" in c else c[:-1] + "1" for c in convs]
    hooks = [model.get_submodule(b).register_forward_hook(
        lambda m, i, o: o.index_fill(1, torch.tensor(idx), 0.0)) for b in bns]
    with torch.no_grad():
        want = model(x)
        for h in hooks:
            h.remove()
        got, full = pruned(x), model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - full).abs().max() > 0.01 * full.abs().max()
    unit = removal_units(model, x[:1], [layer])[layer]
    assert unit.coupled and unit.convs == convs and unit.consumers == consumers
    for c in convs:
        assert pruned.get_submodule(c).out_channels == model.get_submodule(c).out_channels - 3
    for c in consumers:
        m = pruned.get_submodule(c)
        full_in = model.get_submodule(c)
        assert getattr(m, "in_channels", getattr(m, "in_features", None)) == getattr(
            full_in, "in_channels", getattr(full_in, "in_features", None)) - 3


@pytest.mark.parametrize("name,bn", [("lenet5", False), ("alexnet_small", True),
                                     ("resnet_small", False)])
def test_uncoupled_units_are_carlibs_prunable_layers(name, bn):
    model = _model(name, bn)
    units = removal_units(model, _input(name, 1))
    assert [k for k, u in units.items() if not u.coupled] == prunable_layers(model)


def test_resnet_small_prunable_layers():
    """The stem feeds layer1.0's conv1 and downsample (no addition), so it is prunable."""
    names = prunable_layers(build_model("resnet_small", 6))
    assert names == ["stem"] + [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in (0, 1)]


def test_copy_leaves_model_and_modes_alone():
    model = build_model("resnet_small", 6)
    randomize_bn(model).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_physically(model, {"stem": [0], "layer1.0.conv1": [1, 2]},
                              torch.randn(1, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and pruned.training and pruned.stem_bn.training
    kept = [i for i in range(16) if i not in (1, 2)]
    assert torch.equal(pruned.state_dict()["layer1.0.bn1.running_mean"],
                       before["layer1.0.bn1.running_mean"][kept])


@pytest.mark.parametrize("removed,message", [
    ({"conv9": [0]}, "'conv9' is not a conv layer"),
    ({"conv1": [0, 0]}, "distinct indices in 0..31"),
    ({"conv1": [32]}, "distinct indices in 0..31"),
    ({"conv1": list(range(32))}, "cannot remove all 32 filters of conv1"),
])
def test_bad_removals(removed, message):
    model = build_model("alexnet_small", 6)
    with pytest.raises(CarlibError, match=message):
        prune_physically(model, removed, torch.zeros(1, 3, 32, 32))


def test_coupled_layers_refused_or_given_once():
    model, x = build_model("resnet_small", 6), torch.zeros(1, 3, 32, 32)
    with pytest.raises(CarlibError, match="'layer1.0.conv2' is residual-coupled: its channels are "
                       "removed together with those of layer1.0.downsample.0, layer1.1.conv2"):
        prune_physically(model, {"layer1.0.conv2": [0]}, x)
    with pytest.raises(CarlibError, match="one coupled unit"):
        prune_coupled(model, {"layer1.0.conv2": [0], "layer1.1.conv2": [1]}, x)


@pytest.mark.parametrize("cfg,removed", [
    ({"name": "alexnet_small", "num_classes": 6, "batchnorm": True, "widths": [8, 12, 16, 16, 8]},
     {"conv1": [0, 7], "conv2": [3], "conv5": [1, 2]}),
    ({"name": "resnet_small", "num_classes": 6, "widths": [16, 32, 64], "blocks": [2, 2, 2]},
     {"stem": [0, 5], "layer2.0.conv1": [1], "layer3.1.conv2": [4, 8, 63]}),  # one coupled unit
])
def test_save_load_round_trip(tmp_path, cfg, removed):
    model = randomize_bn(build_model(**cfg)).eval()
    x = torch.randn(4, 3, 32, 32)
    pruned = prune_coupled(model, removed, x[:1])
    path = save_pruned(tmp_path / "sub" / "pruned.pt", cfg, removed, pruned.state_dict(),
                       (3, 32, 32))
    assert not list(tmp_path.glob("sub/*.tmp"))
    loaded = load_pruned(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert count_params(loaded) == count_params(pruned) < count_params(model)
    assert loaded.state_dict().keys() == pruned.state_dict().keys()
    kept = torch.load(path, weights_only=True)["kept"]
    assert kept == {k: [i for i in range(model.get_submodule(k).out_channels) if i not in v]
                    for k, v in removed.items()}


def test_load_errors(tmp_path):
    with pytest.raises(CarlibError, match="pruned model not found: /nonexistent/p.pt"):
        load_pruned("/nonexistent/p.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CarlibError, match="not a pruned-model file"):
        load_pruned(tmp_path / "other.pt")
    cfg = {"name": "lenet5", "num_classes": 10, "in_channels": 1}
    full = build_model(**cfg)
    save_pruned(tmp_path / "bad.pt", cfg, {"conv1": [0]}, full.state_dict(), (1, 28, 28))
    with pytest.raises(CarlibError, match="do not fit the pruned lenet5"):
        load_pruned(tmp_path / "bad.pt")


def _curves(network_wide: bool) -> pd.DataFrame:
    rows = []
    if network_wide:
        for crit, order in (("car", [("conv1", 3), ("conv2", 0), ("conv1", 1)]),
                            ("l1", [("conv2", 5)])):
            rows.append({"layer": None, "criterion": crit, "step": 0, "removed_filter": None,
                         "layer_remaining": None, "heldout_top1": 0.9})
            for step, (layer, f) in enumerate(order, 1):
                rows.append({"layer": layer, "criterion": crit, "step": step,
                             "removed_filter": f, "layer_remaining": 7, "heldout_top1": 0.8})
    else:
        for layer in ("conv1", "conv2"):
            for crit, order in (("car", [4, 2, 6]), ("l1", [0, 1])):
                for step, f in enumerate([None, *order]):
                    rows.append({"layer": layer, "criterion": crit, "step": step,
                                 "removed_filter": f, "heldout_top1": 0.9 - step / 10})
    df = pd.DataFrame(rows)
    df["removed_filter"] = df["removed_filter"].astype("Int64")
    return df


def test_removed_filters_from_curves():
    layerwise, wide = _curves(False), _curves(True)
    rows = removal_rows(layerwise, "car", "conv2")
    assert removed_per_layer(rows) == {"conv2": [4, 2, 6]}
    assert rows.heldout_top1.iloc[-1] == pytest.approx(0.6)
    assert removed_per_layer(removal_rows(layerwise, "l1", "conv1", max_removed=1)) == {
        "conv1": [0]}
    with pytest.raises(CarlibError, match="layer-wise runs of conv1, conv2"):
        removal_rows(layerwise, "car")
    assert removed_per_layer(removal_rows(wide, "car")) == {"conv1": [3, 1], "conv2": [0]}
    assert removed_per_layer(removal_rows(wide, "car", max_removed=2)) == {"conv1": [3],
                                                                           "conv2": [0]}
    with pytest.raises(CarlibError, match="no rows for criterion 'taylor'"):
        removal_rows(wide, "taylor")
    with pytest.raises(CarlibError, match="removed twice"):
        removal_rows(pd.concat([wide, wide]), "car")
