"""The figures' geometry and numbers, read back from the matplotlib artists (not from pixels)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from scipy import stats as sps

from reports.build import load_study
from reports.plots import forest, per_seed, reliability, strength, vs_noise, write_plots
from reports.plots._common import colors
from reports.synthetic import make_synthetic_study

REGS = ["ce", "label_smoothing", "maxsup"]
SETTINGS = ["none", "symmetric:0.2"]


@pytest.fixture(scope="module")
def study4(tmp_path_factory):
    out = tmp_path_factory.mktemp("plots4")
    make_synthetic_study(out, models=("mlp",), seeds=4, search_trials=4, bins=15)
    return load_study(out)


def _axes(fig, gid: str):
    found = [ax for ax in fig.axes if ax.get_gid() == gid]
    assert len(found) == 1, [ax.get_gid() for ax in fig.axes]
    return found[0]


def _bars(ax, label: str) -> list:
    return [p for c in ax.containers if isinstance(c, BarContainer) and c.get_label() == label for p in c]


def test_reliability_bars_sit_on_the_bin_edges_and_the_one_bin_at_1(study4):
    ps = per_seed(study4)
    fig = reliability(ps, REGS, SETTINGS, "t")
    ax = _axes(fig, "reliability|none|label_smoothing")
    # The evaluation's binning (torchmetrics): 15 bins on linspace(0, 1, 16), plus confidences == 1.0.
    edges = np.linspace(0, 1, 16)
    acc = _bars(ax, "accuracy")
    ev = study4.evals.merge(
        study4.trials[["trial_id", "regularizer", "noise_setting", "phase"]], on="trial_id"
    )
    ev = ev[
        (ev["regularizer"] == "label_smoothing") & (ev["noise_setting"] == "none") & (ev["phase"] == "final")
    ]
    wide = ev[ev["metric"].str.startswith("bin_")].pivot_table(
        index=["trial_id", "severity"], columns="metric", values="value"
    )
    n = wide["bin_count"].groupby("severity").sum()
    assert n.index.tolist() == list(range(16))
    filled = [b for b in range(15) if n[b] > 0]  # an empty bin has no bar
    assert len(filled) >= 5
    assert [p.get_x() for p in acc] == pytest.approx(edges[filled].tolist())
    assert [p.get_width() for p in acc] == pytest.approx([1 / 15] * len(filled))
    (top,) = _bars(ax, "accuracy at confidence = 1.0")
    assert top.get_x() == pytest.approx(1.0) and 0 < top.get_width() < 1 / 15
    assert ax.get_xlim()[1] >= top.get_x() + top.get_width()  # the 1.0 bar is inside the axes

    # Heights: bin accuracy pooled over the 4 seeds, weighted by the seeds' bin counts.
    expected = (wide["bin_accuracy"] * wide["bin_count"]).groupby("severity").sum() / n
    assert [p.get_height() for p in acc] == pytest.approx(expected[filled].tolist())
    assert top.get_height() == pytest.approx(expected.iloc[15])
    # ECE of the pooled bins in the corner, and the bin counts underneath as shares of the samples.
    conf = (wide["bin_confidence"] * wide["bin_count"]).groupby("severity").sum() / n
    ece = float((n * (expected - conf).abs()).fillna(0).sum() / n.sum())
    assert any(t.get_text().startswith(f"ECE {ece:.3f}\nN={int(n.sum())} (4 seeds)") for t in ax.texts)
    counts = _axes(fig, "counts|none|label_smoothing")
    shares = [p.get_height() for c in counts.containers for p in c]
    assert shares == pytest.approx((n / n.sum()).tolist())
    plt.close(fig)


def test_few_seeds_show_the_seeds_and_no_interval(tmp_path):
    make_synthetic_study(tmp_path, models=("mlp",), seeds=2, search_trials=2)
    ps = per_seed(load_study(tmp_path))
    fig = vs_noise(ps, "accuracy", REGS, colors(REGS), "t")
    ax = fig.axes[0]
    # Every seed is a dot: 3 regularizers x 2 noise rates x 2 seeds.
    dots = np.concatenate([c.get_offsets() for c in ax.collections if len(c.get_offsets()) == 4])
    assert len(dots) == 12
    # n=2: the t interval (12.7 sd/sqrt 2) is not drawn; the legend says why.
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert bars and all(
        np.allclose(seg[0, 1], seg[1, 1]) for c in bars for seg in c.lines[2][0].get_segments()
    )
    assert "no CI drawn" in ax.get_legend().get_title().get_text()
    plt.close(fig)


def test_forest_shows_paired_differences_and_their_t_interval(study4):
    ps = per_seed(study4)
    fig = forest(ps, REGS, colors(REGS), SETTINGS, "t", "ce")
    ax = fig.axes[0]  # accuracy
    labels = [t.get_text() for t in ax.get_yticklabels()]
    row = labels.index("maxsup | symmetric:0.2")
    acc = ps[(ps["metric"] == "accuracy") & (ps["condition"] == "clean") & ps["severity"].isna()]
    acc = acc[acc["noise_setting"] == "symmetric:0.2"].pivot_table(
        index="seed", columns="regularizer", values="value"
    )
    d = (acc["maxsup"] - acc["ce"]).to_numpy()
    half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    (bar,) = [
        c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.lines[0].get_ydata()[0] == row
    ]
    assert bar.lines[0].get_xdata()[0] == pytest.approx(d.mean())
    seg = bar.lines[2][0].get_segments()[0]
    assert (seg[0, 0], seg[1, 0]) == pytest.approx((d.mean() - half, d.mean() + half))
    assert "right = better" in ax.get_xlabel() and "left = better" in fig.axes[1].get_xlabel()
    plt.close(fig)


def test_strength_has_one_axis_per_regularizer_parameter(study4):
    fig = strength(study4.trials, REGS, colors(REGS), "t")
    xlabels = {ax.get_xlabel() for ax in fig.axes}
    assert xlabels == {"label_smoothing: alpha", "maxsup: alpha"}  # ce has no strength: no column
    # label smoothing's range (-0.5..0.3 in the synthetic study) is not squeezed into maxsup's (0..0.3).
    ls = [ax for ax in fig.axes if ax.get_xlabel().startswith("label_smoothing")][0]
    ms = [ax for ax in fig.axes if ax.get_xlabel().startswith("maxsup")][0]
    assert ls.get_xlim()[0] < -0.1 < ms.get_xlim()[0]
    plt.close(fig)


def test_write_plots_writes_each_figure(study4, tmp_path):
    names = {p.name for p in write_plots(study4, tmp_path)}
    assert names == {
        f"{k}_mnist1d_mlp.png"
        for k in (
            "accuracy_vs_noise",
            "ece_vs_noise",
            "forest",
            "accuracy_vs_eps",
            "accuracy_vs_severity",
            "strength",
            "reliability",
            "curves",
        )
    }
    assert all((tmp_path / n).stat().st_size > 0 for n in names)
    assert isinstance(per_seed(study4), pd.DataFrame)
