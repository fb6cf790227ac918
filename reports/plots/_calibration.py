"""Reliability diagrams from the per-bin rows of the final trials.

The evaluation (study.metrics.reliability_bins) writes, per final trial, rows ``bin_accuracy``,
``bin_confidence`` and ``bin_count`` with severity = bin index b in 0..n_bins: bin b < n_bins holds
confidences in [b / n_bins, (b + 1) / n_bins) and bin n_bins holds confidences of exactly 1.0 (a
degenerate bin, as in torchmetrics). Empty bins have a count row only. n_bins is therefore the largest
bin index; the regular bins are drawn on their edges and the 1.0 bin as a narrow hatched bar starting
at x = 1.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from study.vocabulary import BIN_METRIC_PREFIX, CLEAN

# Width of the conf == 1.0 bar, as a fraction of a regular bin: visible, but clearly not a range.
TOP_BIN_WIDTH = 0.5
OVER_COLOR, UNDER_COLOR = "C3", "#9ad0a0"  # over-confidence (translucent red), under-confidence (green)


def pooled_bins(ps: pd.DataFrame) -> pd.DataFrame:
    """Per (noise_setting, regularizer, bin): count summed over seeds, accuracy and confidence weighted by
    the seeds' counts; columns bin, count, accuracy, confidence, seeds."""
    b = ps[
        (ps["split"] == "test") & (ps["condition"] == CLEAN) & ps["metric"].str.startswith(BIN_METRIC_PREFIX)
    ]
    if b.empty:
        return pd.DataFrame(
            columns=["noise_setting", "regularizer", "bin", "count", "accuracy", "confidence"]
        )
    wide = b.pivot_table(
        index=["noise_setting", "regularizer", "seed", "severity"], columns="metric", values="value"
    ).reset_index()
    for col in ("bin_accuracy", "bin_confidence", "bin_count"):
        if col not in wide:
            wide[col] = np.nan
    wide["count"] = wide["bin_count"].fillna(0.0)
    wide["acc_n"] = (wide["bin_accuracy"] * wide["count"]).fillna(0.0)
    wide["conf_n"] = (wide["bin_confidence"] * wide["count"]).fillna(0.0)
    g = wide.groupby(["noise_setting", "regularizer", "severity"])
    out = g[["count", "acc_n", "conf_n"]].sum().join(g["seed"].nunique().rename("seeds")).reset_index()
    with np.errstate(invalid="ignore", divide="ignore"):
        out["accuracy"] = np.where(out["count"] > 0, out["acc_n"] / out["count"], np.nan)
        out["confidence"] = np.where(out["count"] > 0, out["conf_n"] / out["count"], np.nan)
    out["bin"] = out["severity"].astype(int)
    return out.drop(columns=["acc_n", "conf_n", "severity"])


