"""Aggregate a sweep: concatenate the tidy CSVs of its runs and summarize the greedy runs.

Takes a multirun folder (`python experiments/prune.py -m ...`; any folder holding Hydra run
folders, found by their `.hydra/`; failing those, its subfolders holding CSVs, e.g. runs copied
to results/<study>/<run>/) or several run folders, and writes to `--out` (default: the one
folder given):

- `<name>.csv` for every CSV name the runs have (curves.csv, rank_agreement.csv,
  per_class_car.csv, color_counts.csv, diversity.csv, cost.csv, ...): the rows of all runs,
  with `run` (the run folder, relative to the input) and each command-line override of the run
  (`.hydra/overrides.yaml`, if any, e.g. `method.metric`) as columns, unless already a column;
- `runs.csv`: one row per run with its overrides;
- `summary.csv` (from curves.csv): held-out top-1 at the end of each greedy run, mean, std and n
  over seeds (`--over`) per model, dataset, layer, criterion and configuration (the overrides
  that differ between runs, e.g. a swept `method.metric`); with regime.csv, CAR's regime
  beside it: `scoring_top1` (the full network's scoring top-1, mean over seeds),
  `decided` (the share of this criterion's removals its score decided without a tie, pooled
  over seeds) and `car_decided` (the same for `car` on that layer);
- `differences.csv` (from paired.csv and the summary): CAR minus the next best criterion (the
  best mean end accuracy other than CAR and its random-tie ablation), minus the loss
  criterion, minus its random-tie ablation and minus the best baseline, per layer: the mean
  paired difference over seeds with its Student-t 95% interval, and how many seeds' own
  held-out intervals (paired.csv) lie above or below 0;
- `decisions.csv` (from curves.csv and regime.csv; timings.csv if there): per model, dataset,
  configuration, layer and criterion, over seeds: held-out top-1 at the end (mean with its
  Student-t 95% interval, none for one seed), the scoring-minus-held-out gap at the end (the
  same), the share of resolved removals (pooled), with `method.scoring.check` the same-pick
  share (pooled), mean regret and mean reliability (`check_rho`) on the fresh images and how
  many seeds were checked, and the mean seconds of a run (`carlib.pruning.confidence`,
  docs/outputs.md);
- `comparisons.csv` (from curves.csv): CAR against every other criterion, per layer and
  configuration: the per-seed differences of held-out top-1 at the end (same model and
  images per seed), their mean with its Student-t 95% interval and t-test p-value (Holm-
  adjusted over all the comparisons of the folder: one family), for CAR against its ablations
  (EQUIVALENCE: loss, car_random_tie) the TOST p-value for equivalence within ±`--margin`
  (default 2 pp; Holm-adjusted over those comparisons), and the verdict they support
  (`carlib.core.stats.verdict`);
- `comparisons_settings.csv` (from curves.csv, where a SETTINGS override is swept, e.g. the
  step size `method.k` or the scoring-set size `method.scoring.size`): per layer and
  criterion, each value of the setting against its reference value (k: the smallest, one
  removal per re-scoring; scoring size: the largest), as comparisons.csv does criteria: the
  per-seed differences of held-out top-1 at the end, their interval, Holm over the file, and
  TOST within ±`--margin` for every row (the question is whether the setting matters);
- `color_summary.csv` (from color_counts.csv): per layer and criterion, the color-selective
  filters among the top-K pruned summed over the runs (seeds) against the sum expected at
  random, with the exact pooled test (`carlib.analysis.color.pooled_color_count`), and the mean over
  runs of the threshold-free color index of the top-K and of the layer, with their difference
  (`index_diff`: top-K minus layer, mean over runs with a Student-t 95% interval);
- `color_comparisons.csv` (with filters.csv and curves.csv): CAR's top-K color count against
  every other criterion's on the same seeds and layer: the exact paired test on the filters
  only one of the two picked (`carlib.analysis.color.paired_color_count`) and the paired
  t-test of the threshold-free index, each Holm-adjusted over the folder;
- `finetuned_summary.csv` and `comparisons_finetuned.csv` (from finetuned.csv,
  experiments/finetune.py): held-out top-1 before and after the same fine-tuning per layer and
  criterion (t-intervals over seeds), the best baseline chosen on validation top-1, and the
  comparisons above on the fine-tuned networks;
- `compression_choice.csv` and `comparisons_compressed.csv` (from compression.csv of runs
  with `source.criterion` and two or more `layer_compression` settings): per layer and
  criterion the setting chosen on validation top-1 (the largest ratio within
  COMPRESSION_TOLERANCE of the retrained pruned network), and CAR against the others at it.

    python experiments/aggregate.py outputs/multirun/2026-01-01_12-00-00
    python experiments/aggregate.py outputs/prune/run1 outputs/prune/run2 --out results/study
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from carlib.analysis.color import paired_color_count, pooled_color_count
from carlib.core.errors import CarlibError
from carlib.core.io import write_csv
from carlib.core.stats import compare_over_seeds, holm, mean_interval, verdict
from carlib.pruning.criteria import counts_flips

RUNS, SUMMARY, DIFFERENCES = "runs.csv", "summary.csv", "differences.csv"
DECISIONS, COMPARISONS = "decisions.csv", "comparisons.csv"
SETTING_COMPARISONS = "comparisons_settings.csv"
# Swept settings compared with each other (comparisons_settings.csv) and how each one's
# reference value is chosen: the exact greedy (one removal per re-scoring), the most images.
SETTINGS = {"method.k": min, "method.scoring.size": max}
COMPRESSION_TOLERANCE = 0.01  # compression_choice.csv: validation top-1 a setting may lose
MARGIN = 0.02  # equivalence margin of comparisons.csv (held-out top-1), stated before looking
EQUIVALENCE = ("loss", "car_random_tie")  # criteria CAR is tested for equivalence with
# Columns of comparisons.csv other than the configuration columns.
COMPARISON_COLUMNS = ("model", "dataset", "layer", "criterion", "versus", "n_seeds",
                      "diff_mean", "diff_lo", "diff_hi", "p_value", "p_holm", "p_tost",
                      "p_tost_holm", "margin", "verdict")
COLOR_SUMMARY, COLOR_COMPARISONS = "color_summary.csv", "color_comparisons.csv"
FINETUNED_SUMMARY, FINETUNED_COMPARISONS = "finetuned_summary.csv", "comparisons_finetuned.csv"
COMPRESSION_CHOICE, COMPRESSION_COMPARISONS = ("compression_choice.csv",
                                               "comparisons_compressed.csv")
SKIP_DIRS = {".hydra", "state", "wandb", ".submitit"}   # never run folders or results
# Overrides (and their sub-keys) that are never a configuration of their own: what a row
# already names (criterion, layer), what is averaged over (seed) or follows it (the source
# run of an interpretation), and what leaves the numbers unchanged (where files go, logging,
# progress bars, resuming, the CAR engine's mode, the check on fresh images (it observes the
# decisions, it does not change them), the thread count of studies).
NOT_CONDITIONS = ("run", "seed", "method.criteria", "method.layers", "paths", "logger",
                  "progress", "method.resume", "method.state_dir", "method.scoring.mode",
                  "method.scoring.check", "interpret.source", "source.curves", "threads")
# Columns of summary.csv other than the configuration columns.
SUMMARY_COLUMNS = ("model", "dataset", "layer", "criterion", "filters_remaining", "n",
                   "heldout_top1_mean", "heldout_top1_std", "heldout_top1_full",
                   "scoring_top1", "decided", "car_decided")
# Columns of differences.csv other than the configuration columns.
DIFFERENCE_COLUMNS = ("model", "dataset", "layer", "comparison", "criterion", "versus",
                      "n_seeds", "diff_mean", "diff_lo", "diff_hi", "seeds_above",
                      "seeds_below")


def _natural(path: Path) -> list[tuple[int, int | str]]:
    """Sort key: job folders 0, 1, ..., 10 in numeric order."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", str(path)) if t]


