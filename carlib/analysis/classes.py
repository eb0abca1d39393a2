"""Class-specific importance: which classes each filter serves, from per-class CAR."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch


def class_importance(per_class: torch.Tensor, classes: Sequence[str], layer: str,
                     top: int = 1) -> pd.DataFrame:
    """One row per filter: its `top` most and least important classes by per-class CAR.

    `per_class` is (filters, classes): the per-class accuracy drop when the filter is removed.
    Ties go to the lower class index. Removed filters (NaN rows) are skipped.
    """
    rows = []
    for f, drops in enumerate(per_class.double()):
        if torch.isnan(drops).all():
            continue
        order = sorted(range(len(classes)), key=lambda k: (-float(drops[k]), k))
        least = sorted(range(len(classes)), key=lambda k: (float(drops[k]), k))
        rows.append({
            "layer": layer, "filter": f, "car_mean": float(drops.mean()),
            "most_important": "; ".join(classes[k] for k in order[:top]),
            "most_drop": float(drops[order[0]]),
            "least_important": "; ".join(classes[k] for k in least[:top]),
            "least_drop": float(drops[least[0]]),
        })
    return pd.DataFrame(rows)


def per_class_frame(per_class: torch.Tensor, classes: Sequence[str], layer: str) -> pd.DataFrame:
    """Tidy per-class CAR: one row per (filter, class) with the class's accuracy drop.

    Removed filters (NaN rows) are skipped; a class absent from the scoring set gives NaN.
    """
    rows = [{"layer": layer, "filter": f, "class_index": k, "class_name": classes[k],
             "car": float(v)}
            for f, drops in enumerate(per_class.double()) if not torch.isnan(drops).all()
            for k, v in enumerate(drops.tolist())]
    return pd.DataFrame(rows, columns=["layer", "filter", "class_index", "class_name", "car"])


def plot_class_importance(per_class: torch.Tensor, classes: Sequence[str], title: str = ""):
    """Heatmap of per-class CAR in percentage points: filters (highest mean CAR first) x classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pc = per_class.double()
    keep = ~torch.isnan(pc).all(1)
    idx = torch.nonzero(keep).flatten()
    idx = idx[pc[idx].mean(1).argsort(descending=True, stable=True)]
    m = (pc[idx] * 100).numpy()
    lim = max(float(abs(m).max()), 1e-9)
    fig, ax = plt.subplots(figsize=(0.45 * len(classes) + 2.5, 0.16 * len(idx) + 1.6))
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(idx)), [f"#{i}" for i in idx.tolist()], fontsize=6)
    ax.set_ylabel("filter (highest mean CAR on top)")
    fig.colorbar(im, ax=ax, label="per-class accuracy drop (pp)", shrink=0.8)
    ax.set_title(f"{title}\nper-class CAR of each filter (full network)", fontsize=9)
    fig.tight_layout()
    return fig
