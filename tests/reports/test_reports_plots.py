"""The figures' geometry and numbers, read back from the matplotlib artists (not from pixels)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from scipy import stats as sps

from reports.build import load_study
from reports.plots import forest, per_seed, reliability, strength, vs_eps, vs_noise, vs_severity, write_plots
from reports.plots._common import colors
from reports.plots._search import projection_figure
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
    assert bar.lines[0].get_xdata()[0] == pytest.approx(100 * d.mean())  # in points
    seg = bar.lines[2][0].get_segments()[0]
    assert (seg[0, 0], seg[1, 0]) == pytest.approx((100 * (d.mean() - half), 100 * (d.mean() + half)))
    assert "right = better" in ax.get_xlabel() and "left = better" in fig.axes[1].get_xlabel()
    assert "(points)" in ax.get_xlabel() and "(points)" not in fig.axes[2].get_xlabel()  # NLL keeps its unit
    # Not a strip: at least half an inch per row, and one row axis for the metrics' panels.
    assert fig.get_size_inches()[1] >= 0.5 * len(labels)
    assert all(a.get_shared_y_axes().joined(ax, a) for a in fig.axes[1:3])
    plt.close(fig)


def test_strength_has_one_axis_per_regularizer_parameter(study4):
    fig = strength(study4.trials, REGS, colors(REGS), "t")
    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    assert {ax.get_xlabel() for ax in panels} == {"label_smoothing: alpha", "maxsup: alpha"}  # ce: none
    # label smoothing's range (-0.5..0.3 in the synthetic study) is not squeezed into maxsup's (0..0.3).
    ls = [ax for ax in panels if ax.get_xlabel().startswith("label_smoothing")][0]
    ms = [ax for ax in panels if ax.get_xlabel().startswith("maxsup")][0]
    assert ls.get_xlim()[0] < -0.1 < ms.get_xlim()[0]
    plt.close(fig)


def test_strength_rings_the_chosen_trial_and_shows_its_lr(study4):
    fig = strength(study4.trials, REGS, colors(REGS), "t")
    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    tr = study4.trials
    done = tr[(tr.phase == "search") & (tr.status == "completed")]
    for ax in panels:
        reg, ns = ax.get_title().split("\n")[0].split(" | ")
        best = done[(done.regularizer == reg) & (done.noise_setting == ns)].sort_values("best_value").iloc[-1]
        rings = [c for c in ax.collections if len(c.get_offsets()) == 1 and c.get_sizes()[0] >= 100]
        assert len(rings) == 1
        assert list(rings[0].get_offsets()[0]) == pytest.approx([best.strength, 100 * best.best_value])
        assert ax.get_title().endswith(f"chosen: alpha {best.strength:.2g}, lr {best.param_lr:.2g}")
        # Each trial coloured by its learning rate on one log scale.
        ax_row = [a for a in panels if a.get_title().split(" | ")[1].split("\n")[0] == ns]
        assert all(a.get_shared_y_axes().joined(ax, b) for a in ax_row for b in ax_row)
    (bar,) = [ax for ax in fig.axes if ax.get_ylabel() == "learning rate"]
    lr = tr.loc[(tr.phase == "search") & tr.strength.notna(), "param_lr"]
    assert (bar.get_ylim()[0], bar.get_ylim()[1]) == pytest.approx((lr.min(), lr.max()))
    plt.close(fig)


def test_effects_share_y_and_draw_no_line_through_two_points(study4):
    ps = per_seed(study4)
    fig = vs_noise(ps, "accuracy", REGS, colors(REGS), "t")
    ax = fig.axes[0]
    (line,) = {c.lines[0].get_linestyle() for c in ax.containers if isinstance(c, ErrorbarContainer)}
    assert line == "None"  # rates 0 and 0.2 only: markers, no trend line
    y = ps[(ps.metric == "accuracy") & (ps.condition == "clean") & ps.severity.isna()]["value"]
    assert ax.get_ylim()[0] <= 100 * y.min() and ax.get_ylim()[1] >= 100 * y.max()  # in %
    plt.close(fig)
    fig = vs_eps(ps, REGS, colors(REGS), SETTINGS, "t")
    shown = [a for a in fig.axes if a.get_visible()]
    assert len(shown) == 6 and all(shown[0].get_shared_y_axes().joined(shown[0], a) for a in shown)
    plt.close(fig)
    fig = vs_severity(ps, REGS, colors(REGS), SETTINGS, "t")
    a, b = fig.axes[:2]
    assert a.get_shared_y_axes().joined(a, b)
    # Severities 0 (clean) and 1..5: enough points for a line.
    assert {c.lines[0].get_linestyle() for c in a.containers if isinstance(c, ErrorbarContainer)} == {"-"}
    plt.close(fig)


def test_a_setting_without_a_rate_sits_at_its_realised_rate(study4):
    ps = per_seed(study4)
    given = ps[ps.noise_setting == "symmetric:0.2"].assign(
        noise_setting="file-mine", noise_kind="file", noise_rate=0.0
    )
    ps = pd.concat([ps, given], ignore_index=True)
    fig = vs_noise(ps, "accuracy", REGS, colors(REGS), "t", realized={"file-mine": 0.17})
    (ax,) = [a for a in fig.axes if a.get_visible() and "file-mine" in a.get_xlabel()]
    assert ax.get_xlabel() == "file-mine realised noise rate"
    xs = np.concatenate([c.lines[0].get_xdata() for c in ax.containers if isinstance(c, ErrorbarContainer)])
    assert sorted(set(np.round(xs, 1))) == [0.0, 0.2]  # none at 0 and the file's labels at 0.17 (+ dodge)
    assert np.all(xs[xs > 0.05] == pytest.approx(0.17, abs=0.02)) and xs.min() > -0.02
    plt.close(fig)


def test_reliability_legend_swatches_are_visible_and_hatching_means_one_thing(study4):
    fig = reliability(per_seed(study4), REGS, SETTINGS, "t")
    handles = {
        t.get_text(): h
        for h, t in zip(fig.legends[0].legend_handles, fig.legends[0].get_texts(), strict=True)
    }
    under = handles["under-confidence gap"]
    assert under.get_facecolor()[3] == 1.0 and under.get_facecolor()[:3] != (1.0, 1.0, 1.0)
    hatched = {label for label, h in handles.items() if getattr(h, "get_hatch", lambda: None)()}
    assert hatched == {"accuracy at confidence = 1.0"}
    for ax in fig.axes:  # in the panels too: only the confidence = 1.0 bars are hatched
        assert all(p.get_x() == pytest.approx(1.0) for p in ax.patches if p.get_hatch())
    plt.close(fig)


def test_projection_panels_share_one_scale():
    rng = np.random.default_rng(0)
    rows = [dict(regularizer=reg, noise_setting=ns, cls=c, x=x, y=y)
            for reg, spread in (("ce", 5.0), ("label_smoothing", 0.5)) for ns in SETTINGS for c in range(3)
            for x, y in rng.normal(0, spread, (20, 2))]  # fmt: skip
    fig = projection_figure(pd.DataFrame(rows), ["ce", "label_smoothing"], SETTINGS, "t")
    assert len({(ax.get_xlim(), ax.get_ylim()) for ax in fig.axes}) == 1
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


def test_with_search_replicas_the_plots_unit_is_the_replica(tmp_path):
    """The real quickstart (4 replicas x 1 seed): each dot is a replica, as in the report's tests."""
    import shutil
    from pathlib import Path

    from reports.build import load_study
    from reports.compare import per_seed as report_units
    from reports.plots._common import per_seed, seeds_note

    src = Path(__file__).parent / "data" / "quickstart"
    shutil.copytree(src, tmp_path / "q")
    study = load_study(tmp_path / "q")
    ps = per_seed(study)
    clean = ps[(ps["metric"] == "ece") & (ps["condition"] == "clean") & (ps["split"] == "test")]
    assert clean.groupby(["regularizer", "noise_setting"])["seed"].nunique().eq(4).all()
    want = report_units(study.trials, study.evals)
    want = want[(want["metric"] == "ece") & (want["condition"] == "clean") & (want["split"] == "test")]
    merged = clean.merge(want, on=["regularizer", "noise_setting", "seed"], suffixes=("", "_report"))
    assert len(merged) == len(clean) and np.allclose(merged["value"], merged["value_report"])
    assert seeds_note(4, ps) == "n>=4 replicas, bars: 95% t-CI"
    assert seeds_note(2, ps.assign(unit_name="seeds")) == "n=2 seeds: no CI drawn (too few seeds)"
