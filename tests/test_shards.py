"""Images split over two torchrun processes (`carlib.dist.shards`) give one process's counts, losses
and scores, bit for bit. This file is also the worker script."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import randomize_bn, self_labelled

from carlib import CarlibError, MaskedNet, car_scores
from carlib.analysis.color import channel_responses, response_color_index
from carlib.data.decoded import Images
from carlib.dist.collectives import join, leave
from carlib.dist.shards import Shard, fold, split, take
from carlib.models import build_model
from carlib.pruning.criteria import get_criterion
from carlib.scoring.cuts import LayerData
from carlib.scoring.evaluate import evaluate, image_hits
from carlib.scoring.tally import hit_rates, naive_tally, tally

LAYER = "conv2"


def _case() -> tuple[torch.nn.Module, MaskedNet, Images]:
    """Seeded float32 network (one filter already removed) and 72 scoring images in 5 uneven
    batches of 16 (rank 0 of 2 holds batches 0, 2, 4; rank 1 batches 1, 3)."""
    torch.manual_seed(0)
    model = build_model("alexnet_small", 6, batchnorm=True, widths=(8, 12, 16, 16, 8))
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    model = randomize_bn(model).eval()
    x = torch.randn(72, 3, 32, 32)
    y = self_labelled(model, x)
    net = MaskedNet(model)
    net.remove(LAYER, [1])
    return model, net, Images(x, y, 16)


def measure(model: torch.nn.Module, net: MaskedNet, data: Images) -> dict:
    """Everything a greedy run and prune.py measure on a scoring or held-out set."""
    kept = net.kept(LAYER)
    out = {}
    for mode in ("fast", "plain", "naive"):
        out[mode] = tally(LayerData(net, LAYER, data), kept, mode=mode, per_class=True).__dict__
    # image chunks inside a batch (small passes): loss sums per batch, then across batches
    out["chunked"] = tally(LayerData(net, LAYER, data), kept, "top5", chunk=3,
                           max_bytes=2**15).__dict__
    out["reference"] = naive_tally(net, LAYER, data, kept).__dict__
    out["hit_rates"] = hit_rates(LayerData(net, "conv1", data), [1, 5])
    for name in ("mean_activation", "apoz", "taylor"):
        scores, base = get_criterion(name)(net, LAYER, LayerData(net, LAYER, data), kept, "top1")
        out[name] = (scores, None if base is None else base.__dict__)
    out["per_class"] = car_scores(model, "conv1", data, per_class=True)
    out["image_hits"] = image_hits(net, data)
    out["evaluate"] = evaluate(net, data)
    out["responses"] = channel_responses(net, "conv1", data)
    out["color_index"] = response_color_index(net, "conv1", data, [0.5] * 3, [0.25] * 3, 5)
    out["take"] = take(data, [70, 3, 20, 40])  # batches 4, 0, 1, 2: both ranks'
    return out


def _worker(path: str) -> None:
    rank, world = join()
    model, net, data = _case()
    mine = data.split(rank, world)
    got = measure(model, net, mine)
    got.update(world=world, images=len(mine.targets))
    torch.save(got, path.replace(".pt", f".{rank}.pt"))
    leave()


def _same(a: object, b: object, where: str = "") -> None:
    """Equal to the last bit: tensors by value and dtype, floats by ==, containers by item."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(
            a.nan_to_num(), b.nan_to_num()), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_two_processes_give_one_process_bits(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           __file__, str(tmp_path / "got.pt")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"got.{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r.pop("world") for r in ranks] == [2, 2]
    assert [r.pop("images") for r in ranks] == [40, 32]  # batches 0, 2, 4 (8) | 1, 3
    _same(ranks[0], ranks[1], "rank 1 vs rank 0")
    torch.set_num_threads(1)  # as the workers: the float order of a batch's own sums
    model, net, data = _case()
    one = measure(model, net, data)
    _same(ranks[0], one, "2 processes vs 1")
    # the counts are the reference's, and the network is not trivially right or wrong
    ref = one["reference"]
    assert torch.equal(one["fast"]["correct"], ref["correct"]) and ref["n"] == 72
    assert 0 < ref["base_correct"] < 72 and (ref["correct"] != ref["base_correct"]).any()
    assert torch.allclose(one["fast"]["loss"], ref["loss"], rtol=1e-6)
    assert one["chunked"]["loss"].shape == ref["loss"].shape
    assert torch.equal(one["take"], data.images[[70, 3, 20, 40]])
    assert one["responses"].shape == (72, 8) and not one["color_index"].isnan().all()


def test_shards_and_folds_alone():
    assert split(72, 16, 1, 2) == Shard(1, 2, 72, 16) and Shard(1, 2, 72, 16).batches == 5
    assert Shard(1, 2, 72, 16).indices().tolist() == [*range(16, 32), *range(48, 64)]
    assert Shard(0, 2, 72, 16).indices()[-8:].tolist() == list(range(64, 72))
    with pytest.raises(CarlibError, match="1 batch\\(es\\) of 16 images for 2 processes"):
        split(10, 16, 0, 2)
    _, net, data = _case()
    assert data.split(0, 1) is data and data.shard is None
    rows = [torch.tensor(r, dtype=torch.float64) for r in ([0.1, 1e16], [0.2, 1.0], [0.3, -1e16])]
    total = fold(data, rows)  # in order, from zero: ((0 + a) + b) + c
    assert total.tolist() == [((0.0 + 0.1) + 0.2) + 0.3, 0.0]
    with pytest.raises(CarlibError, match="not in a process group of that size"):
        hit_rates(LayerData(net, LAYER, data.split(0, 2)), [1])
    with pytest.raises(CarlibError, match="already one process's share"):
        data.split(0, 2).split(0, 2)


if __name__ == "__main__":
    _worker(sys.argv[1])
