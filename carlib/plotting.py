"""Plotting helpers over tidy DataFrames: a metric against filters remaining; rank agreement."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

STYLE = {"car": ("tab:red", "-"), "random": ("tab:gray", "--"), "l1": ("tab:blue", "-."),
         "l2": ("tab:cyan", "-."), "mean_activation": ("tab:green", ":"),
         "apoz": ("tab:olive", ":"), "taylor": ("tab:purple", "--")}


def plot_curves(df: pd.DataFrame, y: str = "heldout_top1", panel: str = "layer",
                hue: str = "criterion", title: str | None = None) -> plt.Figure:
    """`y` against filters remaining: one panel per `panel` value, one curve per `hue` value.

    Rows sharing (panel, hue, filters_remaining) (e.g. several seeds) are averaged, with the
    min-max band shaded. Pruning proceeds left to right (x axis inverted).
    """
    panels = list(dict.fromkeys(df[panel]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, p in zip(axes[0], panels):
        sub = df[df[panel] == p]
        for h, g in sub.groupby(hue, sort=False):
            color, ls = STYLE.get(h, (None, "-"))
            s = g.groupby("filters_remaining")[y].agg(["mean", "min", "max"]).sort_index()
            ax.plot(s.index, s["mean"] * 100, ls, color=color, label=h, lw=1.8)
            if (s["max"] > s["min"]).any():
                ax.fill_between(s.index, s["min"] * 100, s["max"] * 100, color=color, alpha=0.15)
        ax.invert_xaxis()
        ax.set_title(str(p))
        ax.set_xlabel("filters remaining")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{y.replace('_', ' ')} (%)")
    axes[0][-1].legend(title=hue, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_rank_agreement(df: pd.DataFrame, reference: str = "car",
                        title: str | None = None) -> plt.Figure:
    """Heatmaps (layers x criteria) of Spearman and Kendall correlation with `reference`.

    `df` is `carlib.agreement.rank_agreement`'s frame; each cell is annotated with its value
    (1 = the same ranking as the reference, 0 = unrelated, -1 = reversed).
    """
    layers = list(dict.fromkeys(df["layer"]))
    names = list(dict.fromkeys(df["criterion"]))
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.9 * len(names), 1.6 + 0.55 * len(layers)),
                             squeeze=False, layout="constrained")
    for ax, stat in zip(axes[0], ("spearman", "kendall")):
        grid = df.pivot(index="layer", columns="criterion", values=stat).loc[layers, names]
        im = ax.imshow(grid.to_numpy(dtype=float), cmap="RdBu_r", vmin=-1, vmax=1,
                       aspect="auto")
        for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                    fontsize=9, color="white" if abs(v) > 0.6 else "black")
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_title(f"{stat.capitalize()} with {reference}")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9)
    if title:
        fig.suptitle(title)
    return fig
