"""Shared pieces of the figures: layout, colours, the per-seed table, and the seeds-over-mean-and-CI panel."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: plots are written from CLIs and workers without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from reports.build import Study  # noqa: E402
from reports.stats import t_half_width  # noqa: E402
from study.vocabulary import PERCENT_METRICS  # noqa: E402

# A t interval over fewer seeds is mostly the t quantile (12.7 at n=2): drawn, it hides the data.
MIN_SEEDS_FOR_CI = 3
CELL = ["dataset", "model", "regularizer", "noise_setting", "noise_kind", "noise_rate"]
MIN_POINTS_FOR_LINE = 3


def slug(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", str(p)) for p in parts)


def grid(
    n: int, w: float = 4.0, h: float = 3.2, cols: int = 3, sharey: bool | str = False
) -> tuple[Figure, list[Axes]]:
    """``n`` panels in rows of ``cols``; ``sharey``: one y axis for panels that are compared."""
    cols = max(min(n, cols), 1)
    rows = -(-max(n, 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False, sharey=sharey)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes.flat[:n]:
        ax.yaxis.set_tick_params(labelleft=True)  # shared axes keep their labels: panels are read alone
    return fig, list(axes.flat)


def panels(
    rows: int, cols: int, w: float, h: float, sharey: bool | str = False, layout: str | None = None
) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(
        rows, cols, figsize=(w * cols, h * rows), squeeze=False, sharey=sharey, layout=layout
    )
    return fig, axes


def in_points(ps: pd.DataFrame) -> pd.DataFrame:
    """Per-seed values with [0, 1] metrics in % (the report's one unit: differences in points)."""
    return ps.assign(value=ps["value"] * ps["metric"].map(lambda m: 100.0 if m in PERCENT_METRICS else 1.0))


def unit(metric: str) -> str:
    return " (%)" if metric in PERCENT_METRICS else ""


def save(fig: Figure | None, path: Path, written: list[Path]) -> None:
    if fig is None:
        return
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)


def colors(regs: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {r: cmap(i % 10) for i, r in enumerate(regs)}


def per_seed(study: Study) -> pd.DataFrame:
    """One value per (cell, split, condition, severity, metric, unit) of the completed final trials, with
    the cell's columns. The unit (column ``seed``) is the seed, or with search replicas the replica, its
    seeds averaged: the unit of the report's comparisons (reports.compare.per_seed); ``unit_name``
    says which."""
    t = study.trials
    replicated = "replica" in t.columns and t["replica"].nunique() > 1
    final = t[(t["phase"] == "final") & (t["status"] == "completed")]
    final = final[["trial_id", *CELL]].assign(seed=final["replica" if replicated else "seed"].to_numpy())
    ev = study.evals.merge(final, on="trial_id")
    if ev.empty:
        return pd.DataFrame(columns=[*CELL, "split", "condition", "severity", "metric", "seed", "value"])
    ev["severity"] = ev["severity"].astype(float).fillna(-1.0)  # groupby drops NaN keys
    keys = [*CELL, "split", "condition", "severity", "metric", "seed"]
    out = ev.groupby(keys, sort=False, observed=True)["value"].mean().reset_index()
    out["severity"] = out["severity"].replace(-1.0, np.nan)
    return out.assign(unit_name="replicas" if replicated else "seeds")


def mean_ci(values: pd.Series) -> tuple[float, float, int]:
    """(mean, 95% t half-width or NaN below MIN_SEEDS_FOR_CI seeds, n)."""
    v = values.dropna().to_numpy(dtype=float)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    half = float(t_half_width(np.array([v.std(ddof=1) if n > 1 else np.nan]), np.array([n]))[0])
    return float(v.mean()), half if n >= MIN_SEEDS_FOR_CI else float("nan"), n


def seeds_panel(ax: Axes, d: pd.DataFrame, x: str, regs: list[str], cols: dict[str, tuple]) -> int:
    """Per regularizer: every seed as a small dot, the mean as a marker, the t-CI as error bars (only from
    MIN_SEEDS_FOR_CI seeds); means joined by a line only from MIN_POINTS_FOR_LINE x values (a line
    through two points draws a trend nobody measured). Returns the smallest number of seeds of a drawn
    point (0: nothing drawn)."""
    xs = np.sort(d[x].dropna().unique())
    step = float(np.min(np.diff(xs))) if len(xs) > 1 else 1.0
    fewest = 0
    for i, reg in enumerate(regs):
        r = d[d["regularizer"] == reg]
        if r.empty:
            continue
        dodge = 0.06 * step * (i - (len(regs) - 1) / 2)  # side by side: seeds of regularizers do not overlap
        ax.scatter(r[x] + dodge, r["value"], s=14, color=cols[reg], alpha=0.6, lw=0, zorder=3)
        stats = [(xv, *mean_ci(g["value"])) for xv, g in r.groupby(x, sort=True)]
        xv, mean, half, n = (np.array(c, dtype=float) for c in zip(*stats, strict=True))
        ax.errorbar(
            xv + dodge,
            mean,
            yerr=np.where(np.isfinite(half), half, 0.0),
            color=cols[reg],
            marker="o",
            ms=4,
            capsize=3,
            lw=1.4,
            ls="-" if len(xv) >= MIN_POINTS_FOR_LINE else "none",
            label=reg,
        )
        fewest = int(n.min()) if not fewest else min(fewest, int(n.min()))
    ax.grid(alpha=0.3)
    return fewest


def seeds_note(n: int, d: pd.DataFrame | None = None) -> str:
    """The legend's note on the dots and bars; ``d`` (per_seed rows) names the unit: seeds or replicas."""
    units = str(d["unit_name"].iloc[0]) if d is not None and len(d) and "unit_name" in d else "seeds"
    if 0 < n < MIN_SEEDS_FOR_CI:
        return f"n={n} {units}: no CI drawn (too few {units})"
    return f"n>={n} {units}, bars: 95% t-CI" if n else ""


def kinds_in(settings: pd.DataFrame, order: tuple[str, ...]) -> list[str]:
    """Noise kinds (with adversarial mode, e.g. adversarial-confident) present besides "none", in
    report order; rate 0 of each kind's panel is the "none" setting."""
    kinds = settings["noise_setting"].str.split(":").str[0].unique().tolist()

    def rank(k: str) -> tuple[int, str]:
        base = k.split("-")[0]
        return (order.index(base) if base in order else len(order), k)

    return sorted((k for k in kinds if k != "none"), key=rank)
