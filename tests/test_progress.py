"""Progress of greedy runs without a terminal: one log line per step, rate-limited."""

from __future__ import annotations

import io
import logging
import re
import sys
from types import SimpleNamespace

import pytest
from test_schedules import small_case

import carlib.pruning.progress
from carlib.pruning.greedy import global_prune, greedy_prune
from carlib.pruning.progress import duration, work_left

LINE = re.compile(r"^(?P<desc>.+): step (?P<step>\d+)/(?P<total>\d+), (?P<left>\d+) filters left, "
                  r"elapsed (?P<elapsed>\S+), ETA (?P<eta>\S+)$")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(caplog: pytest.LogCaptureFixture) -> list[re.Match]:
    got = [r.getMessage() for r in caplog.records if r.name == "carlib.pruning.greedy"]
    matches = [LINE.match(m) for m in got]
    assert all(matches), got
    return matches


def no_tty(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """Make stderr a non-terminal stream (in the test body: pytest's capture resets it after
    fixtures) and return it."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    return err


@pytest.mark.usefixtures("one_thread")
def test_one_line_per_step_with_elapsed_and_eta(caplog, monkeypatch):
    no_tty(monkeypatch)
    model, data = small_case()
    caplog.set_level(logging.INFO, logger="carlib.pruning.greedy")
    greedy_prune(model, "conv2", data, 2, "car", log_every=0)
    got = lines(caplog)
    assert [int(m["step"]) for m in got] == [1, 2, 3, 4]
    assert {m["desc"] for m in got} == {"conv2 car"} and {m["total"] for m in got} == {"4"}
    assert [int(m["left"]) for m in got] == [5, 4, 3, 2]
    assert got[-1]["eta"] == "0s" and all(re.fullmatch(r"\d+s", m["elapsed"]) for m in got)
    caplog.clear()
    global_prune(model, ["conv1", "conv2"], data, 5, "l1", k=2, log_every=0)
    got = lines(caplog)
    assert [(m["desc"], m["step"], m["total"], m["left"]) for m in got] == [
        ("conv1+conv2 l1", "1", "3", "10"), ("conv1+conv2 l1", "2", "3", "8"),
        ("conv1+conv2 l1", "3", "3", "7")]


def test_rate_limit_with_a_fake_clock(caplog, monkeypatch):
    no_tty(monkeypatch)
    model, data = small_case()
    now = [0.0]

    def tick() -> float:  # each call: 10 s later
        now[0] += 10
        return now[0]

    monkeypatch.setattr(carlib.pruning.progress, "time", SimpleNamespace(monotonic=tick))
    caplog.set_level(logging.INFO, logger="carlib.pruning.greedy")
    greedy_prune(model, "conv2", data, 1, "l1", log_every=25)  # 5 steps, at 20, 30, ..., 60 s
    got = lines(caplog)
    # the first step always, then one once 25 s have passed since the last, and the last step
    assert [int(m["step"]) for m in got] == [1, 4, 5]
    assert [m["elapsed"] for m in got] == ["10s", "40s", "50s"]
    assert got[0]["eta"] == "40s"  # l1 steps cost the same: 10 s each, 4 left


def test_silent_without_progress_and_on_a_terminal(caplog, monkeypatch):
    err = no_tty(monkeypatch)
    model, data = small_case()
    caplog.set_level(logging.INFO, logger="carlib.pruning.greedy")
    greedy_prune(model, "conv2", data, 4, "l1", progress=False, log_every=0)
    assert caplog.records == [] and err.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", Terminal())
    greedy_prune(model, "conv2", data, 4, "l1", log_every=0)
    assert caplog.records == [] and "l1 conv2" in sys.stderr.getvalue()  # the tqdm bar instead
    monkeypatch.setattr(sys, "stderr", Terminal())
    greedy_prune(model, "conv2", data, 4, "l1", progress=False)
    assert sys.stderr.getvalue() == ""


def test_lines_go_to_stderr_where_logging_is_not_configured(monkeypatch):
    err = no_tty(monkeypatch)
    model, data = small_case()
    monkeypatch.setattr(logging.getLogger("carlib.pruning.greedy"), "propagate", False)
    greedy_prune(model, "conv2", data, 4, "l1", log_every=0)
    out = err.getvalue().splitlines()
    assert [LINE.match(x)["step"] for x in out] == ["1", "2"]


def test_eta_weights_steps_by_their_candidates():
    assert work_left(10, 1, 1, 3) == (9 + 1) + (8 + 1) + (7 + 1)
    assert work_left(10, 2, 4, 3) == (6 + 2) + (2 + 2) + (0 + 2)
    assert work_left(10, 0, 1, 3) == 3  # no tally: every step costs the same
    assert [duration(s) for s in (0.4, 45, 62, 3599, 7500, float("nan"))] == [
        "0s", "45s", "1m02s", "59m59s", "2h05m", "?"]
