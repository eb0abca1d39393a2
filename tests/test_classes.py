"""Class importance report on a per-class CAR matrix with a known answer."""

from __future__ import annotations

import torch

from carlib.analysis.classes import class_importance


def test_most_and_least_important_classes():
    per_class = torch.tensor([[0.5, 0.0, -0.1],
                              [0.0, 0.2, 0.2],
                              [float("nan")] * 3], dtype=torch.float64)
    df = class_importance(per_class, ["cat", "dog", "car"], "conv1")
    assert df["filter"].tolist() == [0, 1]
    assert df["most_important"].tolist() == ["cat", "dog"]        # tie dog/car -> lower index
    assert df["least_important"].tolist() == ["car", "cat"]
    assert df["most_drop"].tolist() == [0.5, 0.2]
    two = class_importance(per_class, ["cat", "dog", "car"], "conv1", top=2)
    assert two["most_important"].iat[0] == "cat; dog"
