"""Resumable greedy runs: state files, in-process interruption, and a SIGKILLed prune.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_experiments import ROOT, TINY
from test_schedules import small_case

import carlib
from carlib.models import build_model
from carlib.pruning.greedy import global_prune, greedy_prune
from carlib.pruning.state import RunState, fingerprint


def test_state_of_another_carlib_version_is_not_resumed(tmp_path, monkeypatch):
    state = RunState(tmp_path, model="abc")
    state.save({"x": 1}, layer="conv1")
    monkeypatch.setattr(carlib, "__version__", carlib.__version__ + ".dev1")
    assert state.load(layer="conv1") is None


def test_run_state_roundtrip_and_keys(tmp_path):
    state = RunState(tmp_path / "s", model="abc", scoring=[1, 2, 3])
    assert state.load(layer="conv1") is None
    path = state.save({"x": [1.5, float("nan")]}, layer="conv1")
    assert state.load(layer="conv1")["x"][0] == 1.5
    assert state.load(layer="conv2") is None
    assert RunState(tmp_path / "s", model="abd", scoring=[1, 2, 3]).load(layer="conv1") is None
    assert [p.name for p in (tmp_path / "s").iterdir()] == [path.name]  # no temporary left
    a, b = build_model("lenet5", 10, 1), build_model("lenet5", 10, 1)
    assert fingerprint(a) == fingerprint(a) != fingerprint(b)
    r = build_model("resnet_small", 6)  # BatchNorm: 0-dim num_batches_tracked buffers
    before = fingerprint(r)
    r.stem_bn.num_batches_tracked += 1
    assert fingerprint(r) != before


class Interrupt(Exception):
    pass


class Dying(RunState):
    """Saves like RunState, then dies right after its `after`-th save."""

    def __init__(self, directory: Path, after: int) -> None:
        super().__init__(directory)
        self.after, self.saves = after, 0

    def save(self, state: dict, **parts: object) -> Path:
        path = super().save(state, **parts)
        self.saves += 1
        if self.saves == self.after:
            raise Interrupt
        return path


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("schedule", ["layerwise", "global"])
def test_interrupted_run_continues_to_the_same_trace(tmp_path, schedule):
    model, data = small_case()

    def run(state):
        if schedule == "global":
            return global_prune(model, ["conv1", "conv2"], data, 7, k=2, eval_data=data[:1],
                                progress=False, state=state)
        return greedy_prune(model, "conv2", data, 2, "taylor", eval_data=data[:1],
                            progress=False, state=state)

    want = run(None)
    with pytest.raises(Interrupt):
        run(Dying(tmp_path, after=3))  # step 0, 1 and 2 saved
    got = run(RunState(tmp_path))
    assert got.resumed_at == 2
    pd.testing.assert_frame_equal(got.to_frame(), want.to_frame())
    assert got.removed == want.removed and got.initial_scores == want.initial_scores
    again = run(RunState(tmp_path))  # finished: nothing left to do
    assert again.resumed_at == want.to_frame()["step"].max()
    pd.testing.assert_frame_equal(again.to_frame(), want.to_frame())


def _command(tmp: Path, run_dir: str) -> list[str]:
    over = [o for o in TINY if not o.startswith(("method.n_keep", "++model.widths"))]
    return [sys.executable, str(ROOT / "experiments" / "prune.py"),
            f"paths.cache_dir={tmp}/cache", f"paths.output_dir={tmp}/out",
            f"hydra.run.dir={tmp}/{run_dir}", "logger.mode=disabled", *over,
            "++model.widths=[16,8,8,8,8]", "method.n_keep=2", "method.layers=[conv1]",
            "method.criteria=[l2]"]


def _finished_steps(state_dir: Path) -> int:
    most = 0
    for p in state_dir.glob("*.json"):
        try:
            steps = json.loads(p.read_text())["state"]["steps"]
        except (OSError, ValueError, KeyError):
            continue
        most = max(most, len({row["step"] for row in steps}) - 1)
    return most


def test_sigkill_and_rerun_gives_the_identical_csv(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: threads only add overhead
    ref = subprocess.run(_command(tmp_path, "ref"), capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=600)  # also trains and caches the model
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = subprocess.Popen(_command(tmp_path, "run"), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _finished_steps(tmp_path / "run" / "state") < 1 and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _finished_steps(tmp_path / "run" / "state") < 14, "killed too late to test resuming"
    again = subprocess.run(_command(tmp_path, "run"), capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed at step" in again.stdout
    for name in ("curves.csv", "rank_agreement.csv"):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert not list((tmp_path / "run").rglob("*.tmp*"))


def test_digests_are_the_recipes_that_name_caches_and_states(tmp_path, monkeypatch):
    """carlib.core.io.digest gives every digest the code computed before it existed: cache
    file names, resume keys and weight fingerprints must not change."""
    import hashlib
    import importlib.util

    import torch
    from torch.utils.data import Subset

    from carlib.core.io import digest

    key = {"model": {"name": "lenet5", "width": [1, 2]}, "data": "fashion", "seed": 3, "a": None}
    text = json.dumps(key, sort_keys=True).encode()
    assert digest(key, algo="sha1", n=8) == hashlib.sha1(text).hexdigest()[:8]  # checkpoints
    assert digest(key, algo="sha1", n=12) == hashlib.sha1(text).hexdigest()[:12]  # decoded
    odd = {"path": Path("/x/y"), "z": 1.5, "b": [1, "2"]}  # not JSON: values by str
    want = hashlib.sha256(json.dumps(odd, sort_keys=True, default=str).encode()).hexdigest()
    assert digest(odd) == want
    assert digest(b"abc", algo="sha1") == hashlib.sha1(b"abc").hexdigest()
    assert digest(iter([b"a", b"bc"])) == hashlib.sha256(b"abc").hexdigest()

    state = RunState(tmp_path, model="m", scoring=[1, 2])  # resume keys and state file names
    parts = {"layer": "conv1", "criterion": "car", "seed": 0}
    want = hashlib.sha256(json.dumps({"version": 1, "carlib": carlib.__version__,
                                      "context": {"model": "m", "scoring": [1, 2]},
                                      "parts": parts}, sort_keys=True, default=str).encode())
    assert state.key(**parts) == want.hexdigest()
    assert state.path(**parts).name == want.hexdigest()[:20] + ".json"

    model = build_model("resnet_small", 6)  # weight fingerprints
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    assert fingerprint(model) == h.hexdigest()

    class Folder(torch.utils.data.Dataset):  # the files behind decoded image caches
        samples = [(str(tmp_path / f"{i}.jpg"), i % 2) for i in range(4)]

    for p, _ in Folder.samples:
        Path(p).write_bytes(b"x" * len(p))
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))  # the scripts import it by path
    spec = importlib.util.spec_from_file_location("common_digest", ROOT / "experiments"
                                                  / "common.py")
    common = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, common)
    spec.loader.exec_module(common)
    for dataset, order in [(Folder(), [0, 1, 2, 3]), (Subset(Subset(Folder(), [3, 1, 2]), [2, 0]),
                                                      [2, 3])]:
        h = hashlib.sha1()
        for i in order:
            path, target = Folder.samples[i]
            st = Path(path).stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{target}\n".encode())
        assert common._files(dataset) == h.hexdigest()
