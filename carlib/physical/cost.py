"""What a network costs: parameters, FLOPs and measured latency (original vs pruned).

FLOPs are what `torch.utils.flop_counter.FlopCounterMode` counts: 2 per multiply-add of the
conv, linear and matmul ops (bias additions, BatchNorm, activations, pooling and residual
additions are not counted). Latency is wall time of a forward pass on the model's device in
eval mode under `torch.no_grad()` with a fixed number of intra-op (CPU) threads: the median of
`runs` timed passes after `warmup` untimed ones, the variants' passes interleaved so that load
from other jobs on the machine affects them alike. On CUDA each pass is timed between
`torch.cuda.synchronize` calls (kernels run asynchronously). The input is drawn on the CPU from
a seeded generator and copied to each model's device: the same numbers on every device.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from carlib.core.module import eval_mode, model_device

COLUMNS = ["model", "variant", "params", "flops", "latency_ms_b1", "latency_ms_bN", "batch_size"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one forward pass on `example_input` (see the module docstring)."""
    with eval_mode(model), FlopCounterMode(display=False) as counter:
        model(example_input.to(model_device(model)))
    return int(counter.get_total_flops())


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def latencies_ms(models: Mapping[str, nn.Module], example_input: torch.Tensor, runs: int = 20,
                 warmup: int = 3, threads: int = 1) -> dict[str, float]:
    """Median forward time in milliseconds of each model on `example_input` (interleaved), each
    on its own device."""
    times: dict[str, list[float]] = {k: [] for k in models}
    devs = {k: model_device(m) for k, m in models.items()}
    inputs = {k: example_input.to(dev) for k, dev in devs.items()}
    with ExitStack() as stack:
        stack.enter_context(_threads(threads))
        for m in models.values():
            stack.enter_context(eval_mode(m))
        for i in range(warmup + runs):
            for name, m in models.items():
                _sync(devs[name])
                start = time.perf_counter()
                m(inputs[name])
                _sync(devs[name])
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {k: float(torch.tensor(v).median()) for k, v in times.items()}


def cost_report(models: Mapping[str, nn.Module], input_shape: Sequence[int], model_name: str,
                batch_size: int = 32, runs: int = 20, warmup: int = 3, threads: int = 1,
                seed: int = 0) -> pd.DataFrame:
    """One row per variant (e.g. {"original": m, "pruned": p}) with the columns `COLUMNS`.

    `input_shape` is one input's (C, H, W); `flops` are per image (batch 1); latency at batch 1
    and at `batch_size` (column `latency_ms_bN`), on each model's device.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *input_shape, generator=g)
    b1 = latencies_ms(models, x[:1], runs, warmup, threads)
    bn = latencies_ms(models, x, runs, warmup, threads)
    return pd.DataFrame([{"model": model_name, "variant": name, "params": count_params(m),
                          "flops": count_flops(m, x[:1]), "latency_ms_b1": b1[name],
                          "latency_ms_bN": bn[name], "batch_size": batch_size}
                         for name, m in models.items()], columns=COLUMNS)
