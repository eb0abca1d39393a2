"""CAR scores against a brute-force reference that builds the physically smaller network."""

from __future__ import annotations

import pytest
import torch
from conftest import physically_pruned, randomize_bn, self_labelled

from carlib import CarlibError, car_scores, prunable_layers
from carlib.models import build_model
from carlib.scoring.evaluate import evaluate


def brute_force_car(model, layer, data, example, removed=None, k=1):
    """accuracy(full) - accuracy(filter physically removed), one full network per filter."""
    removed = removed or {}
    base = physically_pruned(model, removed, example) if removed else model
    def correct(m):  # exact count of hits, so the comparison below can be exact
        r = evaluate(m, data)
        return round(r[f"top{k}"] * r["n"]), r["n"]

    c0, total = correct(base)
    n = model.get_submodule(layer).out_channels
    out = torch.full((n,), float("nan"), dtype=torch.float64)
    for c in range(n):
        if c in removed.get(layer, []):
            continue
        r = {**removed, layer: [*removed.get(layer, []), c]}
        out[c] = (c0 - correct(physically_pruned(model, r, example))[0]) / total
    return out


def _case(name: str, bn: bool = False, n: int = 96, classes: int = 6):
    shape = (1, 28, 28) if name == "lenet5" else (3, 32, 32)
    model = build_model(name, classes, shape[0], batchnorm=bn, widths=(8, 12, 16, 16, 8))
    for m in model.modules():  # keep the signal alive through depth at random init
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    model = randomize_bn(model).double().eval()
    x = torch.randn(n, *shape, dtype=torch.float64)
    y = self_labelled(model, x)
    data = [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]
    return model, data, x[:2]


@pytest.mark.parametrize("name,bn,layer", [
    ("alexnet_small", True, "conv1"),   # conv -> BatchNorm: mask after BN
    ("alexnet_small", True, "conv2"),
    ("alexnet_small", False, "conv5"),  # consumer is a linear layer after flatten
    ("lenet5", False, "conv2"),
])
def test_car_equals_physical_removal(name, bn, layer):
    model, data, example = _case(name, bn)
    got = car_scores(model, layer, data)
    want = brute_force_car(model, layer, data, example)
    assert torch.equal(got, want)
    assert (got != 0).any(), "case is uninformative: no filter changes accuracy"


def test_car_given_removed_filters_and_top5():
    model, data, example = _case("alexnet_small", bn=True, classes=10)
    removed = {"conv1": [0, 3], "conv2": [5]}
    got = car_scores(model, "conv2", data, removed=removed)
    want = brute_force_car(model, "conv2", data, example, removed)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got[~torch.isnan(got)], want[~torch.isnan(want)])
    got5 = car_scores(model, "conv1", data, metric="top5")
    assert torch.equal(got5, brute_force_car(model, "conv1", data, example, k=5))


def test_zeroing_weights_is_not_removal_with_bn():
    """With a following BN, zeroing the filter's weights leaves the BN bias: not removal."""
    model, data, example = _case("alexnet_small", bn=True)
    want = brute_force_car(model, "conv1", data, example)
    zeroed = []
    acc0 = evaluate(model, data)["top1"]
    for c in range(model.conv1.out_channels):
        w = model.conv1.weight.data[c].clone()
        model.conv1.weight.data[c] = 0
        zeroed.append(acc0 - evaluate(model, data)["top1"])
        model.conv1.weight.data[c] = w
    assert not torch.equal(torch.tensor(zeroed, dtype=torch.float64), want)


def test_car_leaves_model_unchanged():
    model, data, _ = _case("alexnet_small", bn=True)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    car_scores(model, "conv2", data)
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_prunable_layers():
    assert prunable_layers(build_model("alexnet_small", 6)) == [f"conv{i}" for i in range(1, 6)]
    assert prunable_layers(build_model("lenet5", 10, 1)) == ["conv1", "conv2"]
    assert prunable_layers(build_model("alexnet", 1000)) == [
        "features.0", "features.3", "features.6", "features.8", "features.10"]
    names = prunable_layers(build_model("resnet50", 1000))
    assert "layer1.0.conv1" in names and "layer1.0.conv3" not in names
    model = build_model("resnet50", 1000)
    total = sum(model.get_submodule(n).out_channels for n in names)
    assert total == 7616  # stem + bottleneck conv1/conv2 of torchvision ResNet-50


def test_unknown_layer_lists_valid_ones():
    model, data, _ = _case("alexnet_small")
    with pytest.raises(CarlibError, match="valid: conv1, conv2"):
        car_scores(model, "conv9", data)
    with pytest.raises(CarlibError, match="unknown metric"):
        car_scores(model, "conv1", data, metric="top3")


def test_per_class_car_equals_physical_removal_by_class():
    model, data, example = _case("alexnet_small", bn=True, classes=4)
    got = car_scores(model, "conv2", data, per_class=True)
    x = torch.cat([b for b, _ in data])
    y = torch.cat([t for _, t in data])
    base = model(x).argmax(1) == y
    for c in range(got.shape[0]):
        pruned = physically_pruned(model, {"conv2": [c]}, example)
        hit = pruned(x).argmax(1) == y
        for k in range(4):
            sel = y == k
            want = (base[sel].sum() - hit[sel].sum()).double() / sel.sum()
            assert got[c, k].item() == want.item()
    # the per-class drops weighted by class share give the overall CAR
    share = torch.bincount(y, minlength=4).double() / len(y)
    assert torch.allclose(got @ share, car_scores(model, "conv2", data))
