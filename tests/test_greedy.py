"""Greedy pruning on constructed networks whose right answer is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from carlib import CarlibError, greedy_prune


class Toy(nn.Module):
    """1x1 conv whose filter i reads input channel src[i] times scale[i]; class 1 = sum > 0.5."""

    def __init__(self, src: list[int], scale: list[float]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(max(src) + 1, len(src), 1, bias=False)
        self.conv1.weight.data.zero_()
        for i, (s, a) in enumerate(zip(src, scale)):
            self.conv1.weight.data[i, s] = a
        self.fc = nn.Linear(len(src), 2)
        self.fc.weight.data = torch.stack([torch.zeros(len(src)), torch.ones(len(src))])
        self.fc.bias.data = torch.tensor([0.5, 0.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv1(x)), 1))


def groups(sizes: list[int], channels: int, negatives: int = 5) -> list[tuple]:
    """Group i: `sizes[i]` images with only channel i on (label 1); all-zero images are label 0."""
    xs, ys = [], []
    for i, n in enumerate(sizes):
        x = torch.zeros(n, channels, 1, 1)
        x[:, i] = 1.0
        xs.append(x)
        ys.append(torch.ones(n, dtype=torch.long))
    xs.append(torch.zeros(negatives, channels, 1, 1))
    ys.append(torch.zeros(negatives, dtype=torch.long))
    return [(torch.cat(xs), torch.cat(ys))]


def test_car_removes_least_needed_first():
    model = Toy([0, 1, 2, 3], [1, 1, 1, 1])
    data = groups([3, 1, 4, 2], 4)
    trace = greedy_prune(model, "conv1", data, n_keep=1, progress=False)
    assert trace.removed == [1, 3, 0]
    n = 15
    assert trace.to_frame()["score"].tolist()[1:] == pytest.approx([1 / n, 2 / n, 3 / n])
    assert trace.to_frame()["scoring_acc"].tolist() == pytest.approx(
        [1, 14 / n, 12 / n, 9 / n])


def test_ties_go_to_smaller_loss_increase_then_lower_index():
    # every filter serves 2 images (equal CAR); a stronger filter's loss rises more when removed
    model = Toy([0, 1, 2, 3], [3.0, 1.0, 2.0, 1.0])
    data = groups([2, 2, 2, 2], 4)
    trace = greedy_prune(model, "conv1", data, n_keep=1, progress=False)
    df = trace.to_frame()
    assert trace.removed == [1, 3, 2]
    assert df["tie_break"].tolist()[1:] == ["index", "loss", "loss"]
    assert df["tie_size"].tolist()[1:] == [4, 3, 2]


def test_greedy_rescoring_sees_redundancy():
    # filters 0 and 1 are redundant copies (either one suffices), filter 2 serves one image:
    # once 0 is gone, 1 becomes important, so greedy removes 2 before 1
    model = Toy([0, 0, 1], [1.0, 1.0, 1.0])
    data = groups([3, 1], 2)
    trace = greedy_prune(model, "conv1", data, n_keep=1, progress=False)
    assert trace.removed == [0, 2]
    df = trace.to_frame()
    assert df["score"].tolist()[1:] == pytest.approx([0.0, 1 / 9])


def test_l1_and_random_orders():
    model = Toy([0, 1, 2, 3], [0.5, 2.0, 0.1, 1.0])
    data = groups([1, 1, 1, 1], 4)
    assert greedy_prune(model, "conv1", data, 1, "l1", progress=False).removed == [2, 0, 3]
    a = greedy_prune(model, "conv1", data, 1, "random", seed=3, progress=False).removed
    b = greedy_prune(model, "conv1", data, 1, "random", seed=3, progress=False).removed
    expected = [i for i in torch.randperm(4, generator=torch.Generator().manual_seed(3)).argsort()
                .tolist()][:3]
    assert a == b == expected


def test_heldout_accuracy_recorded_and_bad_n_keep():
    model = Toy([0, 1, 2, 3], [1, 1, 1, 1])
    data = groups([3, 1, 4, 2], 4)
    held = groups([1, 1, 1, 1], 4, negatives=1)
    df = greedy_prune(model, "conv1", data, 2, eval_data=held, progress=False).to_frame()
    assert df["heldout_top1"].tolist() == pytest.approx([1.0, 0.8, 0.6])
    assert df["filters_remaining"].tolist() == [4, 3, 2]
    for bad in (0, 5):
        with pytest.raises(CarlibError, match="n_keep"):
            greedy_prune(model, "conv1", data, bad, progress=False)
    with pytest.raises(CarlibError, match="unknown criterion"):
        greedy_prune(model, "conv1", data, 2, "nope", progress=False)
