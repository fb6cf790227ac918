"""The search and the representations: validation value vs each regularizer's own strength parameter,
learning curves of the search trials, and the penultimate-feature projections."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from reports.build import Study
from reports.plots._common import panels, save, slug
from reports.render import _order_regs, _order_settings


def strength(tr: pd.DataFrame, regs: list[str], cols: dict, title: str) -> Figure | None:
    """Rows: noise settings; columns: regularizers with a strength parameter, each on its own x axis
    (label smoothing's alpha and another regularizer's beta are different quantities). Completed trials
    filled, pruned trials hollow (their value is a partial-budget value)."""
    s = tr[(tr["phase"] == "search") & tr["strength"].notna() & tr["best_value"].notna()]
    if s.empty:
        return None
    settings = _order_settings(s)
    tuned = [r for r in regs if r in set(s["regularizer"])]
    fig, axes = panels(len(settings), len(tuned), 3.4, 2.8)
    metric = str(s["metric"].iloc[0])
    for j, reg in enumerate(tuned):
        r = s[s["regularizer"] == reg]
        param = r["strength_param"].dropna()
        pname = str(param.iloc[0]) if len(param) else "strength"
        for i, ns in enumerate(settings):
            ax = axes[i, j]
            d = r[r["noise_setting"] == ns]
            done, pruned = d[d["status"] == "completed"], d[d["status"] == "pruned"]
            ax.scatter(done["strength"], done["best_value"], s=18, color=cols[reg], label="completed")
            ax.scatter(
                pruned["strength"],
                pruned["best_value"],
                s=18,
                facecolors="none",
                edgecolors=cols[reg],
                label="pruned (partial budget)",
            )
            lo, hi = float(r["strength"].min()), float(r["strength"].max())
            pad = 0.05 * (hi - lo) or 0.05
            ax.set_xlim(lo - pad, hi + pad)  # one x range per regularizer, shared by its noise settings
            ax.set(xlabel=f"{reg}: {pname}", ylabel=f"{metric} (search)" if j == 0 else None)
            ax.set_title(f"{reg} | {ns}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{title}: search trials vs each regularizer's own strength", fontsize=10)
    return fig


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
    panel per regularizer (rows: noise settings), first final seed of each cell."""
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
        regs = _order_regs(df["regularizer"])
        settings = [s for s in _order_settings(study.trials) if s in set(df["noise_setting"])]
        fig, axes = panels(len(settings), len(regs), 2.6, 2.4)
        for i, setting in enumerate(settings):
            for j, reg in enumerate(regs):
                ax = axes[i][j]
                cell = df[(df["noise_setting"] == setting) & (df["regularizer"] == reg)]
                for k, (cls, pts) in enumerate(cell.groupby("cls")):
                    ax.scatter(pts["x"], pts["y"], s=4, alpha=0.5, color=f"C{k}", label=f"class {cls}")
                ax.set_title(f"{reg} | {setting}", fontsize=8)
                ax.tick_params(labelsize=6)
        axes[0][0].legend(fontsize=6, markerscale=2, loc="best")
        fig.suptitle(
            f"{dataset}/{model}: penultimate features projected on the plane of 3 class templates", fontsize=9
        )
        save(fig, out / f"projection_{slug(dataset, model)}.png", written)
