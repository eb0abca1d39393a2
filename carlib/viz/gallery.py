"""Filter galleries: first-layer filters as RGB images, and top-activating images of any filter.

Both draw filters in pruning order (first removed at top-left), frame pruned filters red and
kept ones green, and print each filter's index and color/shape label.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

PRUNED, KEPT = "tab:red", "tab:green"


def _frame(ax, color: str, title: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_color(color)
        s.set_linewidth(2.5)
    ax.set_title(title, fontsize=7, color=color, pad=2)


def _label(i: int, labels: Sequence[str] | None) -> str:
    return f"#{i}" + (f" {labels[i]}" if labels is not None else "")


def filter_gallery(weight: torch.Tensor, order: Sequence[int], n_pruned: int,
                   labels: Sequence[str] | None = None, title: str = "", cols: int = 16
                   ) -> plt.Figure:
    """RGB filters (F, 3, k, k) in `order`; the first `n_pruned` of it are the pruned ones.

    Each filter is scaled on its own, symmetrically around gray: w / (2 max|w|) + 0.5.
    """
    w = weight.detach().cpu().float()
    rows = -(-len(order) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.95 + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for pos, i in enumerate(order):
        ax = axes.flat[pos]
        ax.axis("on")
        f = w[i]
        img = (f / (2 * f.abs().max().clamp_min(1e-12)) + 0.5).permute(1, 2, 0).clamp(0, 1)
        ax.imshow(img.numpy(), interpolation="nearest")
        _frame(ax, PRUNED if pos < n_pruned else KEPT, _label(i, labels))
    fig.suptitle(f"{title}\nred: pruned (in removal order), green: kept", fontsize=9)
    fig.tight_layout()
    return fig


def top_images_gallery(images: torch.Tensor, responses: torch.Tensor, order: Sequence[int],
                       n_pruned: int, labels: Sequence[str] | None = None, top: int = 6,
                       title: str = "") -> plt.Figure:
    """For each filter in `order` (one row), its `top` highest-responding images.

    `images` are displayable RGB in [0, 1], shape (N, 3, H, W); `responses` is (N, filters).
    A filter with no positive response (dead) gets an empty row marked "no response".
    """
    rows = len(order)
    fig, axes = plt.subplots(rows, top, figsize=(top * 0.9, rows * 0.95 + 1.0), squeeze=False)
    for r, i in enumerate(order):
        best = responses[:, i].topk(min(top, len(images))).indices
        alive = bool((responses[:, i] > 0).any())
        color = PRUNED if r < n_pruned else KEPT
        for c in range(top):
            ax = axes[r][c]
            if c < len(best) and alive:
                ax.imshow(images[best[c]].permute(1, 2, 0).clamp(0, 1).numpy())
            elif c == 1 and not alive:
                ax.text(0.5, 0.5, "no response", ha="center", va="center", fontsize=7,
                        transform=ax.transAxes)
            _frame(ax, color, _label(i, labels) if c == 0 else "")
    fig.suptitle(f"{title}\nrows: filters in removal order (red pruned, green kept); "
                 "columns: top-responding images", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / (rows * 0.95 + 1.0)))  # room for the title
    return fig
