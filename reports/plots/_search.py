"""The search and the representations: validation value vs each regularizer's own strength parameter,
learning curves of the search trials, and the penultimate-feature projections."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from reports.build import Study
from reports.plots._common import panels, save, slug
from reports.render import _order_regs, _order_settings
from reports.stats import best_trials

LR_CMAP = plt.get_cmap("viridis")


def strength(tr: pd.DataFrame, regs: list[str], cols: dict, title: str) -> Figure | None:
    """Rows: noise settings (one y axis per row: the regularizers of a setting are compared); columns:
    regularizers with a strength parameter, each on its own x axis (label smoothing's alpha and another
    regularizer's beta are different quantities). Colour: the trial's learning rate (log scale, one
    colour bar); completed trials filled, pruned trials hollow (a partial-budget value); the chosen
    configuration (the one the final seeds re-train) ringed and written out."""
    s = tr[(tr["phase"] == "search") & tr["strength"].notna() & tr["best_value"].notna()]
    if s.empty:
        return None
    settings = _order_settings(s)
    tuned = [r for r in regs if r in set(s["regularizer"])]
    fig, axes = panels(len(settings), len(tuned), 3.4, 3.0, sharey="row", layout="constrained")
    metric = str(s["metric"].iloc[0])
    k = 100.0 if metric in ("val_accuracy", "val_ece") else 1.0
    lr = s["param_lr"].astype(float) if "param_lr" in s else pd.Series(np.nan, index=s.index)
    norm = LogNorm(lr.min(), lr.max()) if lr.notna().any() and lr.min() > 0 else None
    chosen = best_trials(tr).set_index("cell_id")
    for j, reg in enumerate(tuned):
        r = s[s["regularizer"] == reg]
        param = r["strength_param"].dropna()
        pname = str(param.iloc[0]) if len(param) else "strength"
        for i, ns in enumerate(settings):
            ax = axes[i, j]
            d = r[r["noise_setting"] == ns]
            for status, filled in (("completed", True), ("pruned", False)):
                p = d[d["status"] == status]
                colour = [LR_CMAP(norm(v)) for v in lr[p.index]] if norm is not None else [cols[reg]] * len(p)
                label = "completed" if filled else "pruned (partial budget)"
                ax.scatter(p["strength"], k * p["best_value"], s=22, facecolors=colour if filled else "none",
                           edgecolors=colour, label=label)  # fmt: skip
            text = _mark_chosen(ax, chosen, d, pname, k)
            lo, hi = float(r["strength"].min()), float(r["strength"].max())
            pad = 0.05 * (hi - lo) or 0.05
            ax.set_xlim(lo - pad, hi + pad)  # one x range per regularizer, shared by its noise settings
            ylabel = f"{metric}{' (%)' if k == 100.0 else ''} (search)"
            ax.set(xlabel=f"{reg}: {pname}", ylabel=ylabel if j == 0 else None)
            ax.set_title(f"{reg} | {ns}" + (f"\n{text}" if text else ""), fontsize=8)
            ax.grid(alpha=0.3)
    grey = dict(ls="none", marker="o", color="0.5")
    handles = [
        Line2D([], [], **grey, label="completed"),
        Line2D([], [], **grey, mfc="none", label="pruned (partial budget)"),
        Line2D([], [], ls="none", marker="o", ms=11, mfc="none", mec="k", mew=1.6, label="chosen"),
    ]
    axes[0, 0].legend(handles=handles, fontsize=7, loc="best")
    if norm is not None:
        fig.colorbar(ScalarMappable(norm=norm, cmap=LR_CMAP), ax=axes, label="learning rate", shrink=0.6)
    fig.suptitle(f"{title}: search trials vs each regularizer's own strength (ringed: chosen)", fontsize=10)
    return fig


def _mark_chosen(ax, chosen: pd.DataFrame, d: pd.DataFrame, pname: str, k: float) -> str:
    """Ring the cell's chosen trial; returns its strength and learning rate as text ("" if none)."""
    cells = [c for c in pd.unique(d["cell_id"]) if c in chosen.index]
    if not cells:
        return ""
    best = chosen.loc[cells[0]]
    ax.scatter([best["strength"]], [k * best["best_value"]], s=140, facecolors="none", edgecolors="k", lw=1.6,
               zorder=4)  # fmt: skip
    lr = f", lr {float(best['param_lr']):.2g}" if pd.notna(best.get("param_lr")) else ""
    return f"chosen: {pname} {best['strength']:.2g}{lr}"


def curves(
    tr: pd.DataFrame, ep: pd.DataFrame, regs: list[str], settings: list[str], title: str
) -> Figure | None:
    s = tr[tr["phase"] == "search"][["trial_id", "regularizer", "noise_setting", "status"]]
    e = ep.merge(s, on="trial_id").dropna(subset=["val_accuracy"]).sort_values(["trial_id", "epoch"])
    if e.empty:
        return None
    fig, axes = panels(len(settings), len(regs), 3.2, 2.6)
    lo, hi = e["val_accuracy"].min(), e["val_accuracy"].max()
    pad = 0.05 * (hi - lo) or 0.05
    for i, ns in enumerate(settings):
        for j, reg in enumerate(regs):
            ax = axes[i, j]
            d = e[(e["regularizer"] == reg) & (e["noise_setting"] == ns)]
            # LineCollection: one artist for thousands of trials; pruned drawn last so they stay visible
            for status, color, alpha in (("completed", "C0", 0.6), ("pruned", "C3", 0.6)):
                segs = [
                    g[["epoch", "val_accuracy"]].to_numpy()
                    for _, g in d[d["status"] == status].groupby("trial_id")
                ]
                if segs:
                    ax.add_collection(LineCollection(segs, colors=color, alpha=alpha, lw=1, label=status))
                if segs and status == "pruned":
                    # The point where each trial was stopped; also shows trials pruned after one epoch.
                    ends = [seg[-1] for seg in segs]
                    ax.scatter([p[0] for p in ends], [p[1] for p in ends], marker="x", s=14, color=color)
            ax.set(xlim=(0.5, e["epoch"].max() + 0.5), ylim=(lo - pad, hi + pad))
            ax.set_title(f"{reg} | {ns}", fontsize=9)
            ax.grid(alpha=0.3)
    for ax in axes[-1, :]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("val accuracy")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    return fig


def projections(study: Study, out: Path, written: list[Path]) -> None:
    """Penultimate features on the plane through three class templates (Mueller et al. 2019), one
    panel per regularizer (rows: noise settings), first final seed of each cell; all panels of a figure
    on one scale."""
    path = study.path / "projections.parquet"
    if not path.exists():
        return
    proj = pd.read_parquet(path)
    meta = study.trials[study.trials["phase"] == "final"][
        ["trial_id", "dataset", "model", "regularizer", "noise_setting", "seed"]
    ]
    proj = proj.merge(meta, on="trial_id")
    if proj.empty:
        return
    first = proj.groupby(["dataset", "model", "regularizer", "noise_setting"])["seed"].transform("min")
    proj = proj[proj["seed"] == first]
    for (dataset, model), df in proj.groupby(["dataset", "model"], sort=True):
        settings = [s for s in _order_settings(study.trials) if s in set(df["noise_setting"])]
        fig = projection_figure(df, _order_regs(df["regularizer"]), settings, f"{dataset}/{model}")
        save(fig, out / f"projection_{slug(dataset, model)}.png", written)


def projection_figure(df: pd.DataFrame, regs: list[str], settings: list[str], title: str) -> Figure:
    """One panel per (noise setting, regularizer) of projected points (columns cls, x, y), all panels on
    one scale: the spread of the features is what they compare."""
    fig, axes = panels(len(settings), len(regs), 2.6, 2.4)
    pad_x, pad_y = 0.05 * np.ptp(df["x"]), 0.05 * np.ptp(df["y"])
    lims = dict(
        xlim=(df["x"].min() - pad_x, df["x"].max() + pad_x),
        ylim=(df["y"].min() - pad_y, df["y"].max() + pad_y),
    )
    for i, setting in enumerate(settings):
        for j, reg in enumerate(regs):
            ax = axes[i][j]
            cell = df[(df["noise_setting"] == setting) & (df["regularizer"] == reg)]
            for k, (cls, pts) in enumerate(cell.groupby("cls")):
                ax.scatter(pts["x"], pts["y"], s=4, alpha=0.5, color=f"C{k}", label=f"class {cls}")
            ax.set(**lims)
            ax.set_title(f"{reg} | {setting}", fontsize=8)
            ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6, markerscale=2, loc="best")
    fig.suptitle(
        f"{title}: penultimate features projected on the plane of 3 class templates (one scale)", fontsize=9
    )
    return fig
