"""The fast CAR engine against physical removal and the naive scorer; the exactness guard."""

from __future__ import annotations

import pytest
import torch
from conftest import physically_pruned, randomize_bn, self_labelled
from test_car import brute_force_car
from torch import nn
from torchvision.models.resnet import Bottleneck

from carlib import CarlibError, MaskedNet
from carlib.models import build_model
from carlib.scoring import engine as sc
from carlib.scoring.cuts import LayerData
from carlib.scoring.evaluate import hits
from carlib.scoring.tally import naive_tally, tally

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class TinyResNet(nn.Module):
    """ResNet-shaped: the stem feeds two consumers (block conv1 and the downsample conv)."""

    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        down = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(Bottleneck(8, 4, downsample=down), Bottleneck(16, 4))
        self.fc = nn.Linear(16 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 2), 1))


def inplace_net(classes: int = 6) -> nn.Module:
    """torchvision-style: an in-place ReLU right after each consumer (conv and linear)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 4, padding="same"), nn.ReLU(inplace=True),  # uneven "same" padding
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 16), nn.ReLU(inplace=True),
        nn.Linear(16, classes))


class LinearOnWidth(nn.Module):
    """A linear layer applied to the last (width) dim of a conv output: no channel blocks."""

    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.lin = nn.Linear(8, 4)
        self.fc = nn.Linear(6 * 8 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.lin(torch.relu(self.conv(x))), 1))


def _prepare(model: nn.Module, shape: tuple, n: int = 64, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():  # keep the signal alive through depth at random init
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.data = torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel())**.5
    model = randomize_bn(model, seed).to(dtype).eval()
    x = torch.randn(n, *shape, dtype=dtype, generator=g)
    y = self_labelled(model, x, seed=seed)
    return model, [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)], x[:2]


def _all(net: MaskedNet, layer: str) -> list[int]:
    return list(range(net.unit(layer).num_filters))


CASES = {
    "tinyres": lambda: _prepare(TinyResNet(), (3, 16, 16)),
    "inplace": lambda: _prepare(inplace_net(), (3, 16, 16)),
    "alexnet_small": lambda: _prepare(build_model("alexnet_small", 6, batchnorm=True,
                                                  widths=(8, 12, 16, 16, 8)), (3, 32, 32)),
}


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("case,layer", [
    ("tinyres", "conv1"),            # two consumers: layer1.0.conv1 and layer1.0.downsample.0
    ("tinyres", "layer1.0.conv1"),   # residual input passed through to the rest
    ("tinyres", "layer1.1.conv2"),
    ("inplace", "0"),                # consumer: uneven "same" padding, then an in-place ReLU
    ("inplace", "3"),                # linear consumer after adaptive pool + flatten
])
def test_fast_equals_physical_removal(case, layer):
    model, data, example = CASES[case]()
    net = MaskedNet(model)
    cut = LayerData(net, layer, data)
    t = tally(cut, _all(net, layer))
    assert cut.fallback is None
    want = brute_force_car(model, layer, data, example)
    assert torch.equal(t.scores("top1"), want)
    assert (want != 0).any(), "case is uninformative: no filter changes accuracy"


def test_split_at_consumers_composes_to_the_suffix():
    model, data, _ = CASES["tinyres"]()
    net = MaskedNet(model)
    split = net.split_at_consumers("conv1")
    assert split.consumer_names == ["layer1.0.conv1", "layer1.0.downsample.0"]
    (h, *extras), _ = next(iter(LayerData(net, "conv1", data)))
    ys = [f(x) for f, x in zip(split.consumers, split.between(h), strict=True)]
    with torch.no_grad():
        assert torch.equal(split.rest(*ys, *extras), LayerData(net, "conv1", []).suffix(h, *extras))


@pytest.mark.parametrize("case", ["alexnet_small", "tinyres", "inplace"])
def test_fast_plain_naive_agree_float32_with_removed_filters(case):
    model, data, _ = _prepare(CASES[case]()[0], (3, 32, 32) if case == "alexnet_small"
                              else (3, 16, 16), n=96, dtype=torch.float32, seed=1)
    net = MaskedNet(model)
    for layer in net.units:
        net.remove(layer, [1])
        cut, kept = LayerData(net, layer, data), net.kept(layer)
        for metric in ("top1", "top5"):
            ref = naive_tally(net, layer, data, kept, metric, per_class=True)
            for mode in ("fast", "plain"):
                got = tally(cut, kept, metric, mode=mode, per_class=True)
                assert torch.equal(got.correct, ref.correct), (layer, metric, mode)
                assert torch.equal(got.correct_per_class, ref.correct_per_class)
                assert got.base_correct == ref.base_correct
                assert torch.allclose(got.loss, ref.loss, rtol=1e-5)


def _per_class_hits(model: nn.Module, data: list, classes: int) -> torch.Tensor:
    out = torch.zeros(classes, dtype=torch.long)
    with torch.no_grad():
        for x, y in data:
            out.index_add_(0, y, hits(model(x), y).long())
    return out


def test_per_class_counts_equal_physical_removal():
    model, data, example = CASES["alexnet_small"]()
    net = MaskedNet(model)
    t = tally(LayerData(net, "conv2", data), _all(net, "conv2"), per_class=True)
    assert torch.equal(t.base_correct_per_class, _per_class_hits(model, data, 6))
    for c in range(12):
        pruned = physically_pruned(model, {"conv2": [c]}, example)
        assert torch.equal(t.correct_per_class[c], _per_class_hits(pruned, data, 6))
    assert torch.equal(t.correct_per_class.sum(1), t.correct)


def test_flip_counts_equal_physical_removal_in_every_mode():
    model, data, example = CASES["alexnet_small"]()
    net = MaskedNet(model)
    kept = _all(net, "conv2")
    tallies = [tally(LayerData(net, "conv2", data), kept, mode=m) for m in ("fast", "plain")]
    tallies.append(naive_tally(net, "conv2", data, kept))
    base = torch.cat([hits(model(x), y) for x, y in data])
    for c in kept:
        pruned = physically_pruned(model, {"conv2": [c]}, example)
        after = torch.cat([hits(pruned(x), y) for x, y in data])
        lost, gained = int((base & ~after).sum()), int((~base & after).sum())
        for t in tallies:
            assert (int(t.flips_lost[c]), int(t.flips_gained[c])) == (lost, gained), c
    for t in tallies:
        assert torch.equal(t.flips_lost - t.flips_gained, t.base_correct - t.correct)
    assert (tallies[0].flips_gained > 0).any(), "case is uninformative: no image is gained"


def test_naive_equals_physical_removal_with_removed_filters():
    model, data, example = CASES["alexnet_small"]()
    net = MaskedNet(model)
    removed = {"conv1": [0, 3], "conv3": [2]}
    for name, idx in removed.items():
        net.remove(name, idx)
    kept = net.kept("conv3")
    t = naive_tally(net, "conv3", data, kept)
    want = brute_force_car(model, "conv3", data, example, removed)
    assert torch.equal(t.scores("top1"), want[kept])


def test_memory_budget_chunks_images_and_candidates():
    model, data, _ = CASES["tinyres"]()
    net = MaskedNet(model)
    cut = LayerData(net, "conv1", data)
    big = tally(cut, _all(net, "conv1"), per_class=True)
    (h, *extras), _ = next(iter(cut))
    assert cut.pass_shape(h, extras, 8, 1) == (1, 1)
    small = tally(cut, _all(net, "conv1"), per_class=True, max_bytes=1)
    assert torch.equal(big.correct, small.correct)
    assert torch.equal(big.correct_per_class, small.correct_per_class)


def test_unsupported_consumer_falls_back_to_plain_path():
    model, data, _ = _prepare(LinearOnWidth(), (3, 8, 8))
    net = MaskedNet(model)
    with pytest.raises(CarlibError, match="not after one flatten"):
        net.split_at_consumers("conv")
    cut = LayerData(net, "conv", data)
    t = tally(cut, _all(net, "conv"))
    assert cut.fallback is not None
    assert torch.equal(t.correct, naive_tally(net, "conv", data, _all(net, "conv")).correct)


def test_unsure_flags_small_top_k_margins():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0],       # target 0 first by 1
                           [1.0, 1.0, 0.0, 0.0],       # target 1 tied with class 0
                           [2.0, 2.0 - 1e-6, 0.0, 0.0],  # target 1 second by 1e-6
                           [3.0, 1.0, 1.0 + 1e-6, 0.0]])  # target 1 third by 1e-6
    y = torch.tensor([0, 1, 1, 1])
    assert sc.unsure(logits, y, 1, 1e-4).tolist() == [False, True, True, False]
    assert sc.unsure(logits, y, 2, 1e-4).tolist() == [False, False, False, True]
    assert sc.unsure(logits, y, 4, 1e-4).tolist() == [False] * 4
    assert sc.unsure(logits, y, 1, 1e-7).tolist() == [False, True, False, False]


class Tied(nn.Module):
    """Integer-exact toy: 1x1 conv (filter i reads input channel i), ReLU, linear to 3 classes.

    logits = [bias0, f0 + f1, f2 + f3] with f the filter outputs; removing a filter can make
    two logits exactly equal, and argmax then picks the lower class index.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1, bias=False)
        self.conv1.weight.data = torch.eye(4).view(4, 4, 1, 1)
        self.fc = nn.Linear(4, 3)
        self.fc.weight.data = torch.tensor([[0.0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]])
        self.fc.bias.data = torch.tensor([2.0, 0, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv1(x)), 1))