def _csv_folders(root: Path) -> list[Path]:
    """Folders strictly below `root` with CSV files (not inside SKIP_DIRS)."""
    return sorted({p.parent for p in root.rglob("*.csv") if p.parent != root
                   and not SKIP_DIRS & set(p.relative_to(root).parts)}, key=_natural)


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Run folders: each given folder that is a Hydra run (has `.hydra/`), else the runs inside
    it; failing those, the folders below it holding CSVs (e.g. runs copied to results/)."""
    runs = []
    for p in paths:
        if not p.is_dir():
            raise CarlibError(f"{p} is not a folder; give a multirun folder or run folders")
        found = [p] if (p / ".hydra").is_dir() else sorted(
            (d.parent for d in p.rglob(".hydra") if d.is_dir()), key=_natural)
        found = found or _csv_folders(p)
        if not found:
            raise CarlibError(f"no run folders (with .hydra/ or CSV files) in {p}; give the "
                              "folder of a multirun or of experiments/*.py runs")
        runs += found
    return list(dict.fromkeys(runs))


def run_names(runs: Sequence[Path]) -> list[str]:
    """Short unique names: each run's path relative to the runs' common folder."""
    if len(runs) == 1:
        return [runs[0].name]
    common = Path(*[parts[0] for parts in zip(*(r.resolve().parts for r in runs))
                    if len(set(parts)) == 1])
    return [str(r.resolve().relative_to(common)) for r in runs]


def overrides(run: Path) -> dict[str, str]:
    """The run's task overrides {key: value as typed}, from `.hydra/overrides.yaml` or, for a
    run copied to results/ (scripts/run_studies.sh), its `overrides.yaml`; deletions (~key)
    are left out."""
    path = next((p for p in (run / ".hydra" / "overrides.yaml", run / "overrides.yaml")
                 if p.is_file()), None)
    if path is None:
        return {}
    lines = [str(x) for x in OmegaConf.load(path)]
    parsed = OverridesParser.create().parse_overrides(lines)
    return {o.key_or_group: o.input_line.split("=", 1)[1] for o in parsed if not o.is_delete()}


def condition_columns(df: pd.DataFrame, candidates: Iterable[str],
                      over: Sequence[str] = ()) -> list[str]:
    """The candidate columns of `df` that take more than one value (configurations), other
    than NOT_CONDITIONS (and their sub-keys) and `over`."""
    def skip(c: str) -> bool:
        return c in over or any(c == k or c.startswith(k + ".") for k in NOT_CONDITIONS)

    return [c for c in dict.fromkeys(candidates)
            if c in df and not skip(c) and df[c].nunique(dropna=False) > 1]


def condition_label(df: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """One string per row naming its configuration, e.g. 'method.metric=top1, model=lenet5'."""
    return df[list(columns)].astype("string").fillna("-").apply(
        lambda r: ", ".join(f"{c}={v}" for c, v in r.items()), axis=1)


def pruned_unit(curves: pd.DataFrame) -> pd.Series:
    """What each row's greedy run pruned: its layer, or for a network-wide run (rows with
    `layer_remaining`) the layers it removed filters from, joined with '+'."""
    unit = curves["layer"].astype("string")
    if "layers" in curves:  # written by network-wide runs: all their listed layers
        return unit.where(curves["layers"].isna(), curves["layers"].astype("string"))
    if "layer_remaining" not in curves:
        return unit
    keys = ["run"] if "run" in curves else []
    for _, g in curves.groupby(keys + ["criterion", "seed"], sort=False, dropna=False):
        if g["layer_remaining"].notna().any():
            unit[g.index] = "+".join(sorted(g["layer"].dropna().astype(str).unique()))
    return unit


def run_ends(curves: pd.DataFrame, conditions: Sequence[str] = ()) -> pd.DataFrame:
    """The last row of every greedy run (layer: `pruned_unit`), with the run's first held-out
    top-1 (the full network) as `heldout_top1_full`."""
    df = curves.assign(layer=pruned_unit(curves))
    run_keys = [c for c in ("run", "model", "dataset", *conditions, "layer", "criterion", "seed")
                if c in df]
    by_run = df.groupby(run_keys, sort=False, dropna=False)
    ends = df.loc[by_run["step"].idxmax()].reset_index(drop=True)
    ends["heldout_top1_full"] = df.loc[by_run["step"].idxmin(), "heldout_top1"].to_numpy()
    return ends


def summarize(curves: pd.DataFrame, conditions: Sequence[str] = (),
              regime: pd.DataFrame | None = None) -> pd.DataFrame:
    """Held-out top-1 at the end of every greedy run: mean, std and n over the runs sharing
    model, dataset, configuration (`conditions`), layer and criterion (e.g. seeds); plus the
    mean held-out top-1 of the full network (step 0) as `heldout_top1_full`, and CAR's regime
    from `regime` (regime.csv rows) if given (see the module docstring)."""
    ends = run_ends(curves, conditions)
    keys = [c for c in ("model", "dataset", *conditions, "layer", "criterion",
                        "filters_remaining") if c in ends]
    out = ends.groupby(keys, sort=False, dropna=False).agg(
        n=("heldout_top1", "size"), heldout_top1_mean=("heldout_top1", "mean"),
        heldout_top1_std=("heldout_top1", "std"),
        heldout_top1_full=("heldout_top1_full", "mean")).reset_index()
    return out if regime is None else _with_regime(out, regime, conditions)


def _with_regime(summary: pd.DataFrame, regime: pd.DataFrame, conditions: Sequence[str]
                 ) -> pd.DataFrame:
    keys = [c for c in ("model", "dataset", *conditions, "layer") if c in regime]
    per = regime.groupby([*keys, "criterion"], sort=False, dropna=False).agg(
        scoring_top1=("scoring_top1", "mean"), removals=("removals", "sum"),
        tied=("tied", "sum")).reset_index()
    per["decided"] = 1 - per["tied"] / per["removals"]
    car = per[per["criterion"] == "car"][[*keys, "decided"]].rename(
        columns={"decided": "car_decided"})
    out = summary.merge(per[[*keys, "criterion", "scoring_top1", "decided"]],
                        on=[*keys, "criterion"], how="left")
    return out.merge(car, on=keys, how="left")


def differences(paired: pd.DataFrame, summary: pd.DataFrame,
                conditions: Sequence[str] = ()) -> pd.DataFrame:
    """differences.csv: CAR against the next best criterion, the loss criterion, its random-tie
    ablation and the best baseline, per layer (see the module docstring)."""
    keys = [c for c in ("model", "dataset", *conditions, "layer") if c in summary]
    rows = []
    for key, g in summary.groupby(keys, sort=False, dropna=False):
        mean = g.set_index("criterion")["heldout_top1_mean"]
        if "car" not in mean:
            continue
        others = mean.drop([c for c in ("car", "car_random_tie") if c in mean])
        baselines = mean.drop([c for c in dict.fromkeys(mean.index) if counts_flips(c)])
        versus = {"next best": others.idxmax() if len(others) else None,
                  "loss": "loss" if "loss" in mean else None,
                  "random tie": "car_random_tie" if "car_random_tie" in mean else None,
                  "best baseline": baselines.idxmax() if len(baselines) else None}
        sel = paired
        for k, v in zip(keys, key if isinstance(key, tuple) else (key,)):
            sel = sel[sel[k].astype("string") == str(v)] if k in sel else sel
        for comparison, other in versus.items():
            p = sel[(sel["criterion"] == "car") & (sel["versus"] == other)]
            if other is None or p.empty:
                continue
            m, lo, hi = mean_interval(p["diff"].to_numpy(dtype=float))
            rows.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                         "comparison": comparison, "criterion": "car", "versus": other,
                         "n_seeds": len(p), "diff_mean": m, "diff_lo": lo, "diff_hi": hi,
                         "seeds_above": int((p["lo"] > 0).sum()),
                         "seeds_below": int((p["hi"] < 0).sum())})
    return pd.DataFrame(rows)


def _interval(values: pd.Series) -> tuple[float, float, float]:
    """(mean, low, high) over seeds: the Student-t 95% interval, NaN bounds for one value."""
    m, lo, hi = mean_interval(values.to_numpy(dtype=float))
    return (m, math.nan, math.nan) if values.notna().sum() < 2 else (m, lo, hi)


def _pooled(regime: pd.DataFrame, column: str) -> float:
    """A per-run share of regime.csv pooled over its runs (weighted by their removals)."""
    ok = regime[column].notna() if column in regime else pd.Series(False, regime.index)
    n = regime.loc[ok, "removals"].astype(float)
    return float((regime.loc[ok, column].astype(float) * n).sum() / n.sum()) if n.sum() else \
        math.nan


def decisions(curves: pd.DataFrame, regime: pd.DataFrame, conditions: Sequence[str] = (),
              timings: pd.DataFrame | None = None) -> pd.DataFrame:
    """decisions.csv: how good and how sure each criterion's removals are, over seeds (see the
    module docstring)."""
    ends = run_ends(curves, conditions)
    keys = [c for c in ("model", "dataset", *conditions, "layer", "criterion") if c in ends]
    ends["gap"] = ends["scoring_acc"].astype(float) - ends["heldout_top1"].astype(float)
    rows = []
    for key, g in ends.groupby(keys, sort=False, dropna=False):
        where = dict(zip(keys, key))
        reg = regime
        for k, v in where.items():
            reg = reg[reg[k].astype("string") == str(v)] if k in reg else reg
        top1, top1_lo, top1_hi = _interval(g["heldout_top1"])
        gap, gap_lo, gap_hi = _interval(g["gap"])
        checked = reg[reg["check_same"].notna()] if "check_same" in reg else reg.iloc[:0]
        row = {**where, "n_seeds": len(g), "filters_remaining": g["filters_remaining"].iloc[0],
               "heldout_top1": top1, "heldout_top1_lo": top1_lo, "heldout_top1_hi": top1_hi,
               "heldout_top1_full": g["heldout_top1_full"].mean(),
               "gap": gap, "gap_lo": gap_lo, "gap_hi": gap_hi,
               "scoring_top1": reg["scoring_top1"].mean() if len(reg) else math.nan,
               "resolved": _pooled(reg, "resolved"), "check_seeds": len(checked),
               "check_same": _pooled(checked, "check_same"),
               "check_regret": _pooled(checked, "check_regret"),
               "check_rho": checked["check_rho"].mean() if "check_rho" in checked else math.nan}
        if timings is not None:
            t = timings
            for k, v in where.items():
                t = t[t[k].astype("string") == str(v)] if k in t else t
            fresh = t[t["resumed_at"] == 0] if "resumed_at" in t else t
            row["seconds"] = fresh["seconds"].mean() if len(fresh) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def comparisons(curves: pd.DataFrame, conditions: Sequence[str] = (), margin: float = MARGIN,
                reference: str = "car") -> pd.DataFrame:
    """comparisons.csv: `reference` minus every other criterion (see the module docstring)."""
    return compare(run_ends(curves, conditions), conditions, margin, reference)


def compare(ends: pd.DataFrame, conditions: Sequence[str] = (), margin: float = MARGIN,
            reference: str = "car", value: str = "heldout_top1") -> pd.DataFrame:
    """`reference` minus every other criterion in `ends` (one row per run: model, dataset,
    layer, criterion, seed and `value`), per layer and configuration: the per-seed differences
    of `value`, their mean with its t-interval and p-value (Holm over every row: one family),
    the TOST p-value against the EQUIVALENCE criteria, and the verdict."""
    keys = [c for c in ("model", "dataset", *conditions, "layer") if c in ends]
    rows = []
    for key, g in ends.groupby(keys, sort=False, dropna=False):
        top1 = g.pivot_table(index="seed", columns="criterion", values=value, aggfunc="mean")
        if reference not in top1:
            continue
        for other in [c for c in dict.fromkeys(g["criterion"]) if c != reference]:
            d = (top1[reference] - top1[other]).dropna()
            r = compare_over_seeds(d.to_numpy(dtype=float), margin)
            if other not in EQUIVALENCE:
                r["p_tost"] = math.nan
            rows.append({**dict(zip(keys, key)), "criterion": reference, "versus": other,
                         **r, "margin": margin if other in EQUIVALENCE else math.nan})
    return with_verdicts(pd.DataFrame(rows), margin)


def compare_settings(curves: pd.DataFrame, conditions: Sequence[str] = (),
                     margin: float = MARGIN) -> pd.DataFrame:
    """comparisons_settings.csv: every value of each swept SETTINGS column against its
    reference value, per layer, criterion and the other configuration columns (see the module
    docstring); the column's name is in `setting`, the values in `value` and `versus`."""
    ends = run_ends(curves, conditions)
    rows = []
    for column, pick in SETTINGS.items():
        if column not in conditions:
            continue
        rest = [c for c in conditions if c != column]
        keys = [c for c in ("model", "dataset", *rest, "layer", "criterion") if c in ends]
        for key, g in ends.groupby(keys, sort=False, dropna=False):
            top1 = g.pivot_table(index="seed", columns=column, values="heldout_top1",
                                 aggfunc="mean")
            ref = pick(top1.columns, key=float)
            for value in [v for v in top1.columns if v != ref]:
                d = (top1[value] - top1[ref]).dropna()
                rows.append({**dict(zip(keys, key)), "setting": column, "value": value,
                             "versus": ref, **compare_over_seeds(d.to_numpy(dtype=float),
                                                                 margin), "margin": margin})
    return with_verdicts(pd.DataFrame(rows), margin)


