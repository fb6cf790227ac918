"""What makes the findings less trustworthy: few seeds, a search "best" that was the only completed
trial of its cell or sits at the edge of its search range, temperature scaling fitted on noisy labels,
single outlier seeds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml


def warnings(trials: pd.DataFrame, evals: pd.DataFrame, spec: dict[str, Any] | None) -> list[str]:
    """What makes the findings less trustworthy: few seeds, a search "best" that is the only completed
    trial of its cell or sits at the edge of its range, single outlier seeds (> 3 MAD from the others)."""
    out = []
    final = trials[(trials["phase"] == "final") & (trials["status"] == "completed")]
    # The unit of a comparison: the seed, or with search replicas the replica (reports/compare.py).
    replicated = "replica" in trials.columns and trials["replica"].nunique() > 1
    unit, units = ("replica", "replicas") if replicated else ("seed", "seeds")
    n = final.groupby("cell_id")[unit].nunique()
    if len(n) and n.min() < 3:
        raise_it = "search.replicas" if replicated else "final.seeds"
        out.append(
            f"{(n < 3).sum()} of {len(n)} cells have fewer than 3 {units} (n={n.min()}): t-intervals with "
            f"{max(int(n.min()) - 1, 0)} df are wide; raise {raise_it}"
        )
    by = ["cell_id", "replica"] if replicated else ["cell_id"]
    search = trials[(trials["phase"] == "search") & (trials["status"] == "completed")]
    planned = trials[trials["phase"] == "search"].groupby(by).size()
    single = [
        "/".join(map(str, c if isinstance(c, tuple) else (c,)))
        for c, k in search.groupby(by).size().items()
        if k == 1 and planned.get(c, 0) > 1
    ]
    if single:
        what = "search's best config is its" if len(single) == 1 else "searches' best configs are their"
        out.append(f"{len(single)} {what} only completed search trial: {_few(single)}")
    edge = _at_edge(trials, spec) if spec else []
    if edge:
        out.append(f"best config at the edge of its search range (widen it): {_few(edge)}")
    if spec and _noisy_validation(spec) and (evals["metric"] == "ece_ts").any():
        out.append("T, ece_ts fitted on NOISY val. labels (dataset.clean_validation: true)")
    outliers = _outlier_seeds(final, evals)
    if outliers:
        out.append(f"single-seed outliers (> 3 MAD from the other seeds): {_few(outliers)}")
    return out


def _noisy_validation(spec: dict[str, Any]) -> bool:
    noise = spec.get("noise") or []
    noisy = any(isinstance(n, dict) and n.get("kind", "none") != "none" for n in noise)
    return noisy and not (spec.get("dataset") or {}).get("clean_validation", False)


def _few(items: list[str], k: int = 3) -> str:
    return ", ".join(items[:k]) + (f" (+{len(items) - k} more)" if len(items) > k else "")


def _at_edge(trials: pd.DataFrame, spec: dict[str, Any]) -> list[str]:
    """Cells whose best search value of a ranged hyperparameter lies in the outer 2% of its range."""
    from reports.stats import best_trials

    ranges: dict[tuple[str | None, str], dict] = {}
    for name, value in (spec.get("train") or {}).items():
        if isinstance(value, dict) and "low" in value:
            ranges[(None, name)] = value
    for reg, params in (spec.get("regularizers") or {}).items():
        for name, value in (params or {}).items():
            if isinstance(value, dict) and "low" in value:
                ranges[(reg, name)] = value
    out = []
    for _, row in best_trials(trials).iterrows():
        if row["phase"] != "search":
            continue
        params = json.loads(row["best_params"])
        for (reg, name), r in ranges.items():
            if (reg is not None and reg != row["regularizer"].partition("@")[0]) or name not in params:
                continue
            lo, hi, v = float(r["low"]), float(r["high"]), float(params[name])
            if r.get("log") and lo > 0 and v > 0:
                lo, hi, v = np.log(lo), np.log(hi), np.log(v)
            if hi > lo and min(v - lo, hi - v) <= 0.02 * (hi - lo):
                out.append(f"{row['cell_id']} {name}={params[name]:.3g}")
    return out


def _outlier_seeds(final: pd.DataFrame, evals: pd.DataFrame) -> list[str]:
    key = evals[
        (evals["split"] == "test") & (evals["condition"] == "clean") & (evals["metric"] == "accuracy")
    ]
    v = key.merge(final[["trial_id", "cell_id", "seed"]], on="trial_id")
    out = []
    for cell, grp in v.groupby("cell_id"):
        x = grp["value"].to_numpy()
        if len(x) < 5:  # the MAD of 3 other seeds is itself too noisy: it flagged 1 in 4 seeds
            continue
        flagged = []
        for i, seed in enumerate(grp["seed"]):
            rest = np.delete(x, i)
            mad = 1.4826 * np.median(np.abs(rest - np.median(rest)))
            # > 3 MAD, and at least a point of accuracy: identical seeds make the MAD ~0.
            if abs(x[i] - np.median(rest)) > max(3 * mad, 0.01):
                flagged.append(f"{cell} seed {seed}")
        if len(flagged) == 1:  # two or more "outliers" in one cell are its spread, not an outlier
            out += flagged
    return out


def load_spec_dict(out_dir: Path) -> dict[str, Any] | None:
    """The study's spec.yaml as plain data (reports stay independent of the study package)."""
    path = Path(out_dir) / "spec.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def realized_rates(trials: pd.DataFrame) -> dict[str, float]:
    """Mean realised noise rate of the final trials per noise setting."""
    final = trials[(trials["phase"] == "final") & trials["realized_noise_rate"].notna()]
    return final.groupby("noise_setting")["realized_noise_rate"].mean().to_dict() if len(final) else {}
