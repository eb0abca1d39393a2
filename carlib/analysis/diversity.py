"""How much of a layer's filter diversity a kept subset retains.

Filters are compared as unit vectors of the flattened, mean-free weights. A filter and its negative
count as different (after a ReLU they detect opposite things).
- `coverage`: mean over all of the layer's filters of the best cosine to a kept filter
  (1.0 when every original filter has a kept near-copy).
- `clusters_covered`: the layer's filters are grouped by k-means (seeded); the share of groups
  with at least one kept filter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sklearn.cluster import KMeans


def unit_filters(weight: torch.Tensor) -> torch.Tensor:
    """(F, ...) weights -> (F, D) unit vectors of the mean-free filters, float64."""
    w = weight.detach().cpu().double().flatten(1)
    w = w - w.mean(1, keepdim=True)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def coverage(weight: torch.Tensor, kept: Sequence[int]) -> float:
    """Mean over all filters of the max cosine to a kept filter."""
    u = unit_filters(weight)
    return float((u @ u[list(kept)].T).amax(1).mean())


def cluster_labels(weight: torch.Tensor, n_clusters: int, seed: int = 0) -> torch.Tensor:
    """Seeded k-means cluster of each filter's unit vector."""
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed)
    return torch.as_tensor(km.fit_predict(unit_filters(weight).numpy()))


def clusters_covered(labels: torch.Tensor, kept: Sequence[int]) -> float:
    """Share of clusters holding at least one kept filter."""
    return len(set(labels[list(kept)].tolist())) / len(set(labels.tolist()))
