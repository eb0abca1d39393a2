"""Wall time of a reduced default run of experiments/prune.py in 1 and in P torchrun processes.

The model is trained once (untimed) into a temporary cache; then the same run is timed, each
from start to exit, as 1 process x 1 thread, 1 process x P threads and P processes x 1 thread
(torchrun, gloo), the latter both ways prune.py spreads a job: `distribute=images` (each rank
scores its batches of the scoring and held-out sets in every run) and `distribute=runs`
(whole greedy runs divided over the ranks). Prints one row per setting: wall seconds,
speed-up against 1 x 1, the greedy-run seconds (the sum of the runs' times as printed; per
rank where runs are divided) and whether curves.csv is byte-identical to the 1 x 1 run's.
`--logs DIR` keeps each run's output there.

Reduced default: the default config with half the scoring images (500) and half the held-out
images (1,000), in batches of 250 (so each of 2 processes holds scoring batches); extra
arguments are overrides. `--full`: the default run as it is (1,000 scoring images in 2
batches of 500, 2,000 held-out). P = --procs (default 2).

    python benchmarks/prune_speed.py
    python benchmarks/prune_speed.py --procs 2 --logs /tmp/logs method.criteria=[car,l1]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REDUCED = ["method.scoring.size=500", "data.n_test=1000", "data.batch_size=250"]


def prune(tmp: Path, name: str, procs: int, threads: int, overrides: list[str],
          logs: Path | None = None) -> dict:
    """One timed run; its wall time, per-rank run seconds and curves.csv bytes."""
    launch = ([] if procs == 1 else ["-m", "torch.distributed.run", "--standalone",
                                      f"--nproc_per_node={procs}"])
    args = [sys.executable, *launch, str(ROOT / "experiments" / "prune.py"),
            f"paths.cache_dir={tmp / 'cache'}", f"hydra.run.dir={tmp / name}",
            "logger.mode=disabled", "progress=false", f"threads={threads}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        sys.exit(f"error: {name} failed: {res.stderr.strip()[-1500:]}")
    busy: dict[str, float] = defaultdict(float)
    for m in re.finditer(r"^(\[rank \d+\] )?.*\(([\d.]+) s[,)]", res.stdout, re.M):
        busy[m.group(1) or "[rank 0] "] += float(m.group(2))
    curves = (tmp / name / "curves.csv").read_bytes()
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{name}.log").write_text(res.stdout + res.stderr)
    return {"wall": wall, "runs_s": "/".join(f"{busy[r]:.1f}" for r in sorted(busy)),
            "curves": curves}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--logs", type=Path, default=None)
    p.add_argument("--full", action="store_true", help="the default run, not reduced")
    args, overrides = p.parse_known_args()
    if not args.full:
        overrides = [*REDUCED, *overrides]
    n = args.procs
    with tempfile.TemporaryDirectory(prefix="carlib-speed-") as t:
        tmp = Path(t)
        prune(tmp, "train", 1, n, [*overrides, "method.layers=[conv2]", "method.criteria=[l1]",
                                   "method.rank_agreement=false", "method.per_class=false"])
        rows = {(1, 1, ""): prune(tmp, "p1t1", 1, 1, overrides, args.logs),
                (1, n, ""): prune(tmp, f"p1t{n}", 1, n, overrides, args.logs)}
        for how in ("images", "runs"):
            rows[(n, 1, how)] = prune(tmp, f"p{n}t1-{how}", n, 1,
                                      [*overrides, f"distribute={how}"], args.logs)
    base = rows[(1, 1, "")]
    print(f"# prune.py {' '.join(overrides)}; model cached")
    print(f"{'setting':>30} {'wall_s':>7} {'speed-up':>8} {'runs_s (per rank)':>18}  "
          "curves.csv = 1 x 1")
    for (procs, threads, how), r in rows.items():
        setting = f"{procs} proc x {threads} thread" + (f", {how}" if how else "")
        print(f"{setting:>30} {r['wall']:7.1f} {base['wall'] / r['wall']:8.2f} "
              f"{r['runs_s']:>18}  {r['curves'] == base['curves']}")
    for how in ("images", "runs"):
        print(f"# {n} x 1 ({how}) vs 1 x {n}: "
              f"{rows[(1, n, '')]['wall'] / rows[(n, 1, how)]['wall']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
