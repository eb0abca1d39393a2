"""Regenerate every figure of a results folder from the CSVs beside it.

Walks the folders given (recursively, skipping .hydra/, state/, wandb/, .submitit/) and for every
CSV named in FIGURES writes its figure(s) next to it. Aggregated folders
(experiments/aggregate.py) work too: seeds are averaged (curves: mean with the min-max band),
and configurations that differ between the runs (the override columns of runs.csv beside the
CSV, or several models/datasets) get their own row of panels or their own bars. curves.png
notes CAR's regime under each panel's title when regime.csv is beside it; differences.png
(from differences.csv, with paired.csv's per-seed intervals) is drawn per study, and once
more for all studies together in the folder given when it holds several. A CSV that
cannot be plotted is named on stderr (exit status 2); the other figures are written all the same.
Gallery figures (experiments/interpret.py) need the model and are not regenerated.

    python experiments/figures.py results/               # every study under results/
    python experiments/figures.py outputs/multirun/2026-01-01_12-00-00
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from aggregate import (
    COMPARISON_COLUMNS,
    DIFFERENCE_COLUMNS,
    RUNS,
    SKIP_DIRS,
    SUMMARY_COLUMNS,
    condition_columns,
    condition_label,
    pruned_unit,
)

from carlib.analysis.classes import plot_class_importance
from carlib.analysis.color import plot_color_counts
from carlib.core.errors import CarlibError
from carlib.core.io import save_figure
from carlib.viz.plotting import (
    plot_before_after,
    plot_compression,
    plot_compression_choice,
    plot_curves,
    plot_decisions,
    plot_differences,
    plot_rank_agreement,
    plot_summary,
    regime_notes,
)


@dataclass
class Table:
    """A CSV to plot: its rows, the columns that tell configurations apart, a title prefix."""

    df: pd.DataFrame
    conditions: list[str]
    tag: str
    path: Path | None = None  # the CSV, to find the tables beside it

    def beside(self, name: str) -> pd.DataFrame | None:
        """The CSV `name` in the same folder, if there is one."""
        other = self.path.parent / name if self.path is not None else None
        return (pd.read_csv(other, dtype_backend="numpy_nullable")
                if other is not None and other.is_file() else None)


def _with_condition(t: Table) -> tuple[pd.DataFrame, str | None]:
    """The rows with a `condition` label column when configurations differ (else no column)."""
    if not t.conditions:
        return t.df, None
    return t.df.assign(condition=condition_label(t.df, t.conditions)), "condition"


def _distinct(t: Table, keys: Sequence[str]) -> list[str]:
    """Columns telling apart rows that share `keys`: the configurations, plus the seed when
    seeds differ, else the run when runs differ (runs copied without their overrides). Rows
    left alike (one seed's per-class CAR from two runs: the same model) are averaged."""
    cols, df = list(t.conditions), t.df
    if df.duplicated([*keys, *cols]).any():
        extra = [c for c in ("seed", "run") if c in df and df[c].nunique() > 1]
        cols += extra[:1]
    return cols


def curves_figures(t: Table) -> dict[str, plt.Figure]:
    df, row = _with_condition(t)
    df = df.assign(layer=pruned_unit(df))
    glob = "layer_remaining" in df and df["layer_remaining"].notna().any()
    what = "network-wide greedy pruning" if glob else "greedy pruning, each layer alone"
    regime = t.beside("regime.csv")
    notes = None
    if regime is not None:
        if row:
            regime = regime.assign(condition=condition_label(regime, t.conditions))
        notes = regime_notes(regime)
    return {"curves.png": plot_curves(df, title=f"{t.tag}{what}", row=row, notes=notes)}


def as_differences(comparisons: pd.DataFrame) -> pd.DataFrame:
    """comparisons.csv rows as differences to draw: every criterion against CAR, labelled with
    the verdict and the Holm-adjusted p-value (`experiments/aggregate.py`)."""
    def label(r: pd.Series) -> str:
        p = "" if pd.isna(r["p_holm"]) else f", Holm p={r['p_holm']:.2g}"
        if not pd.isna(r["p_tost_holm"]):
            p += f", TOST p={r['p_tost_holm']:.2g}"
        return f"{r['verdict']}{p}"

    return comparisons.assign(comparison=comparisons.apply(label, axis=1))


DIFFERENCES_TITLE = ("CAR minus every other criterion, end of pruning (verdict: Holm over the "
                     "study; TOST ±margin against loss, car_random_tie)\nblack: mean over seeds, "
                     "95% t-interval; color: each seed, 95% over held-out images")


def differences_figures(t: Table) -> dict[str, plt.Figure]:
    """differences.png: from comparisons.csv beside (every criterion) when there is one, else
    from differences.csv (CAR against the best others)."""
    comparisons = t.beside("comparisons.csv")
    if comparisons is not None:
        t = Table(as_differences(comparisons), t.conditions, t.tag, t.path)
    df, row = _with_condition(t)
    paired = t.beside("paired.csv")
    if paired is not None and row:
        paired = paired.assign(condition=condition_label(paired, t.conditions))
    title = (DIFFERENCES_TITLE if comparisons is not None else
             "CAR minus other criteria, end of pruning\nblack: mean over seeds, 95% "
             "t-interval; color: each seed, 95% over held-out images")
    return {"differences.png": plot_differences(df, paired, row=row, title=f"{t.tag}{title}")}


def rank_agreement_figures(t: Table) -> dict[str, plt.Figure]:
    df, row = _with_condition(t)
    if row:
        df = df.assign(layer=df["layer"].astype(str) + "\n" + df[row])
    return {"rank_agreement.png": plot_rank_agreement(
        df, title=f"{t.tag}rank agreement with CAR (full layers)")}


def color_counts_figures(t: Table) -> dict[str, plt.Figure]:
    if "run" in t.df and t.df["run"].nunique() > 1 and t.beside("color_summary.csv") is not None:
        return {}  # several runs: their pooled counts, color_summary.png, say more
    cols = _distinct(t, ["layer", "criterion"])
    df = t.df
    if cols:
        df = df.assign(criterion=df["criterion"].astype(str) + "\n"
                       + condition_label(df, cols).str.replace(", ", "\n"))
    return {"color_counts.png": plot_color_counts(df, title=f"{t.tag}color-selective filters "
                                                              "among the top-K pruned")}


def color_summary_figures(t: Table) -> dict[str, plt.Figure]:
    """color_summary[_<configuration>].png: the pooled counts, one figure per configuration
    (e.g. interpret.color.index; "default" where a run left it unset)."""
    figs = {}
    groups = (t.df.groupby(t.conditions, sort=False, dropna=False) if t.conditions
              else [((), t.df)])
    for _, g in groups:
        label = (condition_label(g.head(1), t.conditions).iat[0].replace("=-", "=default")
                 if t.conditions else "")
        runs = int(g["runs"].max())
        name = "color_summary" + (f"_{_slug(label)}" if label else "")
        figs[f"{name}.png"] = plot_color_counts(
            g.reset_index(drop=True), title=f"{t.tag}color-selective filters among the top-K "
            f"pruned, {runs} runs pooled (exact test of the sum)" + (f"; {label}" if label
                                                                       else ""))
    return figs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def class_matrix(rows: pd.DataFrame) -> tuple[torch.Tensor, list[str]]:
    """The (filters, classes) per-class CAR matrix of one layer from its tidy rows
    (`carlib.analysis.classes.per_class_frame`), and the class names; filters without rows (removed)
    are NaN, and rows repeated (several runs of one model) are averaged."""
    names = rows.drop_duplicates("class_index").sort_values("class_index")
    col = {int(k): j for j, k in enumerate(names["class_index"])}
    m = torch.full((int(rows["filter"].max()) + 1, len(col)), float("nan"), dtype=torch.float64)
    mean = rows.groupby(["filter", "class_index"])["car"].mean()
    for (f, k), v in mean.items():
        m[int(f), col[int(k)]] = float(v)
    return m, [str(c) for c in names["class_name"]]


def per_class_figures(t: Table) -> dict[str, plt.Figure]:
    """class_importance_<layer>[_<configuration>].png: the filters x classes matrix of each
    layer (and configuration or seed), rebuilt from the tidy rows. An aggregated table whose
    runs each keep their own table in their folder draws nothing: each run's folder has its
    own figure (a study of 3 seeds x 2 settings x 10 layers would otherwise repeat 60)."""
    cols = _distinct(t, ["layer", "filter", "class_index"])
    runs = t.df["run"].unique() if "run" in t.df else []
    if set(cols) & {"seed", "run"} and t.path is not None and len(runs) and all(
            (t.path.parent / str(r) / "per_class_car.csv").is_file() for r in runs):
        return {}
    figs = {}
    groups = t.df.groupby(cols, sort=False, dropna=False) if cols else [((), t.df)]
    for _, g in groups:
        label = condition_label(g.head(1), cols).iat[0] if cols else ""
        for layer, rows in g.groupby("layer", sort=False):
            m, classes = class_matrix(rows)
            name = f"class_importance_{layer}" + (f"_{_slug(label)}" if label else "")
            figs[f"{name}.png"] = plot_class_importance(
                m, classes, f"{t.tag}{layer}" + (f" ({label})" if label else ""))
    return figs


def diversity_figures(t: Table) -> dict[str, plt.Figure]:
    df, row = _with_condition(t)
    return {"diversity.png": plot_curves(df, y="clusters_covered", row=row,
                                         title=f"{t.tag}share of filter clusters kept")}


def summary_figures(t: Table) -> dict[str, plt.Figure]:
    conds = [c for c in t.df if c not in SUMMARY_COLUMNS]
    df = t.df
    if conds:  # bar labels: the value alone for one configuration column, else key=value lines
        label = (df[conds[0]].astype("string").fillna("-") if len(conds) == 1
                 else condition_label(df, conds).str.replace(", ", "\n"))
        df = df.assign(condition=label)
    return {"summary.png": plot_summary(df, title=f"{t.tag}held-out top-1 after pruning "
                                                  "(mean ± std over seeds)")}


def decisions_figures(t: Table) -> dict[str, plt.Figure]:
    """decisions.png: decision quality against the scoring-set size, where runs differ in it
    (the sizes study); nothing for other studies."""
    x = "method.scoring.size"
    if x not in t.conditions:
        return {}
    return {"decisions.png": plot_decisions(
        t.df, x, title=f"{t.tag}decisions against scoring-set size (mean over seeds, 95% "
                       "t-interval)")}


def compression_figures(t: Table) -> dict[str, plt.Figure]:
    """compression.png (carlib.viz.plotting.plot_compression) of one run; none for a study's
    aggregated table (each run folder has its own, compression_choice.png compares them)."""
    if "run" in t.df and t.df["run"].nunique() > 1:
        return {}
    return {"compression.png": plot_compression(t.df)}


def compression_choice_figures(t: Table) -> dict[str, plt.Figure]:
    return {"compression_choice.png": plot_compression_choice(
        t.df, title=f"{t.tag}layer compression of each criterion's pruned, fine-tuned network "
                    "(filled: the setting chosen on validation top-1)")}


def finetuned_figures(t: Table) -> dict[str, plt.Figure]:
    """finetuned.png (from finetuned_summary.csv) and differences_finetuned.png (from
    comparisons_finetuned.csv beside it)."""
    figs = {"finetuned.png": plot_before_after(
        t.df, title=f"{t.tag}every criterion's pruned network, fine-tuned with the same budget "
                    "(mean over seeds, 95% t-interval)")}
    comparisons = t.beside("comparisons_finetuned.csv")
    if comparisons is not None and len(comparisons):
        figs["differences_finetuned.png"] = plot_differences(
            as_differences(comparisons), title=f"{t.tag}CAR minus every other criterion "
            "after fine-tuning (verdict: Holm over the study; TOST ±margin against loss, "
            "car_random_tie)\nmean over seeds, 95% t-interval")
    return figs


# CSV file name -> the function giving its figures {png file name: figure}
FIGURES: dict[str, Callable[[Table], dict[str, plt.Figure]]] = {
    "curves.csv": curves_figures,
    "rank_agreement.csv": rank_agreement_figures,
    "color_counts.csv": color_counts_figures,
    "color_summary.csv": color_summary_figures,
    "per_class_car.csv": per_class_figures,
    "diversity.csv": diversity_figures,
    "summary.csv": summary_figures,
    "compression.csv": compression_figures,
    "differences.csv": differences_figures,
    "decisions.csv": decisions_figures,
    "finetuned_summary.csv": finetuned_figures,
    "compression_choice.csv": compression_choice_figures,
}


def find_csvs(root: Path) -> list[Path]:
    """The CSVs under `root` (or `root` itself) that FIGURES knows, in path order."""
    if root.is_file():
        return [root] if root.name in FIGURES else []
    if not root.is_dir():
        raise CarlibError(f"{root} does not exist; give a results or run folder")
    return sorted(p for p in root.rglob("*.csv") if p.name in FIGURES
                  and not SKIP_DIRS & set(p.relative_to(root).parts))


def make_figures(csv: Path) -> dict[str, plt.Figure]:
    """The figures of one CSV (file name in FIGURES), {png name: figure}; {} if it has no rows."""
    df = pd.read_csv(csv, dtype_backend="numpy_nullable")
    if df.empty:
        return {}
    runs = csv.parent / RUNS
    candidates = ["model", "dataset", *(pd.read_csv(runs, nrows=0).columns if runs.is_file()
                                        else [])]
    tag = " on ".join(str(df[c].iat[0]) for c in ("model", "dataset")
                      if c in df and df[c].nunique() == 1)
    try:
        return FIGURES[csv.name](Table(df, condition_columns(df, candidates),
                                       f"{tag}: " if tag else "", csv))
    except (KeyError, ValueError, TypeError) as e:
        raise CarlibError(f"{csv}: cannot plot it ({type(e).__name__}: {e}); is it an "
                          "unchanged output of carlib's experiments?") from e


def all_differences(root: Path) -> plt.Figure | None:
    """One differences figure of every study under `root` (folders with differences.csv),
    a row per study and configuration (not the scoring-set size studies, whose own
    differences.png has a row per size); None when fewer than two studies have one."""
    found = [p for p in find_csvs(root) if p.name == "differences.csv"]
    if len(found) < 2:
        return None
    diffs, paired = [], []
    for p in found:
        d = pd.read_csv(p, dtype_backend="numpy_nullable")
        known = DIFFERENCE_COLUMNS
        if (p.parent / "comparisons.csv").is_file():  # every criterion, with its verdict
            d = as_differences(pd.read_csv(p.parent / "comparisons.csv",
                                           dtype_backend="numpy_nullable"))
            known = (*COMPARISON_COLUMNS, "comparison")
        q = pd.read_csv(p.parent / "paired.csv", dtype_backend="numpy_nullable")
        conds = [c for c in d if c not in known]
        if "method.scoring.size" in conds:  # the sizes studies: their own figures
            continue
        for frame, out in ((d, diffs), (q, paired)):
            label = pd.Series(str(p.parent.relative_to(root)), index=frame.index)
            if conds:
                label = label + "\n" + condition_label(frame, conds)
            out.append(frame.assign(study=label))
    return plot_differences(pd.concat(diffs, ignore_index=True),
                            pd.concat(paired, ignore_index=True), row="study",
                            title=f"every study: {DIFFERENCES_TITLE}")


def write_figures(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """Write the figures of every known CSV under `paths` beside it, and `all_differences`
    into each path given; returns the PNG paths and one line per CSV that could not be
    plotted."""
    written, failed = [], []
    for root in paths:
        if root.is_dir() and (fig := all_differences(root)) is not None:
            written.append(save_figure(fig, root / "differences.png"))
            plt.close(fig)
        csvs = find_csvs(root)
        if not csvs:
            print(f"{root}: no CSVs with figures ({', '.join(FIGURES)})", file=sys.stderr)
        for csv in csvs:
            try:
                figs = make_figures(csv)
            except CarlibError as e:
                failed.append(str(e))
                continue
            for name, fig in figs.items():
                written.append(save_figure(fig, csv.parent / name))
                plt.close(fig)
    return written, failed


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", type=Path, default=[Path("results")],
                    help="results, run or multirun folders (default: results)")
    args = ap.parse_args(argv)
    try:
        written, failed = write_figures(args.paths)
    except CarlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    for line in failed:  # the other figures are written all the same
        print(f"error: {line}", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
