"""Aggregation over seeds: means, t confidence intervals, paired tests against CE, Holm correction.

Statistics are computed over FINAL-phase completed trials only (search trials are tuned on the
validation split and are not independent replicates). One observation = one seed of one cell; if a
cell has several trials for the same seed their values are averaged first.

Comparisons: every non-CE cell is compared with the ``ce`` cell of the same dataset, model and noise
setting, per (split, condition, severity, metric). Final trials are paired by ``seed`` (the same seed
means the same noisy labels and the same initialisation stream), so the test is the paired t-test
(``scipy.stats.ttest_rel``: t = mean(d) / (sd(d) / sqrt(n)), n-1 degrees of freedom, two-sided),
computed here in vectorised form. The Holm step-down correction is applied within each family
(dataset, model, noise setting, split, condition, severity, metric): the regularizer-vs-CE
comparisons that answer one question ("which regularizers differ from CE on this metric in this
setting?"). ``significant`` is p_adjusted < alpha.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from study.vocabulary import NON_CORRUPTION_CONDITIONS

KEYS = ["split", "condition", "severity", "metric"]
CELL_COLS = ["cell_id", "dataset", "model", "regularizer", "noise_setting", "noise_kind", "noise_rate"]
GROUP = ["dataset", "model", "noise_setting"]
REFERENCE = "ce"
TEST_NAME = "paired_t (scipy.stats.ttest_rel over seeds)"
CORRECTION = "holm within dataset/model/noise_setting/split/condition/severity/metric over regularizers vs ce"
SUMMARY_COLUMNS = [
    "study", "cell_id", "dataset", "model", "regularizer", "noise_setting", "noise_kind", "noise_rate",
    "split", "condition", "severity", "metric", "mean", "std", "n", "ci_low", "ci_high", "delta_vs_ce",
    "p_value", "p_adjusted", "significant", "best_params", "best_strength", "correction", "test",
]  # fmt: skip
# NaN severities (most metrics) as a finite sentinel: pandas merges/groupbys on NaN keys are fragile.
_NOSEV = -1.0e300


def t_half_width(std: np.ndarray, n: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Half-width of the two-sided t confidence interval of a mean; NaN where n < 2."""
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = sps.t.ppf(0.5 + level / 2, np.where(n >= 2, n - 1, np.nan))
        return q * np.asarray(std, dtype=float) / np.sqrt(n)


def holm(p: pd.Series, groups: list[pd.Series] | pd.DataFrame) -> pd.Series:
    """Holm step-down adjusted p-values within groups; NaN p-values stay NaN and do not count in m.

    p_adj(i) = max_{j <= i} min(1, (m - j + 1) p_(j)) over the ascending p-values of a group.
    """
    out = pd.Series(np.nan, index=p.index)
    ok = p.notna()
    if not ok.any():
        return out
    frame = pd.DataFrame(groups).loc[ok].copy() if isinstance(groups, pd.DataFrame) else None
    assert frame is not None
    cols = list(frame.columns)
    frame["p"] = p[ok]
    frame = frame.sort_values([*cols, "p"], kind="mergesort")
    rank = frame.groupby(cols, sort=False).cumcount()
    m = frame.groupby(cols, sort=False)["p"].transform("count")
    frame["adj"] = ((m - rank) * frame["p"]).clip(upper=1.0)
    out.loc[frame.index] = frame.groupby(cols, sort=False)["adj"].cummax()
    return out