def with_verdicts(out: pd.DataFrame, margin: float) -> pd.DataFrame:
    """Rows with p_value and p_tost (one family): Holm-adjusted columns and the verdict."""
    if out.empty:
        return out
    out.insert(out.columns.get_loc("p_value") + 1, "p_holm", holm(out["p_value"]))
    out.insert(out.columns.get_loc("p_tost") + 1, "p_tost_holm", holm(out["p_tost"]))
    out["verdict"] = [verdict(r.n_seeds, r.diff_mean, r.p_holm, r.p_tost_holm, margin)
                      for r in out.itertuples()]
    return out


def finetuned_summary(finetuned: pd.DataFrame, conditions: Sequence[str] = ()) -> pd.DataFrame:
    """finetuned_summary.csv: per layer and criterion, held-out top-1 before and after the
    fine-tuning (mean and t-interval over seeds), the mean validation top-1 after it, and
    `best_baseline`: the baseline (a criterion that counts no flips: not CAR, its ablations or
    loss) with the highest mean validation top-1 after fine-tuning over both layers; chosen on
    the validation split, it is the one the compression study takes."""
    keys = [c for c in ("model", "dataset", *conditions, "layer", "criterion") if c in finetuned]
    rows = []
    for key, g in finetuned.groupby(keys, sort=False, dropna=False):
        before, before_lo, before_hi = _interval(g["heldout_top1_before"])
        after, after_lo, after_hi = _interval(g["heldout_top1"])
        rows.append({**dict(zip(keys, key)), "n_seeds": len(g),
                     "filters_remaining": g["filters_remaining"].iloc[0],
                     "heldout_top1_full": g["heldout_top1_full"].mean(),
                     "heldout_top1_before": before, "heldout_top1_before_lo": before_lo,
                     "heldout_top1_before_hi": before_hi, "heldout_top1": after,
                     "heldout_top1_lo": after_lo, "heldout_top1_hi": after_hi,
                     "val_top1": g["val_top1"].mean(),
                     "retrain_epochs": g["retrain_epochs"].iloc[0]})
    out = pd.DataFrame(rows)
    base = out[[not counts_flips(c) for c in out["criterion"]]]
    by = [c for c in ("model", "dataset", *conditions) if c in out]
    out["best_baseline"] = False
    for _, g in (base.groupby(by, sort=False, dropna=False) if by else [(None, base)]):
        if len(g):
            best = g.groupby("criterion", sort=False)["val_top1"].mean().idxmax()
            out.loc[g.index[g["criterion"] == best], "best_baseline"] = True
    return out


