"""CAR scoring with 1 process against P processes (torchrun, gloo): time and identity.

Launches `torch.distributed.run --nproc_per_node=1` and `=P` on this script in worker mode;
each worker scores its batches of the scoring set (`carlib.dist.shards`: every P-th batch) with the
engine, which adds the tallies up over the processes exactly. The
CPU threads are split evenly (OMP_NUM_THREADS = cores / processes); 1 process with that many
threads is timed too. P = $PROCS (default 2); the other flags are car_speed.py's.

    python benchmarks/dist_speed.py --model alexnet --n-images 64 --batch 16 \\
        --layers features.10 --max-candidates 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from car_speed import load, make_case, parse_args  # noqa: E402

from carlib.data.decoded import Images  # noqa: E402
from carlib.dist.collectives import barrier, join, leave  # noqa: E402
from carlib.network.graph import MaskedNet  # noqa: E402
from carlib.scoring.cuts import LayerData  # noqa: E402
from carlib.scoring.tally import tally  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """Score every listed layer on this process's batches; rank 0 prints one JSON line."""
    rank, world = join()
    model, data, _ = make_case(args)
    net = MaskedNet(model)
    images = Images(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]),
                    args.batch, args.device)
    mine = images.split(rank, world)
    out = {}
    barrier()
    t0 = time.perf_counter()
    for layer in args.layers or list(net.units):
        n = net.unit(layer).num_filters
        cands = list(range(min(n, args.max_candidates or n)))
        t = tally(LayerData(net, layer, mine, cache=False), cands, chunk=args.chunk,
                  max_bytes=args.max_bytes)
        out[layer] = [t.correct.tolist(), t.loss.tolist(), t.base_loss]
    seconds = time.perf_counter() - t0
    if rank == 0:
        print(json.dumps({"world": world, "seconds": seconds, "tally": out}), flush=True)
    leave()


def launch(procs: int, threads: int, argv: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={procs}", __file__, "--worker", *argv]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        sys.exit(run.stderr[-3000:])
    return json.loads(next(s for s in run.stdout.splitlines() if s.startswith("{")))


def main() -> None:
    argv = sys.argv[1:]
    procs = int(os.environ.get("PROCS", "2"))  # P
    if "--worker" in argv:
        argv.remove("--worker")
        worker(parse_args(argv))
        return
    cores = os.cpu_count() or 1
    print(f"# {' '.join(sys.argv)}; {cores} cores; load before: {load()}")
    share = max(1, cores // procs)
    configs = dict.fromkeys([(1, cores), (1, share), (procs, share)])
    runs = {(p, th): launch(p, th, argv) for p, th in configs}
    base, same = runs[(1, cores)], runs[(1, share)]  # same: the float order of P x share
    for (p, th), r in runs.items():
        print(f"{p} process(es) x {th} thread(s): {r['seconds']:8.2f} s  "
              f"speed-up vs 1 x {cores}: {base['seconds'] / r['seconds']:5.2f}  "
              f"tally = 1 x {share} (counts, loss bits): {r['tally'] == same['tally']}")
    print(f"# load after: {load()}")


if __name__ == "__main__":
    main()
