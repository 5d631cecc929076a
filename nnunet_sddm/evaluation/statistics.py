"""Descriptive statistics, 95% confidence intervals and Welch's t-test.

* ``describe(x)``: over the finite values of ``x``: n, mean, std (ddof = 1), median and the
  95% confidence interval of the mean, ``mean +- t_{0.975, n-1} * std / sqrt(n)`` (Student t;
  NaN when n < 2). NaN values (e.g. empty masks under the NaN policy) are counted as ``n_nan``.
* ``welch(a, b)``: Welch's unequal-variance t-test of mean(a) vs mean(b), two-sided, exactly
  ``scipy.stats.ttest_ind(a, b, equal_var=False)`` on the finite values (the paper's test).
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