def bin_geometry(n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Left x and width of the n_bins + 1 bars: the regular bins on linspace(0, 1, n_bins + 1), the
    conf == 1.0 bin starting at 1."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    left = np.append(edges[:-1], 1.0)
    width = np.append(np.diff(edges), TOP_BIN_WIDTH / n_bins)
    return left, width


def _draw_cell(ax, axc, g: pd.DataFrame, n_bins: int) -> None:
    left, width = bin_geometry(n_bins)
    g = g.set_index("bin").reindex(range(n_bins + 1))
    filled = (g["count"] > 0).to_numpy()
    acc, conf = g["accuracy"].to_numpy(), g["confidence"].to_numpy()
    top = np.arange(n_bins + 1) == n_bins
    reg = filled & ~top
    ax.bar(
        left[reg],
        acc[reg],
        width=width[reg],
        align="edge",
        color="C0",
        edgecolor="k",
        lw=0.5,
        label="accuracy",
    )
    over, under = reg & (conf > acc), reg & (acc > conf)
    ax.bar(
        left[over],
        (conf - acc)[over],
        bottom=acc[over],
        width=width[over],
        align="edge",
        color=OVER_COLOR,
        alpha=0.4,
        lw=0,
        label="over-confidence gap",
    )
    # Under-confidence lies inside the accuracy bar: an opaque colour of its own over that part (its
    # legend swatch is the colour drawn); hatching means one thing only, the confidence = 1.0 bin.
    ax.bar(
        left[under],
        (acc - conf)[under],
        bottom=conf[under],
        width=width[under],
        align="edge",
        color=UNDER_COLOR,
        edgecolor="k",
        lw=0.5,
        label="under-confidence gap",
    )
    ax.hlines(conf[filled], left[filled], (left + width)[filled], colors="k", lw=1.2, label="mean confidence")
    if filled[-1]:
        ax.bar(
            left[top],
            acc[top],
            width=width[top],
            align="edge",
            color="C0",
            edgecolor="k",
            lw=0.5,
            hatch="///",
            label="accuracy at confidence = 1.0",
        )
    counts = g["count"].fillna(0.0).to_numpy()
    total = counts.sum()
    ece = float(np.nansum(counts * np.abs(acc - conf)) / total) if total else float("nan")
    seeds = int(g["seeds"].max()) if g["seeds"].notna().any() else 0
    ax.text(
        0.04,
        0.96,
        f"ECE {ece:.3f}\nN={int(total)} ({seeds} seed{'s' * (seeds != 1)})",
        transform=ax.transAxes,
        va="top",
        fontsize=7,
        bbox=dict(boxstyle="round", fc="w", ec="0.7"),
    )
    share = counts / total if total else counts
    axc.bar(left[~top], share[~top], width=width[~top], align="edge", color="0.55", label="share of samples")
    axc.bar(left[top], share[top], width=width[top], align="edge", color="0.55", hatch="///")
    axc.set(ylim=(0, max(float(share.max()), 1e-9) * 1.15), xlim=(0, 1 + width[-1]))
    axc.tick_params(labelsize=6)


def reliability(ps: pd.DataFrame, regs: list[str], settings: list[str], title: str) -> Figure | None:
    """Reliability diagram per (noise setting, regularizer), pooled over seeds, with the share of test
    samples per bin underneath and the pooled ECE in the corner."""
    pooled = pooled_bins(ps)
    if pooled.empty:
        return None
    n_bins = int(pooled["bin"].max())
    settings = [s for s in settings if s in set(pooled["noise_setting"])]
    fig = plt.figure(figsize=(2.9 * len(regs), 3.7 * len(settings)), layout="constrained")
    outer = fig.add_gridspec(len(settings), len(regs))
    first = None
    for i, ns in enumerate(settings):
        for j, reg in enumerate(regs):
            inner = outer[i, j].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.0)
            ax = fig.add_subplot(inner[0])
            axc = fig.add_subplot(inner[1], sharex=ax)
            ax.set_gid(f"reliability|{ns}|{reg}")
            axc.set_gid(f"counts|{ns}|{reg}")
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            ax.set(xlim=(0, 1 + TOP_BIN_WIDTH / n_bins), ylim=(0, 1))
            ax.set_title(f"{reg} | {ns}", fontsize=9)
            ax.tick_params(labelbottom=False, labelsize=7)
            g = pooled[(pooled["noise_setting"] == ns) & (pooled["regularizer"] == reg)]
            if g.empty:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", color="0.5")
                continue
            _draw_cell(ax, axc, g, n_bins)
            first = first or ax
            if j == 0:
                ax.set_ylabel("accuracy", fontsize=8)
                axc.set_ylabel("share", fontsize=7)
            if i == len(settings) - 1:
                axc.set_xlabel("confidence (hatched: exactly 1.0)", fontsize=8)
    if first is not None:
        # Below the panels: inside one, the legend hid that panel's high-confidence bars.
        handles, labels = first.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=7)
    fig.suptitle(
        f"{title}: reliability on the test set, {n_bins} bins + confidence 1.0, seeds pooled", fontsize=10
    )
    return fig