def _json_default(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else str(v)


def best_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: its best completed search trial (by best_value and direction).

    Cells without a completed search trial fall back to their first completed final trial (a cell
    with nothing to tune, e.g. CE at fixed hyperparameters). Adds a ``best_params`` JSON column of
    the non-null ``param_*`` values (prefix stripped, keys sorted).
    """
    done = trials[(trials["status"] == "completed")]
    search = done[(done["phase"] == "search") & done["best_value"].notna()]
    score = np.where(search["direction"] == "minimize", -search["best_value"], search["best_value"])
    search = search.assign(_score=score).sort_values(["cell_id", "_score"], ascending=[True, False])
    best = search.drop_duplicates("cell_id")
    rest = done[(done["phase"] == "final") & ~done["cell_id"].isin(best["cell_id"])].drop_duplicates(
        "cell_id"
    )
    best = pd.concat([best.drop(columns="_score"), rest], ignore_index=True)
    pcols = [c for c in best.columns if c.startswith("param_")]
    best["best_params"] = [
        json.dumps(
            {
                c[6:]: r[c]
                for c in pcols
                if r[c] is not None and not (isinstance(r[c], float) and np.isnan(r[c]))
            },
            sort_keys=True,
            default=_json_default,
        )
        for r in best[pcols].to_dict("records")
    ]
    return best


def summarize(
    trials: pd.DataFrame, evals: pd.DataFrame, *, study: str | None = None, alpha: float = 0.05
) -> pd.DataFrame:
    """Summary table: one row per cell and (split, condition, severity, metric).

    Args:
        trials: trials table (reports.build.SCHEMAS["trials"]).
        evals: evals table (long format).
        study: value of the ``study`` column (default: the trials' own study column).
        alpha: significance level of the ``significant`` column.

    Returns:
        DataFrame with ``SUMMARY_COLUMNS``. Empty (zero rows) when no final trial completed.
        ci_low/ci_high are NaN for n = 1; delta_vs_ce is 0 for CE cells and NaN without a CE cell;
        p_value is NaN for CE cells, for fewer than 2 paired seeds, or identical paired values.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), but got {alpha}.")
    final = trials[(trials["phase"] == "final") & (trials["status"] == "completed")]
    if study is None:
        study = str(trials["study"].iloc[0]) if len(trials) else ""
    ev = evals.merge(final[["trial_id", "cell_id", "seed"]], on="trial_id", how="inner")
    if ev.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in SUMMARY_COLUMNS})
    ev["severity"] = ev["severity"].astype(float).fillna(_NOSEV)
    per_seed = ev.groupby(["cell_id", *KEYS, "seed"], sort=False, observed=True)["value"].mean().reset_index()
    agg = (
        per_seed.groupby(["cell_id", *KEYS], sort=False, observed=True)["value"]
        .agg(mean="mean", std="std", n="count")
        .reset_index()
    )
    half = t_half_width(agg["std"].to_numpy(), agg["n"].to_numpy())
    agg["ci_low"], agg["ci_high"] = agg["mean"] - half, agg["mean"] + half

    cells = trials.drop_duplicates("cell_id")[CELL_COLS]
    ref = cells[cells["regularizer"] == REFERENCE].drop_duplicates(GROUP)[[*GROUP, "cell_id"]]
    cells = cells.merge(ref.rename(columns={"cell_id": "ref_cell"}), on=GROUP, how="left")
    agg = agg.merge(cells, on="cell_id", how="left")

    ref_mean = agg[["cell_id", *KEYS, "mean"]].rename(columns={"cell_id": "ref_cell", "mean": "ref_mean"})
    agg = agg.merge(ref_mean, on=["ref_cell", *KEYS], how="left")
    agg["delta_vs_ce"] = agg["mean"] - agg["ref_mean"]

    # Paired differences per seed against the reference cell.
    ps = per_seed.merge(cells[["cell_id", "ref_cell"]], on="cell_id")
    ps = ps[ps["cell_id"] != ps["ref_cell"]]
    ref_vals = per_seed.rename(columns={"cell_id": "ref_cell", "value": "ref_value"})
    ps = ps.merge(ref_vals, on=["ref_cell", *KEYS, "seed"], how="inner")
    ps["d"] = ps["value"] - ps["ref_value"]
    d = ps.dropna(subset=["d"]).groupby(["cell_id", *KEYS], sort=False)["d"].agg(["mean", "std", "count"])
    with np.errstate(invalid="ignore", divide="ignore"):
        t = d["mean"] / (d["std"] / np.sqrt(d["count"]))
        p = 2 * sps.t.sf(np.abs(t), d["count"] - 1)
    d["p_value"] = np.where(d["count"] >= 2, p, np.nan)
    agg = agg.merge(d[["p_value"]].reset_index(), on=["cell_id", *KEYS], how="left")

    agg["p_adjusted"] = holm(agg["p_value"], agg[[*GROUP, *KEYS]])
    agg["significant"] = (agg["p_adjusted"] < alpha).fillna(False).astype(bool)

    best = best_trials(trials)[["cell_id", "best_params", "strength"]].rename(
        columns={"strength": "best_strength"}
    )
    agg = agg.merge(best, on="cell_id", how="left")
    agg["severity"] = agg["severity"].replace(_NOSEV, np.nan)
    agg["study"] = study
    agg["correction"] = CORRECTION
    agg["test"] = np.where(agg["p_value"].notna(), TEST_NAME, None)
    agg = agg.sort_values(["dataset", "model", "noise_setting", "regularizer", *KEYS], kind="mergesort")
    return agg[SUMMARY_COLUMNS].reset_index(drop=True)


# Conditions of evals.parquet that are not corruptions (attacks, clean, derived means, distillation).
NOT_CORRUPTIONS = NON_CORRUPTION_CONDITIONS


def corruption_mask(evals: pd.DataFrame) -> pd.Series:
    """True on the per-corruption accuracy rows of evals: test split, metric accuracy, a condition that is
    not an attack/clean/derived one, and an integer severity in 1..5 (corruption levels)."""
    sev = evals["severity"].astype(float)
    return (
        (evals["split"] == "test")
        & (evals["metric"] == "accuracy")
        & ~evals["condition"].isin(NOT_CORRUPTIONS)
        & sev.between(1, 5)
        & (sev == sev.round())
    )


def corruption_summary(
    trials: pd.DataFrame, evals: pd.DataFrame, *, study: str | None = None
) -> pd.DataFrame:
    """Summary of each corruption's accuracy averaged over its severities, with the usual seed statistics.

    Per final trial and corruption, the accuracies at the severities present are averaged first; that
    per-seed value then goes through `summarize` (mean, t-CI over seeds, delta and paired test vs the ce
    cell, Holm within each corruption's family), so the CI covers the severity-averaged quantity itself.

    Returns:
        `summarize` output (SUMMARY_COLUMNS) with condition = corruption name and severity NaN; zero rows
        when evals hold no corruption rows.
    """
    ev = evals[corruption_mask(evals)]
    if ev.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in SUMMARY_COLUMNS})
    per_trial = (
        ev.groupby(["trial_id", "split", "condition", "metric"], sort=False, observed=True)["value"]
        .mean()
        .reset_index()
        .assign(severity=np.nan)
    )
    return summarize(trials, per_trial, study=study)
