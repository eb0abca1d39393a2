"""Bad input fails with one clear CarlibError (in the scripts: exit 2, one `error:` line)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from test_experiments import ROOT, TINY, run
from torch import nn

from carlib import CarlibError, car_scores, global_prune, greedy_prune, prunable_layers
from carlib.core.io import save_figure, write_csv
from carlib.data.datasets import save_indices
from carlib.models import build_model, load_checkpoint, save_checkpoint
from carlib.physical.removal import save_pruned
from carlib.pruning.state import RunState, StaleStateWarning, atomic_write_text

CFG = {"name": "alexnet_small", "num_classes": 6, "in_channels": 3, "widths": [4, 4, 4, 4, 4]}


@pytest.fixture
def model(one_thread) -> nn.Module:
    return build_model(**CFG).eval()


def _data(n: int = 12, classes: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g))]


def _one_line(res) -> str:
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    return lines[0]


# ----------------------------------------------------------------------------- 1. checkpoints


def _truncated(path, model):
    save_checkpoint(path, model, CFG, {})
    path.write_bytes(path.read_bytes()[:300])


def _other_weights(path, model):
    torch.save({"state_dict": model.state_dict(), "meta": {},
                "model_cfg": {**CFG, "widths": [8, 8, 8, 8, 8]}}, path)


@pytest.mark.parametrize("make,why", [
    (lambda p, m: p.write_bytes(os.urandom(2000)), "(not a torch file: truncated or another "
                                                   "format)"),
    (_truncated, "(not a torch file: truncated or another format)"),
    (lambda p, m: torch.save({"meta": {}, "net": nn.Linear(2, 2)}, p),
     "(it pickles objects other than tensors and plain data)"),
    (lambda p, m: torch.save(m.state_dict(), p), "(it holds keys classifier.2.bias, "
                                                 "classifier.2.weight, classifier.5.bias, "
                                                 "classifier.5.weight, ..., not state_dict, "
                                                 "model_cfg, meta)"),
    (lambda p, m: torch.save([1, 2, 3], p), "it holds a list, not state_dict, model_cfg, meta"),
    (lambda p, m: torch.save({"state_dict": {}, "model_cfg": {**CFG, "name": "vgg"}, "meta": {}},
                                   p),
     "unknown model 'vgg'"),
    (_other_weights, "size mismatch"),
])
def test_corrupt_checkpoint(tmp_path, model, make, why):
    path = tmp_path / "model.pt"
    make(path, model)
    with pytest.raises(CarlibError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} is not a carlib checkpoint (") and why in msg
    assert msg.endswith("; retrain with experiments/train.py or fix model.checkpoint")
    assert len(msg.splitlines()) == 1


def test_corrupt_weights_file(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(os.urandom(500))
    with pytest.raises(CarlibError, match=f"weights file {path} is not a torch state dict"):
        build_model("alexnet", 6, weights_path=str(path))


def test_script_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(1000))
    line = _one_line(run(tmp_path, *TINY, f"model.checkpoint={bad}"))
    assert line.startswith(f"error: {bad} is not a carlib checkpoint (")
    assert line.endswith("retrain with experiments/train.py or fix model.checkpoint")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 2.-3. data

EMPTY = "the scoring set is empty (no images); give at least one (inputs, targets) batch"


@pytest.mark.parametrize("call", [
    lambda m, d: car_scores(m, "conv1", d),
    lambda m, d: car_scores(m, "conv1", d, per_class=True),
    lambda m, d: greedy_prune(m, "conv1", d, n_keep=2, progress=False),
    lambda m, d: greedy_prune(m, "conv1", d, n_keep=2, progress=False, mode="naive"),
    lambda m, d: greedy_prune(m, "conv2", d, n_keep=2, criterion="mean_activation",
                              progress=False),
    lambda m, d: global_prune(m, ["conv1", "conv2"], d, keep_fraction=0.5, progress=False),
])
@pytest.mark.parametrize("empty", [[], [(torch.zeros(0, 3, 32, 32), torch.zeros(0).long())]])
def test_empty_scoring_set(model, call, empty):
    with pytest.raises(CarlibError) as e:
        call(model, empty)
    assert str(e.value) == EMPTY


def test_empty_eval_data(model):
    with pytest.raises(CarlibError, match=r"^the held-out set \(eval_data\) is empty"):
        greedy_prune(model, "conv1", _data(), n_keep=2, eval_data=[], progress=False)


def _bad(x: torch.Tensor, y: torch.Tensor, case: str) -> list[tuple]:
    return {
        "label 7": [(x, torch.full_like(y, 7))],
        "label -1": [(x, y.clone().index_fill_(0, torch.tensor([3]), -1))],
        "later batch": [(x, y), (x, y.clone().index_fill_(0, torch.tensor([0, 1]), 9))],
        "1 channel": [(x[:, :1], y)],
        "uint8": [((x * 40 + 128).clamp(0, 255).to(torch.uint8), y)],
        "float64": [(x.double(), y)],
        "3-D": [(x[0], y)],
        "float targets": [(x, y.float())],
        "2-D targets": [(x, y[:, None])],
        "fewer targets": [(x, y[:5])],
        "not a pair": [(x, y, y)],
        "16x16": [(x[:, :, :16, :16], y)],
    }[case]


MESSAGES = {
    "label 7": "the scoring set has target 7, but the model has 6 classes (targets 0..5); fix "
               "the labels or the model's num_classes",
    "label -1": "the scoring set has target -1, but the model has 6 classes (targets 0..5)",
    "later batch": "the scoring set has target 9, but the model has 6 classes",
    "1 channel": "the scoring set gives 1-channel inputs (shape (12, 1, 32, 32)); the model's "
                 "first conv takes 3 channels: give N x 3 x H x W images",
    "uint8": "the scoring set gives torch.uint8 inputs; the model's weights are torch.float32: "
             "convert the images",
    "float64": "the scoring set gives torch.float64 inputs; the model's weights are "
               "torch.float32",
    "3-D": "the scoring set gives inputs of shape (3, 32, 32); the model takes N x C x H x W "
           "batches (4-D)",
    "float targets": "the scoring set gives targets of shape (12,) (torch.float32) for 12 "
                     "images; give a 1-D integer tensor of class indices, one per image",
    "2-D targets": "the scoring set gives targets of shape (12, 1) (torch.int64) for 12 images",
    "fewer targets": "the scoring set gives targets of shape (5,) (torch.int64) for 12 images",
    "not a pair": "the scoring set must give (inputs, targets) tensor batches; got (Tensor, "
                  "Tensor, Tensor)",
    "16x16": "the model cannot run on the scoring set's inputs of shape (12, 3, 16, 16) (",
}


@pytest.mark.parametrize("case", list(MESSAGES))
@pytest.mark.parametrize("entry", ["car_scores", "greedy", "global"])
def test_bad_scoring_data(model, case, entry):
    data = _bad(*_data()[0], case)
    with pytest.raises(CarlibError) as e:
        if entry == "car_scores":
            car_scores(model, "conv2", data)
        elif entry == "greedy":
            greedy_prune(model, "conv2", data, n_keep=2, progress=False)
        else:
            global_prune(model, ["conv1", "conv2"], data, n_remove=1, progress=False)
    assert str(e.value).startswith(MESSAGES[case]), str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_bad_eval_data_is_named(model):
    x, y = _data()[0]
    with pytest.raises(CarlibError, match=r"^the held-out set \(eval_data\) has target 6"):
        greedy_prune(model, "conv1", [(x, y)], n_keep=2, eval_data=[(x, y.clamp_max(5) + 1)],
                     progress=False)


def test_integer_targets_of_any_width_are_accepted(model):
    x, y = _data()[0]
    want = car_scores(model, "conv1", [(x, y)])
    assert torch.equal(car_scores(model, "conv1", [(x, y.int())]), want)
    assert torch.equal(car_scores(model, "conv1", [(x, y.to(torch.uint8))]), want)


# ----------------------------------------------------------------------------- 4. one class


def test_single_class_scoring_set(model):
    x, _ = _data()[0]
    data = [(x, torch.full((len(x),), 4))]
    pc = car_scores(model, "conv1", data, per_class=True)
    assert pc.shape == (4, 6)
    assert pc[:, 4].isfinite().all()
    assert pc[:, [0, 1, 2, 3, 5]].isnan().all()  # absent classes
    assert torch.equal(pc[:, 4], car_scores(model, "conv1", data))  # the only class: CAR
    trace = greedy_prune(model, "conv1", data, n_keep=2, progress=False)
    assert len(trace.removed) == 2
    with pytest.raises(CarlibError, match="per_class CAR needs an accuracy metric"):
        car_scores(model, "conv1", [], metric="loss", per_class=True)


# ----------------------------------------------------------------------------- 5. no conv


def test_model_without_prunable_layer(one_thread):
    dense = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 6))
    assert prunable_layers(dense) == []
    data = _data()
    want = ("'x' is not a prunable layer; this model (Sequential) has none: carlib prunes "
            "Conv2d filters whose channels reach only conv or linear layers")
    for call in (lambda: car_scores(dense, "x", data),
                 lambda: greedy_prune(dense, "x", data, n_keep=1, progress=False),
                 lambda: global_prune(dense, ["x"], data, n_remove=1, progress=False)):
        with pytest.raises(CarlibError) as e:
            call()
        assert str(e.value) == want
    # a conv whose channels reach the output: the reason is given
    head = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(CarlibError, match=r"this model \(Sequential\) has none: .*\(not "
                                          r"prunable: 0: its channels reach no conv or linear "
                                          r"layer\)"):
        car_scores(head, "conv1", data)
    with pytest.raises(CarlibError, match=r"\(not prunable: 0: its channels reach output"):
        car_scores(head, "conv1", iter(data))  # one-shot data: single-conv analysis only
    assert prunable_layers(nn.Sequential(nn.Flatten())) == []  # no parameters at all


# ----------------------------------------------------------------------------- 6. run state


@pytest.mark.parametrize("content", [b'{"key": "abc", "parts": {}, "sta', b"", b"\x00\xff junk",
                                     b"[1, 2, 3]", b'{"key": "abc"}', b'{"key": 1, "state": 5}'])
def test_unreadable_run_state_is_ignored_with_a_warning(tmp_path, content):
    state = RunState(tmp_path, model="abc")
    path = state.save({"x": 1}, layer="conv1")
    path.write_bytes(content)
    with pytest.warns(StaleStateWarning, match=f"ignoring the unreadable run state {path} "):
        assert state.load(layer="conv1") is None
    state.save({"x": 2}, layer="conv1")  # the run that starts over replaces it
    assert state.load(layer="conv1") == {"x": 2}


def test_state_of_another_key_or_version_is_ignored_silently(tmp_path, monkeypatch):
    from carlib.pruning import state as checkpointing
    state = RunState(tmp_path, model="abc")
    path = state.save({"x": 1}, layer="conv1")
    other = RunState(tmp_path, model="abd")
    other.path(layer="conv1").write_text(path.read_text())  # a copied file: its key differs
    monkeypatch.setattr(checkpointing, "VERSION", checkpointing.VERSION + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert other.load(layer="conv1") is None
        assert state.load(layer="conv1") is None  # another state format: another file name


def test_truncated_state_file_restarts_the_run(model, tmp_path):
    data = _data()
    want = greedy_prune(model, "conv1", data, n_keep=2, progress=False)
    state = RunState(tmp_path, model="m")
    greedy_prune(model, "conv1", data, n_keep=2, progress=False, state=state)
    (path,) = tmp_path.glob("*.json")
    path.write_text(path.read_text()[:40])
    with pytest.warns(StaleStateWarning):
        again = greedy_prune(model, "conv1", data, n_keep=2, progress=False, state=state)
    assert again.resumed_at == 0 and again.removed == want.removed
    assert json.loads(path.read_text())["state"]["removed"] == want.removed  # written anew


# ----------------------------------------------------------------------------- 7. writes


def _writers(tmp_path, model):
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    return {
        "curves.csv": lambda p: write_csv(pd.DataFrame({"a": [1]}), p),
        "curves.png": lambda p: save_figure(fig, p),
        "state.json": lambda p: atomic_write_text(p, "{}"),
        "scoring_indices.txt": lambda p: save_indices(p, [1, 2]),
        "model.pt": lambda p: save_checkpoint(p, model, CFG, {}),
        "pruned.pt": lambda p: save_pruned(p, CFG, {"conv1": [0]}, model.state_dict(),
                                           (3, 32, 32)),
        "run_state": lambda p: RunState(p.parent).save({"x": 1}, layer="conv1"),
    }


@pytest.mark.parametrize("name", ["curves.csv", "curves.png", "state.json", "scoring_indices.txt",
                                  "model.pt", "pruned.pt", "run_state"])
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   PermissionError(errno.EACCES, "Permission denied")])
def test_write_failures(tmp_path, model, monkeypatch, name, error):
    write = _writers(tmp_path, model)[name]

    def replace(src, dst):
        raise error

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CarlibError) as e:
        write(tmp_path / "out" / name)
    msg = str(e.value)
    assert msg.startswith(f"cannot write {tmp_path / 'out'}/") and f"({error.strerror}); " in msg
    assert "choose a writable" in msg
    assert list((tmp_path / "out").iterdir()) == []  # the temporary file is gone


@pytest.mark.parametrize("name", ["curves.csv", "curves.png", "scoring_indices.txt", "model.pt"])
def test_write_under_a_file(tmp_path, model, name):
    (tmp_path / "file.txt").write_text("x")
    path = tmp_path / "file.txt" / "run" / name
    with pytest.raises(CarlibError, match=f"^cannot write {path} \\(Not a directory\\); choose"):
        _writers(tmp_path, model)[name](path)


def test_open_permission_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.open

    def deny(file, *args, **kwargs):
        if str(file).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    path = tmp_path / "state" / "x.json"
    with pytest.raises(CarlibError) as e:
        RunState(tmp_path / "state").save({"x": 1}, layer="conv1")
    assert "(Permission denied); choose a writable hydra.run.dir / method.state_dir" in str(e.value)
    with pytest.raises(CarlibError, match=f"^cannot write {path} \\(Permission denied\\)"):
        atomic_write_text(path, "{}")


def test_script_cache_dir_under_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    line = _one_line(run(tmp_path, *TINY, f"paths.cache_dir={tmp_path}/file.txt/cache",
                         "method.criteria=[l1]", "method.rank_agreement=false",
                         "method.per_class=false"))
    assert line.startswith(f"error: cannot write {tmp_path}/file.txt/cache/checkpoints/")
    assert line.endswith(".pt (Not a directory); choose a writable paths.cache_dir (or "
                         "model.checkpoint)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", ["prune.py", "train.py", "interpret.py", "compress.py"])
def test_script_run_dir_under_a_file(tmp_path, script):
    """Hydra makes the run folder before the script's guard runs: a callback checks it first."""
    (tmp_path / "file.txt").write_text("x")
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / script),
                          f"hydra.run.dir={tmp_path}/file.txt/run", "logger.mode=disabled"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert _one_line(res) == (f"error: cannot create the run folder {tmp_path}/file.txt/run "
                              "(Not a directory); choose a writable hydra.run.dir")


