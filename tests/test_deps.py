"""One unit model (carlib.network.deps) and one list of pass-through ops (carlib.network.ops)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from carlib.models import build_model
from carlib.network.deps import Deps
from carlib.network.graph import MaskedNet
from carlib.physical.removal import removal_units
from carlib.pruning.criteria import relu_follows


def test_masking_and_removal_units_are_one_group() -> None:
    """Every conv of a masking unit has the removal unit with the same convs and consumers."""
    model = build_model("resnet_small", 6).eval()
    x = torch.randn(1, 3, 32, 32)
    removal = removal_units(model, x)
    deps = Deps.build(model, x)
    for unit in MaskedNet(model, x).units.values():
        for conv in unit.convs or (unit.name,):
            assert set(removal[conv].convs) == set(unit.convs or (unit.name,))
            assert set(removal[conv].consumers) == set(unit.consumers)
            assert removal[conv].convs == deps.in_order(removal[conv].convs)


class _Act(nn.Module):
    """conv -> act -> conv -> flatten -> linear; `act` one ReLU form."""

    def __init__(self, act: str) -> None:
        super().__init__()
        self.act = act
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)
        self.drop = nn.Dropout()
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h = {"relu": lambda: F.relu(h), "relu_": lambda: torch.relu_(h),
             "dropout_relu": lambda: F.relu(self.drop(h)), "relu6": lambda: F.relu6(h),
             "id": lambda: h}[self.act]()
        return self.fc(torch.flatten(self.conv2(h), 1))


def test_pass_through_ops_and_relu_follows() -> None:
    """The single-conv analysis passes ReLU (not its in-place functional form); relu_follows
    counts both and looks through dropout modules."""
    def net(act: str) -> MaskedNet:
        return MaskedNet(_Act(act).eval())

    assert "conv1" in net("relu").units and relu_follows(net("relu"), "conv1")
    assert "conv1" in net("dropout_relu").units and relu_follows(net("dropout_relu"), "conv1")
    assert "conv1" in net("id").units and not relu_follows(net("id"), "conv1")
    assert "conv1" not in net("relu_").units
    assert "conv1" not in net("relu6").units  # F.relu6 is a function: not passed
    grouped = MaskedNet(_Act("relu_").eval(), torch.randn(1, 3, 8, 8))
    assert relu_follows(grouped, "conv1")
