"""Paired comparisons between the regularizers of one (dataset, model, noise setting): against one
reference regularizer, or between all pairs.

Final trials of two cells of the same group with the same seed share their noisy labels and their
initialisation stream, so they are paired by seed. For each pair of regularizers (a, b) and each
(split, condition, severity, metric): d_s = value_a(s) - value_b(s) over the seeds both completed;
diff = mean(d), its 95% t-interval, Cohen's d_z = mean(d) / sd(d), and the paired t-test
(``scipy.stats.ttest_rel``: t = mean(d) / (sd(d) / sqrt(n)), n - 1 df, two-sided). Holm's step-down
correction runs within each family: the comparisons that answer one question in one setting (one
group x split x condition x severity x metric), i.e. every regularizer against one reference
(``p_adjusted``), or every unordered pair (``p_adjusted_pairs``: a pair is one test; both directions
carry its p).

Each comparison also carries its verdict (reports/verdicts.py): better / worse (the Holm-adjusted
interval excludes 0), equivalent (the 90% interval inside the metric's margin), or undecided with the
units it would need; and the probability of improvement P(A beats B) with a bootstrap interval.
``verdict`` follows ``p_adjusted``; ``verdict_pairs`` (all pairs only) follows ``p_adjusted_pairs``.

The unit of pairing is the seed while a study has one search replica per cell; with replicas (a
``replica`` column holding more than one value), it is the replica, its seeds averaged first, so the
search's own variance is inside every interval (Bouthillier et al. 2021).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

from reports import verdicts
from study import vocabulary as vocab

KEYS = ["split", "condition", "severity", "metric"]
GROUP = ["dataset", "model", "noise_setting"]
CELL_COLS = ["cell_id", "dataset", "model", "regularizer", "noise_setting", "noise_kind", "noise_rate"]
COMPARISON_COLUMNS = [
    *GROUP, *KEYS, "regularizer", "reference", "n_pairs", "n_above", "n_below", "diff", "diff_ci_low",
    "diff_ci_high", "effect_size_dz", "t", "p_value", "p_adjusted", "p_adjusted_pairs", "significant",
    "adj_ci_low", "adj_ci_high", "verdict", "verdict_pairs", "margin", "p_improve", "p_improve_low",
    "p_improve_high", "n_units", "units_needed",
]  # fmt: skip
# NaN severities (most metrics) as a finite sentinel: pandas merges/groupbys on NaN keys are fragile.
NOSEV = -1.0e300


def t_half_width(std: np.ndarray, n: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Half-width of the two-sided t confidence interval of a mean; NaN where n < 2."""
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = sps.t.ppf(0.5 + level / 2, np.where(n >= 2, n - 1, np.nan))
        return q * np.asarray(std, dtype=float) / np.sqrt(n)


def holm(p: pd.Series, groups: pd.DataFrame) -> pd.Series:
    """Holm step-down adjusted p-values within groups; NaN p-values stay NaN and do not count in m.

    p_adj(i) = max_{j <= i} min(1, (m - j + 1) p_(j)) over the ascending p-values of a group.
    """
    out = pd.Series(np.nan, index=p.index)
    ok = p.notna()
    if not ok.any():
        return out
    frame = groups.loc[ok].copy()
    cols = list(frame.columns)
    frame["p"] = p[ok]
    frame = frame.sort_values([*cols, "p"], kind="mergesort")
    rank = frame.groupby(cols, sort=False).cumcount()
    m = frame.groupby(cols, sort=False)["p"].transform("count")
    frame["adj"] = ((m - rank) * frame["p"]).clip(upper=1.0)
    out.loc[frame.index] = frame.groupby(cols, sort=False)["adj"].cummax()
    return out


def per_seed(trials: pd.DataFrame, evals: pd.DataFrame) -> pd.DataFrame:
    """One value per completed final trial's cell, unit and (split, condition, severity, metric), with
    the cell's columns; severity NaN as ``NOSEV``. The unit (column ``seed``, the pairing key) is the
    seed, or with search replicas the replica, its seeds averaged (see the module docstring). Several
    trials of one cell and unit are averaged."""
    final = trials[(trials["phase"] == "final") & (trials["status"] == "completed")]
    replicated = "replica" in final.columns and final["replica"].nunique() > 1
    unit = final["replica"] if replicated else final["seed"]
    ev = evals.merge(final[["trial_id", "cell_id"]].assign(seed=unit.to_numpy()), on="trial_id", how="inner")
    if ev.empty:
        return pd.DataFrame(columns=[*CELL_COLS, *KEYS, "seed", "value"])
    ev["severity"] = ev["severity"].astype(float).fillna(NOSEV)
    values = ev.groupby(["cell_id", *KEYS, "seed"], sort=False, observed=True)["value"].mean().reset_index()
    return values.merge(trials.drop_duplicates("cell_id")[CELL_COLS], on="cell_id", how="left")


