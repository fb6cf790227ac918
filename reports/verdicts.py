"""Verdicts that replicate: better / worse / equivalent / undecided, the probability of improvement and
the units a comparison still needs (shared/reference.md, "Comparing regularizers: verdicts that
replicate").

All functions take one entry per comparison (numpy arrays of equal length) and are vectorised: a report
decides thousands of comparisons at once. A comparison is a set of paired unit differences
d_i = A_i - B_i (unit = search replica with its seeds averaged, or a seed when the study has one
replica) summarised by mean d, sd s and n; its p-value comes from the paired t-test and its adjusted
p-value from Holm over the comparisons printed together (reports/compare.py).

- ``better`` / ``worse``: the Holm-adjusted interval excludes 0 (equivalently p_adjusted < alpha); the
  word follows the metric's direction (accuracy up is better, ECE up is worse); metrics with no better
  direction say ``higher`` / ``lower``.
- ``equivalent``: otherwise, when the 90% interval of d lies inside (-margin, +margin): two one-sided
  tests at 5% (Lakens 2017). A metric without a margin is never equivalent.
- ``undecided``: neither; ``units_needed`` estimates the units at which the observed spread would
  decide it (power 0.8): n = ((z_0.975 + z_0.8) s / |d|)^2 to show the difference, or
  n = ((z_0.95 + z_0.8) s / (margin - |d|))^2 to show equivalence when |d| < margin; the smaller of the
  two, at least 3.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps

Z_DIFFERENCE = float(sps.norm.ppf(0.975) + sps.norm.ppf(0.8))  # 2.80: two-sided 5%, power 0.8
Z_EQUIVALENCE = float(sps.norm.ppf(0.95) + sps.norm.ppf(0.8))  # 2.49: one-sided 5% each, power 0.8
MIN_UNITS = 3
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 20211206  # fixed: the same results give the same report


def t_interval(diff: np.ndarray, sd: np.ndarray, n: np.ndarray, level: np.ndarray | float):
    """Two-sided t-interval of a mean at `level` (per comparison); NaN where n < 2."""
    diff, sd, n = (np.asarray(v, dtype=float) for v in (diff, sd, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        q = sps.t.ppf(0.5 + np.asarray(level, dtype=float) / 2, np.where(n >= 2, n - 1, np.nan))
        half = q * sd / np.sqrt(n)
    return diff - half, diff + half


def holm_interval(diff, sd, n, p, p_adjusted, alpha: float = 0.05):
    """The interval of d at the level Holm grants this comparison: 1 - alpha p / p_adjusted.

    Holm rejects comparison k when p_k < alpha / f_k with f_k = p_adjusted / p (the step's multiplier
    after the running maximum), so this interval excludes 0 exactly when p_adjusted < alpha. Where
    p = 0 (every difference equal and nonzero) the interval is the point d.
    """
    p, p_adjusted = np.asarray(p, dtype=float), np.asarray(p_adjusted, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        level = np.where(p > 0, 1 - alpha * p / p_adjusted, 1.0)
    low, high = t_interval(diff, sd, n, np.clip(level, 0.0, 1.0))
    point = np.asarray(diff, dtype=float)
    return np.where(p == 0, point, low), np.where(p == 0, point, high)


def decide(diff, sd, n, p_adjusted, margin, better, alpha: float = 0.05) -> np.ndarray:
    """The verdict word of each comparison (see the module docstring).

    Args:
        diff, sd, n: mean, standard deviation and count of the paired unit differences A - B.
        p_adjusted: Holm-adjusted p-values (NaN: untested, e.g. n < 2).
        margin: equivalence margins in the metric's units (NaN: none).
        better: +1 higher is better, -1 lower is better, 0 neither.
        alpha: family-wise level of better/worse.
    """
    diff, sd, n, p_adjusted, margin, better = (
        np.atleast_1d(np.asarray(v, dtype=float)) for v in (diff, sd, n, p_adjusted, margin, better)
    )
    low90, high90 = t_interval(diff, sd, n, 0.90)
    decided = p_adjusted < alpha
    up = diff * np.where(better == 0, 1.0, better) > 0
    words = np.where(
        better == 0,
        np.where(diff > 0, "higher", "lower"),
        np.where(up, "better", "worse"),
    )
    equivalent = (low90 > -margin) & (high90 < margin)  # False wherever margin or the interval is NaN
    return np.where(decided, words, np.where(equivalent, "equivalent", "undecided")).astype(object)


def units_needed(diff, sd, margin) -> np.ndarray:
    """Units (replicas, or seeds) at which the observed d and s would decide a comparison (power 0.8,
    5%): the smaller of what a difference and what equivalence would need, at least 3; NaN when
    neither can be estimated (s unknown, or d = 0 without a margin)."""
    diff, sd, margin = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (diff, sd, margin))
    ad = np.abs(diff)
    with np.errstate(invalid="ignore", divide="ignore"):
        n_diff = np.where(ad > 0, (Z_DIFFERENCE * sd / ad) ** 2, np.inf)
        n_eq = np.where(ad < margin, (Z_EQUIVALENCE * sd / (margin - ad)) ** 2, np.inf)
    n = np.fmin(n_diff, n_eq)
    n = np.where(np.isfinite(n) & np.isfinite(sd), np.maximum(np.ceil(n), MIN_UNITS), np.nan)
    return np.where(sd == 0, MIN_UNITS, n)


def probability_of_improvement(
    diffs: list[np.ndarray],
    better: np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(A > B) over paired units (Agarwal et al. 2021): mean of 1{A_i beats B_i} + 0.5 1{tie}, where
    "beats" follows the metric's direction (+1 / 0: higher, -1: lower), with a 95% percentile bootstrap
    interval over units.

    Args:
        diffs: per comparison, its paired unit differences A_i - B_i (NaN-free).
        better: per comparison, the metric's direction.
        resamples: bootstrap resamples (the same unit indices serve every comparison of one size).
        seed: the bootstrap's generator seed (fixed: a report is reproducible).

    Returns:
        (point, low, high); NaN for a comparison without units, and low = high = point for one unit.
    """
    m = len(diffs)
    point, low, high = (np.full(m, np.nan) for _ in range(3))
    sign = np.where(np.asarray(better, dtype=float) < 0, -1.0, 1.0)
    sizes = np.array([len(d) for d in diffs])
    rng = np.random.default_rng(seed)
    for size in np.unique(sizes[sizes > 0]):
        rows = np.flatnonzero(sizes == size)
        d = np.stack([diffs[i] for i in rows]) * sign[rows, None]
        wins = (d > 0) + 0.5 * (d == 0)
        point[rows] = wins.mean(axis=1)
        idx = rng.integers(0, size, size=(resamples, size))
        for chunk in np.array_split(np.arange(len(rows)), max(1, len(rows) // 256)):
            boot = wins[chunk][:, idx].mean(axis=2)  # (comparisons, resamples)
            low[rows[chunk]], high[rows[chunk]] = np.percentile(boot, [2.5, 97.5], axis=1)
    return point, low, high
