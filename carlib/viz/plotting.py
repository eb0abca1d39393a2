"""Plotting helpers over tidy DataFrames: a metric against filters remaining (with CAR's regime
under each panel's title); rank agreement; end-of-run accuracy per layer and criterion; paired
differences between criteria."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

STYLE = {"car": ("tab:red", "-"), "car_random_tie": ("tab:orange", "--"),
         "loss": ("tab:brown", "-"), "random": ("tab:gray", "--"), "l1": ("tab:blue", "-."),
         "l2": ("tab:cyan", "-."), "mean_activation": ("tab:green", ":"),
         "apoz": ("tab:olive", ":"), "taylor": ("tab:purple", "--")}


def _count_ticks(ax: plt.Axes, counts: pd.Series) -> None:
    """Integer ticks for filter counts, the first and last count among them."""
    lo, hi = int(counts.min()), int(counts.max())
    ticks = [int(t) for t in MaxNLocator(nbins=7, integer=True).tick_values(lo, hi)]
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1
    inner = [t for t in ticks if lo + step / 2 < t < hi - step / 2]
    ax.set_xticks(sorted({lo, hi, *inner}))


def _panel_label(name: object) -> str:
    """A panel title: a network-wide unit of many layers ('a+b+c+...') shortened."""
    text = str(name)
    parts = text.split("+")
    if len(parts) > 2 and len(text) > 40:
        return f"{len(parts)} layers, network-wide ({parts[0]} ... {parts[-1]})"
    return text


def regime_notes(regime: pd.DataFrame, reference: str = "car") -> dict:
    """Per layer (and `condition`, if a column): "scoring top-1 0.63, car decided 22/24" and,
    where regime.csv has `resolved` (carlib >= 0.7), a second line "car resolved 3/24 ...",
    from regime.csv rows (several seeds: mean top-1, removals summed); keys are the layer, or
    (condition, layer) when the frame has a `condition` column."""
    keys = ["condition", "layer"] if "condition" in regime else ["layer"]
    notes = {}
    for key, g in regime.groupby(keys, sort=False):
        ref = g[g["criterion"] == reference]
        text = f"scoring top-1 {g['scoring_top1'].mean():.2f}"
        if len(ref):
            n = int(ref["removals"].sum())
            text += f", {reference} decided {n - int(ref['tied'].sum())}/{n}"
            if "resolved" in ref and ref["resolved"].notna().all():
                done = round((ref["resolved"] * ref["removals"]).sum())
                text += f"\n{reference} resolved {done}/{n} (margin interval excludes 0)"
        notes[key if len(keys) > 1 else key[0]] = text
    return notes


def plot_curves(df: pd.DataFrame, y: str = "heldout_top1", panel: str = "layer",
                hue: str = "criterion", title: str | None = None,
                row: str | None = None, notes: dict | None = None) -> plt.Figure:
    """`y` against filters remaining: one panel per `panel` value, one curve per `hue` value.

    Rows sharing (panel, hue, filters_remaining) (e.g. several seeds) are averaged, with the
    min-max band shaded (the legend says so). Pruning proceeds left to right (x axis
    inverted). `row`, if given, is a column whose values (e.g. models or configurations of a
    sweep) each get a row of panels.
    `notes` ({panel: text} or {(row, panel): text}, e.g. `regime_notes`) go under the titles.
    """
    panels = list(dict.fromkeys(df[panel]))
    rows = list(dict.fromkeys(df[row])) if row else [None]
    banded = False
    width = 4.6 if len(panels) > 1 else 6.4
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(width * len(panels),
                                                              3.8 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        for ax, p in zip(axes[i], panels):
            sub = df[(df[panel] == p) & (df[row] == r if row else True)]
            for h, g in sub.groupby(hue, sort=False):
                color, ls = STYLE.get(h, (None, "-"))
                s = g.groupby("filters_remaining")[y].agg(["mean", "min", "max"]).sort_index()
                ax.plot(s.index, s["mean"] * 100, ls, color=color, label=h, lw=1.8)
                if (s["max"] > s["min"]).any():
                    ax.fill_between(s.index, s["min"] * 100, s["max"] * 100, color=color,
                                    alpha=0.15)
                    banded = True
            ax.invert_xaxis()
            _count_ticks(ax, sub["filters_remaining"])
            note = (notes or {}).get(p if r is None else (r, p))
            head = _panel_label(p) if r is None else f"{r}\n{_panel_label(p)}"
            ax.set_title(head + (f"\n{note}" if note else ""), fontsize=10 if r is None else 9)
            ax.set_xlabel("filters remaining")
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel(f"{y.replace('_', ' ')} (%)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if banded:  # say what the shading is
        handles.append(Patch(color="0.5", alpha=0.3))
        labels.append("shaded: min-max\nover seeds (line: mean)")
    axes[0][-1].legend(handles, labels, title=hue, frameon=False, loc="upper left",
                       bbox_to_anchor=(1.02, 1), fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_rank_agreement(df: pd.DataFrame, reference: str = "car",
                        title: str | None = None) -> plt.Figure:
    """Heatmaps (layers x criteria) of Spearman and Kendall correlation with `reference`.

    `df` is `carlib.analysis.agreement.rank_agreement`'s frame; each cell is annotated with its
    value (1 = the same ranking as the reference, 0 = unrelated, -1 = reversed). Rows sharing
    (layer, criterion), e.g. several seeds, are averaged.
    """
    df = df.groupby(["layer", "criterion"], sort=False)[["spearman", "kendall"]].mean(
    ).reset_index()
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


def plot_summary(df: pd.DataFrame, y: str = "heldout_top1", title: str | None = None
                 ) -> plt.Figure:
    """Bars of `{y}_mean` (error bar: `{y}_std`, n in the label) per criterion, one panel per
    layer, with `{y}_full` (the unpruned network) as a dashed tick if present; `df` is a
    summary table (one row per layer, criterion and configuration, experiments/aggregate.py).
    A `condition` column, if present, labels each bar with its configuration; `scoring_top1`
    and `car_decided` columns, if present, note CAR's regime under each panel's title (their
    mean over the panel's configurations, said so when there are several)."""
    layers = list(dict.fromkeys(df["layer"]))
    bars = int(df.groupby("layer").size().max())
    fig, axes = plt.subplots(1, len(layers), figsize=(len(layers) * (1.2 + 0.75 * bars), 3.8),
                             squeeze=False, sharey=True)
    for ax, layer in zip(axes[0], layers):
        sub = df[df["layer"] == layer].reset_index(drop=True)
        colors = [STYLE.get(c, ("tab:gray", "-"))[0] for c in sub["criterion"]]
        err = sub[f"{y}_std"].fillna(0) * 100
        ax.bar(sub.index, sub[f"{y}_mean"] * 100, yerr=err, color=colors, capsize=3, alpha=0.85)
        if f"{y}_full" in sub:
            ax.hlines(sub[f"{y}_full"] * 100, sub.index - 0.4, sub.index + 0.4, colors="k",
                      linestyles="--", label="full network")
        labels = [f"{c}\n{cond}" if "condition" in sub else c
                  for c, cond in zip(sub["criterion"], sub.get("condition", sub["criterion"]))]
        ax.set_xticks(sub.index, [f"{lab}\nn={n}" for lab, n in zip(labels, sub["n"])],
                      fontsize=7)
        regime = ""  # CAR's regime, when the summary has it (experiments/aggregate.py)
        if "scoring_top1" in sub and sub["scoring_top1"].notna().any():
            regime = f"\nscoring top-1 {sub['scoring_top1'].mean():.2f}"
            if "car_decided" in sub and sub["car_decided"].notna().any():
                regime += f", car decided {sub['car_decided'].mean():.0%} of removals"
            pooled = sub["condition"].nunique() if "condition" in sub else 1
            if pooled > 1:  # say what the regime's means pool
                regime += f"\n(mean over {pooled} configurations)"
        ax.set_title(f"{_panel_label(layer)}{regime}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"{y.replace('_', ' ')} at the end (%)")
    if f"{y}_full" in df:
        axes[0][0].legend(fontsize=7, frameon=False, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_compression(df: pd.DataFrame) -> plt.Figure:
    """Bits of the layer per stage (log axis, ratio annotated) and held-out top-1 per stage."""
    x = range(len(df))
    labels = [s.replace("_", "\n") for s in df.stage]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.bar(x, df.bits, color="tab:blue", alpha=0.8)
    ax1.set_yscale("log")
    ax1.set_ylim(df.bits.min() / 2, df.bits.max() * 3)
    for i, r in zip(x, df.itertuples()):
        ax1.annotate(f"{r.ratio:.1f}x", (i, r.bits), ha="center", va="bottom",
                     xytext=(0, 2), textcoords="offset points", fontsize=9)
    ax1.set_ylabel(f"bits of {df.layer.iat[0]} (log)")
    ax1.set_title("layer size (ratio: original / stage)")
    ax2.plot(x, df.heldout_top1 * 100, "o-", color="tab:red", label="after retraining")
    ax2.plot(x, df.heldout_top1_before_retrain * 100, "o", mfc="none", color="tab:gray",
             label="before retraining")
    for i, v in zip(x, df.heldout_top1):
        ax2.annotate(f"{v * 100:.2f}", (i, v * 100), ha="center", va="bottom",
                     xytext=(0, 4), textcoords="offset points", fontsize=9)
    ax2.margins(x=0.1, y=0.25)
    ax2.set_ylabel("held-out top-1 (%)")
    ax2.set_title("accuracy per stage")
    ax2.legend(frameon=False, fontsize=8, loc="best")
    for ax in (ax1, ax2):
        ax.set_xticks(list(x), labels)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{df.model.iat[0]} on {df.dataset.iat[0]}: compressing {df.layer.iat[0]}")
    fig.tight_layout()
    return fig


def plot_differences(diffs: pd.DataFrame, paired: pd.DataFrame | None = None,
                     row: str | None = None, title: str | None = None) -> plt.Figure:
    """Forest plot of paired differences in held-out top-1 (percentage points), CAR minus
    another criterion: one panel per layer (and `row` value), one line per criterion compared
    (comparisons naming the same criterion, e.g. the next best being the loss criterion,
    share a line), labelled with the mean and its interval.

    `diffs` has differences.csv's rows (experiments/aggregate.py): the mean over seeds with its
    95% interval is drawn black (a hollow marker and no interval for one seed). `paired`
    (paired.csv rows), if given, adds each seed's own difference with its 95% interval over
    held-out images, in color, just below.
    """
    rows = list(dict.fromkeys(diffs[row])) if row else [None]
    layers = {r: list(dict.fromkeys((diffs[diffs[row] == r] if row else diffs)["layer"]))
              for r in rows}
    ncol = max(len(v) for v in layers.values())
    lines = diffs.groupby(["layer", *([row] if row else [])], sort=False)["versus"].nunique()
    per_row = max(0.62 * int(lines.max()), 1.4)  # a panel of one line keeps room for its labels
    fig, axes = plt.subplots(len(rows), ncol, squeeze=False,
                             figsize=(6.8 * ncol, 1.2 + per_row * len(rows)))
    for i, r in enumerate(rows):
        for j in range(ncol):
            ax = axes[i][j]
            if j >= len(layers[r]):
                ax.set_visible(False)
                continue
            layer = layers[r][j]
            sub = diffs[(diffs["layer"] == layer) & (diffs[row] == r if row else True)]
            labels = []
            for y, (versus, g) in enumerate(sub.groupby("versus", sort=False)):
                d = g.iloc[0]
                # one seed, or the same difference in every seed: no interval to draw
                one = d.n_seeds < 2 or pd.isna(d.diff_lo) or pd.isna(d.diff_hi)
                spread = (", 1 seed, no interval" if d.n_seeds < 2 else
                          f", n={d.n_seeds}, no spread" if one else
                          f" [{d.diff_lo * 100:+.1f}, {d.diff_hi * 100:+.1f}], n={d.n_seeds}")
                labels.append(f"vs {versus} ({', '.join(g['comparison'])})\n"
                              f"{d.diff_mean * 100:+.1f}{spread}")
                color = STYLE.get(versus, ("tab:gray", "-"))[0]
                if paired is not None:
                    p = paired[(paired["layer"] == layer) & (paired["criterion"] == "car")
                               & (paired["versus"] == versus)
                               & (paired[row] == r if row and row in paired else True)]
                    offsets = np.linspace(0.12, 0.38, max(len(p), 1))
                    for off, q in zip(offsets, p.itertuples()):
                        ax.plot([q.lo * 100, q.hi * 100], [y + off] * 2, color=color, lw=1,
                                alpha=0.7)
                        ax.plot(q.diff * 100, y + off, "o", color=color, ms=3.5)
                if not one:
                    ax.plot([d.diff_lo * 100, d.diff_hi * 100], [y, y], color="k", lw=2.5)
                ax.plot(d.diff_mean * 100, y, "D", color="k", ms=6, mfc="none" if one else "k")
            ax.axvline(0, color="0.4", lw=1, ls="--")
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
            ax.set_ylim(len(labels) - 0.45, -0.6)
            ax.set_xlabel("CAR minus other: held-out top-1 (pp)", fontsize=9)
            ax.set_title(_panel_label(layer) if r is None else f"{r}: {_panel_label(layer)}",
                         fontsize=9)
            ax.grid(axis="x", alpha=0.3)
    _layout_under_title(fig, title)
    return fig


def _layout_under_title(fig: plt.Figure, title: str | None, fontsize: int = 11) -> None:
    """tight_layout below `title`, pinned 0.1 in from the top: the band it keeps is the title's
    own height whatever the figure's (a fraction of a tall figure would overlap or waste)."""
    if not title:
        fig.tight_layout()
        return
    height = fig.get_figheight()
    text = fig.suptitle(title, fontsize=fontsize, y=1 - 0.1 / height, va="top")
    text.set_in_layout(False)  # the rect below keeps its room, once
    below = 0.1 + text.get_window_extent().height / fig.dpi + 0.1
    fig.tight_layout(rect=(0, 0, 1, 1 - below / height))
    text.set_in_layout(True)  # and a tight bbox on saving keeps the title


def plot_decisions(df: pd.DataFrame, x: str, title: str | None = None) -> plt.Figure:
    """Decision quality against `x` (e.g. the scoring-set size, log axis), one column of panels
    per layer, from a decisions table (experiments/aggregate.py): held-out top-1 at the end
    (mean over seeds, 95% interval as error bars), the share of removals that are also the best
    on fresh images (`check_same`, where checked), the criterion's reliability there
    (`check_rho`) and the share resolved on the scoring images.
    Points of a criterion are offset a little along x so that error bars do not hide each
    other; the full network's held-out top-1 is the dashed line where `heldout_top1_full`
    is given."""
    layers = list(dict.fromkeys(df["layer"]))
    rows = [("heldout_top1", "held-out top-1 at the end (%)"),
            ("check_same", "pick also best on fresh images (%)"),
            ("check_rho", "score reliability: Spearman,\nscoring vs fresh images (x100)"),
            ("resolved", "removals resolved on scoring images (%)")]
    rows = [r for r in rows if r[0] in df and df[r[0]].notna().any()]
    fig, axes = plt.subplots(len(rows), len(layers), figsize=(4.6 * len(layers) + 1.6,
                             2.7 * len(rows) + 0.6), squeeze=False, sharex=True)
    crits = list(dict.fromkeys(df["criterion"]))
    for j, layer in enumerate(layers):
        sub = df[df["layer"] == layer]
        for i, (y, label) in enumerate(rows):
            ax = axes[i][j]
            for c_i, (crit, g) in enumerate(sub.groupby("criterion", sort=False)):
                g = g.sort_values(x)
                if g[y].isna().all():
                    continue
                color, ls = STYLE.get(crit, ("tab:gray", "-"))
                xs = g[x].astype(float) * 1.04 ** (c_i - (len(crits) - 1) / 2)
                err = None
                if y == "heldout_top1" and f"{y}_lo" in g:
                    err = np.vstack([(g[y] - g[f"{y}_lo"]).fillna(0),
                                     (g[f"{y}_hi"] - g[y]).fillna(0)]).astype(float) * 100
                ax.errorbar(xs, g[y].astype(float) * 100, yerr=err, color=color, ls=ls,
                            marker="o", ms=4, capsize=3, label=crit)
            if y == "heldout_top1" and "heldout_top1_full" in sub:
                ax.axhline(sub["heldout_top1_full"].mean() * 100, color="k", ls="--", lw=0.8,
                           label="full network")
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(_panel_label(layer))
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
            if i == len(rows) - 1:
                ax.set_xlabel(x.replace("method.scoring.size", "scoring images"))
    sizes = sorted(df[x].astype(float).unique())
    for ax in axes[-1]:
        ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
        ax.minorticks_off()
    axes[0][-1].legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_before_after(df: pd.DataFrame, title: str | None = None) -> plt.Figure:
    """Held-out top-1 of each criterion's pruned network before (hollow) and after (filled)
    fine-tuning with the same budget, mean with its 95% t-interval over seeds, one panel per
    layer; the dashed line is the full network. `df`: finetuned_summary.csv rows."""
    layers = list(dict.fromkeys(df["layer"]))
    fig, axes = plt.subplots(1, len(layers), squeeze=False, figsize=(6.2 * len(layers), 4.4))
    for ax, layer in zip(axes[0], layers):
        sub = df[df["layer"] == layer].reset_index(drop=True)
        for x, r in sub.iterrows():
            color = STYLE.get(r["criterion"], ("tab:gray", "-"))[0]
            for shift, key, fill in ((-0.15, "heldout_top1_before", "none"),
                                     (0.15, "heldout_top1", color)):
                lo, hi = r.get(f"{key}_lo"), r.get(f"{key}_hi")
                if pd.notna(lo) and pd.notna(hi):
                    ax.plot([x + shift] * 2, [lo * 100, hi * 100], color=color, lw=1.5)
                ax.plot(x + shift, r[key] * 100, "o", color=color, mfc=fill, ms=6)
            ax.annotate("", (x + 0.15, r["heldout_top1"] * 100),
                        (x - 0.15, r["heldout_top1_before"] * 100),
                        arrowprops={"arrowstyle": "->", "color": "0.6", "lw": 0.8})
        ax.axhline(sub["heldout_top1_full"].mean() * 100, color="0.3", ls="--", lw=1,
                   label="full network")
        ax.set_xticks(range(len(sub)), sub["criterion"], rotation=35, ha="right", fontsize=8)
        n = int(sub["n_seeds"].max())
        ax.set_ylabel(f"held-out top-1 (%), mean over {n} seed{'s' * (n > 1)}", fontsize=9)
        ax.set_title(f"{_panel_label(layer)}: {int(sub['filters_remaining'].iloc[0])} filters "
                     f"left; hollow: pruned, filled: after {int(sub['retrain_epochs'].iloc[0])}"
                     " epochs", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93) if title else None)
    return fig


def plot_compression_choice(df: pd.DataFrame, title: str | None = None) -> plt.Figure:
    """Held-out top-1 against the layer's compression ratio after weight pruning, sharing and
    coding, per criterion (color) and setting (marker), mean with its 95% t-interval over
    seeds, one panel per layer; the setting chosen on validation top-1 is filled.
    `df`: compression_choice.csv rows."""
    layers = list(dict.fromkeys(df["layer"]))
    markers = dict(zip(dict.fromkeys(df["setting"]), "osD^v"))
    fig, axes = plt.subplots(1, len(layers), squeeze=False, figsize=(5.6 * len(layers), 4.4))
    for ax, layer in zip(axes[0], layers):
        for r in df[df["layer"] == layer].itertuples():
            color = STYLE.get(r.criterion, ("tab:gray", "-"))[0]
            if pd.notna(r.heldout_top1_lo):
                ax.plot([r.ratio] * 2, [r.heldout_top1_lo * 100, r.heldout_top1_hi * 100],
                        color=color, lw=1.2)
            ax.plot(r.ratio, r.heldout_top1 * 100, markers[r.setting], color=color, ms=7,
                    mfc=color if r.chosen else "none",
                    label=f"{r.criterion}, {r.setting}{' (chosen)' if r.chosen else ''}")
        ax.set_xlabel("compression ratio of the layer (original bits / final bits)", fontsize=9)
        ax.set_ylabel("held-out top-1 (%) after compression", fontsize=9)
        ax.set_title(_panel_label(layer), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93) if title else None)
    return fig
