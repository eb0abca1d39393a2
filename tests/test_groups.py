"""Units as dependency groups (carlib.network.groups): coverage of torchvision CNNs, masking equals
physical removal (torch-pruning), and the scoring engine's counts equal the naive reference."""

from __future__ import annotations

import random
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

import carlib
from carlib.models import build_model
from carlib.network.graph import MaskedNet, coverage
from carlib.physical.removal import ungroup
from carlib.scoring.cuts import LayerData
from carlib.scoring.tally import naive_tally, tally

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from unit_coverage import MODELS as ALL_MODELS  # noqa: E402
from unit_coverage import random_model  # noqa: E402

SIZE = 64  # input side: small enough for a CPU, large enough for every model's downsampling
# ShuffleNetV2: see test_shufflenet_...; GroupNorm: torch-pruning cannot remove one channel of a
# group (test_masked_groupnorm_... checks it by hand)
MODELS = [m for m in ALL_MODELS if not m.startswith("shufflenet") and "groupnorm" not in m]


def physical(model: nn.Module, unit: str, channels: list[int], x: torch.Tensor) -> torch.Tensor:
    """Output of a copy of `model` with `channels` of `unit` removed by torch-pruning (grouped
    convs made dense first: `ungroup`)."""
    p = ungroup(model)
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(p, example_inputs=x[:1])
    dg.get_pruning_group(p.get_submodule(unit), tp.prune_conv_out_channels,
                         idxs=channels).prune()
    with torch.no_grad():
        return p(x)


def sample(net: MaskedNet, n: int, seed: int) -> list[str]:
    """One unit of each kind, then seeded draws of multi-point units, n in all (at least)."""
    multi = [u for u in net.units.values() if u.multi]
    kinds = list({u.kind: u.name for u in net.units.values()}.values())
    rng = random.Random(seed)
    first = kinds
    rest = [u.name for u in multi if u.name not in first]
    rng.shuffle(rest)
    return (first + rest)[:max(n, len(first))]


@pytest.mark.parametrize("name", MODELS)
def test_coverage_and_masking_equals_removal(name: str) -> None:
    model = random_model(name)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    cov = coverage(model, x[:1])
    assert cov["scorable"] / cov["filters"] >= 0.95, cov["excluded"]
    net = MaskedNet(model, x[:1])
    with torch.no_grad():
        full = model(x)
        assert torch.allclose(net(x), full, rtol=0, atol=1e-6 * float(full.abs().max()))
        changed = 0.0
        for i, layer in enumerate(sample(net, 3, seed=0)):
            n = net.unit(layer).num_filters
            chans = sorted(random.Random(i).sample(range(n), min(2, n - 1)))
            net.remove(layer, chans)
            masked = net(x)
            net.mask(layer).fill_(1)
            ref = physical(model, layer, chans, x)
            scale = float(ref.abs().max())
            assert (masked - ref).abs().max() <= 1e-5 * scale, (layer, net.unit(layer).kind)
            changed = max(changed, float((masked - full).abs().max()) / scale)
        assert changed > 1e-6  # the removals changed something (a channel can be dead)


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "efficientnet_b0", "convnext_tiny",
                                  "regnet_y_400mf", "alexnet", "resnet18_groupnorm"])
def test_engine_counts_equal_naive(name: str) -> None:
    """On sampled units (a plain conv unit too), fast and plain tallies equal the naive one."""
    model = random_model(name, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, SIZE, SIZE, generator=g)
    with torch.no_grad():
        y = model(x).argsort(-1)[:, -2]  # second-best class: removals flip some of them
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    net = MaskedNet(model, x[:1])
    layers = sample(net, 1, seed=1) + [n for n, u in net.units.items() if not u.multi][-1:]
    for layer in layers:
        cands = list(range(min(4, net.unit(layer).num_filters)))
        ref = naive_tally(net, layer, data, cands)
        for mode in ("fast", "plain"):
            t = tally(LayerData(net, layer, data, cache=True), cands, mode=mode)
            assert torch.equal(t.correct, ref.correct), (layer, mode)
            assert torch.allclose(t.loss, ref.loss, rtol=1e-5), (layer, mode)
            assert t.base_correct == ref.base_correct


def test_shufflenet_is_reported_not_scored() -> None:
    """torch-pruning cannot trace channel shuffle: the convs are listed with that reason."""
    model = random_model("shufflenet_v2_x0_5")
    cov = coverage(model, torch.randn(1, 3, SIZE, SIZE))
    assert cov["scorable"] == 0
    assert all("torch-pruning cannot trace" in why for why in cov["excluded"].values())


def test_units_of_resnet_small() -> None:
    """Each stage's residual stream is one unit (every conv writing it), named by its first
    conv and found under any of them; without an example only single-point units exist."""
    model = build_model("resnet_small", 6).eval()
    x = torch.randn(1, 3, 32, 32)
    units = {u.name: u for u in carlib.units(model, x)}
    plain = carlib.prunable_layers(model)
    assert set(plain) < set(units)
    streams = [u for u in units.values() if u.kind == "residual"]
    assert len(streams) == 3
    assert sum(u.num_filters for u in streams) == 16 + 32 + 64
    net = MaskedNet(model, x)
    for u in streams:
        for conv in u.convs:
            assert net.unit(conv).name == u.name
    stream = net.unit("layer1.1.conv2")
    assert set(stream.convs) == {"layer1.0.conv2", "layer1.0.downsample.0", "layer1.1.conv2"}


