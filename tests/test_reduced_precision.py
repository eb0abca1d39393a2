"""bf16 fast passes with the float32 guard: hit counts equal those of the float32 network."""

from __future__ import annotations

import pytest
import torch
from test_engine import CASES, _all, _prepare

from carlib import CarlibError, MaskedNet, car_scores
from carlib.scoring.counts import TallyMemo
from carlib.scoring.cuts import LayerData
from carlib.scoring.options import ScoringOptions
from carlib.scoring.tally import naive_tally, tally

BF16 = ScoringOptions(precision="bf16")
SHAPES = {"tinyres": (3, 16, 16), "inplace": (3, 16, 16), "alexnet_small": (3, 32, 32)}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _case(case: str, seed: int) -> tuple[torch.nn.Module, list]:
    torch.manual_seed(seed)
    model, data, _ = _prepare(CASES[case]()[0], SHAPES[case], n=96, dtype=torch.float32,
                              seed=seed)
    return model, data


def _same_counts(got, want) -> bool:
    return (torch.equal(got.correct, want.correct) and got.base_correct == want.base_correct
            and torch.equal(got.flips_lost, want.flips_lost)
            and torch.equal(got.flips_gained, want.flips_gained)
            and torch.equal(got.correct_per_class, want.correct_per_class)
            and torch.equal(got.base_correct_per_class, want.base_correct_per_class))


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("case", ["tinyres", "inplace", "alexnet_small"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_counts_equal_float32_and_naive(case, seed):
    model, data = _case(case, seed)
    net = MaskedNet(model)
    rechecked = pairs = 0
    for layer in net.units:
        kept = _all(net, layer)
        fp32, bf16 = LayerData(net, layer, data), LayerData(net, layer, data, options=BF16)
        for metric in ("top1", "top5"):
            want = tally(fp32, kept, metric, per_class=True)
            got = tally(bf16, kept, metric, per_class=True)
            assert _same_counts(got, want), (layer, metric)
            assert _same_counts(got, naive_tally(net, layer, data, kept, metric,
                                                 per_class=True)), (layer, metric)
            assert got.base_loss == want.base_loss  # base logits are float32
            assert torch.allclose(got.loss, want.loss, rtol=0.05)  # approximate
            rechecked, pairs = rechecked + got.rechecked, pairs + len(kept) * got.n
        assert bf16.fallback is None, "bf16 applies to the fast path only"
    assert 0 < rechecked < pairs / 2, "the guard rechecks some pairs, not most"


def test_without_the_guard_bf16_counts_differ():
    """rtol=0 (exact ties only): bf16 rounding changes hits, so the guard is what repairs them."""
    differ = 0
    for seed in (0, 1):
        model, data = _case("alexnet_small", seed)
        net = MaskedNet(model)
        for layer in net.units:
            kept = _all(net, layer)
            want = tally(LayerData(net, layer, data), kept)
            unguarded = tally(LayerData(net, layer, data, options=BF16), kept, rtol=0.0)
            differ += int((unguarded.correct != want.correct).sum())
    assert differ > 0


def test_bf16_car_scores_equal_float32():
    model, data = _case("alexnet_small", 0)
    for per_class in (False, True):
        want = car_scores(model, "conv3", data, per_class=per_class)
        got = car_scores(model, "conv3", data, per_class=per_class, options=BF16)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_memo_keeps_precisions_apart():
    model, data = _case("tinyres", 0)
    net = MaskedNet(model)
    cut, memo = LayerData(net, "conv1", data), TallyMemo()
    cut.memo = memo
    kept = _all(net, "conv1")
    fp32, bf16 = tally(cut, kept), tally(cut, kept, options=BF16)
    assert memo.hits == 0 and not torch.equal(fp32.loss, bf16.loss)
    assert tally(cut, kept, options=BF16) is bf16 and memo.hits == 1


def test_loss_tallies_run_in_float32():
    """metric=loss (the loss criterion) ignores a reduced precision: its losses are float32's."""
    model, data = _case("tinyres", 0)
    net = MaskedNet(model)
    kept = _all(net, "conv1")
    bf16 = tally(LayerData(net, "conv1", data, options=BF16), kept, "loss")
    fp32 = tally(LayerData(net, "conv1", data), kept, "loss")
    assert torch.equal(bf16.loss, fp32.loss) and torch.equal(bf16.correct, fp32.correct)


def test_reduced_precision_refusals():
    model, data = _case("tinyres", 0)
    cut = LayerData(MaskedNet(model), "conv1", data, options=BF16)
    with pytest.raises(CarlibError, match="tf32 needs a CUDA device"):
        tally(cut, [0], options=ScoringOptions(precision="tf32"))
    net64, data64 = MaskedNet(model.double()), [(x.double(), y) for x, y in data]
    with pytest.raises(CarlibError, match="needs a float32 model"):
        tally(LayerData(net64, "conv1", data64, options=BF16), [0])