def test_script_state_dir_under_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    line = _one_line(run(tmp_path, *TINY, f"method.state_dir={tmp_path}/file.txt/state",
                         "method.criteria=[l1]", "method.rank_agreement=false",
                         "method.per_class=false"))
    assert line.startswith(f"error: cannot write {tmp_path}/file.txt/state/")
    assert line.endswith("(Not a directory); choose a writable hydra.run.dir / method.state_dir")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 8. configs


@pytest.mark.parametrize("override,message", [
    # needed a fix: a traceback, a silent run, or a message without the config key
    ("method.layers=[]", "method.layers=[] names none; list at least one, e.g. "
                         "method.layers=[conv1,conv2]"),
    ("method.layers=conv1", "method.layers=conv1 is not a list of names"),
    ("method.criteria=[]", "method.criteria=[] names none; list at least one"),
    ("data.batch_size=0", "data.batch_size=0 is not a positive integer; set data.batch_size=N"),
    ("threads=-1", "threads=-1 is not a positive integer; set threads=N (CPU threads) or "
                   "threads=null"),
    ("train.epochs=-1", "train.epochs=-1 is not an integer >= 0; set train.epochs=N"),
    ("method.keep_fraction=1.5", "method.keep_fraction=1.5 is not in (0, 1]; set the share"),
    ("method.scoring.size=0", "method.scoring.size=0 is not a positive integer"),
    ("method.scoring.size=5000", "method.scoring.size=5000 must be in 10..100 (at least one "
                                 "image per class; the val split has 100); set "
                                 "method.scoring.size in that range or a larger data.val_size"),
    # already one line (after training), now before it and naming the key
    ("method.k=0", "method.k=0 is not a positive integer; set method.k=N"),
    ("method.metric=top3", "method.metric=top3 is not one of top1, top5, loss"),
    ("method.criteria=[car,foo]", "method.criteria: unknown criterion 'foo'; valid: car,"),
])
def test_script_bad_config(tmp_path, override, message):
    line = _one_line(run(tmp_path, *TINY, override))
    assert line.startswith(f"error: {message}"), line
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # untrained