def compare(
    values: pd.DataFrame,
    *,
    reference: str | None = "ce",
    alpha: float = 0.05,
    margins: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Paired comparisons of `per_seed` values (see the module docstring).

    Args:
        values: ``per_seed`` output.
        reference: compare every regularizer with this one (rows: regularizer vs reference); None for
            every ordered pair (each regularizer vs each other one).
        alpha: level of ``significant`` (p_adjusted < alpha) and of the better/worse verdicts.
        margins: equivalence margins per metric overriding ``study.vocabulary.margin_of``.

    Returns:
        COMPARISON_COLUMNS; severity NaN restored. Empty when no pair of cells shares a seed.
        ``p_adjusted``: Holm over the regularizers compared with the row's reference (the family of
        ``--reference``); ``p_adjusted_pairs`` (reference None only, else NaN): Holm over the unordered
        pairs, a pair's p counted once and copied to both directions. ``n_above`` / ``n_below``: paired
        seeds where the regularizer's value is above / below the reference's.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), but got {alpha}.")
    a = values[[*GROUP, *KEYS, "seed", "regularizer", "value"]]
    b = a.rename(columns={"regularizer": "reference", "value": "ref_value"})
    pairs = a.merge(b, on=[*GROUP, *KEYS, "seed"], how="inner")
    pairs = pairs[pairs["regularizer"] != pairs["reference"]]
    if reference is not None:
        pairs = pairs[pairs["reference"] == reference]
    if pairs.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in COMPARISON_COLUMNS})
    pairs = pairs.assign(d=pairs["value"] - pairs["ref_value"]).dropna(subset=["d"])
    pairs = pairs.assign(above=pairs["d"] > 0, below=pairs["d"] < 0)
    keys = [*GROUP, *KEYS, "regularizer", "reference"]
    grouped = pairs.groupby(keys, sort=False, observed=True)
    d = grouped["d"].agg(["mean", "std", "count"]).join(grouped[["above", "below"]].sum()).reset_index()
    n, sd = d["count"].to_numpy(dtype=float), d["std"].to_numpy(dtype=float)
    half = t_half_width(sd, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = d["mean"].to_numpy() / (sd / np.sqrt(n))
        p = np.where(n >= 2, 2 * sps.t.sf(np.abs(t), n - 1), np.nan)
        dz = np.where(n >= 2, d["mean"].to_numpy() / sd, np.nan)
    out = d[keys].assign(
        n_pairs=d["count"].astype(int),
        n_above=d["above"].astype(int),
        n_below=d["below"].astype(int),
        diff=d["mean"],
        diff_ci_low=d["mean"] - half,
        diff_ci_high=d["mean"] + half,
        effect_size_dz=dz,
        t=np.where(n >= 2, t, np.nan),
        p_value=p,
    )
    out["p_adjusted"] = holm(out["p_value"], out[[*GROUP, *KEYS, "reference"]])
    out["p_adjusted_pairs"] = np.nan if reference is not None else _holm_pairs(out)
    out["significant"] = (out["p_adjusted"] < alpha).fillna(False).astype(bool)
    out = _with_verdicts(out, sd, [g.to_numpy() for _, g in grouped["d"]], alpha, margins, reference is None)
    out["severity"] = out["severity"].replace(NOSEV, np.nan)
    return out[COMPARISON_COLUMNS].reset_index(drop=True)


def _with_verdicts(
    out: pd.DataFrame,
    sd: np.ndarray,
    diffs: list[np.ndarray],
    alpha: float,
    margins: dict[str, float] | None,
    all_pairs: bool,
) -> pd.DataFrame:
    """Adds the Holm-adjusted interval, verdict (and verdict_pairs), margin, probability of improvement
    and units needed."""
    metrics = out["metric"].to_numpy()
    better = np.array([getattr(vocab.METRIC_BY_NAME.get(m), "better", 0) for m in metrics], dtype=float)
    margin = np.array([vocab.margin_of(m, margins) for m in metrics], dtype=float)  # None -> NaN
    diff, n = out["diff"].to_numpy(dtype=float), out["n_pairs"].to_numpy(dtype=float)
    low, high = verdicts.holm_interval(diff, sd, n, out["p_value"], out["p_adjusted"], alpha)
    point, p_low, p_high = verdicts.probability_of_improvement(diffs, better)
    pairs = out["p_adjusted_pairs"].to_numpy(dtype=float)
    return out.assign(
        adj_ci_low=low,
        adj_ci_high=high,
        verdict=verdicts.decide(diff, sd, n, out["p_adjusted"], margin, better, alpha),
        # A NaN p (identical paired values) is no difference, and can still be equivalent.
        verdict_pairs=verdicts.decide(diff, sd, n, pairs, margin, better, alpha) if all_pairs else None,
        margin=margin,
        p_improve=point,
        p_improve_low=p_low,
        p_improve_high=p_high,
        n_units=out["n_pairs"],
        units_needed=verdicts.units_needed(diff, sd, margin),
    )


def _holm_pairs(out: pd.DataFrame) -> np.ndarray:
    """Holm over the unordered pairs of each family (a < b adjusted, then copied to b vs a)."""
    keys = [*GROUP, *KEYS, "regularizer", "reference"]
    family = out[out["regularizer"] < out["reference"]]
    adj = family.assign(p_adj=holm(family["p_value"], family[[*GROUP, *KEYS]]))
    mirror = adj.rename(columns={"regularizer": "reference", "reference": "regularizer"})
    both = pd.concat([adj[[*keys, "p_adj"]], mirror[[*keys, "p_adj"]]], ignore_index=True)
    return out[keys].merge(both, on=keys, how="left")["p_adj"].to_numpy()


def correction_text(pairs: bool = False) -> str:
    """The summary's ``correction`` column: the Holm families of p_adjusted (and p_adjusted_pairs)."""
    text = "holm within dataset/model/noise_setting/split/condition/severity/metric"
    text += " over the regularizers vs the reference"
    return text + ("; p_adjusted_pairs: over the unordered pairs of regularizers" if pairs else "")
