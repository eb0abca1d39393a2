"""CPU rehearsal of an ImageNet preset at ImageNet shape: decodes, loader speed, memory, time.

A generated 1000-class ImageFolder tree of real 500x375 JPEGs (scripts/make_imagefolder.py)
stands in for ImageNet; the preset runs end to end through experiments/prune.py, in this
process, with random weights (model.weights=null, train.epochs=0), a reduced scoring and
held-out size and a few greedy steps. Printed:

- loader: images/s decoding the scoring subset (JPEG -> resize -> crop -> uint8) with 0, 1
  and all-core DataLoader workers, no cache;
- decodes: JPEG reads during the run (each scoring and held-out image once is the target) and
  in a second run on the same cache (0 is the target; `--no-second` skips it);
- per greedy run: seconds, steps, seconds per step;
- peak resident memory of this process (and of the workers).

    .venv/bin/python benchmarks/rehearsal.py --root /tmp/imagenet-fake --make
    .venv/bin/python benchmarks/rehearsal.py --root /tmp/imagenet-fake --preset resnet50 \\
        --layers conv1 --criteria l1 random --steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import resource
import runpy
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "experiments"))

from make_imagefolder import make_tree  # noqa: E402

import carlib.data.datasets  # noqa: E402
from carlib.data.datasets import load_dataset, take  # noqa: E402
from carlib.data.decoded import decode  # noqa: E402

FILTERS = {"alexnet_conv1": 64, "alexnet_conv2": 192}
RUN_LINE = re.compile(r"^\s*(.+?):\s+(\d+) filters left.*\(([\d.]+) s")


def count_decodes(log: Path) -> None:
    """Append a line to `log` per JPEG read (here or in a forked worker)."""
    read = carlib.data.datasets.read_image

    def counted(path: str) -> object:
        with open(log, "a") as f:
            f.write("\n")
        return read(path)

    carlib.data.datasets.read_image = counted


def decodes(log: Path) -> int:
    return len(log.read_text()) if log.exists() else 0


def loader_speed(root: Path, n: int, workers: list[int]) -> dict[int, float]:
    """Images/s decoding `n` seeded random training images with each worker count."""
    train = load_dataset("imagenet", str(root)).train
    subset = take(train, torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n])
    out = {}
    for w in workers:
        t0 = time.perf_counter()
        decode(subset, 100, num_workers=w, progress=False)
        out[w] = n / (time.perf_counter() - t0)
    return out


def prune(overrides: list[str]) -> tuple[str, float]:
    """Run experiments/prune.py here with `overrides`; (its stdout, seconds)."""
    argv, sys.argv = sys.argv, ["prune.py", *overrides]
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(str(ROOT / "experiments" / "prune.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return buf.getvalue(), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True, help="the ImageFolder tree")
    p.add_argument("--make", action="store_true",
                   help="write a 1000-class tree there first (2 train + 1 val per class)")
    p.add_argument("--preset", default="alexnet_conv1",
                   choices=("alexnet_conv1", "alexnet_conv2", "resnet50"))
    p.add_argument("--layers", nargs="*", default=None, help="override the preset's layers")
    p.add_argument("--criteria", nargs="*", default=["car", "l1"])
    p.add_argument("--scoring", type=int, default=1000, help="scoring images (>= classes)")
    p.add_argument("--n-test", type=int, default=1000, help="held-out images")
    p.add_argument("--steps", type=int, default=1, help="greedy steps per run (>= 1)")
    p.add_argument("--no-second", dest="second", action="store_false",
                   help="skip the second run (l1 on the same cache: decodes nothing)")
    p.add_argument("--filters", type=int, default=None,
                   help="filters of the pruned layer (to set n_keep; default: the preset's)")
    a = p.parse_args(argv)
    if a.make and not a.root.exists():
        t0 = time.perf_counter()
        make_tree(a.root, 1000, 2, 1)
        print(f"# wrote the tree in {time.perf_counter() - t0:.0f} s")
    cores = len(os.sched_getaffinity(0))
    print(f"# {a.preset} on {a.root}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {cores} cores")
    speed = loader_speed(a.root, min(a.scoring, 500), sorted({0, 1, cores}))
    print("loader (JPEG 500x375 -> uint8 224x224), images/s: "
          + ", ".join(f"{w} workers {r:.0f}" for w, r in speed.items()), flush=True)

    filters = a.filters or FILTERS.get(a.preset, 64)
    with tempfile.TemporaryDirectory(prefix="rehearsal-") as tmp:
        log = Path(tmp) / "decodes.txt"
        count_decodes(log)
        common = [f"experiment={a.preset}", f"data.root={a.root}", "model.weights=null",
                  "train.epochs=0", f"method.scoring.size={a.scoring}", f"data.n_test={a.n_test}",
                  f"method.n_keep={filters - a.steps}", f"method.criteria=[{','.join(a.criteria)}]",
                  "method.rank_agreement=false", "method.per_class=false", "progress=false",
                  "logger.mode=disabled", f"paths.cache_dir={tmp}/cache", "device=cpu"]
        if a.layers:
            common.append(f"method.layers=[{','.join(a.layers)}]")
        out, secs = prune([*common, f"hydra.run.dir={tmp}/run1"])
        first = decodes(log)
        print(f"decodes: {first} in the run (target {a.scoring + a.n_test}: each scoring and "
              f"held-out image once)")
        print(f"{'run':<28}{'seconds':>9}{'steps':>7}{'s/step':>9}")
        for line in out.splitlines():
            m = RUN_LINE.match(line)
            if m:
                label, s = m.group(1), float(m.group(3))
                print(f"{label:<28}{s:>9.1f}{a.steps:>7}{s / a.steps:>9.1f}")
        me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"wall {secs:.0f} s; peak RSS {me:.0f} MB (largest worker {kids:.0f} MB)",
              flush=True)
        if a.second:
            _, secs2 = prune([*common, f"hydra.run.dir={tmp}/run2", "method.criteria=[l1]"])
            print(f"second run on the same cache (l1 only): {decodes(log) - first} decodes "
                  f"(target 0), wall {secs2:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
