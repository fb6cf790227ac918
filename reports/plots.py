"""PNG figures of a study (matplotlib, Agg backend): one file per figure under ``plots/``.

- accuracy_vs_noise_<dataset>_<model>.png: clean test accuracy vs noise rate, one panel per noise
  kind, one line per regularizer, error bars = 95% t-CI over seeds (rate 0 = the "none" setting).
- strength_<dataset>_<model>.png: validation value of search trials vs strength, one panel per noise
  setting; completed trials filled, pruned trials hollow (their value is a partial-budget value).
- reliability_<dataset>_<model>_<noise>.png: reliability diagram per regularizer, from the bin rows
  of the final trials pooled over seeds (bin accuracy weighted by bin counts).
- curves_<dataset>_<model>_<noise>.png: validation accuracy vs epoch of every search trial, one panel
  per regularizer, pruned trials grey.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: plots are written from CLIs and workers without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from reports.build import Study  # noqa: E402
from reports.render import _order_regs, _order_settings  # noqa: E402
from reports.stats import summarize  # noqa: E402


def _slug(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", str(p)) for p in parts)


def _grid(n: int, w: float = 4.0, h: float = 3.2):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def _save(fig, path: Path, written: list[Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)


def _colors(regs: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {r: cmap(i % 10) for i, r in enumerate(regs)}


def _accuracy_vs_noise(sm: pd.DataFrame, regs, colors, title: str, path: Path, written: list[Path]) -> None:
    acc = sm[(sm["split"] == "test") & (sm["condition"] == "clean") & (sm["metric"] == "accuracy")]
    # kind label from the setting so adversarial-confident and adversarial-boundary get separate panels
    acc = acc[acc["severity"].isna()]
    if acc.empty:  # no finished final trial yet (partial study)
        return
    acc = acc.assign(_kind=acc["noise_setting"].str.split(":").str[0])
    order = ("symmetric", "asymmetric", "pairflip", "instance", "adversarial")
    rank = {
        k: (order.index(k.split("-")[0]) if k.split("-")[0] in order else len(order), k) for k in acc["_kind"]
    }
    kinds = sorted((k for k in rank if k != "none"), key=rank.__getitem__)
    span = float(acc["noise_rate"].max()) or 1.0
    if acc.empty:
        return
    fig, axes = _grid(max(len(kinds), 1))
    for ax, kind in zip(axes, kinds or ["none"], strict=False):
        for i, reg in enumerate(regs):
            d = acc[(acc["regularizer"] == reg) & acc["_kind"].isin([kind, "none"])]
            d = (
                d.groupby("noise_rate", as_index=False)[["mean", "ci_low", "ci_high"]]
                .mean()
                .sort_values("noise_rate")
            )
            if d.empty:
                continue
            err = np.nan_to_num((d["ci_high"] - d["ci_low"]).to_numpy() / 2)
            dodge = 0.012 * span * (i - (len(regs) - 1) / 2)  # side by side so the error bars stay readable
            ax.errorbar(
                d["noise_rate"] + dodge,
                d["mean"],
                yerr=err,
                marker="o",
                ms=4,
                capsize=3,
                label=reg,
                color=colors[reg],
            )
        ax.set(xlabel="noise rate", ylabel="test accuracy (mean, 95% CI)")
        ax.set_title(f"{title}: {kind}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _save(fig, path, written)


def _strength(tr: pd.DataFrame, regs, colors, title: str, path: Path, written: list[Path]) -> None:
    s = tr[(tr["phase"] == "search") & tr["strength"].notna() & tr["best_value"].notna()]
    if s.empty:
        return
    settings = _order_settings(s)
    fig, axes = _grid(len(settings))
    for ax, ns in zip(axes, settings, strict=False):
        for reg in regs:
            d = s[(s["noise_setting"] == ns) & (s["regularizer"] == reg)]
            done, pruned = d[d["status"] == "completed"], d[d["status"] == "pruned"]
            if d.empty:
                continue
            ax.scatter(done["strength"], done["best_value"], s=18, color=colors[reg], label=reg)
            ax.scatter(
                pruned["strength"], pruned["best_value"], s=18, facecolors="none", edgecolors=colors[reg]
            )
        ax.set(xlabel="strength", ylabel=f"{s['metric'].iloc[0]} (search)")
        ax.set_title(f"{title}: {ns}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="filled: completed, hollow: pruned", title_fontsize=7)
    _save(fig, path, written)


def _panels(rows: list[str], cols: list[str], w: float, h: float):
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(w * len(cols), h * len(rows)), squeeze=False)
    return fig, axes


def _reliability(ev: pd.DataFrame, regs, settings, title: str, path: Path, written: list[Path]) -> None:
    bins = ev[(ev["split"] == "test") & (ev["condition"] == "clean") & ev["metric"].str.startswith("bin_")]
    if bins.empty:
        return
    wide = bins.pivot_table(index=["noise_setting", "regularizer", "trial_id", "severity"], columns="metric",
                            values="value").reset_index()  # fmt: skip
    if not {"bin_accuracy", "bin_confidence", "bin_count"} <= set(wide.columns):
        return
    nbins = int(wide["severity"].max()) + 1
    # pool seeds: bin accuracy/confidence weighted by the bin counts
    wide["acc_n"], wide["conf_n"] = (
        wide["bin_accuracy"] * wide["bin_count"],
        wide["bin_confidence"] * wide["bin_count"],
    )
    pooled = wide.groupby(["noise_setting", "regularizer", "severity"])[
        ["acc_n", "conf_n", "bin_count"]
    ].sum()
    fig, axes = _panels(settings, regs, 2.8, 2.8)
    for i, ns in enumerate(settings):
        for j, reg in enumerate(regs):
            ax = axes[i, j]
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", title=f"{reg}\n{ns}")
            ax.title.set_fontsize(9)
            if (ns, reg) not in pooled.index.droplevel(2):
                ax.text(0.5, 0.5, "no data", ha="center", va="center", color="0.5")
                continue
            g = pooled.loc[(ns, reg)]
            g = g[g["bin_count"] > 0]
            left = g.index.to_numpy() / nbins
            acc, conf = g["acc_n"] / g["bin_count"], g["conf_n"] / g["bin_count"]
            ax.bar(
                left, acc, width=1 / nbins, align="edge", color="C0", edgecolor="k", lw=0.5, label="accuracy"
            )
            ax.bar(left, conf - acc, bottom=acc, width=1 / nbins, align="edge", color="C3", alpha=0.35,
                   label="gap to confidence")  # fmt: skip
    for ax in axes[-1, :]:
        ax.set_xlabel("confidence")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    _save(fig, path, written)


def _curves(
    tr: pd.DataFrame, ep: pd.DataFrame, regs, settings, title: str, path: Path, written: list[Path]
) -> None:
    s = tr[tr["phase"] == "search"][["trial_id", "regularizer", "noise_setting", "status"]]
    e = ep.merge(s, on="trial_id").dropna(subset=["val_accuracy"]).sort_values(["trial_id", "epoch"])
    if e.empty:
        return
    fig, axes = _panels(settings, regs, 3.2, 2.6)
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
            ax.set(xlim=(0.5, e["epoch"].max() + 0.5), ylim=(lo - pad, hi + pad), title=f"{reg}\n{ns}")
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
    for ax in axes[-1, :]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("val accuracy")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    _save(fig, path, written)


def _projections(study: Study, out: Path, written: list[Path]) -> None:
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
        fig, axes = _panels(settings, regs, 2.6, 2.4)
        for i, setting in enumerate(settings):
            for j, reg in enumerate(regs):
                ax = axes[i][j]
                cell = df[(df["noise_setting"] == setting) & (df["regularizer"] == reg)]
                for k, (cls, pts) in enumerate(cell.groupby("cls")):
                    ax.scatter(pts["x"], pts["y"], s=4, alpha=0.5, color=f"C{k}", label=f"class {cls}")
                ax.set_title(f"{reg}\n{setting}", fontsize=8)
                ax.tick_params(labelsize=6)
        axes[0][0].legend(fontsize=6, markerscale=2, loc="best")
        fig.suptitle(
            f"{dataset}/{model}: penultimate features projected on the plane of 3 class templates", fontsize=9
        )
        _save(fig, out / f"projection_{_slug(dataset, model)}.png", written)


def write_plots(study: Study, plots_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write every figure for ``study``; returns the written paths (figures without data are skipped).

    Args:
        study: a loaded study (its ``summary`` is computed if missing).
        plots_dir: output folder (default ``study.path / "plots"``), created if missing.
    """
    out = Path(plots_dir) if plots_dir is not None else study.path / "plots"
    out.mkdir(parents=True, exist_ok=True)
    summary = study.summary if study.summary is not None else summarize(study.trials, study.evals)
    written: list[Path] = []
    meta = study.trials[["trial_id", "dataset", "model", "regularizer", "noise_setting", "phase", "status"]]
    final = meta[(meta["phase"] == "final") & (meta["status"] == "completed")]
    evals = study.evals.merge(final.drop(columns=["phase", "status"]), on="trial_id")
    for (dataset, model), tr in study.trials.groupby(["dataset", "model"], sort=True):
        regs = _order_regs(tr["regularizer"])
        colors = _colors(regs)
        where = f"{dataset}/{model}"
        sm = summary[(summary["dataset"] == dataset) & (summary["model"] == model)]
        _accuracy_vs_noise(
            sm, regs, colors, where, out / f"accuracy_vs_noise_{_slug(dataset, model)}.png", written
        )
        _strength(tr, regs, colors, where, out / f"strength_{_slug(dataset, model)}.png", written)
        settings, name = _order_settings(tr), _slug(dataset, model)
        ev = evals[(evals["dataset"] == dataset) & (evals["model"] == model)]
        _reliability(ev, regs, settings, f"{where}: reliability (test, final trials pooled over seeds)",
                     out / f"reliability_{name}.png", written)  # fmt: skip
        ep = study.epochs[study.epochs["trial_id"].isin(tr["trial_id"])]
        _curves(tr, ep, regs, settings, f"{where}: search trials (blue: completed, red: pruned)",
                out / f"curves_{name}.png", written)  # fmt: skip
    _projections(study, out, written)
    return written
