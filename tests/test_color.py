"""Color-selectivity indices and counts on constructed filters and images with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from carlib.analysis.color import (
    LUMA,
    color_count,
    response_color_index,
    to_grayscale,
    weight_color_index,
)
from carlib.network.graph import MaskedNet


def test_weight_index_known_filters():
    w = torch.zeros(4, 3, 3, 3)
    w[0] = torch.randn(1, 3, 3)          # same pattern in R, G, B: luminance only
    w[1, 0], w[1, 1] = 1.0, -1.0         # R - G: purely opponent
    w[2, 0] = torch.randn(3, 3)          # red channel only
    w[3, 2] = 1.0                        # blue only
    idx = weight_color_index(w)
    assert idx.tolist() == pytest.approx([0.0, 1.0, 2 / 3, 2 / 3], abs=1e-12)
    # dividing by a per-channel std that differs makes an equal-weight filter chromatic
    assert weight_color_index(w[:1], std=(0.2, 0.4, 0.4)).item() > 0.05
    with pytest.raises(ValueError, match="RGB"):
        weight_color_index(torch.zeros(2, 1, 3, 3))


def test_grayscale_keeps_luminance_and_is_idempotent():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    g = to_grayscale(x, mean, std)
    raw = lambda t: t * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)  # noqa: E731
    y = (raw(x) * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1)
    assert torch.allclose(raw(g)[:, 0], y) and torch.allclose(raw(g)[:, 2], y)
    assert torch.allclose(to_grayscale(g, mean, std), g)


class OneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 1, bias=False)
        self.conv1.weight.data.zero_()
        self.conv1.weight.data[0, :, 0, 0] = torch.tensor(LUMA)   # luminance: blind to color
        self.conv1.weight.data[1, :, 0, 0] = torch.tensor([1.0, -1.0, 0.0])  # red minus green
        self.conv1.weight.data[2, :, 0, 0] = torch.tensor([0.5, 0.3, 0.2])   # mostly luminance
        self.fc = nn.Linear(3 * 2 * 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv1(x)), 1))


def test_response_index_known_filters():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 2, 2, generator=g, dtype=torch.float64)
    net = MaskedNet(OneLayer().double())
    csi = response_color_index(net, "conv1", [(x, torch.zeros(40, dtype=torch.long))],
                               mean=(0, 0, 0), std=(1, 1, 1), top=10)
    assert csi[0].item() == pytest.approx(0.0, abs=1e-6)    # luminance filter (fp32 weights)
    assert csi[1].item() == pytest.approx(1.0)              # R-G is silent on gray images
    assert 0 < csi[2].item() < 0.5


def test_color_count_exact_permutation_p_value():
    selective = torch.tensor([True, True, False, False, False, False])
    r = color_count([0, 1, 2, 3, 4, 5], selective, top_k=2)
    assert r["color_selective"] == 2 and r["expected_random"] == pytest.approx(2 / 3)
    assert r["p_value"] == pytest.approx(1 / math.comb(6, 2))
    r = color_count([2, 3, 0], selective, top_k=3)
    # P(at least 1 of 2 selective among 3 drawn from 6) = 1 - C(4,3)/C(6,3)
    assert r["color_selective"] == 1
    assert r["p_value"] == pytest.approx(1 - math.comb(4, 3) / math.comb(6, 3))
    assert r["p_value_fewer"] == pytest.approx(
        (math.comb(4, 3) + 2 * math.comb(4, 2)) / math.comb(6, 3))  # 0 or 1 selective of 3
    r = color_count([3, 4], selective, top_k=2)
    assert r["p_value_fewer"] == pytest.approx(math.comb(4, 2) / math.comb(6, 2))


def test_color_count_leaves_dead_filters_out():
    selective = torch.tensor([True, True, False, False, False, False])
    dead = torch.tensor([False, False, False, False, True, True])
    r = color_count([4, 5, 0, 2], selective, top_k=3, dead=dead)  # 2 dead, then 0 (color)
    assert (r["dead_in_top_k"], r["live_in_top_k"], r["color_selective"]) == (2, 1, 1)
    assert r["layer_live"] == 4 and r["base_rate"] == pytest.approx(0.5)
    assert r["expected_random"] == pytest.approx(0.5)
    assert r["p_value"] == pytest.approx(0.5)  # 1 draw from 4 live filters, 2 selective


def test_response_index_is_nan_for_a_dead_filter():
    x = torch.rand(40, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = OneLayer().double()
    model.conv1.weight.data[0, :, 0, 0] = -torch.tensor(LUMA)  # negative on positive images
    csi = response_color_index(MaskedNet(model), "conv1", [(x, torch.zeros(40, dtype=torch.long))],
                               mean=(0, 0, 0), std=(1, 1, 1), top=10)
    assert torch.isnan(csi[0]) and csi[1].item() == pytest.approx(1.0)
