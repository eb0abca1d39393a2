"""The cache planner: every placement gives the same counts; byte estimates; the "nothing fits"
error."""

from __future__ import annotations

import pytest
import torch
from test_engine import CASES, _all, _prepare
from torch.utils.data import DataLoader, TensorDataset

from carlib import CarlibError, MaskedNet
from carlib.scoring.cache import count_images
from carlib.scoring.cuts import LayerData
from carlib.scoring.options import ScoringOptions
from carlib.scoring.tally import naive_tally, tally

MAX_BYTES = 2**20  # small passes, so budgets of a few MiB decide the placement


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


SHAPES = {"tinyres": (3, 16, 16), "alexnet_small": (3, 32, 32)}


def _uneven(case: str, n: int = 70, batch: int = 32) -> tuple[torch.nn.Module, list]:
    """A float32 case with n images in batches of `batch` (the last one shorter)."""
    model, data, _ = _prepare(CASES[case]()[0], SHAPES[case], n=n, dtype=torch.float32)
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    return model, [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _cut(net: MaskedNet, layer: str, data: list, **options: object) -> LayerData:
    return LayerData(net, layer, data, options=ScoringOptions(max_bytes=MAX_BYTES, **options))


def _forced(net: MaskedNet, layer: str, data: list) -> dict[str, LayerData]:
    """Cuts whose plans are each placement: explicit ones, and "auto" driven by budgets."""
    probe = _cut(net, layer, data, placement="device").plan()
    work = probe.per_image * probe.batch + MAX_BYTES  # one batch plus one pass: the minimum
    return {
        "device": _cut(net, layer, data, placement="device"),
        "host": _cut(net, layer, data, placement="host"),
        "recompute": _cut(net, layer, data, placement="recompute"),
        "auto-device": _cut(net, layer, data, cache_budget_bytes=probe.bytes + MAX_BYTES),
        "auto-host": _cut(net, layer, data, cache_budget_bytes=work,
                          host_budget_bytes=probe.bytes),
        "auto-recompute": _cut(net, layer, data, cache_budget_bytes=work,
                               host_budget_bytes=probe.bytes - 1),
    }


@pytest.mark.parametrize("case,layer", [
    ("tinyres", "conv1"),            # two consumers
    ("tinyres", "layer1.0.conv1"),   # the residual input is cached too (an extra output)
    ("alexnet_small", "conv2"),
])
@pytest.mark.parametrize("metric", ["top1", "top5"])
def test_every_placement_gives_the_same_counts(case, layer, metric):
    model, data = _uneven(case)
    net = MaskedNet(model)
    kept = _all(net, layer)
    ref = naive_tally(net, layer, data, kept, metric, per_class=True)
    cuts = _forced(net, layer, data)
    first = None
    for name, cut in cuts.items():
        assert cut.placement == name.removeprefix("auto-"), name
        for _ in range(2):  # filling the cache, then reading it back
            t = tally(cut, kept, metric, per_class=True)
            assert torch.equal(t.correct, ref.correct), name
            assert torch.equal(t.correct_per_class, ref.correct_per_class), name
            assert torch.equal(t.flips_lost, ref.flips_lost), name
            assert torch.equal(t.flips_gained, ref.flips_gained), name
            assert t.base_correct == ref.base_correct
            first = t if first is None else first
            # the same tensors whatever the placement: losses equal to the bit
            assert torch.equal(t.loss, first.loss) and t.base_loss == first.base_loss, name
    assert torch.allclose(first.loss, ref.loss, rtol=1e-5)
    assert (ref.correct != ref.base_correct).any(), "case is uninformative"


@pytest.mark.parametrize("placement", ["device", "host", "recompute"])
def test_plan_bytes_equal_the_cached_bytes(placement):
    model, data = _uneven("tinyres")
    cut = _cut(MaskedNet(model), "layer1.0.conv1", data, placement=placement)
    plan = cut.plan()
    assert (plan.images, plan.batch) == (70, 32)
    assert cut.cached_bytes == 0  # planning read one batch; nothing is cached yet
    list(cut)
    want = sum(sum(t.nbytes for t in (*outs, y)) for outs, y in cut)
    assert plan.per_image * 70 == want
    assert plan.bytes == cut.cached_bytes == (0 if placement == "recompute" else want)
    assert (cut._batches is None) == (placement == "recompute")


def test_nothing_fits_says_what_would():
    model, data = _uneven("tinyres", n=64, batch=32)
    net = MaskedNet(model)
    per_image = _cut(net, "conv1", data, placement="device").plan().per_image
    budget = 20 * per_image + MAX_BYTES  # room for a batch of 20 images, not 32
    with pytest.raises(CarlibError) as err:
        _cut(net, "conv1", data, cache_budget_bytes=budget).plan()
    msg = str(err.value)
    assert "\n" not in msg
    assert "one batch of 32 images" in msg and "cache_budget_bytes" in msg
    assert "lower data.batch_size to 20," in msg
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    smaller = [(x[i:i + 20], y[i:i + 20]) for i in range(0, 64, 20)]
    assert _cut(net, "conv1", smaller, cache_budget_bytes=budget).placement == "recompute"
    with pytest.raises(CarlibError, match="lower max_bytes"):
        _cut(net, "conv1", data, cache_budget_bytes=MAX_BYTES).plan()


def test_uncached_cut_recomputes_without_a_budget_check():
    model, data = _uneven("tinyres")
    cut = LayerData(MaskedNet(model), "conv1", data, cache=False,
                    options=ScoringOptions(cache_budget_bytes=0))
    assert cut.placement == "recompute" and cut.plan().bytes == 0


def test_one_shot_iterator_is_planned_while_cached():
    model, data = _uneven("tinyres")
    net = MaskedNet(model)
    cut = LayerData(net, "conv1", iter(data))
    assert cut.placement == "device" and cut.plan().images is None
    assert torch.equal(tally(cut, _all(net, "conv1")).correct,
                       naive_tally(net, "conv1", data, _all(net, "conv1")).correct)


def test_count_images():
    x, y = torch.zeros(10, 3, 4, 4), torch.zeros(10, dtype=torch.long)
    assert count_images([(x[:6], y[:6]), (x[6:], y[6:])]) == 10
    assert count_images(DataLoader(TensorDataset(x, y), batch_size=4)) == 10
    assert count_images(iter([(x, y)])) is None


def test_options_checked():
    with pytest.raises(CarlibError, match="unknown cache placement 'gpu'"):
        ScoringOptions(placement="gpu")
    with pytest.raises(CarlibError, match="unknown scoring precision"):
        ScoringOptions(precision="fp16")
    with pytest.raises(CarlibError, match="chunk=0"):
        ScoringOptions(chunk=0)
    with pytest.raises(CarlibError, match="cache_budget_bytes=-1"):
        ScoringOptions(cache_budget_bytes=-1)
    cpu, cuda = ScoringOptions.for_device("cpu"), ScoringOptions.for_device("cuda", chunk=16)
    assert (cpu.max_bytes, cpu.chunk) == (64 * 2**20, 8)
    assert (cuda.max_bytes, cuda.chunk) == (2**30, 16)


def test_pass_size_comes_from_the_call_then_options_then_the_cut(monkeypatch):
    model, data, _ = _prepare(CASES["tinyres"]()[0], (3, 16, 16), dtype=torch.float32)
    net = MaskedNet(model)
    cut = LayerData(net, "conv1", data, options=ScoringOptions(max_bytes=1, chunk=1))
    assert LayerData(net, "conv1", data).options == ScoringOptions.for_device("cpu")
    seen, original = [], LayerData.pass_shape

    def pass_shape(self, h, extras, chunk, max_bytes):
        seen.append((chunk, max_bytes))
        return original(self, h, extras, chunk, max_bytes)

    monkeypatch.setattr(LayerData, "pass_shape", pass_shape)
    kept = _all(net, "conv1")
    tallies = [tally(cut, kept), tally(cut, kept, options=ScoringOptions(max_bytes=2**20)),
               tally(cut, kept, "top1", 3, options=ScoringOptions(max_bytes=2**20))]
    assert sorted(set(seen)) == [(1, 1), (3, 2**20), (8, 2**20)]
    assert all(torch.equal(t.correct, tallies[0].correct) for t in tallies)