def _tied_data() -> list:
    x = torch.tensor([[1.0, 2, 0, 0], [0, 0, 2, 1], [1, 1, 0, 0], [2, 1, 1, 1]]).view(4, 4, 1, 1)
    return [(x, torch.tensor([1, 2, 0, 1]))]


def test_exact_ties_match_reference_tie_rule():
    # logits [2, f0 + f1, f2 + f3]; a tie goes to the lower class index
    # image 0 (target 1): base [2, 3, 0] hit; without f0 [2, 2, 0]: tie -> 0, miss; f1 miss
    # image 1 (target 2): base [2, 0, 3] hit; without f3 [2, 0, 2]: tie -> 0, miss; f2 miss
    # image 2 (target 0): base [2, 2, 0] tie -> 0, hit; a hit whatever is removed
    # image 3 (target 1): base [2, 3, 2] hit; without f1 [2, 2, 2] -> 0, miss; f0 miss
    net = MaskedNet(Tied().eval())
    t = tally(LayerData(net, "conv1", _tied_data()), [0, 1, 2, 3])
    ref = naive_tally(net, "conv1", _tied_data(), [0, 1, 2, 3])
    assert t.base_correct == ref.base_correct == 4
    assert t.correct.tolist() == ref.correct.tolist() == [2, 2, 3, 3]
    assert t.rechecked > 0, "exact ties must be recomputed on the reference path"


