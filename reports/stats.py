"""Aggregation over seeds: means, t confidence intervals, paired comparisons, Holm correction.

Statistics are computed over FINAL-phase completed trials only (search trials are tuned on the
validation split and are not independent replicates). One observation = one seed of one cell; if a
cell has several trials for the same seed their values are averaged first.

Comparisons (reports/compare.py): every cell is compared with the reference regularizer's cell
(``ce`` by default; ``study report --reference NAME``) of the same dataset, model and noise setting,
per (split, condition, severity, metric); summary.parquet (``summarize(..., all_pairs=True)``, written
by the run) holds one block of rows per reference, so any reference or pair is a filter of it. Final
trials are paired by ``seed`` (the same seed means the same noisy labels and the same initialisation
stream), so the test is the paired t-test (``scipy.stats.ttest_rel``: t = mean(d) / (sd(d) /
sqrt(n)), n-1 degrees of freedom, two-sided), computed in vectorised form. Holm's step-down
correction runs within each family (dataset, model, noise setting, split, condition, severity,
metric): the comparisons that answer one question ("which regularizers differ from the reference on
this metric in this setting?"). Each comparison carries its effect size: the mean paired difference
with its 95% t-interval and Cohen's d_z. ``delta_vs_ce`` stays the difference of means to the ce
cell. ``significant`` is p_adjusted < alpha; ``verdict`` (reports/verdicts.py: better / worse /
equivalent / undecided) is the word the report prints and ``mark`` the sign its tables print.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from reports.compare import (
    CELL_COLS,
    GROUP,
    KEYS,
    NOSEV,
    compare,
    correction_text,
    per_seed,
    t_half_width,
)
from study.vocabulary import NON_CORRUPTION_CONDITIONS

REFERENCE = "ce"
TEST_NAME = "paired_t (scipy.stats.ttest_rel over seeds)"
CORRECTION = correction_text(False)
SUMMARY_COLUMNS = [
    "study", "cell_id", "dataset", "model", "regularizer", "noise_setting", "noise_kind", "noise_rate",
    "split", "condition", "severity", "metric", "mean", "std", "n", "ci_low", "ci_high", "delta_vs_ce",
    "reference", "n_pairs", "diff", "diff_ci_low", "diff_ci_high", "effect_size_dz",
    "p_value", "p_adjusted", "significant", "adj_ci_low", "adj_ci_high", "verdict", "margin",
    "p_improve", "p_improve_low", "p_improve_high", "n_units", "units_needed",
    "best_params", "best_strength", "correction", "test", "n_above", "n_below", "p_adjusted_pairs",
    "verdict_pairs",
]  # fmt: skip
DIFFERENT = ("better", "worse", "higher", "lower")  # verdicts whose Holm-adjusted interval excludes 0


def mark(verdict: object, p_adjusted: float) -> str:
    """The sign a table cell carries after its difference: "*" when the verdict is a difference
    (better / worse / higher / lower: p_adjusted < alpha), "**" at p_adjusted < 0.01."""
    if verdict not in DIFFERENT:
        return ""
    return "**" if p_adjusted < 0.01 else "*"


def _json_default(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else str(v)


def best_trials(trials: pd.DataFrame, *, per_replica: bool = False) -> pd.DataFrame:
    """One row per cell (``per_replica``: per cell and search replica): its best completed search
    trial (by best_value and direction).

    Cells without a completed search trial fall back to their first completed final trial (a cell
    with nothing to tune, e.g. CE at fixed hyperparameters). Adds a ``best_params`` JSON column of
    the non-null ``param_*`` values (prefix stripped, keys sorted).
    """
    done = trials[(trials["status"] == "completed")]
    search = done[(done["phase"] == "search") & done["best_value"].notna()]
    score = np.where(search["direction"] == "minimize", -search["best_value"], search["best_value"])
    unit = ["cell_id", "replica"] if per_replica and "replica" in trials.columns else ["cell_id"]
    search = search.assign(_score=score).sort_values(
        [*unit, "_score"], ascending=[True] * len(unit) + [False]
    )
    best = search.drop_duplicates(unit)
    final = done[done["phase"] == "final"]
    rest = final[~final.set_index(unit).index.isin(best.set_index(unit).index)].drop_duplicates(unit)
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
    trials: pd.DataFrame,
    evals: pd.DataFrame,
    *,
    study: str | None = None,
    alpha: float = 0.05,
    reference: str = REFERENCE,
    all_pairs: bool = False,
    margins: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Summary table: one row per cell and (split, condition, severity, metric).

    Args:
        trials: trials table (reports.build.SCHEMAS["trials"]).
        evals: evals table (long format).
        study: value of the ``study`` column (default: the trials' own study column).
        alpha: significance level of the ``significant`` column.
        reference: the regularizer every other one is compared with (paired by seed; reports.compare).
        all_pairs: every regularizer of a group as the reference in turn: one row per cell and
            regularizer of its group (``reference`` names it; the reference's own cell has no
            comparison), ``p_adjusted`` Holm over the regularizers vs that reference (as
            ``reference=`` it gives), ``p_adjusted_pairs`` Holm over the unordered pairs.
        margins: equivalence margins per metric (the spec's ``margins:``) over the vocabulary's.

    Returns:
        DataFrame with ``SUMMARY_COLUMNS``. Empty (zero rows) when no final trial completed.
        ci_low/ci_high are NaN for n = 1; delta_vs_ce is 0 for CE cells and NaN without a CE cell;
        p_value is NaN on the reference's own row, for fewer than 2 paired seeds, or identical paired
        values; ``verdict`` / ``verdict_pairs`` are None on the reference's own row.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), but got {alpha}.")
    if study is None:
        study = str(trials["study"].iloc[0]) if len(trials) else ""
    values = per_seed(trials, evals)
    if values.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in SUMMARY_COLUMNS})
    agg = (
        values.groupby(["cell_id", *KEYS], sort=False, observed=True)["value"]
        .agg(mean="mean", std="std", n="count")
        .reset_index()
    )
    half = t_half_width(agg["std"].to_numpy(), agg["n"].to_numpy())
    agg["ci_low"], agg["ci_high"] = agg["mean"] - half, agg["mean"] + half

    cells = trials.drop_duplicates("cell_id")[CELL_COLS]
    ce = cells[cells["regularizer"] == "ce"].drop_duplicates(GROUP)[[*GROUP, "cell_id"]]
    cells = cells.merge(ce.rename(columns={"cell_id": "ce_cell"}), on=GROUP, how="left")
    agg = agg.merge(cells, on="cell_id", how="left")
    ce_mean = agg[["cell_id", *KEYS, "mean"]].rename(columns={"cell_id": "ce_cell", "mean": "ce_mean"})
    agg = agg.merge(ce_mean, on=["ce_cell", *KEYS], how="left")
    agg["delta_vs_ce"] = agg["mean"] - agg["ce_mean"]

    comp = compare(values, reference=None if all_pairs else reference, alpha=alpha, margins=margins)
    comp["severity"] = comp["severity"].astype(float).fillna(NOSEV)
    if all_pairs:  # every cell once per regularizer of its group as the reference
        refs = cells[[*GROUP, "regularizer"]].drop_duplicates().rename(columns={"regularizer": "reference"})
        agg = agg.merge(refs, on=GROUP, how="left")
    else:
        agg["reference"] = reference
    agg = agg.merge(comp, on=[*GROUP, *KEYS, "regularizer", "reference"], how="left")
    agg["significant"] = agg["significant"].fillna(False).astype(bool)
    own = agg["reference"].isna() | (agg["regularizer"] == agg["reference"])
    agg.loc[own, ["verdict", "verdict_pairs"]] = None  # the reference's own row compares nothing

    best = best_trials(trials)[["cell_id", "best_params", "strength"]].rename(
        columns={"strength": "best_strength"}
    )
    agg = agg.merge(best, on="cell_id", how="left")
    agg["severity"] = agg["severity"].replace(NOSEV, np.nan)
    agg["study"] = study
    agg["correction"] = np.where(agg["p_value"].notna(), correction_text(all_pairs), None)
    agg["test"] = np.where(agg["p_value"].notna(), TEST_NAME, None)
    order = ["dataset", "model", "noise_setting", "reference", "regularizer", *KEYS]
    agg = agg.sort_values(order, kind="mergesort")
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
    trials: pd.DataFrame, evals: pd.DataFrame, *, study: str | None = None, reference: str = REFERENCE
) -> pd.DataFrame:
    """Summary of each corruption's accuracy averaged over its severities, with the usual seed statistics.

    Per final trial and corruption, the accuracies at the severities present are averaged first; that
    per-seed value then goes through `summarize` (mean, t-CI over seeds, delta and paired test vs the
    reference's cell, Holm within each corruption's family), so the CI covers the severity-averaged
    quantity itself.

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
    return summarize(trials, per_trial, study=study, reference=reference)