def _with_setting(comp: pd.DataFrame) -> pd.DataFrame:
    """compression.csv rows with `setting`, e.g. 'sparsity 0.6, 4 bits', from the overrides."""
    return comp.assign(setting=[f"sparsity {s:g}, {int(b)} bits" for s, b in zip(
        comp["layer_compression.sparsity"].astype(float), comp["layer_compression.bits"])])


def compression_choice(comp: pd.DataFrame, tolerance: float = COMPRESSION_TOLERANCE
                       ) -> pd.DataFrame:
    """compression_choice.csv, from the compression.csv rows of runs with `source.criterion`,
    `layer_compression.sparsity` and `.bits` (scripts/run_studies.sh compress): per layer,
    criterion and setting, over seeds: the ratio and top-1 after the last stage, and the
    retrained pruned network's; `chosen`: per layer and criterion, the setting with the largest
    ratio whose mean validation top-1 after compression is within `tolerance` of the retrained
    pruned network's (failing all, the one with the highest validation top-1). Chosen on the
    validation split; held-out top-1 is reported, never used to choose."""
    need = ("source.criterion", "layer_compression.sparsity", "layer_compression.bits")
    if any(c not in comp for c in need):
        return pd.DataFrame()
    comp = _with_setting(comp)
    keys = ["model", "dataset", "layer", "source.criterion", "setting"]
    last = comp.groupby([*keys, "seed"], sort=False).tail(1).set_index([*keys, "seed"])
    pruned = comp[comp["stage"] == "car_pruned"].set_index([*keys, "seed"])
    rows = []
    for key, g in last.groupby(keys, sort=False):
        p = pruned.loc[g.index]
        top1, lo, hi = _interval(g["heldout_top1"])
        rows.append({**dict(zip(keys, key)), "n_seeds": len(g), "ratio": g["ratio"].mean(),
                     "val_top1": g["val_top1"].mean(), "val_top1_pruned": p["val_top1"].mean(),
                     "heldout_top1": top1, "heldout_top1_lo": lo, "heldout_top1_hi": hi,
                     "heldout_top1_pruned": p["heldout_top1"].mean()})
    out = pd.DataFrame(rows)
    out["chosen"] = False
    for _, g in out.groupby(keys[:-1], sort=False):
        ok = g[g["val_top1"] >= g["val_top1_pruned"] - tolerance]
        pick = ok["ratio"].idxmax() if len(ok) else g["val_top1"].idxmax()
        out.loc[pick, "chosen"] = True
    return out.rename(columns={"source.criterion": "criterion"})


