"""CAR intervals against scipy, closed forms, exact enumeration and a brute-force bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from carlib import CarlibError
from carlib.core.stats import car_interval, clopper_pearson


@pytest.mark.parametrize("n10,n01,n", [(7, 2, 50), (0, 3, 40), (5, 0, 40), (12, 12, 100),
                                       (1, 0, 500), (30, 1, 500)])
def test_exact_interval_is_clopper_pearson_on_discordant_pairs(n10, n01, n):
    lo, hi = car_interval(n10, n01, n)
    m = n10 + n01
    ci = stats.binomtest(n10, m).proportion_ci(0.95, method="exact")
    assert lo == pytest.approx(m * (2 * ci.low - 1) / n, abs=1e-12)
    assert hi == pytest.approx(m * (2 * ci.high - 1) / n, abs=1e-12)
    assert lo <= (n10 - n01) / n <= hi


def test_exact_interval_closed_forms_and_no_discordant_pairs():
    # x = 0 of m: p in [0, 1 - (alpha/2)^(1/m)]; so CAR in [-m/n, m (1 - 2 * 0.025^(1/m)) / n]
    lo, hi = car_interval(0, 6, 60)
    assert lo == pytest.approx(-6 / 60)
    assert hi == pytest.approx(6 * (1 - 2 * 0.025 ** (1 / 6)) / 60)
    lo, hi = car_interval([0, 2], [0, 0], 10)
    assert lo[0] == hi[0] == 0.0  # nothing flips: the sample CAR is exactly 0
    assert hi[1] == pytest.approx(0.2)


def test_clopper_pearson_covers_by_enumeration():
    m = 15
    lo, hi = clopper_pearson(np.arange(m + 1), np.full(m + 1, m))
    for p in np.linspace(0.01, 0.99, 37):
        covered = (lo <= p) & (p <= hi)
        assert stats.binom.pmf(np.arange(m + 1), m, p)[covered].sum() >= 0.95 - 1e-12


def test_bootstrap_matches_brute_force_resampling():
    n10, n01, n = 7, 2, 50
    lo, hi = car_interval(n10, n01, n, method="bootstrap", n_boot=20_000, seed=1)
    d = np.array([1] * n10 + [-1] * n01 + [0] * (n - n10 - n01))
    rng = np.random.default_rng(2)
    means = d[rng.integers(0, n, size=(20_000, n))].mean(1)
    assert lo == pytest.approx(np.quantile(means, 0.025), abs=1.01 / n)
    assert hi == pytest.approx(np.quantile(means, 0.975), abs=1.01 / n)
    again = car_interval([n10, 0], [n01, 0], n, method="bootstrap", n_boot=20_000, seed=1)
    assert again[0][0] == lo and again[1][0] == hi  # seeded; vectorized over candidates
    assert again[0][1] == again[1][1] == 0.0


def test_bad_counts_and_method():
    with pytest.raises(CarlibError, match="n10 \\+ n01 <= n"):
        car_interval(8, 5, 10)
    with pytest.raises(CarlibError, match="unknown interval method"):
        car_interval(1, 1, 10, method="wald")


def test_compare_over_seeds_matches_scipy_and_a_hand_tost():
    """Known answers: scipy's one-sample t-test and interval; TOST's p is the larger of the
    two one-sided t-tests against -margin and +margin, written out here."""
    from scipy import stats as st

    from carlib.core.stats import compare_over_seeds
    d = np.array([0.012, -0.004, 0.006, 0.001, 0.009])
    r = compare_over_seeds(d, margin=0.02)
    t = st.ttest_1samp(d, 0.0)
    ci = t.confidence_interval(0.95)
    assert r["n_seeds"] == 5 and r["diff_mean"] == pytest.approx(d.mean())
    assert (r["diff_lo"], r["diff_hi"]) == pytest.approx((ci.low, ci.high))
    assert r["p_value"] == pytest.approx(t.pvalue)
    lower = st.ttest_1samp(d, -0.02, alternative="greater").pvalue
    upper = st.ttest_1samp(d, 0.02, alternative="less").pvalue
    assert r["p_tost"] == pytest.approx(max(lower, upper))
    assert r["p_tost"] < 0.05  # tight around 0.5 pp: equivalent within ±2 pp
    one = compare_over_seeds([0.03], margin=0.02)
    assert one["n_seeds"] == 1 and np.isnan(one["p_value"]) and np.isnan(one["diff_lo"])


def test_holm_matches_the_step_down_rule_and_skips_nan():
    from carlib.core.stats import holm
    p = np.array([0.01, 0.04, np.nan, 0.03])
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1, then running maximum
    want = [0.03, 0.06, np.nan, 0.06]
    assert np.allclose(holm(p), want, equal_nan=True)


@pytest.mark.parametrize("args,word", [
    ((5, 0.03, 0.01, 0.9), "higher"), ((5, -0.03, 0.01, 0.9), "lower"),
    ((5, 0.001, 0.8, 0.01), "equivalent within ±2 pp"), ((5, 0.01, 0.3, 0.2), "inconclusive"),
    ((1, 0.03, np.nan, np.nan), "1 seed, no test"),
    ((5, 0.0, np.nan, np.nan), "identical on every seed")])
def test_verdict_words(args, word):
    from carlib.core.stats import verdict
    assert verdict(*args, margin=0.02) == word