def _perturb(monkeypatch, targets: torch.Tensor, scale: float) -> None:
    """Make the fast path lower the target logit by scale x default_rtol x max |logit|."""
    original = sc.Engine.ablated

    def ablated(self, xs, ys, extras, cs):
        out = original(self, xs, ys, extras, cs)
        tol = scale * sc.default_rtol(out.dtype) * out.abs().amax(-1, keepdim=True)
        return out.scatter_add(-1, targets.expand(out.shape[:2]).unsqueeze(-1), -tol)

    monkeypatch.setattr(sc.Engine, "ablated", ablated)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_guard_repairs_errors_below_its_tolerance(monkeypatch, dtype):
    """A fast path wrong by less than the tolerance flips near-tied images unless guarded."""
    net = MaskedNet(Tied().to(dtype).eval())
    data = [(x.to(dtype), y) for x, y in _tied_data()]
    ref = naive_tally(net, "conv1", data, [0, 1, 2, 3])
    _perturb(monkeypatch, data[0][1], 0.5)
    guarded = tally(LayerData(net, "conv1", data), [0, 1, 2, 3])
    assert torch.equal(guarded.correct, ref.correct)
    unguarded = tally(LayerData(net, "conv1", data), [0, 1, 2, 3], rtol=0.0)
    assert not torch.equal(unguarded.correct, ref.correct), "perturbation should matter"


def test_near_tie_in_float32_is_rechecked():
    """Logits 1 ulp apart after a removal: the guard sends them to the reference path."""
    model = Tied().eval()
    model.fc.bias.data[0] = torch.nextafter(torch.tensor(2.0), torch.tensor(3.0))
    net = MaskedNet(model)
    t = tally(LayerData(net, "conv1", _tied_data()), [0, 1, 2, 3])
    assert torch.equal(t.correct, naive_tally(net, "conv1", _tied_data(), [0, 1, 2, 3]).correct)
    assert t.rechecked >= 5


def test_unknown_mode():
    net = MaskedNet(Tied().eval())
    with pytest.raises(CarlibError, match="unknown scoring mode"):
        tally(LayerData(net, "conv1", _tied_data()), [0], mode="quick")


def test_approx_greedy_options():
    from test_greedy import Toy, groups

    from carlib.pruning.approx import approx_greedy
    from carlib.pruning.greedy import greedy_prune

    model, data = Toy([0, 1, 2, 3], [3.0, 1.0, 2.0, 1.0]), groups([3, 1, 4, 2], 4)
    exact = greedy_prune(model, "conv1", data, 1, progress=False).removed
    assert exact == [1, 3, 0]
    assert approx_greedy(model, "conv1", data, 1) == exact
    assert approx_greedy(model, "conv1", data, 1, taylor_m=4, subset=15) == exact
    assert approx_greedy(model, "conv1", data, 1, k=2) == [1, 3, 0]  # 2 lowest, then 1
    # Taylor |a * g| is largest for the strong filter 0 (scale 3), so m=1 screens it out
    assert approx_greedy(model, "conv1", data, 1, taylor_m=1)[0] != 0
    with pytest.raises(CarlibError, match="subset"):
        approx_greedy(model, "conv1", data, 1, subset=99)