def compressed_ends(comp: pd.DataFrame, choice: pd.DataFrame) -> pd.DataFrame:
    """One row per seed, layer and criterion: held-out top-1 after compression at the chosen
    setting (for `compare`)."""
    comp = _with_setting(comp).rename(columns={"source.criterion": "criterion"})
    keys = ["model", "dataset", "layer", "criterion", "setting"]
    last = comp.groupby([*keys, "seed"], sort=False).tail(1)
    return last.merge(choice.loc[choice["chosen"], keys], on=keys)


def color_summary(counts: pd.DataFrame, conditions: Sequence[str] = ()) -> pd.DataFrame:
    """color_summary.csv: color counts of the runs pooled per layer and criterion."""
    keys = [c for c in ("model", "dataset", *conditions, "layer", "criterion", "index",
                        "threshold") if c in counts]
    rows = []
    for key, g in counts.groupby(keys, sort=False, dropna=False):
        rows.append({**dict(zip(keys, key)), "top_k": g["top_k"].max(),
                     "dead_in_top_k": g["dead_in_top_k"].sum(),
                     **pooled_color_count(g.to_dict("records")),
                     "index_mean_top_k": g["index_mean_top_k"].mean(),
                     "index_mean_layer": g["index_mean_layer"].mean(),
                     **dict(zip(("index_diff", "index_diff_lo", "index_diff_hi"), mean_interval(
                         g["index_mean_top_k"] - g["index_mean_layer"])))})
    return pd.DataFrame(rows)


