"""A synthetic results directory with the real schema, for tests, benchmarks and report demos.

Values are random but shaped like a study (regularizer effects, noise hurting accuracy, pruned
trials stopping early), so tables and plots look like the real thing. Vectorised with numpy so the
benchmark can make 100k trials / 1M epoch rows in seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from reports.build import SCHEMA_VERSION, write_results

# (strength param, low, high, accuracy effect, ECE) per regularizer; unknown names get a generic row.
_REG = {
    "ce": (None, 0.0, 0.0, 0.0, 0.10),
    "label_smoothing": ("alpha", -0.5, 0.3, 0.01, 0.04),
    "maxsup": ("alpha", 0.0, 0.3, 0.02, 0.05),
}
_CLEAN = [
    "accuracy",
    "nll",
    "brier",
    "ece",
    "mce",
    "adaptive_ece",
    "classwise_ece",
    "overconfidence_on_errors",
    "mean_confidence",
    "temperature",
    "ece_ts",
    "nll_ts",
    "d_within",
    "d_total",
    "r2",
]
_CORRUPTIONS = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "contrast",
    "brightness",
    "gaussian_blur",
    "pixelate",
    "jpeg",
]


def _parse(setting: str) -> tuple[str, float, str | None]:
    if setting == "none":
        return "none", 0.0, None
    kind, rate = setting.split(":")
    kind, _, mode = kind.partition("-")
    return kind, float(rate), mode or None


def make_synthetic_study(
    out_dir: str | os.PathLike,
    *,
    name: str = "synthetic",
    datasets: tuple[str, ...] = ("mnist1d",),
    models: tuple[str, ...] = ("mlp", "cnn1d"),
    regularizers: tuple[str, ...] = ("ce", "label_smoothing", "maxsup"),
    noise_settings: tuple[str, ...] = ("none", "symmetric:0.2"),
    seeds: int = 3,
    search_trials: int = 6,
    max_epochs: int = 8,
    bins: int = 15,
    corruptions: int = 2,
    status: str = "completed",
    rng_seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Write trials/epochs/evals Parquet + manifest.json under ``out_dir`` and return the frames.

    Args:
        seeds: final trials per cell (seed 0..seeds-1, noise_seed = seed).
        search_trials: search trials per cell; about 40% pruned, a few failed/diverged.
        bins: reliability bins per final trial, plus the evaluation's extra bin (index ``bins``) of
            confidences equal to 1.0.
        corruptions: number of corruption types (5 severities each) plus their mean.
        status: manifest status ("completed" gives a non-partial study).
    """
    # One generator draws trials, then epochs, then evals, in this order (the helpers keep it).
    rng = np.random.default_rng(rng_seed)
    cells = [(d, m, r, s) for d in datasets for m in models for r in regularizers for s in noise_settings]
    t = _trial_rows(rng, cells, name, search_trials, seeds, max_epochs)
    quality = _trial_outcomes(rng, t, models, max_epochs)
    search = (t["phase"] == "search").to_numpy()
    fin = ~search
    e = _epoch_rows(rng, t, quality)
    ev = _eval_rows(rng, t[fin].reset_index(drop=True), quality[fin], _eval_specs(bins, corruptions), bins)
    t = t.drop(columns="_ci")
    write_results(out_dir, trials=t, epochs=e, evals=ev)
    manifest = {"study": name, "spec_hash": "0" * 16, "status": status, "started_at": 1.7e9, "ended_at": None,
                "planned": {"search": int(search.sum()), "final": int(fin.sum())}, "cells": len(cells),
                "versions": {}, "git_sha": None, "schema_version": SCHEMA_VERSION}  # fmt: skip
    (Path(out_dir) / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return {"trials": t, "epochs": e, "evals": ev}


def _trial_rows(
    rng: np.random.Generator,
    cells: list[tuple[str, str, str, str]],
    name: str,
    search_trials: int,
    seeds: int,
    max_epochs: int,
) -> pd.DataFrame:
    """One row per trial (search trials with a drawn strength, then the final seeds), cell by cell."""
    rows = []
    for ci, (d, m, r, s) in enumerate(cells):
        sp, lo, hi, _, _ = _REG.get(r, ("beta", 0.0, 1.0, 0.005, 0.07))
        kind, rate, mode = _parse(s)
        base = dict(
            study=name,
            cell_id=f"{d}-{m}-{r}-{s}",
            dataset=d,
            model=m,
            regularizer=r,
            strength_param=sp,
            noise_kind=kind,
            noise_rate=rate,
            noise_mode=mode,
            noise_setting=s,
            metric="val_accuracy",
            direction="maximize",
            max_epochs=max_epochs,
            device="cpu",
            node="node0",
            _ci=ci,
        )
        strengths = rng.uniform(lo, hi, search_trials) if sp else [None] * search_trials
        for k, a in enumerate(strengths):
            rows.append(base | dict(phase="search", seed=k, noise_seed=0, strength=a, optuna_number=k))
        for k in range(seeds):
            rows.append(base | dict(phase="final", seed=k, noise_seed=k, strength=None, optuna_number=None))
    t = pd.DataFrame(rows)
    t["trial_id"] = [f"t{i:07d}" for i in range(len(t))]
    return t


def _trial_outcomes(
    rng: np.random.Generator, t: pd.DataFrame, models: tuple[str, ...], max_epochs: int
) -> np.ndarray:
    """Fill each trial's status, epochs, best value, params and timing in place; return its quality."""
    n = len(t)
    reg_eff = np.array([_REG.get(r, (0, 0, 0, 0.005, 0.07))[3] for r in t["regularizer"]])
    model_eff = t["model"].map({m: 0.05 * i for i, m in enumerate(models)}).to_numpy()
    a = t["strength"].astype(float).fillna(0.1).to_numpy()
    quality = 0.70 + model_eff + reg_eff - 0.5 * t["noise_rate"].to_numpy() - 0.3 * (a - 0.1) ** 2
    search = (t["phase"] == "search").to_numpy()
    u = rng.random(n)
    status_arr = np.where(~search, "completed", np.where(u < 0.4, "pruned", "completed"))
    status_arr[search & (u > 0.97)] = "failed"
    status_arr[search & (u > 0.94) & (u <= 0.97)] = "diverged"
    t["status"] = status_arr
    t["epochs"] = np.where(status_arr == "pruned", rng.integers(1, max(max_epochs // 2, 2), n), max_epochs)
    t.loc[t["status"] == "failed", "epochs"] = 0
    quality = quality - 0.1 * (status_arr == "pruned")  # pruners stop the weak trials
    t["best_value"] = np.where(status_arr == "completed", quality + rng.normal(0, 0.01, n), np.nan)
    t.loc[t["status"] == "pruned", "best_value"] = quality[status_arr == "pruned"] * 0.9
    t["best_epoch"] = np.where(np.isfinite(t["best_value"]), np.maximum(t["epochs"], 1), np.nan)
    t["error"] = np.where(status_arr == "failed", "RuntimeError: synthetic failure", None)
    t["param_lr"] = rng.choice([1e-3, 3e-3, 1e-2], n)
    t["param_weight_decay"] = 5e-4
    t["param_alpha"] = t["strength"]
    # Final trials re-train the best search configuration of their cell.
    bs = (
        t[search & (status_arr == "completed")]
        .sort_values("best_value")
        .drop_duplicates("cell_id", keep="last")
    )
    fin = ~search
    for col in ("strength", "param_alpha", "param_lr"):
        t.loc[fin, col] = t.loc[fin, "cell_id"].map(bs.set_index("cell_id")[col]).to_numpy()
    t["realized_noise_rate"] = t["noise_rate"] + rng.normal(0, 0.003, n) * (t["noise_rate"] > 0)
    t["wall_s"] = t["epochs"] * rng.uniform(0.5, 1.5, n)
    t["started_at"] = 1.7e9 + np.arange(n, dtype=float)
    t["ended_at"] = t["started_at"] + t["wall_s"]
    return quality


def _epoch_rows(rng: np.random.Generator, t: pd.DataFrame, quality: np.ndarray) -> pd.DataFrame:
    """One row per trial-epoch: a learning curve rising to the trial's quality."""
    n = len(t)
    reps = t["epochs"].to_numpy()
    idx = np.repeat(np.arange(n), reps)
    ep = np.concatenate([np.arange(1, k + 1) for k in reps]) if n else np.array([], int)
    q = quality[idx]
    val = q * (1 - np.exp(-ep / 2.0)) + rng.normal(0, 0.01, len(idx))
    e = pd.DataFrame(
        {
            "trial_id": t["trial_id"].to_numpy()[idx],
            "epoch": ep,
            "lr": 0.01 * 0.95**ep,
            "train_loss": 2.3 * np.exp(-ep / 3.0),
            "train_acc": np.minimum(val + 0.1, 1.0),
            "val_accuracy": val,
            "val_nll": 2.3 * np.exp(-ep / 3.0) + 0.3,
            "val_ece": 0.1 / ep,
            "wall_s": rng.uniform(0.5, 1.5, len(idx)),
            "term_ce": 2.0 * np.exp(-ep / 3.0),
        }
    )
    is_ls = (t["regularizer"].to_numpy() == "label_smoothing")[idx]
    e["term_regularization"] = np.where(is_ls, 0.05 * np.exp(-ep / 5.0), np.nan)
    e["term_error_amplification"] = np.where(is_ls, -0.02 * np.exp(-ep / 5.0), np.nan)
    return e


def _eval_specs(bins: int, corruptions: int) -> list[tuple[str, str, float, str]]:
    """(split, condition, severity, metric) of every eval row of a final trial."""
    specs: list[tuple[str, str, float, str]] = [("test", "clean", np.nan, m) for m in _CLEAN]
    specs += [
        ("test", "clean", float(b), m)
        for b in range(bins + 1)
        for m in ("bin_accuracy", "bin_confidence", "bin_count")
    ]
    specs += [("test", c, eps, "accuracy") for c in ("fgsm", "pgd_ce", "pgd_dlr") for eps in (0.05, 0.1)]
    specs += [("test", "pgd_ce", 0.1, "gradient_masking"), ("train", "clean", np.nan, "memorisation_rate")]
    specs += [("test", c, float(lv), "accuracy") for c in _CORRUPTIONS[:corruptions] for lv in range(1, 6)]
    specs += [("test", "corruption_mean", float(lv), "accuracy") for lv in range(1, 6)] if corruptions else []
    return specs


def _eval_rows(
    rng: np.random.Generator,
    ft: pd.DataFrame,
    quality: np.ndarray,
    specs: list[tuple[str, str, float, str]],
    bins: int,
) -> pd.DataFrame:
    """Long-format evals of the final trials ``ft`` (``quality``: theirs), one row per spec each."""
    fq = quality + rng.normal(0, 0.01, len(ft))
    ece = np.array([_REG.get(r, (0, 0, 0, 0, 0.07))[4] for r in ft["regularizer"]]) + rng.normal(
        0, 0.005, len(ft)
    )
    k = len(specs)
    split, cond, sev, metric = (np.array(x, dtype=object) for x in zip(*specs, strict=True))
    sev = sev.astype(float)
    val = np.empty((len(ft), k))
    for j, (_, c, s_, mt) in enumerate(specs):
        if mt == "accuracy":
            val[:, j] = fq - (
                0 if c == "clean" else 2.0 * s_ if c in ("fgsm", "pgd_ce", "pgd_dlr") else 0.04 * s_
            )
        elif mt in ("ece", "adaptive_ece", "classwise_ece", "mce"):
            val[:, j] = ece * (1 if mt != "mce" else 2.5)
        elif mt == "ece_ts":
            val[:, j] = 0.3 * ece + 0.01
        elif mt in ("nll", "nll_ts"):
            val[:, j] = 1.5 - fq + ece + (0 if mt == "nll" else -0.02)
        elif mt == "bin_confidence":  # bin `bins` holds confidences of exactly 1.0
            val[:, j] = min((s_ + 0.5) / bins, 1.0)
        elif mt == "bin_accuracy":
            val[:, j] = np.clip(min((s_ + 0.5) / bins, 1.0) - ece * min(s_ / bins, 1.0) * 2, 0, 1)
        elif mt == "bin_count":
            val[:, j] = np.round(1000 * np.exp(s_ - bins)) if s_ < bins else 7.0
        elif mt == "gradient_masking":
            val[:, j] = (ft["regularizer"] != "ce").astype(float)
        else:
            val[:, j] = rng.uniform(0.2, 0.9, len(ft))
    ev = pd.DataFrame({"trial_id": np.repeat(ft["trial_id"].to_numpy(), k), "split": np.tile(split, len(ft)),
                       "condition": np.tile(cond, len(ft)), "severity": np.tile(sev, len(ft)),
                       "metric": np.tile(metric, len(ft)), "value": val.ravel()})  # fmt: skip
    return ev


def replicated_comparisons(
    n_studies: int,
    effect: float,
    *,
    replicas: int,
    seeds: int,
    search_sd: float,
    seed_sd: float,
    rng: np.random.Generator,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`n_studies` independent two-regularizer studies (label_smoothing vs ce, test accuracy), as the
    final trials' rows of trials.parquet and evals.parquet, for checking verdicts against a planted truth.

    Every source of variance a real study has enters: each search replica of each regularizer picks a
    configuration whose quality is off by N(0, search_sd) (the search's own luck, fixed for all of that
    replica's seeds), and each seed adds N(0, seed_sd) twice - once shared by the regularizers (the same
    noisy labels and data order: what pairing removes) and once their own. The true difference is
    `effect`. Study k is the dataset ``s<k>``, so one `compare` call decides every study at once.
    With ``replicas=1`` the unit is the seed and the search's luck is in no interval: the design whose
    intervals under-cover.
    """
    regs = ("ce", "label_smoothing")
    k, r, s = np.meshgrid(np.arange(n_studies), np.arange(replicas), np.arange(seeds), indexing="ij")
    k, r, s = k.ravel(), r.ravel(), s.ravel()
    shared = rng.normal(0.0, seed_sd, size=k.shape)
    search = rng.normal(0.0, search_sd, size=(len(regs), n_studies, replicas))
    trials, evals = [], []
    for j, reg in enumerate(regs):
        value = 0.8 + effect * j + search[j, k, r] + shared + rng.normal(0.0, seed_sd, size=k.shape)
        ids = [f"s{a}-{reg}-r{b}-{c}" for a, b, c in zip(k, r, s, strict=True)]
        trials.append(
            pd.DataFrame(
                {
                    "trial_id": ids,
                    "cell_id": [f"s{a}/m/{reg}/none" for a in k],
                    "phase": "final",
                    "status": "completed",
                    "seed": s + 1 + r * seeds,
                    "replica": r,
                    "dataset": [f"s{a}" for a in k],
                    "model": "m",
                    "regularizer": reg,
                    "noise_setting": "none",
                    "noise_kind": "none",
                    "noise_rate": 0.0,
                }
            )
        )
        evals.append(
            pd.DataFrame(
                {"trial_id": ids, "split": "test", "condition": "clean", "severity": np.nan}
                | {"metric": "accuracy", "value": value}
            )
        )
    return pd.concat(trials, ignore_index=True), pd.concat(evals, ignore_index=True)
