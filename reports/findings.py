"""The report's answer: per (dataset, model, noise setting) and question, the best regularizer, its paired
difference to the reference (or, when the reference is best, to the runner-up) with the 95% CI, n, p and
Holm-adjusted p, and a plain verdict; then the warnings a reader needs to trust it.

"Best" is the highest (or, for lower-is-better metrics, lowest) mean over final seeds; the test is the
paired t-test against the reference, Holm-adjusted over all regularizers vs the reference
(reports/compare.py), so picking the best mean does not shrink its p-value.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from reports.compare import GROUP, NOSEV, compare, per_seed
from study import vocabulary as vocab

ATTACK_PREFERENCE = ("pgd_dlr", "pgd_ce", "fgsm", "transfer")  # strongest first, at the largest eps


@dataclass
class Finding:
    dataset: str
    model: str
    noise_setting: str
    question: str
    label: str
    metric: str
    better: int
    best: str
    best_mean: float
    other: str | None
    diff: float  # best - other, in the metric's units
    ci_low: float
    ci_high: float
    n: int
    p: float
    p_adj: float

    @property
    def verdict(self) -> str:
        if self.other is None:
            return "only one regularizer"
        if self.n < 2 or not math.isfinite(self.p):
            return f"untested (n={self.n})"
        return "significant" if self.p_adj < 0.05 else "not significant"

    def sentence(self) -> str:
        """ "LS > CE +4.1 [-8.1, +16.3] n=5 p=.21/.63 not significant" (differences in percentage points
        for [0, 1] metrics; p raw / Holm-adjusted)."""
        scale = 100.0 if self.metric in vocab.PERCENT_METRICS else 1.0
        best = vocab.short_name(self.best)
        if self.other is None:
            return f"{best} {self.best_mean * scale:.3g}: {self.verdict}"
        op = ">" if self.diff > 0 else "<" if self.diff < 0 else "="
        d, lo, hi = (v * scale for v in (self.diff, self.ci_low, self.ci_high))
        digits = 1 if scale == 100.0 else 3  # points with one decimal; other metrics (R²) with three
        ci = f" [{lo:+.{digits}f}, {hi:+.{digits}f}]" if math.isfinite(lo) else ""
        p = f" p={_p(self.p)}/{_p(self.p_adj)}" if math.isfinite(self.p) else ""
        return f"{best} {op} {vocab.short_name(self.other)} {d:+.{digits}f}{ci} n={self.n}{p} {self.verdict}"


def _p(p: float) -> str:
    """0.012 -> ".012", 3.8e-06 -> "4e-06": short p-values for one-line findings."""
    return "1" if p >= 0.995 else f"{p:.2f}"[1:] if p >= 0.01 else f"{p:.0e}"


def _key_rows(values: pd.DataFrame) -> list[tuple[str, str, tuple[str, str, float, str], int]]:
    """(question, label, (split, condition, severity, metric), better) of the rows the findings use."""
    out = []
    present = values.drop_duplicates(["split", "condition", "severity", "metric"])
    have = set(
        zip(present["split"], present["condition"], present["severity"], present["metric"], strict=True)
    )
    by_name = vocab.METRIC_BY_NAME
    for question in vocab.QUESTIONS:
        if question == vocab.Q_ROBUSTNESS:
            attacks = present[
                (present["metric"] == "accuracy") & present["condition"].isin(ATTACK_PREFERENCE)
            ]
            if len(attacks):
                eps = attacks["severity"].max()
                cond = next(c for c in ATTACK_PREFERENCE if ("test", c, eps, "accuracy") in have)
                out.append((question, f"{cond} ε{eps:g}", ("test", cond, eps, "accuracy"), vocab.HIGHER))
            mean = present[present["condition"] == vocab.CORRUPTION_MEAN]
            if len(mean):  # one row per trial (no severity) in the final evaluation; else the harshest
                sev = mean["severity"].max()
                out.append((question, "corruptions", ("test", vocab.CORRUPTION_MEAN, sev, "accuracy"), 1))
            continue
        name = vocab.FINDING_METRICS.get(question)
        if name is None:
            continue
        m = by_name[name]
        key = next((k for k in have if k[0] == m.split and k[1] == m.condition and k[3] == name), None)
        if key is not None:
            out.append((question, _short_label(name), key, m.better))
    return out


def _short_label(metric: str) -> str:
    return {"accuracy": "accuracy", "ece": "ECE", "memorisation_rate": "memorised", "r2": "R²",
            "student_accuracy": "distilled"}.get(metric, metric)  # fmt: skip


def findings(
    trials: pd.DataFrame, evals: pd.DataFrame, *, reference: str = "ce", alpha: float = 0.05
) -> list[Finding]:
    """One Finding per (dataset, model, noise setting) and question the study measured."""
    values = per_seed(trials, evals)
    if values.empty:
        return []
    comp = compare(values, reference=reference, alpha=alpha)
    means = (
        values.groupby([*GROUP, "split", "condition", "severity", "metric", "regularizer"], sort=False)[
            "value"
        ]
        .mean()
        .reset_index()
    )
    out: list[Finding] = []
    for question, label, key, better in _key_rows(values):
        split, cond, sev, metric = key
        sub = means[(means["split"] == split) & (means["condition"] == cond) & (means["metric"] == metric)]
        sub = sub[sub["severity"] == sev]
        for (dataset, model, setting), grp in sub.groupby(GROUP, sort=False):
            if metric == "memorisation_rate" and setting == "none":
                continue
            ranked = grp.assign(score=better * grp["value"]).sort_values("score", ascending=False)
            best = ranked.iloc[0]["regularizer"]
            others = [r for r in ranked["regularizer"] if r != best]
            other = (
                reference if best != reference and reference in others else (others[0] if others else None)
            )
            row = _comparison(comp, (dataset, model, setting), key, best, other, reference)
            head = (dataset, model, setting, question, label, metric, better, best)
            out.append(Finding(*head, float(ranked.iloc[0]["value"]), other, *row))
    # Grouped by setting (clean first, then noise kinds in the vocabulary's order and by rate),
    # questions in the vocabulary's order.
    kinds = list(vocab.NOISE_KINDS)
    settings = values.drop_duplicates(GROUP).assign(
        _k=lambda f: f["noise_kind"].map(lambda k: kinds.index(k) if k in kinds else len(kinds))
    )
    settings = settings.sort_values(["dataset", "model", "_k", "noise_rate", "noise_setting"])
    order = {g: i for i, g in enumerate(zip(*(settings[c] for c in GROUP), strict=True))}
    out.sort(key=lambda f: (order[(f.dataset, f.model, f.noise_setting)], vocab.QUESTIONS.index(f.question)))
    return out


def _comparison(
    comp: pd.DataFrame, group: tuple, key: tuple, best: str, other: str | None, reference: str
) -> tuple[float, float, float, int, float, float]:
    """(diff, ci_low, ci_high, n, p, p_adj) of best - other from the comparisons vs the reference."""
    nan = (math.nan, math.nan, math.nan, 0, math.nan, math.nan)
    if other is None:
        return nan
    a, b, sign = (best, other, 1.0) if other == reference else (other, best, -1.0)
    if b != reference:  # neither is the reference: no test in the reference family
        return nan
    split, cond, sev, metric = key
    m = comp[
        (comp["dataset"] == group[0]) & (comp["model"] == group[1]) & (comp["noise_setting"] == group[2])
        & (comp["split"] == split) & (comp["condition"] == cond) & (comp["metric"] == metric)
        & (comp["regularizer"] == a)
        & (comp["severity"].isna() if sev == NOSEV else comp["severity"] == sev)
    ]  # fmt: skip
    if m.empty:
        return nan
    r = m.iloc[0]
    lo, hi = sign * r["diff_ci_low"], sign * r["diff_ci_high"]
    return sign * r["diff"], min(lo, hi), max(lo, hi), int(r["n_pairs"]), r["p_value"], r["p_adjusted"]


def warnings(trials: pd.DataFrame, evals: pd.DataFrame, spec: dict[str, Any] | None) -> list[str]:
    """What makes the findings less trustworthy: few seeds, a search "best" that is the only completed
    trial of its cell or sits at the edge of its range, single outlier seeds (> 3 MAD from the others)."""
    out = []
    final = trials[(trials["phase"] == "final") & (trials["status"] == "completed")]
    n = final.groupby("cell_id")["seed"].nunique()
    if len(n) and n.min() < 3:
        out.append(
            f"{(n < 3).sum()} of {len(n)} cells have fewer than 3 seeds (n={n.min()}): t-intervals with "
            f"{max(int(n.min()) - 1, 0)} df are wide; raise final.seeds"
        )
    search = trials[(trials["phase"] == "search") & (trials["status"] == "completed")]
    planned = trials[trials["phase"] == "search"].groupby("cell_id").size()
    single = [c for c, k in search.groupby("cell_id").size().items() if k == 1 and planned.get(c, 0) > 1]
    if single:
        what = "cell's best config is its" if len(single) == 1 else "cells' best configs are their"
        out.append(f"{len(single)} {what} only completed search trial: {_few(single)}")
    edge = _at_edge(trials, spec) if spec else []
    if edge:
        out.append(f"best config at the edge of its search range (widen it): {_few(edge)}")
    if spec and _noisy_validation(spec) and (evals["metric"] == "ece_ts").any():
        out.append(
            "temperature scaling (T, ece_ts) was fitted on NOISY validation labels; set "
            "dataset.clean_validation: true to fit it on clean ones"
        )
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
            if (reg is not None and reg != row["regularizer"]) or name not in params:
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


def findings_lines(
    found: list[Finding], warns: list[str], reference: str, realized: dict[str, float] | None = None
) -> list[tuple[str, str]]:
    """(kind, text) lines of the findings section: "title", "group", "line", "warning", "note".
    `realized` maps a noise setting to its realised flip rate (shown next to the requested one)."""
    lines = [("title", f"Findings: best regularizer per question, vs {vocab.short_name(reference)}")]
    group = None
    for f in found:
        if (f.dataset, f.model, f.noise_setting) != group:
            group = (f.dataset, f.model, f.noise_setting)
            rate = (realized or {}).get(f.noise_setting)
            shown = f" (realised {100 * rate:.1f}% flipped)" if rate and f.noise_setting != "none" else ""
            lines.append(("group", f"{f.dataset} / {f.model}, noise {f.noise_setting}{shown}"))
        lines.append(("line", f"  {f.label:<12} {f.sentence()}"))
    if not found:
        lines.append(("note", "  no completed final trials yet: nothing to compare"))
    ref = vocab.short_name(reference)
    lines.append(
        ("note", f"Best mean over seeds vs {ref} (vs the runner-up when {ref} is best): paired difference "
                 "[95% CI] (points for [0, 1] metrics), n seeds, p raw/Holm-adjusted")
    )  # fmt: skip
    lines += [("warning", f"Warning: {w}") for w in warns]
    return lines


def realized_rates(trials: pd.DataFrame) -> dict[str, float]:
    """Mean realised noise rate of the final trials per noise setting."""
    final = trials[(trials["phase"] == "final") & trials["realized_noise_rate"].notna()]
    return final.groupby("noise_setting")["realized_noise_rate"].mean().to_dict() if len(final) else {}
