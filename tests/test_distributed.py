"""Two torchrun processes give the one-process CAR counts. This file is also the worker script."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import randomize_bn, self_labelled

from carlib import CarlibError, MaskedNet
from carlib.distributed import all_reduce_tally, distributed_tally, init_from_env, shard
from carlib.models import build_model
from carlib.scoring import LayerData, naive_tally, tally

LAYER = "conv2"


def _case() -> tuple[MaskedNet, list]:
    """Seeded float32 network (one filter already removed) and 5 uneven scoring batches."""
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
    return net, [(x[i:i + 16], y[i:i + 16]) for i in range(0, 72, 16)]


def _worker(out: str) -> None:
    rank, world = init_from_env()
    net, data = _case()
    t = distributed_tally(LayerData(net, LAYER, shard(data)), net.kept(LAYER), per_class=True)
    if rank == 0:
        torch.save({"world": world, "tally": t.__dict__}, out)
    torch.distributed.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "tally.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           __file__, str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    assert got["world"] == 2
    two = got["tally"]
    net, data = _case()
    kept = net.kept(LAYER)
    one = tally(LayerData(net, LAYER, data), kept, per_class=True)
    ref = naive_tally(net, LAYER, data, kept, per_class=True)
    assert two["n"] == one.n == 72
    assert two["base_correct"] == one.base_correct == ref.base_correct
    for key in ("correct", "correct_per_class", "base_correct_per_class", "flips_lost",
                "flips_gained"):
        assert torch.equal(two[key], getattr(one, key)), key
        assert torch.equal(two[key], getattr(ref, key)), key
    assert torch.equal(two["correct"], ref.correct) and (one.correct != one.base_correct).any()
    assert torch.allclose(two["loss"], one.loss, rtol=1e-12)
    assert two["base_loss"] == pytest.approx(one.base_loss, rel=1e-12)


def test_single_process_helpers():
    assert init_from_env() == (0, 1)
    assert shard(range(5), 1, 2) == [1, 3]
    with pytest.raises(CarlibError, match="no scoring batch"):
        shard(range(1), 1, 2)
    net, data = _case()
    t = tally(LayerData(net, LAYER, data), [0, 2])
    assert all_reduce_tally(t) is t


if __name__ == "__main__":
    _worker(sys.argv[1])
