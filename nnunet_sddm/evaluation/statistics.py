"""Descriptive statistics, 95% confidence intervals, Welch's t-test, paired tests and Holm's correction.

* ``describe(x)``: over the finite values of ``x``: n, mean, std (ddof = 1), median and the
  95% confidence interval of the mean, ``mean +- t_{0.975, n-1} * std / sqrt(n)`` (Student t;
  NaN when n < 2). NaN values (e.g. empty masks under the NaN policy) are counted as ``n_nan``.
* ``welch(a, b)``: Welch's unequal-variance t-test of mean(a) vs mean(b), two-sided, exactly
  ``scipy.stats.ttest_ind(a, b, equal_var=False)`` on the finite values (the paper's test).
* ``paired_tests(c, b)``: paired samples (same cases, same order), over the cases where both are
  finite: d = c - b, n, mean(d), its seeded bootstrap percentile CI, the Wilcoxon signed-rank
  test (``scipy.stats.wilcoxon``, two-sided, zero differences dropped; exact without ties, else
  the normal approximation: ``wilcoxon_method``) and the paired t-test
  (``scipy.stats.ttest_rel``).
* ``holm(p)``: Holm-Bonferroni step-down adjusted p-values: with the m finite p-values sorted
  ascending, p_(1) <= ... <= p_(m), ``p~_(i) = min(1, max_{j <= i} (m - j + 1) p_(j))``.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np
from scipy.special import stdtrit


def finite(x: Sequence[float]) -> np.ndarray:
    """The finite values of ``x`` as a float64 array."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    return a[np.isfinite(a)]


def confidence_interval(x: Sequence[float], level: float = 0.95) -> tuple:
    """Student-t confidence interval of the mean of the finite values of ``x`` (NaNs if n < 2)."""
    a = finite(x)
    if a.size < 2:
        return (math.nan, math.nan)
    # Student-t quantile: scipy.special.stdtrit(df, p) is what scipy.stats.t.ppf evaluates,
    # without importing scipy.stats (about a second of a command's start-up)
    half = stdtrit(a.size - 1, 0.5 + level / 2) * a.std(ddof=1) / math.sqrt(a.size)
    m = float(a.mean())
    return (m - float(half), m + float(half))


def describe(x: Sequence[float]) -> Dict[str, float]:
    """n, n_nan, mean, std, median, ci95_low, ci95_high of a sample (NaNs excluded)."""
    raw = np.asarray(x, dtype=np.float64).reshape(-1)
    a = finite(raw)
    lo, hi = confidence_interval(a)
    return {
        "n": int(a.size),
        "n_nan": int(raw.size - a.size),
        "mean": float(a.mean()) if a.size else math.nan,
        "std": float(a.std(ddof=1)) if a.size > 1 else math.nan,
        "median": float(np.median(a)) if a.size else math.nan,
        "ci95_low": lo,
        "ci95_high": hi,
    }