def color_comparisons(curves: pd.DataFrame, filters: pd.DataFrame, counts: pd.DataFrame,
                      reference: str = "car") -> pd.DataFrame:
    """color_comparisons.csv: `reference`'s top-K color counts against every other criterion's,
    per color index, threshold and layer, on the same seeds: the exact paired test
    (`carlib.analysis.color.paired_color_count`, on the filters only one of the two picked),
    and the paired t-test over seeds of the threshold-free index (mean over the live top-K);
    Holm over each column's family (the folder)."""
    import torch

    orders = {k: [int(f) for f in g["removed_filter"].dropna()]
              for k, g in curves.groupby(["seed", "layer", "criterion"], sort=False)}
    # a layer measured with the same index by two runs (both indices' runs) counts once
    filters = filters.drop_duplicates(["index_used", "threshold", "layer", "seed", "filter"])
    counts = counts.drop_duplicates(["index", "threshold", "layer", "seed", "criterion"])
    rows = []
    for (index, threshold, layer), f in filters.groupby(["index_used", "threshold", "layer"],
                                                        sort=False):
        cnt = counts[(counts["index"] == index) & (counts["threshold"] == threshold)
                     & (counts["layer"] == layer)]
        seeds = sorted(set(f["seed"]))
        for other in [c for c in dict.fromkeys(cnt["criterion"]) if c != reference]:
            runs, idx = [], []
            for seed in seeds:
                per = f[f["seed"] == seed].sort_values("filter")
                k = cnt.loc[cnt["seed"] == seed, "top_k"]
                mine = orders.get((seed, layer, reference))
                theirs = orders.get((seed, layer, other))
                if mine is None or theirs is None or k.empty:
                    continue
                runs.append((mine[:int(k.iloc[0])], theirs[:int(k.iloc[0])],
                             torch.tensor(per["color_selective"].astype(bool).to_numpy()),
                             torch.tensor(per["dead"].astype(bool).to_numpy())))
                m = cnt[cnt["seed"] == seed].set_index("criterion")["index_mean_top_k"]
                same = set(runs[-1][0]) == set(runs[-1][1])  # the same filters: exactly 0
                idx.append(0.0 if same else float(m[reference]) - float(m[other]))
            if not runs:
                continue
            t = compare_over_seeds(idx, MARGIN)
            rows.append({"index": index, "threshold": threshold, "layer": layer,
                         "criterion": reference, "versus": other,
                         **paired_color_count(runs), "index_diff": t["diff_mean"],
                         "index_diff_lo": t["diff_lo"], "index_diff_hi": t["diff_hi"],
                         "p_index": t["p_value"]})
    out = pd.DataFrame(rows)
    if len(out):
        out.insert(out.columns.get_loc("p_value") + 1, "p_holm", holm(out["p_value"]))
        out["p_index_holm"] = holm(out["p_index"])
    return out


