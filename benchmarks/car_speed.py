"""One CAR scoring round: the naive scorer against the engine, with a MAC-count ceiling.

For each prunable layer (or --layers), every candidate filter (or the first --max-candidates)
is scored on N random images twice: by `naive_tally` (a full forward per removed filter, the
filter zeroed by a forward hook, nothing cached) and by the engine (`tally`, fast mode: prefix
cached, consumer subtraction, batched candidates, exactness guard). Only what runs is timed;
nothing is extrapolated. See benchmarks/README.md for the columns.

    python benchmarks/car_speed.py --model alexnet --n-images 32 --max-candidates 16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carlib.models import build_model  # noqa: E402
from carlib.network.graph import MaskedNet  # noqa: E402
from carlib.scoring.counts import Tally  # noqa: E402
from carlib.scoring.cuts import LayerData  # noqa: E402
from carlib.scoring.options import DEFAULT_MAX_BYTES  # noqa: E402
from carlib.scoring.tally import naive_tally, tally  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("alexnet", "resnet50", "alexnet_small"), default="alexnet")
    p.add_argument("--n-images", type=int, default=32, help="scoring images N")
    p.add_argument("--batch", type=int, default=32, help="images per data batch")
    p.add_argument("--size", type=int, default=None, help="input size (224; 32 for alexnet_small)")
    p.add_argument("--layers", nargs="*", default=None, help="subset of prunable layers")
    p.add_argument("--max-candidates", type=int, default=None,
                   help="score only the first K filters of each layer (all if unset)")
    p.add_argument("--chunk", type=int, default=8, help="engine: candidates per batched pass")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help="engine: memory budget of one batched pass")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1,
                   help="time each scorer this many times per layer and keep the fastest")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed seconds; cpu: this process's CPU seconds")
    return p.parse_args(argv)


def make_case(args: argparse.Namespace) -> tuple[nn.Module, list, torch.Tensor]:
    """Random-weight model, random images, targets = its own predictions (30% relabelled)."""
    torch.manual_seed(args.seed)
    size = args.size or (32 if args.model == "alexnet_small" else 224)
    model = build_model(args.model, args.classes).eval()
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
    x = torch.randn(args.n_images, 3, size, size, dtype=getattr(torch, args.dtype),
                    device=args.device)
    with torch.no_grad():
        y = torch.cat([model(x[i:i + args.batch]).argmax(1) for i in range(0, len(x), args.batch)])
    flip = torch.rand(len(y), device=args.device) < 0.3
    y[flip] = torch.randint(0, args.classes, (int(flip.sum()),), device=args.device)
    data = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, len(x), args.batch)]
    return model, data, x[:1]


def module_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per image of every conv and linear module (forward hooks)."""
    macs: dict[str, int] = {}

    def hook(name: str):
        def f(m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            if isinstance(m, nn.Conv2d):
                per_out = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            else:
                per_out = m.in_features
            macs[name] = macs.get(name, 0) + out[:1].numel() * per_out
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(example)
    for h in handles:
        h.remove()
    return macs


def _targets(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]


def layer_macs(net: MaskedNet, cut: LayerData, macs: dict[str, int], n: int, cands: int,
               t: Tally, chunk: int) -> dict[str, int]:
    """MACs of the naive scorer, the plain (caching-only) path and the engine as run."""
    split = net.split_at_consumers(cut.layer)
    cost = {k: sum(macs.get(m, 0) for m in v) for k, v in {
        "total": list(macs), "prefix": _targets(cut.prefix), "suffix": _targets(cut.suffix),
        "consumers": split.consumer_names, "rest": _targets(split.rest)}.items()}
    delta = cost["consumers"] // net.unit(cut.layer).num_filters  # one input channel's share
    probe = min(chunk, cands) * cost["suffix"]  # the guard's one-image calibration probe
    return {
        "naive": n * (cands + 1) * cost["total"],
        "plain": n * (cost["prefix"] + (cands + 1) * cost["suffix"]),
        "engine": n * (cost["prefix"] + cost["suffix"] + cands * (cost["rest"] + delta))
        + (t.rechecked * cost["suffix"] + probe),
    }


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: writing 5 to clear_refs resets VmHWM (peak resident set)
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        line = next(s for s in Path("/proc/self/status").read_text().splitlines()
                    if s.startswith("VmHWM"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, device: str, repeat: int = 1, clock: str = "wall"):
    """(result, fastest of `repeat` times in seconds, peak MB) of fn().

    clock "wall": elapsed time; "cpu": CPU time of this process (all its threads), which a
    machine shared with other jobs inflates far less.
    """
    now = time.perf_counter if clock == "wall" else time.process_time
    best = float("inf")
    reset_peak(device)
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = now()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, now() - t0)
    return out, best, peak_mb(device)


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run_layer(args: argparse.Namespace, net: MaskedNet, layer: str, data: list,
              macs: dict[str, int]) -> dict[str, float]:
    """Time both scorers on one layer, print its row; seconds and MACs for the totals."""
    n_filters = net.unit(layer).num_filters
    cands = list(range(min(n_filters, args.max_candidates or n_filters)))
    tn, s_naive, mb_naive = timed(lambda: naive_tally(net, layer, data, cands), args.device,
                                  args.repeat, args.clock)

    def engine() -> tuple[LayerData, Tally]:
        cut = LayerData(net, layer, data, cache=False)
        return cut, tally(cut, cands, chunk=args.chunk, max_bytes=args.max_bytes)

    (cut, te), s_eng, mb_eng = timed(engine, args.device, args.repeat, args.clock)
    if cut.fallback:
        print(f"# {layer}: plain path ({cut.fallback})")
    diff = float((te.scores("top1") - tn.scores("top1")).abs().max())
    c = layer_macs(net, cut, macs, args.n_images, len(cands), te, args.chunk)
    ceil = c["naive"] / c["engine"]
    print(f"{layer:<22}{len(cands):>4}/{n_filters:<4}{s_naive:>9.2f}{s_eng:>9.2f}"
          f"{s_naive / s_eng:>7.2f}{ceil:>8.2f}{s_naive / s_eng / ceil:>7.2f}"
          f"{c['naive'] / c['plain']:>11.2f}{diff:>9.1e}{te.rechecked:>8}"
          f"{mb_naive:>9.0f}{mb_eng:>8.0f}", flush=True)
    return {"naive": s_naive, "engine": s_eng, "mn": c["naive"], "me": c["engine"],
            "mp": c["plain"]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, data, example = make_case(args)
    net = MaskedNet(model)
    layers = args.layers or list(net.units)
    macs = module_macs(model, example)
    with torch.no_grad():  # warm-up: kernel selection and allocator, outside the timings
        model(data[0][0])
    print(f"# {' '.join(sys.argv)}")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}, {args.dtype}, "
          f"{args.clock} clock; load before: {load()}")
    head = (f"{'layer':<22}{'cand':>9}{'naive s':>9}{'engine s':>9}{'ratio':>7}{'ceiling':>8}"
            f"{'r/ceil':>7}{'cache-only':>11}{'max|dS|':>9}{'recheck':>8}{'naive MB':>9}"
            f"{'eng MB':>8}")
    print(head)
    tot = {"naive": 0.0, "engine": 0.0, "mn": 0, "me": 0, "mp": 0}
    for layer in layers:
        row = run_layer(args, net, layer, data, macs)
        for key in tot:
            tot[key] += row[key]
    ratio, ceil = tot["naive"] / tot["engine"], tot["mn"] / tot["me"]
    print(f"{'total':<22}{'':>9}{tot['naive']:>9.2f}{tot['engine']:>9.2f}{ratio:>7.2f}"
          f"{ceil:>8.2f}{ratio / ceil:>7.2f}{tot['mn'] / tot['mp']:>11.2f}")
    print(f"# load after: {load()}; engine MACs {tot['me'] / 1e9:.1f} G, naive "
          f"{tot['mn'] / 1e9:.1f} G; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")


if __name__ == "__main__":
    main()
