"""Every tensor on the model's device: the library and the scripts under an emulated CUDA
device (tests/fake_cuda.py), on CPU-only CI; float32 precision switched by the library."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_BASE, randomize_bn, self_labelled
from fake_cuda import DeviceMismatch, emulated, is_tagged
from hydra import compose, initialize_config_dir
from torch import nn

from carlib import car_scores, global_prune, greedy_prune
from carlib.core.precision import float32_exact, tf32_enabled
from carlib.data.datasets import make_loader
from carlib.models import build_model
from carlib.physical.compression import (
    apply_mask,
    bake,
    bit_account,
    magnitude_mask,
    quantize,
    relative_indices,
    share_weights,
)
from carlib.physical.cost import cost_report
from carlib.pruning.criteria import CRITERIA
from carlib.scoring.evaluate import evaluate
from carlib.train import fit

ROOT = Path(__file__).resolve().parents[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("alexnet_small", num_classes=4, widths=[8, 8, 8, 8, 8], batchnorm=True)
    return randomize_bn(model).eval()


def _data(model: nn.Module, n: int = 48) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = self_labelled(model, x)
    return [(x[:n // 2], y[:n // 2]), (x[n // 2:], y[n // 2:])]


def _cuda(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple]:
    return [(x.cuda(), y.cuda()) for x, y in batches]


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert not is_tagged(b)
    torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0, equal_nan=True)


# --- the harness itself ---------------------------------------------------------------------

def test_harness_catches_a_cpu_tensor_mixed_with_a_cuda_one():
    available = torch.cuda.is_available
    with emulated():
        a, b = torch.randn(3, 4).to("cuda"), torch.randn(3, 4)
        assert a.device == torch.device("cuda", 0) and a.is_cuda and b.device.type == "cpu"
        with pytest.raises(DeviceMismatch, match=r"add.*cuda\(3, 4\), cpu\(3, 4\)"):
            a + b
        with pytest.raises(DeviceMismatch, match="cuda indices into a cpu tensor"):
            b[a > 0]
        with pytest.raises(DeviceMismatch, match="numpy"):
            a.numpy()
        with pytest.raises(DeviceMismatch, match="cpu generator"):
            torch.randn(3, device="cuda", generator=torch.Generator().manual_seed(0))
        # what real CUDA allows: cpu 0-dim scalars, cpu indices, copies across devices
        assert (a * torch.tensor(2.0)).is_cuda and a[torch.tensor([0, 2])].shape == (2, 4)
        assert not b.copy_(a).is_cuda and a.cpu().device.type == "cpu"
        assert torch.zeros(2, device="cuda").is_cuda and torch.zeros_like(a).is_cuda
        t = torch.as_tensor(b, device="cuda")
        assert t is not b and t.is_cuda and not is_tagged(b)
    assert torch.cuda.is_available is available and "pin_memory" not in vars(torch.Tensor)


def test_harness_runs_a_model_moved_to_cuda():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 5))
    x = torch.randn(2, 3, 8, 8)
    with emulated():
        gpu = copy.deepcopy(net).to("cuda")
        assert all(p.is_cuda for p in gpu.parameters()) and gpu[1].running_mean.is_cuda
        out = gpu(x.cuda())
        assert out.is_cuda
        _same(out, net(x))
        with pytest.raises(DeviceMismatch, match="conv2d"):
            gpu(x)
        torch.nn.functional.cross_entropy(out, torch.tensor([1, 2], device="cuda")).backward()
        assert gpu[0].weight.grad.is_cuda
        assert next(copy.deepcopy(gpu).parameters()).is_cuda
        assert not next(gpu.cpu().parameters()).is_cuda


# --- the library on "cuda": the CPU's numbers -----------------------------------------------

def test_car_scores_on_cuda_equal_cpu(one_thread):
    model = _model()
    data = _data(model)
    want = car_scores(model, "conv2", data)
    want_pc = car_scores(model, "conv1", data, per_class=True)
    with emulated():
        gpu = copy.deepcopy(model).to("cuda")
        got = car_scores(gpu, "conv2", _cuda(data))
        got_pc = car_scores(gpu, "conv1", _cuda(data), per_class=True)
    _same(got, want)
    _same(got_pc, want_pc)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_greedy_prune_on_cuda_equals_cpu(one_thread, criterion):
    model = _model()
    data, held = _data(model), _data(model, 16)
    want = greedy_prune(model, "conv2", data, 6, criterion, eval_data=held, progress=False)
    with emulated():
        gpu = copy.deepcopy(model).to("cuda")
        got = greedy_prune(gpu, "conv2", _cuda(data), 6, criterion, eval_data=_cuda(held),
                           progress=False)
    assert got.removed == want.removed
    assert got.to_frame().equals(want.to_frame())


def test_global_prune_on_cuda_equals_cpu(one_thread):
    model = _model()
    data = _data(model)
    want = global_prune(model, ["conv1", "conv2"], data, 3, progress=False)
    with emulated():
        gpu = copy.deepcopy(model).to("cuda")
        got = global_prune(gpu, ["conv1", "conv2"], _cuda(data), 3, progress=False)
    assert got.to_frame().equals(want.to_frame())


def test_compression_on_cuda_equals_cpu():
    conv = nn.Conv2d(4, 6, 3)
    w = conv.weight.detach()
    mask = magnitude_mask(w, 0.6)
    codebook, codes = quantize(w, mask, 3)
    bits = bit_account(conv, conv, mask, codes, 3, 4)
    with emulated():
        gpu = copy.deepcopy(conv).to("cuda")
        m = magnitude_mask(gpu.weight, 0.6)
        cb, c = quantize(gpu.weight, m, 3)
        assert m.is_cuda and cb.is_cuda and c.is_cuda
        symbols = relative_indices(m, 4)
        assert symbols.is_cuda
        got_bits = bit_account(gpu, gpu, m, c, 3, 4)
        apply_mask(gpu, m)
        bake(gpu)
        share_weights(gpu, cb, c, m)
        assert gpu.parametrizations.weight[0].codebook.is_cuda
        bake(gpu)
        shared = gpu.weight.detach().cpu()
    _same(m, mask)
    _same(cb, codebook)
    _same(c, codes)
    _same(symbols, relative_indices(mask, 4))
    assert got_bits.equals(bits)
    assert torch.equal(shared, codebook[codes] * mask)


def test_cost_report_and_fit_on_cuda(one_thread):
    model = _model()
    want = cost_report({"m": model}, (3, 32, 32), "m", batch_size=2, runs=1, warmup=0)
    x, y = _data(model)[0]
    loader = make_loader(torch.utils.data.TensorDataset(x, y), 8)
    trained = fit(copy.deepcopy(model), loader, 1, progress=False)
    with emulated():
        gpu = copy.deepcopy(model).to("cuda")
        got = cost_report({"m": gpu}, (3, 32, 32), "m", batch_size=2, runs=1, warmup=0)
        fit(gpu, loader, 1, progress=False)  # cpu batches: fit moves them to the model
        assert all(p.is_cuda for p in gpu.parameters())
        acc = evaluate(gpu, _cuda([(x, y)]))
    assert got[["params", "flops"]].equals(want[["params", "flops"]])
    for p, q in zip(gpu.cpu().parameters(), trained.parameters()):
        assert torch.equal(p, q)
    assert acc == evaluate(trained, [(x, y)])


# --- float32 precision ----------------------------------------------------------------------

def _flags() -> tuple:
    return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.get_float32_matmul_precision())


@pytest.fixture
def tf32_on():
    """TF32 allowed everywhere (as on a GPU by default for cuDNN); restored after."""
    before = _flags()
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.set_float32_matmul_precision(before[2])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[1], before[0]


def test_float32_exact_switches_tf32_off_and_restores(tf32_on):
    before = _flags()
    assert tf32_enabled()
    with float32_exact():
        assert _flags() == (False, False, "highest") and not tf32_enabled()
        with float32_exact():
            pass
        assert _flags() == (False, False, "highest")
    assert _flags() == before == (True, True, "high")
    with pytest.raises(ValueError, match="inside"), float32_exact():
        raise ValueError("inside")
    assert _flags() == before


def test_float32_exact_as_a_decorator(tf32_on):
    @float32_exact()
    def inside() -> tuple:
        return _flags()

    assert inside() == (False, False, "highest") and _flags() == (True, True, "high")


# --- the scripts with device=cuda -----------------------------------------------------------

# ++: train.yaml and compress.yaml have no `device` key yet (test_every_config_takes_device)
TINY = [*TINY_BASE, "logger.mode=disabled", "device=cuda"]
SCORING = ["method.scoring.size=60", "method.n_keep=6"]  # prune.py and interpret.py only


def _script(script: str, tmp: Path, run: str, *overrides: str
            ) -> tuple[subprocess.CompletedProcess, dict[str, list[int]]]:
    """Run experiments/`script` under the emulation; (result, ops run: name -> [cpu, cuda])."""
    stats = tmp / f"{run}.json"
    base = [*TINY, *(SCORING if script in ("prune.py", "interpret.py") else [])]
    args = [sys.executable, str(ROOT / "tests" / "fake_cuda.py"),
            str(ROOT / "experiments" / script), f"paths.cache_dir={tmp}/cache",
            f"paths.output_dir={tmp}/out", f"hydra.run.dir={tmp}/{run}", *base, *overrides]
    res = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "FAKE_CUDA_STATS": str(stats)})
    assert res.returncode == 0, res.stderr[-3000:]
    return res, json.loads(stats.read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict[str, list[int]]]:
    """The tiny model trained by experiments/train.py with device=cuda (its cache reused by
    the other scripts), and train.py's op counts."""
    tmp = tmp_path_factory.mktemp("device")
    _, stats = _script("train.py", tmp, "train")
    return tmp, stats