def welch(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """Welch's two-sided t-test on the finite values: ``{"t", "p", "n_a", "n_b"}``.

    p is NaN when either sample has fewer than 2 values; two identical constant samples give
    p = 1 (no evidence of a difference) rather than SciPy's NaN.
    """
    from scipy import stats

    x, y = finite(a), finite(b)
    out = {"n_a": int(x.size), "n_b": int(y.size), "t": math.nan, "p": math.nan}
    if x.size < 2 or y.size < 2:
        return out
    if x.std() == 0 and y.std() == 0:
        if x.mean() == y.mean():
            out.update(t=0.0, p=1.0)
        else:
            out.update(t=math.copysign(math.inf, x.mean() - y.mean()), p=0.0)
        return out
    res = stats.ttest_ind(x, y, equal_var=False)
    out.update(t=float(res.statistic), p=float(res.pvalue))
    return out


def bootstrap_mean_ci(x: Sequence[float], *, seed: int = 0, n_boot: int = 10000,
                      level: float = 0.95) -> tuple:
    """Percentile bootstrap CI of the mean of the finite values of ``x``: ``n_boot`` resamples
    with replacement drawn by ``numpy.random.default_rng(seed)`` (vectorised, in blocks of about
    4 million draws), the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of their means
    (numpy's linear interpolation). ``(nan, nan)`` when fewer than 2 values or ``n_boot < 1``;
    the same inputs and seed give the same interval."""
    a = finite(x)
    if a.size < 2 or n_boot < 1:
        return (math.nan, math.nan)
    if not (0 < level < 1):
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    block = max(1, 4_000_000 // a.size)
    means = np.empty(int(n_boot), dtype=np.float64)
    for start in range(0, int(n_boot), block):
        stop = min(int(n_boot), start + block)
        idx = rng.integers(0, a.size, size=(stop - start, a.size))
        means[start:stop] = a[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def wilcoxon_method(d: np.ndarray) -> str:
    """``scipy.stats.wilcoxon``'s method for the differences ``d``: ``"exact"`` (the exact null
    distribution) when there are at most 50 non-zero differences and no ties among their absolute
    values, else ``"approx"`` (the normal approximation with the tie and zero corrections). SciPy's
    ``"auto"`` answers ties with a permutation test of every sign flip, about 0.1 to 0.4 s per call
    at n = 10 and so minutes for a study's table; the approximation is the classical treatment."""
    nz = np.abs(d[d != 0])
    return "exact" if nz.size <= 50 and np.unique(nz).size == nz.size else "approx"


def paired_tests(candidate: Sequence[float], baseline: Sequence[float], *, seed: int = 0,
                 n_boot: int = 10000, level: float = 0.95) -> Dict[str, float]:
    """Paired comparison of two per-case samples (equal length, the same case order).

    Over the cases where both values are finite, d = candidate - baseline. Returns ``n``,
    ``mean_diff`` (mean of d), ``ci_low``/``ci_high`` (``bootstrap_mean_ci`` of d; NaN if
    ``n_boot`` is 0), ``p_wilcoxon`` (Wilcoxon signed-rank, two-sided, zero differences dropped,
    exact or normal-approximated as ``wilcoxon_method`` says; p = 1 when every difference is 0), ``t``/``p_ttest_rel`` (paired t-test; all differences 0:
    t = 0, p = 1; all equal and non-zero: t = +-inf, p = 0). Tests and CI are NaN when n < 2
    (``mean_diff`` is NaN only when n = 0).
    """
    c = np.asarray(candidate, dtype=np.float64).reshape(-1)
    b = np.asarray(baseline, dtype=np.float64).reshape(-1)
    if c.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {c.size} vs {b.size}")
    d = (c - b)[np.isfinite(c) & np.isfinite(b)]
    lo, hi = bootstrap_mean_ci(d, seed=seed, n_boot=n_boot, level=level)
    out = {"n": int(d.size), "mean_diff": float(d.mean()) if d.size else math.nan, "ci_low": lo, "ci_high": hi,
           "p_wilcoxon": math.nan, "t": math.nan, "p_ttest_rel": math.nan}
    if d.size < 2:
        return out
    from scipy import stats

    if not np.any(d):
        out.update(p_wilcoxon=1.0, t=0.0, p_ttest_rel=1.0)
        return out
    out["p_wilcoxon"] = float(stats.wilcoxon(d, method=wilcoxon_method(d)).pvalue)
    if np.all(d == d[0]):
        out.update(t=math.copysign(math.inf, d[0]), p_ttest_rel=0.0)
    else:
        res = stats.ttest_rel(c[np.isfinite(c) & np.isfinite(b)], b[np.isfinite(c) & np.isfinite(b)])
        out.update(t=float(res.statistic), p_ttest_rel=float(res.pvalue))
    return out


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order (float64 array of the same length).

    NaNs stay NaN and do not count in m (the number of tests); the adjusted values are
    monotone in the raw ones and capped at 1."""
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out
