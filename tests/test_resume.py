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
