"""What each regularizer's final trials ran with: the configuration its search chose (strength and
learning rate, shortly, for the findings' "chosen" lines) and its strength as a number."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from reports.stats import best_trials

GREEK = {"alpha": "α", "beta": "β", "gamma": "γ", "lambda": "λ", "temperature": "T"}


def chosen_configs(trials: pd.DataFrame) -> dict[tuple[str, str, str, str], str]:
    """(dataset, model, noise setting, regularizer) -> its final trials' configuration, shortly: the
    regularizer's strength and the learning rate, e.g. "α 0.34 lr 0.012" ("" when neither was set);
    with search replicas the median of the replicas' choices."""
    best = best_trials(trials, per_replica=True)
    out = {}
    for key, rows in best.groupby(["dataset", "model", "noise_setting", "regularizer"], sort=False):
        chosen: dict[str, list[float]] = {}
        for r in rows.to_dict("records"):
            params, name = json.loads(r["best_params"]), r.get("strength_param")
            matched = "@" in key[3]  # the arm's name already says its strength
            strength = () if matched else ((GREEK.get(name, name), params.get(name)),)
            for shown, value in (*strength, ("lr", params.get("lr"))):
                if isinstance(shown, str) and _number(value) is not None:
                    chosen.setdefault(shown, []).append(_number(value))
        out[key] = " ".join(f"{k} {_median(v)}" for k, v in chosen.items())
    return out


def _median(values: list[float]) -> str:
    return f"{float(np.median(values)):.2g}"


def chosen_strengths(trials: pd.DataFrame) -> dict[tuple[str, str, str, str], float]:
    """(dataset, model, noise setting, regularizer) -> the strength its final trials ran at (the median
    over search replicas); regularizers without a strength are left out."""
    best = best_trials(trials, per_replica=True)
    best = best[best["strength"].notna() & (best["strength"].astype(float) > 0)]
    med = best.groupby(["dataset", "model", "noise_setting", "regularizer"])["strength"].median()
    return {k: float(v) for k, v in med.items()}


def _number(v: object) -> float | None:
    """A hyperparameter's value as a number (a schedule {start, ...}: its start), else None."""
    if isinstance(v, dict):
        v = v.get("start")
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None
