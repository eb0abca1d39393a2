"""Wall time of the README's default run (`experiments/prune.py` with no overrides).

Runs it twice in a fresh temporary cache: first cold (the model is trained, as on a new
machine), then warm (the cached checkpoint is reused), each as its own process timed from
start to exit; prints one row per run with the wall time, the peak resident memory, the
training time and what the run measured (held-out top-1 of the full network, scoring top-1,
the share of removals CAR decided). Extra arguments are passed to prune.py as overrides;
`--keep DIR` copies the cold run's CSVs, figures, resolved config and provenance to DIR.

    python benchmarks/default_run.py                  # the default, torch's thread default
    python benchmarks/default_run.py threads=1        # any overrides
    python benchmarks/default_run.py --keep results/default_run
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def run(tmp: Path, name: str, overrides: list[str]) -> dict:
    """One timed run of prune.py in its own process; its numbers and outputs."""
    out = tmp / name
    args = [sys.executable, str(ROOT / "experiments" / "prune.py"),
            f"paths.cache_dir={tmp / 'cache'}", f"hydra.run.dir={out}", "logger.mode=disabled",
            "progress=false", *overrides]
    log = tmp / f"{name}.log"
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage
        wall = time.perf_counter() - start
    text = log.read_text()
    if status != 0:
        sys.exit(f"error: prune.py failed (wait status {status}): {text.strip()[-500:]}")
    trained = re.search(r"trained .* in (\d+) s", text)
    regime = pd.read_csv(out / "regime.csv")
    car = regime[regime.criterion == "car"]
    curves = pd.read_csv(out / "curves.csv")
    return {"run": name, "wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "train_s": int(trained.group(1)) if trained else 0,
            "heldout_top1_full": curves.heldout_top1.iat[0],
            "scoring_top1": round(float(regime.scoring_top1.iat[0]), 4),
            "car_decided": f"{int((car.removals - car.tied).sum())}/{int(car.removals.sum())}",
            "greedy_runs": len(regime)}


def main(argv: list[str]) -> int:
    keep = None
    if "--keep" in argv:
        i = argv.index("--keep")
        if i + 1 >= len(argv):
            sys.exit("error: --keep needs a folder")
        keep, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    with tempfile.TemporaryDirectory(prefix="carlib-bench-") as tmp:
        rows = [run(Path(tmp), name, argv) for name in ("cold", "warm")]
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            cold = Path(tmp) / "cold"
            for f in [*cold.glob("*.csv"), *cold.glob("*.png"), cold / ".hydra" / "config.yaml",
                      cold / "provenance.yaml"]:
                shutil.copy(f, keep / f.name)
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