def small_resnet_data(n: int, seed: int, every: int) -> tuple[nn.Module, list]:
    """resnet_small (random weights) and two batches of n/2 random images, labelled with its
    own predictions except every `every`-th (the next class): some right, some wrong."""
    model = build_model("resnet_small", 6).eval()
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(-1)
    y[::every] = (y[::every] + 1) % 6
    return model, [(x[:n // 2], y[:n // 2]), (x[n // 2:], y[n // 2:])]


def test_greedy_on_a_residual_stream_fast_equals_naive() -> None:
    model, data = small_resnet_data(12, seed=0, every=3)
    runs = [carlib.greedy_prune(model, "layer2.0.conv2", data, 28, "car", mode=m, progress=False)
            for m in ("fast", "naive")]
    assert runs[0].removed == runs[1].removed and len(runs[0].removed) == 4
    first = [t.initial_scores["layer2.0.conv2"] for t in runs]
    assert first[0] == first[1] and any(s != 0 for s in first[0])


def test_masked_layernorm_rows_equal_single_removals() -> None:
    """ConvNeXt's stream (LayerNorms across channels): the plain path's per-row masks give,
    per candidate, the logits of that candidate masked alone."""
    model = random_model("convnext_tiny")
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    net = MaskedNet(model, x[:1])
    layer = next(n for n, u in net.units.items() if "layernorm" in u.kind)
    cut = LayerData(net, layer, [(x, torch.zeros(2, dtype=torch.long))])
    (h, *extras), _ = next(iter(cut))
    from carlib.scoring.engine import zeroed_suffix
    cs = torch.tensor([0, 5, 7])
    rows = torch.arange(2).repeat(3)
    got = zeroed_suffix(cut, h, extras, rows, cs.repeat_interleave(2)).view(3, 2, -1)
    for j, c in enumerate(cs.tolist()):
        net.remove(layer, [c])
        with torch.no_grad():
            want = net(x)
        net.mask(layer).fill_(1)
        assert torch.allclose(got[j], want, atol=1e-5 * float(want.abs().max()))
    assert net.unit_mask(layer).rows is None


def test_taylor_and_l1_of_a_stream_unit() -> None:
    """taylor's gate gradient on a multi-point unit equals the gradient of the loss with
    respect to the unit's own mask (every point at once); l1 sums every writer's filters."""
    from carlib.pruning.criteria import l1, taylor

    model = build_model("resnet_small", 6).eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    y = torch.arange(8) % 6
    net = MaskedNet(model, x[:1])
    layer = "layer2.0.conv2"
    net.remove(layer, [3])
    kept = net.kept(layer)
    cut = LayerData(net, layer, [(x, y)])
    got, _ = taylor(net, layer, cut, kept, "top1")
    mask = net.mask(layer)
    mask.requires_grad_(True)
    try:
        loss = torch.nn.functional.cross_entropy(net(x), y)
        (g,) = torch.autograd.grad(loss, mask)
    finally:
        mask.requires_grad_(False)
    assert torch.allclose(got, g.flatten()[kept].double() ** 2, rtol=1e-4, atol=1e-12)
    scores, _ = l1(net, layer, cut, kept, "top1")
    unit = net.unit(layer)
    want = sum(model.get_submodule(c).weight.detach().abs().flatten(1).sum(1).double()
               for c in unit.convs)
    assert torch.allclose(scores, want[kept])


def test_tracing_units_leaves_a_training_model_untouched() -> None:
    """MaskedNet's zero check runs in eval mode: BatchNorm statistics and the mode stay."""
    model = build_model("resnet_small", 6).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    MaskedNet(model, torch.randn(1, 3, 32, 32))
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_global_schedule_over_streams_fast_equals_naive() -> None:
    """Network-wide over single-conv units and residual streams: a removal in an upstream
    stream invalidates the cached prefixes of the units after it (their prefix reads the
    stream's mask module), so the cached engine makes the naive reference's choices."""
    model, data = small_resnet_data(16, seed=1, every=2)
    layers = ["layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1"]
    runs = [carlib.global_prune(model, layers, data, 12, "car", k=2, eval_data=data, mode=m,
                                progress=False) for m in ("fast", "naive")]
    fast, naive = (t.to_frame() for t in runs)
    assert runs[0].removed_layers == runs[1].removed_layers
    assert runs[0].removed == runs[1].removed
    for col in ("score", "scoring_acc", "heldout_top1"):
        assert fast[col].equals(naive[col]), col
    assert "layer1.0.conv2" in runs[0].removed_layers  # the stream lost channels upstream


def test_masked_groupnorm_equals_uneven_groups_by_hand() -> None:
    """A channel removed before a GroupNorm leaves its group: the masked network equals a
    hand-written pruned one (the conv without the filter, each group normalized over its
    remaining channels, the consumer without the input channel)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 3, 8, 8)
    net = MaskedNet(model, x[:1])
    unit = net.unit("0")
    assert unit.kind == "groupnorm" and unit.multi
    removed = [1, 6]
    net.remove("0", removed)
    keep = [c for c in range(8) if c not in removed]
    with torch.no_grad():
        got = net(x)
        h = model[0](x)[:, keep]
        gn = model[1]
        out = torch.empty_like(h)
        for g in range(2):
            cols = [i for i, c in enumerate(keep) if c // 4 == g]
            part = h[:, cols]
            mean = part.mean((1, 2, 3), keepdim=True)
            var = part.var((1, 2, 3), unbiased=False, keepdim=True)
            w = gn.weight[[keep[i] for i in cols]].view(1, -1, 1, 1)
            b = gn.bias[[keep[i] for i in cols]].view(1, -1, 1, 1)
            out[:, cols] = (part - mean) / torch.sqrt(var + gn.eps) * w + b
        conv = model[3]
        y = torch.nn.functional.conv2d(out.relu(), conv.weight[:, keep], conv.bias)
        want = model[5](y.flatten(1))
    assert torch.allclose(got, want, atol=1e-5)
    net.mask("0").fill_(1)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))  # nothing removed: the plain GroupNorm