def test_train_runs_with_device_cuda(trained):
    _, stats = trained
    assert stats["Tensor.backward"][0] + stats["Tensor.backward"][1] > 0


def test_train_trains_on_the_device(trained):
    _, stats = trained
    assert stats["Tensor.backward"][0] == 0 and stats["Tensor.backward"][1] > 0


@pytest.mark.parametrize("script,overrides", [
    ("prune.py", []),
    ("interpret.py", ["interpret.top_k=3", "method.criteria=[car,l1]"]),
])
def test_scoring_scripts_run_every_forward_on_cuda(trained, script, overrides):
    tmp, _ = trained
    res, stats = _script(script, tmp, script[:-3], *overrides)
    assert "trained" not in res.stdout  # the cached checkpoint of train.py
    conv = stats["_VariableFunctionsClass.conv2d"]
    assert conv[0] == 0 and conv[1] > 0  # no forward pass on the CPU


def test_compress_runs_on_cuda(trained):
    tmp, _ = trained
    res, stats = _script("compress.py", tmp, "compress", "source.removed={conv2: [1, 5]}",
                         "cost.runs=2", "cost.warmup=1", "cost.batch_size=4", "retrain.epochs=1",
                         "layer_compression.bits=3")
    assert "trained" not in res.stdout
    # retraining (3 stages) on the device; the only CPU forwards are the untrained model's
    # check that the removal is possible, before get_model moves it
    assert stats["Tensor.backward"][0] == 0 and stats["Tensor.backward"][1] > 0
    assert stats["_VariableFunctionsClass.conv2d"][1] > 0
    assert (tmp / "compress" / "compressed.pt").is_file()


@pytest.mark.parametrize("config", ["train", "prune", "interpret", "compress"])
def test_every_config_takes_device(config):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config, overrides=["device=cuda"])
    assert cfg.device == "cuda"
