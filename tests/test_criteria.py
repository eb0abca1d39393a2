"""Criteria against hand-computed values or brute-force references on constructed networks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn, self_labelled
from torch import nn

from carlib import CarlibError, MaskedNet, greedy_prune
from carlib.models import build_model
from carlib.pruning.criteria import CRITERIA, get_criterion, make_random, relu_follows
from carlib.scoring.cuts import LayerData


class OneByOne(nn.Module):
    """conv1 (1x1, identity weights, bias `bias`) -> [ReLU] -> flatten -> fc."""

    def __init__(self, channels: int, bias: list[float] | None = None, relu: bool = True
                 ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.conv1.weight.data = torch.eye(channels).view(channels, channels, 1, 1)
        self.conv1.bias.data = torch.tensor(bias or [0.0] * channels)
        self.relu = relu
        self.fc = nn.Linear(channels * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        return self.fc(torch.flatten(torch.relu(h) if self.relu else h, 1))


def scores(model: nn.Module, name: str, data: list, layer: str = "conv1", seed: int = 0
           ) -> torch.Tensor:
    net = MaskedNet(model.eval())
    kept = list(range(net.unit(layer).num_filters))
    with torch.no_grad():
        return get_criterion(name, seed)(net, layer, LayerData(net, layer, data), kept, "top1")[0]


def test_l2_order_on_constructed_weights():
    model = OneByOne(4)
    w = torch.tensor([[3.0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 0, 0], [0.5, -0.5, 0.5, 0.5]])
    model.conv1.weight.data = w.view(4, 4, 1, 1)
    data = [(torch.randn(6, 4, 2, 2), torch.zeros(6, dtype=torch.long))]
    assert scores(model, "l2", data).tolist() == pytest.approx([3, 2, 8 ** 0.5, 1])
    assert scores(model, "l1", data).tolist() == pytest.approx([3, 4, 4, 2])
    assert greedy_prune(model, "conv1", data, 1, "l2", progress=False).removed == [3, 1, 2]
    t = greedy_prune(model, "conv1", data, 1, "l1", progress=False)  # 1 and 2 tie on L1
    assert t.removed[:2] == [3, 0] and t.to_frame()["tie_size"].tolist() == [0, 1, 1, 2]


def constructed_activations() -> list:
    """Channel c is negative at exactly `neg[c]` of 8 positions (2 images x 2x2) per batch."""
    neg = [2, 4, 6, 0]
    batches = []
    for b in range(2):
        x = torch.empty(2, 4, 2, 2)
        for c, k in enumerate(neg):
            v = torch.arange(1.0, 9.0) * (c + 1) + b  # positive, distinct
            v[:k] = -v[:k]
            x[:, c] = v.view(2, 2, 2)
        batches.append((x, torch.zeros(2, dtype=torch.long)))
    return batches


def test_apoz_and_mean_activation_on_constructed_activations():
    data = constructed_activations()
    model = OneByOne(4)
    assert scores(model, "apoz", data).tolist() == pytest.approx([0.75, 0.5, 0.25, 1.0])
    x = torch.cat([b for b, _ in data])
    want = x.clamp_min(0).transpose(0, 1).reshape(4, -1).double().mean(1)
    assert torch.allclose(scores(model, "mean_activation", data), want)
    # highest APoZ first; dead channels (APoZ 1) tie and go by the smaller loss increase
    assert greedy_prune(model, "conv1", data, 1, "apoz", progress=False).removed == [2, 1, 0]
    # without a ReLU after the mask point: the raw channel, and APoZ counts exact zeros only
    raw = OneByOne(4, relu=False)
    assert not relu_follows(MaskedNet(raw), "conv1") and relu_follows(MaskedNet(model), "conv1")
    plain = MaskedNet(build_model("alexnet_small", 6, 3, batchnorm=False))  # nn.Identity BN
    assert all(relu_follows(plain, name) for name in plain.units)
    assert torch.allclose(scores(raw, "mean_activation", data),
                          x.transpose(0, 1).reshape(4, -1).double().mean(1))
    assert scores(raw, "apoz", data).tolist() == [1.0] * 4


def _bn_case(n: int = 48):
    model = build_model("alexnet_small", 6, 3, batchnorm=True, widths=(8, 12, 16, 16, 8))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    model = randomize_bn(model).double().eval()
    x = torch.randn(n, 3, 32, 32, dtype=torch.float64)
    y = self_labelled(model, x)
    return model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def test_activation_criteria_after_batchnorm_vs_hook():
    model, data = _bn_case()
    seen = []
    handle = model.bn2.register_forward_hook(lambda m, i, o: seen.append(torch.relu(o)))
    with torch.no_grad():
        for x, _ in data:
            model(x)
    handle.remove()
    a = torch.cat(seen).transpose(0, 1).reshape(12, -1)
    assert torch.allclose(scores(model, "mean_activation", data, "conv2"), a.mean(1))
    assert torch.allclose(scores(model, "apoz", data, "conv2"), 1 - (a == 0).double().mean(1))


def test_taylor_equals_manual_autograd():
    model, data = _bn_case()
    for layer, bn in (("conv1", model.bn1), ("conv2", model.bn2)):
        acts = []

        def keep(m, i, o, acts=acts):
            o.retain_grad()
            acts.append(o)

        handle = bn.register_forward_hook(keep)
        want = torch.zeros(bn.num_features, dtype=torch.float64)
        for x, y in data:
            acts.clear()
            F.cross_entropy(model(x), y).backward()
            a = acts[0]
            want += (a * a.grad).sum((0, 2, 3)) ** 2
        handle.remove()
        model.zero_grad()
        want /= len(data)
        got = scores(model, "taylor", data, layer)
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-30)
        assert (got > 0).all()


def test_taylor_sees_removed_filters_downstream():
    # with filter 0 of conv2 removed, conv1's Taylor scores change (gradients flow differently),
    # and equal a fresh net in which conv2's filter 0 is zeroed by its mask
    model, data = _bn_case()
    net = MaskedNet(model)
    kept = list(range(8))
    before = get_criterion("taylor")(net, "conv1", LayerData(net, "conv1", data), kept, "top1")[0]
    net.remove("conv2", [0])
    after = get_criterion("taylor")(net, "conv1", LayerData(net, "conv1", data), kept, "top1")[0]
    assert not torch.allclose(before, after)


def test_random_over_layers_is_one_permutation():
    model, data = _bn_case(16)
    net = MaskedNet(model)
    fn = make_random(5, ["conv1", "conv2"])
    got = torch.cat([fn(net, name, None, list(range(n)), "top1")[0]
                     for name, n in (("conv1", 8), ("conv2", 12))])
    assert sorted(got.tolist()) == list(range(20))
    assert torch.equal(got, torch.randperm(20, generator=torch.Generator().manual_seed(5))
                       .double())
    assert torch.equal(make_random(5)(net, "conv2", None, [0, 3], "top1")[0],
                       torch.randperm(12, generator=torch.Generator().manual_seed(5))
                       .double()[[0, 3]])


def test_every_criterion_runs_and_unknown_fails():
    model, data = _bn_case(16)
    for name in CRITERIA:
        t = greedy_prune(model, "conv2", data, 10, name, progress=False)
        assert len(t.removed) == 2 and len(t.initial_scores["conv2"]) == 12
    with pytest.raises(CarlibError,
                       match="unknown criterion 'nope'; valid: car, car_random_tie, loss, random"):
        get_criterion("nope")


# ----------------------------------------------------------------------------- the registry


@pytest.fixture
def registry(monkeypatch):
    """The criteria module with a copy of its registry, restored after the test."""
    from carlib.pruning import criteria

    monkeypatch.setattr(criteria, "_REGISTRY", dict(criteria._REGISTRY))
    return criteria


def _last_first(net, layer, cut, kept, metric):
    return -torch.tensor(kept, dtype=torch.float64), None


def test_registering_a_taken_name_is_an_error(registry):
    with pytest.raises(CarlibError, match="^criterion 'l1' is already registered; choose another "
                                          "name, or pass replace=True to replace it$"):
        registry.register_criterion("l1", _last_first)
    assert get_criterion("l1").fn is registry.l1  # unchanged
    registry.register_criterion("mine", _last_first)
    with pytest.raises(CarlibError, match="'mine' is already registered"):
        registry.register_criterion("mine", _last_first, tie_break="random")
    registry.register_criterion("mine", _last_first, tie_break="random", replace=True)
    assert get_criterion("mine").tie_break == "random"


def test_a_user_criterion_is_pruned_with_and_in_the_live_registry(registry):
    from carlib.analysis.agreement import layer_scores

    model = OneByOne(4)
    data = [(torch.randn(6, 4, 2, 2), torch.zeros(6, dtype=torch.long))]
    assert "last_first" not in registry.registered()
    registry.register_criterion("last_first", _last_first, depends="weights")
    assert registry.registered() == (*CRITERIA, "last_first")
    t = greedy_prune(model, "conv1", data, 1, "last_first", progress=False)
    assert t.criterion == "last_first" and t.removed == [3, 2, 1]
    got = layer_scores(model, "conv1", data, metric="top1")  # criteria read when called
    assert list(got) == [*CRITERIA, "last_first"]
    assert got["last_first"].tolist() == [0.0, -1.0, -2.0, -3.0]


def test_counts_flips_flag(registry):
    assert [c for c in CRITERIA if registry.counts_flips(c)] == ["car", "car_random_tie", "loss"]
    assert all(get_criterion(c).counts_flips == registry.counts_flips(c) for c in CRITERIA)
    assert not registry.counts_flips("not registered")
    registry.register_criterion("mine", _last_first)
    registry.register_criterion("my_car", registry.make_car(), counts_flips=True)
    assert not registry.counts_flips("mine") and registry.counts_flips("my_car")
    assert registry.counts_flips(registry.Criterion("x", _last_first, counts_flips=True))
