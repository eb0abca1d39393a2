"""experiments/prune.py under torchrun: 2 gloo processes write what 1 process writes, byte for
byte, with the images split over them (`distribute=images`) or whole runs divided
(`distribute=runs`); a killed rank stops the run with a clear message and the rerun resumes
it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.types import RunMode
from omegaconf import OmegaConf
from test_experiments import ROOT, TINY

from carlib.core.errors import CarlibError
from carlib.dist.collectives import assign

sys.path.insert(0, str(ROOT / "experiments"))  # the scripts' ranks module
import ranks  # noqa: E402

OUTPUTS = ("curves.csv", "regime.csv", "paired.csv", "rank_agreement.csv", "per_class_car.csv",
           "scoring_indices.txt")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _prune(procs: int, *overrides: str, script: str = "prune") -> list[str]:
    launch = ([] if procs == 1 else ["-m", "torch.distributed.run", "--standalone",
                                      f"--nproc_per_node={procs}"])
    return [sys.executable, *launch, str(ROOT / "experiments" / f"{script}.py"),
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


def test_interpret_two_processes_write_the_one_process_bytes(tmp_path, cache):
    over = [*TINY, f"paths.cache_dir={cache}", "data.batch_size=25", "interpret.top_k=3"]
    one = _run(_prune(1, *over, f"hydra.run.dir={tmp_path}/one", script="interpret"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(_prune(2, *over, f"hydra.run.dir={tmp_path}/two", script="interpret"))
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("filters.csv", "color_counts.csv", "class_importance.csv", "diversity.csv",
                 "scoring_indices.txt"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    for name in ("gallery_conv1", "gallery_conv2", "class_importance_conv2", "color_counts"):
        assert (tmp_path / "two" / f"{name}.png").stat().st_size > 5_000  # conv2: top images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_nodes_meet_through_c10d_rendezvous(tmp_path, cache):
    """`torchrun --nnodes=2` as on two machines (two agents, one process each, here both on
    localhost; agent 0 hosts the rendezvous store): one run folder, the 1-process bytes."""
    over = [*TINY, f"paths.cache_dir={cache}", "data.batch_size=25", "method.criteria=[car,l1]",
            "method.rank_agreement=false", "method.per_class=false"]
    one = _run(_prune(1, *over, f"hydra.run.dir={tmp_path}/one"))
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=carlib-test",
         f"--rdzv-conf=is_host={int(node == 0)}", str(ROOT / "experiments" / "prune.py"),
         "logger.mode=disabled", *over, f"paths.output_dir={tmp_path}/nodes"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)]
    results = [a.communicate(timeout=600) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], [err[-2000:] for _, err in results]
    runs = list((tmp_path / "nodes" / "prune").iterdir())
    assert len(runs) == 1, runs  # both nodes named one folder
    for name in ("curves.csv", "regime.csv", "paired.csv", "scoring_indices.txt"):
        assert (runs[0] / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_submitit_tasks_join_one_group(tmp_path, cache):
    """hydra/launcher=submitit_local with 2 tasks per node: the tasks join one process group
    (`ranks.slurm_tasks`, as SLURM tasks do) and write what 1 process writes."""
    over = [*TINY, f"paths.cache_dir={cache}", "data.batch_size=25", "method.criteria=[car,l1]",
            "method.rank_agreement=false", "method.per_class=false"]
    one = _run(_prune(1, *over, f"hydra.run.dir={tmp_path}/one"))
    assert one.returncode == 0, one.stderr[-3000:]
    job = _run([sys.executable, str(ROOT / "experiments" / "prune.py"), "-m",
                "hydra/launcher=submitit_local", "logger.mode=disabled", *over,
                "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10",
                f"hydra.sweep.dir={tmp_path}/sweep"])
    logs = "".join(p.read_text() for p in (tmp_path / "sweep").rglob("*.err"))
    assert job.returncode == 0, (job.stderr[-2000:], logs[-2000:])
    out = "".join(p.read_text() for p in (tmp_path / "sweep").rglob("*.out"))
    assert "2 processes: scoring and held-out batches split" in out, out[-2000:]
    for name in ("curves.csv", "regime.csv", "paired.csv"):
        assert (tmp_path / "sweep" / "0" / name).read_bytes() == \
            (tmp_path / "one" / name).read_bytes(), name


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


@pytest.mark.parametrize("script", ["compress", "train"])
def test_one_process_scripts_stop_under_torchrun(script):
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / f"{script}.py")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**ENV, "WORLD_SIZE": "2"})
    assert res.returncode == 2
    assert res.stderr.startswith(f"error: {script}.py runs in one process; start it without "
                                 "torchrun"), res.stderr


def test_each_rank_decodes_only_its_batches(tmp_path):
    """ImageNet layout (JPEG files): with the images split, each of 2 ranks decodes only its
    batches of the scoring and held-out sets (its own decode cache file), and the run writes
    the 1-process bytes."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_imagefolder import make_tree

    tree = tmp_path / "imagenet"
    make_tree(tree, 4, 6, 3, size=(72, 56))  # 24 train, 12 val JPEGs
    common = ["data=imagenet", f"data.root={tree}", "data.image_size=32", "data.n_test=12",
              "data.num_workers=0", "data.batch_size=5", "model=alexnet_small",
              "++model.widths=[8,8,8,8,8]", "train.epochs=0", "method.scoring.split=train",
              "method.scoring.size=8", "method.layers=[conv1]", "method.criteria=[car,l1]",
              "method.n_keep=6", "progress=false", "threads=1"]
    one = _run(_prune(1, *common, f"paths.cache_dir={tmp_path}/cache1",
                      f"hydra.run.dir={tmp_path}/one"))  # trains (0 epochs), caches the model
    assert one.returncode == 0, one.stderr[-3000:]
    (ckpt,) = (tmp_path / "cache1" / "checkpoints").glob("*.pt")
    two = _run(_prune(2, *common, f"paths.cache_dir={tmp_path}/cache2", f"model.checkpoint={ckpt}",
                      f"hydra.run.dir={tmp_path}/two"))
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("curves.csv", "paired.csv", "rank_agreement.csv", "per_class_car.csv"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    # scoring: 8 images in batches 5 + 3 (rank 0, rank 1); held-out: 12 in 5 + 5 + 2 (0, 1, 0)
    decoded = sorted(np.load(p, mmap_mode="r").shape[0]
                     for p in (tmp_path / "cache2" / "decoded").glob("*.npy"))
    assert decoded == [3, 5, 5, 7]
