"""Uncertainty of CAR values and of differences between criteria: 95% intervals from paired
outcomes over images, and over seeds.

Removing a filter is a paired comparison: each scoring image i is classified with and without
the filter, and its outcome changes by d_i = +1 (right -> wrong), -1 (wrong -> right) or 0.
With n10 images lost (right -> wrong), n01 gained (wrong -> right) and n images in all,
CAR = mean(d_i) = (n10 - n01) / n.

- `exact` (default): conditional on the m = n10 + n01 discordant images, n10 ~ Binomial(m, p)
  (McNemar's exact setting). The Clopper-Pearson interval [p_lo, p_hi] for p maps to
  CAR in [m (2 p_lo - 1) / n, m (2 p_hi - 1) / n]. It is exact (conservative) for p given m;
  the spread of m itself is not included. With m = 0 the interval is [0, 0].
- `bootstrap`: a seeded percentile bootstrap over images: resampling n images with
  replacement is drawing (n10*, n01*, n00*) ~ Multinomial(n, (n10, n01, n00) / n); the interval
  is the level's central quantiles of (n10* - n01*) / n.
"""

from __future__ import annotations

import math

import numpy as np

from carlib.core.errors import CarlibError

METHODS = ("exact", "bootstrap")


def clopper_pearson(x: np.ndarray, m: np.ndarray, level: float = 0.95
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sided binomial interval for p from x successes in m trials ((0, 1) if m = 0)."""
    from scipy import stats  # slow to import; only needed here

    x, m = np.asarray(x, dtype=float), np.asarray(m, dtype=float)
    a = (1 - level) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(x > 0, stats.beta.ppf(a, x, m - x + 1), 0.0)
        hi = np.where(x < m, stats.beta.ppf(1 - a, x + 1, m - x), 1.0)
    return np.nan_to_num(lo, nan=0.0), np.nan_to_num(hi, nan=1.0)


def _counts(n10: object, n01: object, n: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(n10, dtype=np.int64)
    b = np.asarray(n01, dtype=np.int64)
    if (a < 0).any() or (b < 0).any() or (a + b > n).any():
        raise CarlibError(f"flip counts must satisfy 0 <= n10 + n01 <= n = {n}")
    return a, b


def car_interval(n10: object, n01: object, n: int, *, level: float = 0.95,
                 method: str = "exact", n_boot: int = 10_000, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) interval of CAR = (n10 - n01) / n per candidate (arrays; see module doc).

    `n10`/`n01`: images that go right -> wrong / wrong -> right when the filter is removed
    (scalars or arrays, one entry per candidate).
    """
    a, b = _counts(n10, n01, n)
    if method == "exact":
        m = a + b
        p_lo, p_hi = clopper_pearson(a, m, level)
        return m * (2 * p_lo - 1) / n + 0.0, m * (2 * p_hi - 1) / n + 0.0  # + 0.0: no -0.0
    if method == "bootstrap":
        p = np.stack(np.broadcast_arrays(a, b, n - a - b), -1) / n
        draws = np.random.default_rng(seed).multinomial(n, p, size=(n_boot, *a.shape))
        car = (draws[..., 0] - draws[..., 1]) / n
        q = (1 - level) / 2
        return np.quantile(car, q, axis=0), np.quantile(car, 1 - q, axis=0)
    raise CarlibError(f"unknown interval method '{method}'; valid: {', '.join(METHODS)}")


def paired_difference(hits_a: object, hits_b: object, *, level: float = 0.95,
                      method: str = "exact", seed: int = 0) -> dict:
    """Accuracy of A minus accuracy of B on the same images, with its interval.

    The two networks classify the same n images: n_ab are right for A only, n_ba for B only,
    and diff = (n_ab - n_ba) / n; the interval is `car_interval` of those discordant counts
    (exact: conditional on the n_ab + n_ba discordant images; or bootstrap over images).
    """
    a = np.asarray(hits_a, dtype=bool)
    b = np.asarray(hits_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise CarlibError(f"paired hits must be two equal, non-empty vectors (got {a.shape} and "
                          f"{b.shape})")
    n, n_ab, n_ba = len(a), int((a & ~b).sum()), int((~a & b).sum())
    lo, hi = car_interval(n_ab, n_ba, n, level=level, method=method, seed=seed)
    return {"n": n, "top1": a.mean(), "top1_versus": b.mean(), "diff": (n_ab - n_ba) / n,
            "lo": float(lo), "hi": float(hi), "n_ab": n_ab, "n_ba": n_ba}


def mean_interval(values: object, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean of independent values (e.g. one
    paired difference per seed); low = high = mean for a single value."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if len(v) == 1:
        return m, m, m
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - half, m + half


def compare_over_seeds(diffs: object, margin: float, level: float = 0.95) -> dict:
    """One criterion against another from their per-seed differences (e.g. held-out top-1 at
    the end, same model and images per seed): the mean with its Student-t interval, the
    two-sided p-value of a zero mean (one-sample t-test, scipy) and the p-value of the two one-
    sided tests (TOST, statsmodels) that the mean lies within (-margin, +margin). NaN p-values
    and bounds with fewer than two seeds, or where the differences have no spread."""
    from scipy import stats
    from statsmodels.stats.weightstats import ttost_paired

    d = np.asarray(diffs, dtype=float)
    d = d[~np.isnan(d)]
    out = {"n_seeds": len(d), "diff_mean": float(d.mean()) if len(d) else math.nan,
           "diff_lo": math.nan, "diff_hi": math.nan, "p_value": math.nan, "p_tost": math.nan}
    if len(d) < 2 or d.std(ddof=1) == 0:
        return out
    _, lo, hi = mean_interval(d, level)
    out.update(diff_lo=lo, diff_hi=hi, p_value=float(stats.ttest_1samp(d, 0.0).pvalue),
               p_tost=float(ttost_paired(d, np.zeros_like(d), -margin, margin)[0]))
    return out


def holm(p_values: object) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (statsmodels' multipletests); NaN
    entries are left out of the family and stay NaN."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


def verdict(n_seeds: int, diff_mean: float, p_holm: float, p_tost_holm: float,
            margin: float, alpha: float = 0.05) -> str:
    """The wording a comparison supports: "higher" or "lower" (Holm-adjusted p < alpha),
    "equivalent within ±margin" (Holm-adjusted TOST p < alpha), else "inconclusive"; "1 seed,
    no test" and "the same on every seed" (no spread: identical, or one constant difference)
    where there is nothing to test."""
    if n_seeds < 2:
        return "1 seed, no test"
    if math.isnan(p_holm):
        return "identical on every seed" if diff_mean == 0 else "the same on every seed"
    if p_holm < alpha:
        return "higher" if diff_mean > 0 else "lower"
    if p_tost_holm < alpha:
        return f"equivalent within ±{margin * 100:g} pp"
    return "inconclusive"
