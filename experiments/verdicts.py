"""The verdict table: every comparison of every study in results/, in one tidy file and one page.

Reads each study folder's comparisons (written by aggregate.py) and writes, to the folder given:

- `verdicts.csv`: one row per comparison: study, stage (`pruned`: held-out top-1 at the end of
  the greedy runs, comparisons.csv; `fine-tuned`: after the same fine-tuning,
  comparisons_finetuned.csv; `compressed`: after retraining and layer compression at the
  setting chosen on validation, comparisons_compressed.csv; `setting`: a criterion at one
  value of a swept setting against the same criterion at its reference value,
  comparisons_settings.csv, e.g. 'k=4 vs k=1'; `color count` / `color index`: CAR's top-K
  color-selective count or threshold-free index against the other criterion's,
  color_comparisons.csv), setting (the swept overrides, e.g. the scoring-set size; the color
  index and threshold), layer, criterion, versus, seeds, the mean difference with its 95%
  interval (none for counts: the exact test's difference in filters), the Holm-adjusted
  p-value, the Holm-adjusted TOST p-value where an equivalence margin was set, and the verdict
  (`carlib.core.stats.verdict`: higher, lower, equivalent within the margin, inconclusive);
- `verdicts.md`: the same as Markdown tables, one per study, for REPRODUCING.md to cite,
  after a table of which code made each study: per study, its runs, how many record their
  provenance (provenance.yaml: carlib version, git commit, dirty flag) and which;
- `provenance.csv`: one row per run folder: study, run, carlib_version, git_commit, git_dirty,
  torch_version, cpu (empty where the run predates the field).

    python experiments/verdicts.py results/
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd
import yaml

from carlib.core.errors import CarlibError
from carlib.core.io import atomic_write_text, write_csv
from carlib.core.provenance import FIELDS as PROVENANCE_FIELDS
from carlib.core.stats import verdict

STAGES = {"comparisons.csv": "pruned", "comparisons_finetuned.csv": "fine-tuned",
          "comparisons_compressed.csv": "compressed"}
COLUMNS = ["study", "stage", "setting", "layer", "criterion", "versus", "n_seeds", "diff_mean",
           "diff_lo", "diff_hi", "p_holm", "p_tost_holm", "verdict"]
KNOWN = {"model", "dataset", "layer", "criterion", "versus", "n_seeds", "diff_mean", "diff_lo",
         "diff_hi", "p_value", "p_holm", "p_tost", "p_tost_holm", "margin", "verdict",
         "setting"}


def _setting(df: pd.DataFrame) -> pd.Series:
    """The swept overrides of each row (columns other than the known ones), as 'key=value'."""
    extra = [c for c in df.columns if c not in KNOWN]
    if not extra:
        return pd.Series([""] * len(df), index=df.index)
    return df[extra].astype(str).apply(
        lambda r: ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r.items()), axis=1)


def setting_rows(df: pd.DataFrame) -> pd.DataFrame:
    """comparisons_settings.csv as verdict rows: a criterion at one value of a swept setting
    minus the same criterion at the reference value (setting 'k=4 vs k=1')."""
    name = df["setting"].str.split(".").str[-1]
    out = df.drop(columns=["setting", "value", "versus"]).assign(versus=df["criterion"])
    others = _setting(out)
    label = name + "=" + df["value"].astype(str) + " vs " + name + "=" + df["versus"].astype(str)
    return out.assign(stage="setting", setting=label.where(others == "", others + ", " + label))


def color_rows(df: pd.DataFrame) -> pd.DataFrame:
    """color_comparisons.csv as verdict rows: the count (exact paired test) and the index."""
    setting = df["index"] + " index >= " + df["threshold"].map("{:g}".format)
    count = pd.DataFrame({"stage": "color count", "setting": setting, "layer": df["layer"],
                          "criterion": df["criterion"], "versus": df["versus"],
                          "n_seeds": df["runs"], "diff_mean": df["diff"],
                          "diff_lo": math.nan, "diff_hi": math.nan, "p_holm": df["p_holm"],
                          "p_tost_holm": math.nan})
    index = pd.DataFrame({"stage": "color index", "setting": df["index"] + " index",
                          "layer": df["layer"], "criterion": df["criterion"],
                          "versus": df["versus"], "n_seeds": df["runs"],
                          "diff_mean": df["index_diff"], "diff_lo": df["index_diff_lo"],
                          "diff_hi": df["index_diff_hi"], "p_holm": df["p_index_holm"],
                          "p_tost_holm": math.nan})
    # the index does not depend on the threshold: one row per index and layer
    index = index.drop_duplicates(["setting", "layer", "criterion", "versus"])
    out = pd.concat([count, index], ignore_index=True)
    out["verdict"] = [verdict(int(n), d, p, math.nan, math.nan) for n, d, p
                      in zip(out["n_seeds"], out["diff_mean"], out["p_holm"])]
    same = (df["only_a"] + df["only_b"] == 0).to_numpy()  # the count rows come first
    out.loc[out.index[:len(df)][same], "verdict"] = "the same filters in every run"
    return out


def verdicts(root: Path) -> pd.DataFrame:
    """Every study folder's comparisons under `root` (see the module docstring)."""
    frames = []
    for study in sorted(p for p in root.iterdir() if p.is_dir()):
        for name, stage in STAGES.items():
            if (study / name).exists():
                df = pd.read_csv(study / name)
                if len(df):
                    frames.append(df.assign(study=study.name, stage=stage,
                                            setting=_setting(df)))
        if (study / "comparisons_settings.csv").exists():
            df = pd.read_csv(study / "comparisons_settings.csv")
            if len(df):
                frames.append(setting_rows(df).assign(study=study.name))
        if (study / "color_comparisons.csv").exists():
            df = pd.read_csv(study / "color_comparisons.csv")
            if len(df):
                frames.append(color_rows(df).assign(study=study.name))
    if not frames:
        raise CarlibError(f"no comparisons found under {root}; run experiments/aggregate.py on "
                          "each study folder first")
    return pd.concat(frames, ignore_index=True)[COLUMNS]


