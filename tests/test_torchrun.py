"""experiments/prune.py under torchrun: 2 gloo processes write what 1 process writes, byte for
byte, with the images split over them (`distribute=images`) or whole runs divided
(`distribute=runs`); a killed rank stops the run with a clear message and the rerun resumes
it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.types import RunMode
from omegaconf import OmegaConf
from test_experiments import ROOT, TINY

from carlib.distributed import assign
from carlib.errors import CarlibError

sys.path.insert(0, str(ROOT / "experiments"))  # the scripts' ranks module
import ranks  # noqa: E402

OUTPUTS = ("curves.csv", "regime.csv", "paired.csv", "rank_agreement.csv", "per_class_car.csv",
           "scoring_indices.txt")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _prune(procs: int, *overrides: str) -> list[str]:
    launch = ([] if procs == 1 else ["-m", "torch.distributed.run", "--standalone",
                                      f"--nproc_per_node={procs}"])
    return [sys.executable, *launch, str(ROOT / "experiments" / "prune.py"),
            "logger.mode=disabled", *overrides]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One trained TINY model for every run of this file (the first run trains it)."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("schedule", ["layerwise", "global"])
def test_two_processes_write_the_one_process_bytes(tmp_path, cache, schedule):
    over = [*TINY, f"paths.cache_dir={cache}", "method.criteria=[car,car_random_tie,loss,random,"
            "l1,l2,mean_activation,apoz,taylor]", "data.batch_size=25"]  # 3 and 8 batches
    if schedule == "global":
        over += ["method=global", "method.n_remove=4", "method.rank_agreement=false",
                 "method.per_class=false"]
    one = _run(_prune(1, *over, f"hydra.run.dir={tmp_path}/one"))
    assert one.returncode == 0, one.stderr[-3000:]
    written = [n for n in OUTPUTS if (tmp_path / "one" / n).is_file()]
    assert "curves.csv" in written and len(written) == (6 if schedule == "layerwise" else 4)
    states = len(list((tmp_path / "one" / "state").glob("*.json")))
    for how in ("images", "runs"):
        two = _run(_prune(2, *over, f"distribute={how}",
                          f"paths.output_dir={tmp_path}/{how}"))  # default run folder
        assert two.returncode == 0, two.stderr[-3000:]
        assert "trained" not in two.stdout
        assert ("[rank 1]" in two.stdout) == (how == "runs"), two.stdout
        assert ("batches split over them" in two.stdout) == (how == "images"), two.stdout
        runs = list((tmp_path / how / "prune").iterdir())
        assert len(runs) == 1, runs  # both ranks named one folder
        run = runs[0]
        for name in written:
            assert (run / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), \
                (how, name)
        # rank 0 wrote Hydra's files; rank 1 only its log (runs: and its runs' states)
        assert (run / ".hydra" / "config.yaml").is_file() and (run / "prune.rank1.log").is_file()
        assert not [p for p in run.iterdir() if p.is_dir() and p.name not in (".hydra", "state")]
        assert len(list((run / "state").glob("*.json"))) == states


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` started by agent `parent`, if running."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int(next(ln for ln in (proc / "status").read_text().splitlines()
                            if ln.startswith("PPid:")).split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def _steps(state_dir: Path, criterion: str) -> int:
    """Finished steps in the saved state of the run of `criterion` (0: none yet)."""
    for p in state_dir.glob("*.json"):
        try:
            payload = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if payload["parts"]["criterion"] == criterion:
            return len({row["step"] for row in payload["state"]["steps"]}) - 1
    return 0


@pytest.mark.parametrize("how", ["images", "runs"])
def test_killed_rank_stops_the_run_and_the_rerun_resumes(tmp_path, cache, how):
    over = [o for o in TINY if not o.startswith(("method.n_keep", "++model.widths"))]
    over += [f"paths.cache_dir={cache}", "++model.widths=[16,8,8,8,8]", "data.batch_size=25",
             "method.n_keep=2", "method.layers=[conv1]", "method.criteria=[l2,l1]",
             "method.rank_agreement=false", "method.per_class=false"]
    ref = _run(_prune(1, *over, f"hydra.run.dir={tmp_path}/ref"))  # trains the model
    assert ref.returncode == 0, ref.stderr[-3000:]
    cmd = _prune(2, *over, f"distribute={how}", f"hydra.run.dir={tmp_path}/run")
    agent = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    pid = None
    # runs: l2 (index 0) goes to rank 0, l1 to rank 1; images: both run both, rank 0 saves
    watched = "l1" if how == "runs" else "l2"
    while time.monotonic() < deadline:
        assert agent.poll() is None, "the run ended before a rank could be killed"
        pid = pid or _rank_pid(agent.pid, 1)
        if pid and _steps(tmp_path / "run" / "state", watched) >= 1:
            break
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    output, _ = agent.communicate(timeout=120)
    assert agent.returncode != 0
    assert _steps(tmp_path / "run" / "state", watched) < 14, "killed too late to test resuming"
    assert f"rerun the same command with hydra.run.dir={tmp_path}/run to resume" in output, \
        output[-3000:]
    again = _run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at step" in again.stdout
    assert (tmp_path / "run" / "curves.csv").read_bytes() == \
        (tmp_path / "ref" / "curves.csv").read_bytes()
    assert not list((tmp_path / "run").rglob("*.tmp*"))


def test_assign_is_longest_first():
    assert assign([1, 5, 3, 3], 2) == [0, 0, 1, 1]  # 5 | 3 | 3 (3 < 5) | 1 (5 < 6)
    assert assign([2, 2, 2], 1) == [0, 0, 0]


def test_place_gives_each_process_and_sweep_job_its_gpu(monkeypatch):
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)

    def placed(device: str) -> str:
        cfg = OmegaConf.create({"device": device})
        ranks.place(cfg)
        return cfg.device

    assert placed("cuda") == "cuda" and placed("cpu") == "cpu"  # one process: as given
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun: LOCAL_RANK's GPU
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert placed("cuda") == placed("auto") == "cuda:1" and placed("cuda:0") == "cuda:0"
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(CarlibError, match="start at most 2 processes per node"):
        placed("cuda")
    monkeypatch.delenv("WORLD_SIZE")  # a sweep: job number modulo the GPU count
    sweep = SimpleNamespace(mode=RunMode.MULTIRUN, job=SimpleNamespace(num=3))
    monkeypatch.setattr(ranks, "HydraConfig", SimpleNamespace(initialized=lambda: True,
                                                               get=lambda: sweep))
    assert placed("cuda") == "cuda:1" and chosen == [1, 1, 1]
