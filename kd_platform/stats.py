"""Statistics of configurations over seeds (ablation cells, a sweep's confirmed configurations):
a bootstrap or Student-t confidence interval of the mean, the difference to a reference with its
own bootstrap interval, a two-sided Welch t-test, and the Holm-Bonferroni correction across one
table's comparisons.

Everything here is deterministic: the bootstrap draws from a generator seeded by the caller
(``seed``, default 0), so the same runs always give the same intervals. A group with fewer
than ``MIN_SEEDS`` values gets NaN intervals and p-values: with one or two seeds there is no
spread to speak of, and a table built on them is no evidence either way.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
N_RESAMPLES = 10_000
SEED = 0
ALPHA = 0.05
MIN_SEEDS = 3


def _values(x: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=float).ravel()
    return a[~np.isnan(a)]


def _percentile_interval(dist: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(dist, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _resampled_means(x: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_resamples`` resamples of ``x`` with replacement."""
    return x[rng.integers(0, len(x), size=(n_resamples, len(x)))].mean(axis=1)


def bootstrap_mean_ci(x: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE,
                      n_resamples: int = N_RESAMPLES, seed: int = SEED,
                      min_n: int = MIN_SEEDS) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``x`` (NaN values dropped); ``(nan, nan)``
    for fewer than ``min_n`` values."""
    a = _values(x)
    if len(a) < max(min_n, 2):
        return np.nan, np.nan
    rng = np.random.default_rng(seed)
    return _percentile_interval(_resampled_means(a, n_resamples, rng), confidence)


def bootstrap_diff_ci(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
                      confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                      min_n: int = MIN_SEEDS) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(x) - mean(y)``, each group resampled on its own
    (the groups are treated as independent samples); ``(nan, nan)`` when either group has
    fewer than ``min_n`` values."""
    a, b = _values(x), _values(y)
    if min(len(a), len(b)) < max(min_n, 2):
        return np.nan, np.nan
    rng = np.random.default_rng(seed)
    dist = _resampled_means(a, n_resamples, rng) - _resampled_means(b, n_resamples, rng)
    return _percentile_interval(dist, confidence)


def welch_p(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
            min_n: int = MIN_SEEDS) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) of ``mean(x) == mean(y)``.

    NaN when either group has fewer than ``min_n`` (and at least 2) values, or when both
    groups have no spread at all (the t statistic is undefined).
    """
    a, b = _values(x), _values(y)
    if min(len(a), len(b)) < max(min_n, 2):
        return np.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se2 = va + vb
    if not se2 > 0:
        return np.nan
    t = (a.mean() - b.mean()) / np.sqrt(se2)
    df = se2 ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return float(2.0 * sps.t.sf(abs(t), df))


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input's order.

    The family is the non-NaN p-values (NaN stays NaN and does not count as a test). With
    ``m`` tests sorted ascending, the ``i``-th smallest (1-based) is multiplied by
    ``m - i + 1``; a running maximum keeps the adjusted values in the order of the raw ones
    (step-down), and they are capped at 1. Rejecting where the adjusted value is at most
    ``alpha`` controls the family-wise error rate at ``alpha``.
    """
    p = np.asarray(pvalues, dtype=float).ravel()
    out = np.full(p.shape, np.nan)
    present = np.flatnonzero(~np.isnan(p))
    m = len(present)
    if m == 0:
        return out
    order = present[np.argsort(p[present], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out



def t_interval(x: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean of ``x`` (NaN values dropped): with the three to five seeds
    a confirmation affords, a bootstrap's percentiles are too narrow. ``(nan, nan)`` under two values."""
    a = _values(x)
    if len(a) < 2:
        return np.nan, np.nan
    half = float(sps.t.ppf(0.5 + confidence / 2, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a)))
    return float(a.mean()) - half, float(a.mean()) + half


def pooled_std(groups: Sequence[Sequence[float] | np.ndarray]) -> float:
    """The seed-to-seed standard deviation shared by ``groups`` (each one configuration's values
    over seeds): the square root of their variances pooled by degrees of freedom. NaN when no
    group has two values."""
    arrays = [_values(g) for g in groups]
    dof = sum(len(a) - 1 for a in arrays if len(a) > 1)
    if dof == 0:
        return np.nan
    return float(np.sqrt(sum(a.var(ddof=1) * (len(a) - 1) for a in arrays if len(a) > 1) / dof))