def _read(path: Path) -> pd.DataFrame:
    # nullable dtypes: integer columns with gaps (removed_filter at step 0) stay integers
    return pd.read_csv(path, dtype_backend="numpy_nullable")


def aggregate(paths: Sequence[Path], out: Path | None = None,
              over: Sequence[str] = ("seed",), margin: float = MARGIN) -> list[Path]:
    """Write the concatenated tables, runs.csv and summary.csv to `out`; returns their paths."""
    if not margin > 0:
        raise CarlibError(f"--margin {margin} is not a positive accuracy difference; give e.g. "
                          f"--margin {MARGIN} (2 pp)")
    runs = find_runs(paths)
    if out is None:
        if len(paths) != 1 or (paths[0] / ".hydra").is_dir():
            raise CarlibError("give --out DIR: the default (the one multirun folder given) "
                              "does not apply to run folders")
        out = paths[0]
    if any(out.resolve() == r.resolve() for r in runs):
        raise CarlibError(f"--out {out} is a run folder; its CSVs would be overwritten: choose "
                          "another folder")
    names = run_names(runs)
    table = pd.DataFrame([{"run": n, **overrides(r)} for n, r in zip(names, runs)])
    tables: dict[str, list[pd.DataFrame]] = {}
    for name, run in zip(names, runs):
        extra = table[table["run"] == name].drop(columns="run").dropna(axis=1)
        for csv in sorted(run.glob("*.csv")):
            df = _read(csv)
            df.insert(0, "run", name)
            for col, value in extra.iloc[0].items():
                if col not in df:
                    df[col] = value
            tables.setdefault(csv.name, []).append(df)
    if not tables:
        raise CarlibError(f"no CSV files in the {len(runs)} run folders found; nothing to "
                          "aggregate")
    written = [write_csv(table, out / RUNS)]
    for name, frames in tables.items():
        written.append(write_csv(pd.concat(frames, ignore_index=True), out / name))
    if "curves.csv" in tables:
        curves = _read(out / "curves.csv")
        conds = condition_columns(curves, table.columns, over)
        regime = _read(out / "regime.csv") if "regime.csv" in tables else None
        summary = summarize(curves, conds, regime)
        written.append(write_csv(summary, out / SUMMARY))
        if "paired.csv" in tables:
            diffs = differences(_read(out / "paired.csv"), summary, conds)
            if len(diffs):
                written.append(write_csv(diffs, out / DIFFERENCES))
        compared = comparisons(curves, conds, margin)
        if len(compared):
            written.append(write_csv(compared, out / COMPARISONS))
        settings = compare_settings(curves, conds, margin)
        if len(settings):
            written.append(write_csv(settings, out / SETTING_COMPARISONS))
        if regime is not None:
            timings = _read(out / "timings.csv") if "timings.csv" in tables else None
            written.append(write_csv(decisions(curves, regime, conds, timings),
                                     out / DECISIONS))
    if "color_counts.csv" in tables:
        counts = _read(out / "color_counts.csv")
        conds = condition_columns(counts, table.columns, over)
        written.append(write_csv(color_summary(counts, conds), out / COLOR_SUMMARY))
        if "filters.csv" in tables and "curves.csv" in tables and "seed" in counts:
            paired = color_comparisons(curves, _read(out / "filters.csv"), counts)
            if len(paired):
                written.append(write_csv(paired, out / COLOR_COMPARISONS))
    if "finetuned.csv" in tables:
        tuned = _read(out / "finetuned.csv")
        conds = condition_columns(tuned, table.columns, over)
        written.append(write_csv(finetuned_summary(tuned, conds), out / FINETUNED_SUMMARY))
        written.append(write_csv(compare(tuned, conds, margin), out / FINETUNED_COMPARISONS))
    if "compression.csv" in tables:
        comp = _read(out / "compression.csv")
        choice = compression_choice(comp)
        if len(choice):
            written.append(write_csv(choice, out / COMPRESSION_CHOICE))
            written.append(write_csv(compare(compressed_ends(comp, choice), margin=margin),
                                     out / COMPRESSION_COMPARISONS))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help="a multirun folder, or run folders")
    ap.add_argument("--out", type=Path, help="output folder (default: the one folder given)")
    ap.add_argument("--over", nargs="+", default=["seed"],
                    help="columns averaged over in summary.csv (default: seed)")
    ap.add_argument("--margin", type=float, default=MARGIN,
                    help=f"equivalence margin of comparisons.csv (default {MARGIN})")
    args = ap.parse_args(argv)
    try:
        written = aggregate(args.paths, args.out, args.over, args.margin)
    except CarlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
