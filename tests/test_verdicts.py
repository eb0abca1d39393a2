"""experiments/verdicts.py: every study's comparisons in one table, verdicts from known cases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import aggregate  # noqa: E402
import verdicts  # noqa: E402


def ends(diffs: dict[str, list[float]]) -> pd.DataFrame:
    """One run per seed and criterion: car at 0.6, each other criterion at 0.6 - its diff."""
    rows = []
    for other, ds in diffs.items():
        for seed, d in enumerate(ds):
            rows += [{"model": "m", "dataset": "d", "layer": "conv1", "criterion": c,
                      "seed": seed, "heldout_top1": v} for c, v in (("car", 0.6),
                                                                     (other, 0.6 - d))]
    return pd.DataFrame(rows).drop_duplicates(["criterion", "seed"])


@pytest.fixture
def results(tmp_path) -> Path:
    a = tmp_path / "study_a"
    a.mkdir()
    # far above random on every seed, the same as loss within 0.1 pp: higher and equivalent
    aggregate.compare(ends({"random": [0.20, 0.22, 0.21, 0.19, 0.20],
                            "loss": [0.001, -0.001, 0.0005, -0.0005, 0.0]})
                      ).to_csv(a / "comparisons.csv", index=False)
    aggregate.compare(ends({"l1": [0.05, -0.04, 0.01]})).to_csv(
        a / "comparisons_finetuned.csv", index=False)
    pd.DataFrame([{"index": "response", "threshold": 0.25, "layer": "conv1",
                   "criterion": "car", "versus": v, "runs": 5, "only_a": oa, "only_b": ob,
                   "diff": d, "color_only_a": 0, "expected_only_a": 0.0, "p_value": p,
                   "p_holm": p, "index_diff": i, "index_diff_lo": i - 0.01,
                   "index_diff_hi": i + 0.01, "p_index": p, "p_index_holm": p}
                  for v, oa, ob, d, p, i in (("random", 20, 20, 12, 0.001, 0.1),
                                             ("loss", 0, 0, 0, 1.0, 0.0))]
                 ).to_csv(a / "color_comparisons.csv", index=False)
    (tmp_path / "study_b").mkdir()  # a study without comparisons is skipped
    (tmp_path / "study_b" / "curves.csv").write_text("x\n1\n")  # a run kept flat
    recorded = ("carlib_version: 0.8.0\ngit_commit: abcdef1234\ngit_dirty: false\n"
                "torch_version: 2.13.0\ncpu: Some CPU\n")
    for run, prov in (("seed0", recorded), ("seed1", None)):
        (a / run).mkdir()
        (a / run / "curves.csv").write_text("x\n1\n")
        if prov:
            (a / run / "provenance.yaml").write_text(prov)
    return tmp_path


def test_verdicts_table_from_known_cases(results):
    df = verdicts.verdicts(results)
    assert list(df.columns) == verdicts.COLUMNS
    assert set(df["study"]) == {"study_a"}
    v = df.set_index(["stage", "versus"])["verdict"]
    assert v["pruned", "random"] == "higher"
    assert v["pruned", "loss"] == "equivalent within ±2 pp"
    assert v["fine-tuned", "l1"] == "inconclusive"
    assert v["color count", "random"] == "higher"
    assert v["color count", "loss"] == "the same filters in every run"
    assert v["color index", "random"] == "higher"
    assert (df.loc[df.stage == "color count", "setting"] == "response index >= 0.25").all()
    row = df[(df.stage == "pruned") & (df.versus == "random")].iloc[0]
    assert row.diff_mean == pytest.approx(0.204) and row.diff_lo < 0.204 < row.diff_hi


def test_verdicts_command_writes_csv_and_markdown(results):
    res = subprocess.run([sys.executable, str(ROOT / "experiments/verdicts.py"), str(results)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    md = (results / "verdicts.md").read_text()
    assert "## study_a" in md and "| pruned |  | conv1 | car - random | 5 | +20.4 [" in md
    assert len(pd.read_csv(results / "verdicts.csv")) == 7
    prov = pd.read_csv(results / "provenance.csv")
    assert prov[["study", "run"]].values.tolist() == [["study_a", "seed0"], ["study_a", "seed1"],
                                                      ["study_b", "."]]
    assert prov.loc[0, "git_commit"] == "abcdef1234" and prov["git_commit"].isna()[1]
    assert prov.loc[0, "cpu"] == "Some CPU" and prov["cpu"].isna()[1]
    assert "| study_a | 2 | 1 | 0.8.0 abcdef1 (1) | 0 |" in md


def test_verdicts_without_comparisons_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "experiments/verdicts.py"), str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0
    assert "no comparisons found" in res.stderr


def test_setting_comparisons_from_known_curves():
    # k=4 ends 5 pp below k=1 for car on every seed (with spread), within 0.1 pp for loss
    rows = []
    for seed, (dc, dl) in enumerate([(0.05, 0.001), (0.06, -0.001), (0.04, 0.0005),
                                     (0.055, -0.0005), (0.045, 0.0)]):
        for k, crit, end in [("1", "car", 0.6), ("4", "car", 0.6 - dc),
                             ("1", "loss", 0.5), ("4", "loss", 0.5 - dl)]:
            rows += [{"run": f"seed{seed}-k{k}", "model": "m", "dataset": "d",
                      "layer": "conv1", "criterion": crit, "seed": seed, "method.k": k,
                      "step": step, "heldout_top1": top1}
                     for step, top1 in ((0, 0.7), (6, end))]
    out = aggregate.compare_settings(pd.DataFrame(rows), ["method.k"])
    assert out[["value", "versus"]].astype(str).values.tolist() == [["4", "1"], ["4", "1"]]
    v = out.set_index("criterion")
    assert v.loc["car", "diff_mean"] == pytest.approx(-0.05) and v.loc["car", "verdict"] == "lower"
    assert v.loc["loss", "verdict"] == "equivalent within ±2 pp"
    rows = verdicts.setting_rows(out)
    assert rows["setting"].tolist() == ["k=4 vs k=1"] * 2 and (rows["stage"] == "setting").all()
    assert (rows["criterion"] == rows["versus"]).all()
    # the reference is chosen by value, not by its text: the largest scoring set is 16000
    sizes = pd.DataFrame([
        {"model": "m", "dataset": "d", "layer": "conv1", "criterion": "car", "seed": s,
         "method.scoring.size": n, "step": step, "heldout_top1": 0.5 + s / 100 + n / 1e6}
        for s in range(3) for n in (250, 4000, 16000) for step in (0, 1)])
    ref = aggregate.compare_settings(sizes, ["method.scoring.size"])
    assert set(ref["versus"]) == {16000} and sorted(ref["value"]) == [250, 4000]
