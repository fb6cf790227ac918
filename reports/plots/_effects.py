"""Effects over seeds: a metric vs noise rate, vs attack eps, vs corruption severity (seeds over mean and
CI), and the forest plot of paired differences against the reference regularizer."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from reports.plots._common import grid, in_points, kinds_in, mean_ci, panels, seeds_note, seeds_panel, unit
from reports.stats import corruption_mask
from study.vocabulary import ATTACKS, CLEAN, HIGHER, LOWER, METRIC_BY_NAME, NOISE_KINDS

# Metrics of the forest plot: the headline of the accuracy and calibration questions.
FOREST_METRICS = ("accuracy", "ece", "nll")


def _label(metric: str) -> str:
    m = METRIC_BY_NAME.get(metric)
    return m.label if m else metric


def vs_noise(
    ps: pd.DataFrame,
    metric: str,
    regs: list[str],
    cols: dict,
    title: str,
    realized: dict[str, float] | None = None,
) -> Figure | None:
    """Clean-test ``metric`` vs noise rate, one panel per noise kind (rate 0 = the "none" setting), all
    panels on one y axis. A kind without a rate (human labels, a label file) sits at its realised flip
    rate (``realized``: noise setting -> rate; such a setting without one is left out)."""
    d = ps[(ps["split"] == "test") & (ps["condition"] == CLEAN) & (ps["metric"] == metric)]
    d = d[d["severity"].isna()]
    if d.empty:
        return None
    given = ~d["noise_setting"].str.contains(":") & (d["noise_setting"] != "none")
    rate = d["noise_setting"].map(realized or {}).astype(float)
    d = in_points(d).assign(
        _kind=d["noise_setting"].str.split(":").str[0], x=d["noise_rate"].where(~given, rate)
    )
    d = d[d["x"].notna()]
    kinds = kinds_in(d, tuple(NOISE_KINDS)) or ["none"]
    fig, axes = grid(len(kinds), sharey=True)
    fewest = 0
    for ax, kind in zip(axes, kinds, strict=False):
        n = seeds_panel(ax, d[d["_kind"].isin([kind, "none"])], "x", regs, cols)
        fewest = min(fewest, n) if fewest and n else fewest or n
        what = (
            "realised noise rate"
            if ":" not in "".join(d.loc[d["_kind"] == kind, "noise_setting"])
            else "noise rate"
        )
        ax.set(xlabel=f"{kind} {what}", ylabel=f"test {_label(metric)}{unit(metric)}")
        ax.set_title(f"{title}: {kind}", fontsize=10)
    axes[0].legend(fontsize=8, title=seeds_note(fewest, ps), title_fontsize=7)
    return fig


def vs_eps(ps: pd.DataFrame, regs: list[str], cols: dict, settings: list[str], title: str) -> Figure | None:
    """Test accuracy vs attack eps (eps 0 = clean accuracy), rows: noise settings, columns: attacks; one
    y axis for all panels."""
    acc = in_points(ps[(ps["split"] == "test") & (ps["metric"] == "accuracy")])
    att = acc[acc["condition"].isin(ATTACKS) & acc["severity"].notna()]
    if att.empty:
        return None
    attacks = [a for a in ATTACKS if a in set(att["condition"])]
    clean = acc[(acc["condition"] == CLEAN) & acc["severity"].isna()]
    settings = [s for s in settings if s in set(att["noise_setting"])]
    fig, axes = panels(len(settings), len(attacks), 3.6, 2.9, sharey=True)
    fewest = 0
    for i, ns in enumerate(settings):
        for j, attack in enumerate(attacks):
            ax = axes[i, j]
            d = pd.concat([clean.assign(severity=0.0), att[att["condition"] == attack]])
            n = seeds_panel(ax, d[d["noise_setting"] == ns], "severity", regs, cols)
            fewest = min(fewest, n) if fewest and n else fewest or n
            ax.set(xlabel=f"{attack} eps", ylabel="test accuracy (%)" if j == 0 else None)
            ax.set_title(f"{ns}: {attack}", fontsize=9)
    axes[0, 0].legend(fontsize=7, title=seeds_note(fewest, ps), title_fontsize=7)
    fig.suptitle(f"{title}: accuracy under attack (eps 0 = clean)", fontsize=10)
    return fig


def vs_severity(
    ps: pd.DataFrame, regs: list[str], cols: dict, settings: list[str], title: str
) -> Figure | None:
    """Accuracy averaged over the corruptions at each severity (per seed; 0 = clean), one panel per noise
    setting, one y axis."""
    rows = ps[corruption_mask(ps)]
    if rows.empty:
        return None
    keys = ["noise_setting", "regularizer", "seed", "severity"]
    cor = in_points(rows).groupby(keys, as_index=False)["value"].mean()
    acc = in_points(ps[(ps["split"] == "test") & (ps["metric"] == "accuracy")])
    clean = acc[(acc["condition"] == CLEAN) & acc["severity"].isna()][keys[:-1] + ["value"]]
    d = pd.concat([clean.assign(severity=0.0), cor])
    settings = [s for s in settings if s in set(cor["noise_setting"])]
    fig, axes = grid(len(settings), sharey=True)
    fewest = 0
    for ax, ns in zip(axes, settings, strict=False):
        n = seeds_panel(ax, d[d["noise_setting"] == ns], "severity", regs, cols)
        fewest = min(fewest, n) if fewest and n else fewest or n
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # severities are levels 1..5
        ax.set(xlabel="corruption severity (0 = clean)", ylabel="test accuracy (%), mean over corruptions")
        ax.set_title(f"{title}: {ns}", fontsize=10)
    axes[0].legend(fontsize=8, title=seeds_note(fewest, ps), title_fontsize=7)
    return fig


def paired_differences(ps: pd.DataFrame, metric: str, reference: str) -> pd.DataFrame:
    """Per (noise setting, regularizer != reference, seed): value - the reference's value at the same
    seed (same noisy labels, same initialisation stream) on the clean test set."""
    d = ps[(ps["split"] == "test") & (ps["condition"] == CLEAN) & (ps["metric"] == metric)]
    d = d[d["severity"].isna()][["noise_setting", "regularizer", "seed", "value"]]
    ref = d[d["regularizer"] == reference].drop(columns="regularizer").rename(columns={"value": "ref"})
    out = d[d["regularizer"] != reference].merge(ref, on=["noise_setting", "seed"])
    return out.assign(diff=out["value"] - out["ref"])


def forest(
    ps: pd.DataFrame, regs: list[str], cols: dict, settings: list[str], title: str, reference: str
) -> Figure | None:
    """One panel per metric: each (noise setting, regularizer) row shows its paired differences to the
    reference per seed (dots), their mean (marker) and 95% t-CI (line, from MIN_SEEDS_FOR_CI seeds)."""
    diffs = {m: paired_differences(in_points(ps), m, reference) for m in FOREST_METRICS}
    diffs = {m: d for m, d in diffs.items() if not d.empty}
    if not diffs:
        return None
    others = [r for r in regs if r != reference]
    rows = [(ns, r) for ns in settings for r in others]
    # Half an inch per row: the rows are the point of the figure (at a third of an inch, 6 rows made a
    # 272-pixel strip). One row axis for all metrics, labelled once.
    fig, axes = plt.subplots(1, len(diffs), figsize=(3.4 * len(diffs) + 2.4, max(3.6, 1.3 + 0.5 * len(rows))),
                             sharey=True, squeeze=False, layout="constrained")  # fmt: skip
    fewest = 0
    for ax, (metric, d) in zip(axes[0], diffs.items(), strict=False):
        for y, (ns, reg) in enumerate(rows):
            v = d[(d["noise_setting"] == ns) & (d["regularizer"] == reg)]["diff"]
            if v.empty:
                continue
            mean, half, n = mean_ci(v)
            fewest = min(fewest, n) if fewest else n
            ax.scatter(v, np.full(len(v), y), s=14, color=cols[reg], alpha=0.6, lw=0, zorder=3)
            ax.errorbar(
                [mean],
                [y],
                xerr=[[half if np.isfinite(half) else 0.0]] * 2,
                fmt="D",
                ms=5,
                color=cols[reg],
                capsize=3,
                lw=1.6,
            )
        ax.axvline(0.0, color="k", lw=0.8)
        for y in range(len(others), len(rows), len(others)):  # a rule between noise settings
            ax.axhline(y - 0.5, color="0.6", lw=0.6)
        ax.set_yticks(range(len(rows)), [f"{reg} | {ns}" for ns, reg in rows], fontsize=8)
        ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top
        better = METRIC_BY_NAME[metric].better if metric in METRIC_BY_NAME else 0
        hint = {HIGHER: " (right = better)", LOWER: " (left = better)"}.get(better, "")
        points = " (points)" if unit(metric) else ""
        ax.set_xlabel(f"{_label(metric)} - {reference}{points}{hint}", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"{title}: paired difference to {reference} per unit; {seeds_note(fewest, ps)}", fontsize=9)
    return fig
