"""Diversity measures on filter sets with a known structure; galleries render."""

from __future__ import annotations

import pytest
import torch

from carlib.analysis.diversity import cluster_labels, clusters_covered, coverage, unit_filters
from carlib.viz.gallery import filter_gallery, top_images_gallery


def clustered_filters(n_groups: int = 4, per_group: int = 5, seed: int = 0) -> torch.Tensor:
    """n_groups well-separated prototypes, each with `per_group` slightly noisy copies."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(n_groups, 3, 3, 3, generator=g)
    noise = 0.01 * torch.randn(n_groups, per_group, 3, 3, 3, generator=g)
    return (protos[:, None] + noise).reshape(-1, 3, 3, 3)


def test_coverage_and_clusters_known_structure():
    w = clustered_filters()
    one_per_group = [0, 5, 10, 15]
    same_group = [0, 1, 2, 3]
    assert coverage(w, range(20)) == pytest.approx(1.0)
    assert coverage(w, one_per_group) > 0.99
    assert coverage(w, same_group) < coverage(w, one_per_group)
    labels = cluster_labels(w, n_clusters=4, seed=0)
    assert clusters_covered(labels, one_per_group) == 1.0
    assert clusters_covered(labels, same_group) == 0.25


def test_unit_filters_ignore_scale_and_offset():
    w = torch.randn(3, 3, 5, 5)
    assert torch.allclose(unit_filters(w), unit_filters(3 * w + 2))


def test_galleries_render():
    w = clustered_filters()
    fig = filter_gallery(w, list(range(20)), 8, labels=["color"] * 20, title="t", cols=10)
    assert len(fig.axes) == 20
    imgs = torch.rand(12, 3, 8, 8)
    fig = top_images_gallery(imgs, torch.rand(12, 4), [3, 1, 0, 2], 2, top=5)
    assert len(fig.axes) == 4 * 5