def provenance(root: Path) -> pd.DataFrame:
    """provenance.csv: every run folder under the study folders of `root` (a folder with CSVs)
    and the provenance.yaml it holds, if any."""
    rows = []
    for study in sorted(p for p in root.iterdir() if p.is_dir()):
        runs = sorted(p for p in study.iterdir() if p.is_dir() and any(p.glob("*.csv")))
        for run in runs or ([study] if any(study.glob("*.csv")) else []):  # a run kept flat
            f = run / "provenance.yaml"
            rec = yaml.safe_load(f.read_text()) if f.exists() else {}
            rows.append({"study": study.name, "run": run.relative_to(study).as_posix(),
                         **{k: rec.get(k) for k in PROVENANCE_FIELDS}})
    return pd.DataFrame(rows, columns=["study", "run", *PROVENANCE_FIELDS])


def provenance_table(prov: pd.DataFrame) -> list[str]:
    """Markdown lines: per study, how many runs record which code made them."""
    out = ["## Which code made each study", "", "| study | runs | with provenance | carlib "
           "version, commit (runs) | dirty |", "|---|---|---|---|---|"]
    for study, g in prov.groupby("study", sort=False):
        known = g.dropna(subset=["git_commit"])
        made = ", ".join(f"{v} {str(c)[:7]} ({n})" for (v, c), n in
                         known.groupby(["carlib_version", "git_commit"]).size().items())
        dirty = int(known["git_dirty"].astype(bool).sum())
        out.append(f"| {study} | {len(g)} | {len(known)} | {made or 'none recorded'} | "
                   f"{dirty if len(known) else ''} |")
    return [*out, ""]


def _pp(v: float, stage: str) -> str:
    if v != v:
        return ""
    if stage == "color count":
        return f"{v:+.0f}"
    return f"{v:+.3f}" if stage == "color index" else f"{100 * v:+.1f}"


def markdown(df: pd.DataFrame, prov: pd.DataFrame) -> str:
    """verdicts.md: one table per study (differences in percentage points of top-1; color counts
    in filters; color index in index units)."""
    out = ["# Verdicts", "", "Written by `experiments/verdicts.py` from each study's "
           "comparisons (see its docstring); do not edit by hand. Differences: criterion minus "
           "versus, mean over seeds [95% t-interval], in percentage points of held-out top-1 "
           "(color count: filters; color index: index units). p: Holm-adjusted over the "
           "study's comparisons of that kind; TOST: Holm-adjusted equivalence p within the "
           "stated margin.", "", *provenance_table(prov)]
    for study, g in df.groupby("study", sort=False):
        out += [f"## {study}", "", "| stage | setting | layer | comparison | seeds | difference "
                "[95% CI] | p (Holm) | TOST p (Holm) | verdict |", "|---|---|---|---|---|---|---|"
                "---|---|"]
        for r in g.itertuples():
            ci = (f" [{_pp(r.diff_lo, r.stage)}, {_pp(r.diff_hi, r.stage)}]"
                  if r.diff_lo == r.diff_lo else "")
            p = "" if r.p_holm != r.p_holm else f"{r.p_holm:.3g}"
            tost = "" if r.p_tost_holm != r.p_tost_holm else f"{r.p_tost_holm:.3g}"
            out.append(f"| {r.stage} | {r.setting} | {r.layer} | {r.criterion} - {r.versus} | "
                       f"{r.n_seeds} | {_pp(r.diff_mean, r.stage)}{ci} | {p} | {tost} | "
                       f"{r.verdict} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="the results folder (one folder per study)")
    args = ap.parse_args(argv)
    try:
        if not args.root.is_dir():
            raise CarlibError(f"not a folder: {args.root}; give the results folder")
        df = verdicts(args.root)
    except CarlibError as e:
        sys.exit(f"error: {e}")
    prov = provenance(args.root)
    write_csv(df, args.root / "verdicts.csv")
    write_csv(prov, args.root / "provenance.csv")
    atomic_write_text(args.root / "verdicts.md", markdown(df, prov) + "\n")
    print(f"{len(df)} comparisons of {df['study'].nunique()} studies -> "
          f"{args.root / 'verdicts.csv'}, {args.root / 'verdicts.md'}")


if __name__ == "__main__":
    main()
