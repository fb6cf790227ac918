"""reports.stats against independent scipy computations on a synthetic study."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from reports.build import build_summary, read_table
from reports.stats import summarize
from reports.synthetic import make_synthetic_study


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    # 2 models x 3 regularizers x 2 noise settings x 3 seeds, search + final, some pruned
    make_synthetic_study(out, seeds=3, search_trials=6)
    build_summary(out)
    return out


def _holm(p: list[float]) -> list[float]:
    """Holm (1979) from its definition: step down over ascending p, multiplier m - k, running max."""
    order = np.argsort(p)
    adj, running = [0.0] * len(p), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - k) * p[i]))
        adj[i] = running
    return adj


def _values(trials, evals, cell, metric):
    fin = trials[(trials.cell_id == cell) & (trials.phase == "final") & (trials.status == "completed")]
    ev = evals[(evals.metric == metric) & (evals.split == "test") & (evals.condition == "clean")]
    return ev.merge(fin[["trial_id", "seed"]], on="trial_id").set_index("seed")["value"].sort_index()


@pytest.mark.parametrize("metric", ["accuracy", "ece", "nll"])
def test_summary_matches_scipy(study_dir, metric):
    trials, evals = read_table(study_dir, "trials"), read_table(study_dir, "evals")
    summary = read_table(study_dir, "summary")
    summary = summary[(summary.metric == metric) & (summary.condition == "clean") & (summary.split == "test")]
    checked = 0
    for (dataset, model, ns), group in trials.groupby(["dataset", "model", "noise_setting"]):
        cells = group.drop_duplicates("cell_id").set_index("regularizer")["cell_id"]
        ce = _values(trials, evals, cells["ce"], metric)
        pvals, regs = [], []
        for reg, cell in cells.items():
            x = _values(trials, evals, cell, metric)
            row = summary[summary.cell_id == cell].iloc[0]
            assert row.n == len(x) == 3
            assert row["mean"] == pytest.approx(x.mean(), rel=1e-12)
            assert row["std"] == pytest.approx(x.std(ddof=1), rel=1e-12)
            lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
            assert (row.ci_low, row.ci_high) == pytest.approx((lo, hi), rel=1e-10)
            assert row.delta_vs_ce == pytest.approx(x.mean() - ce.mean(), abs=1e-12)
            assert row.noise_setting == ns and row.dataset == dataset and row.model == model
            if reg == "ce":
                assert np.isnan(row.p_value) and row.delta_vs_ce == 0
                continue
            p = sps.ttest_rel(x, ce.loc[x.index]).pvalue  # paired by seed
            assert row.p_value == pytest.approx(p, rel=1e-8)
            pvals.append(p)
            regs.append(cell)
            checked += 1
        for cell, adj in zip(regs, _holm(pvals), strict=True):
            row = summary[summary.cell_id == cell].iloc[0]
            assert row.p_adjusted == pytest.approx(adj, rel=1e-8)
            assert bool(row.significant) == (adj < 0.05)
    assert checked == 8


def test_best_params_from_best_search_trial(study_dir):
    trials, summary = read_table(study_dir, "trials"), read_table(study_dir, "summary")
    for cell, row in summary.drop_duplicates("cell_id").set_index("cell_id").iterrows():
        s = trials[(trials.cell_id == cell) & (trials.phase == "search") & (trials.status == "completed")]
        best = s.loc[s.best_value.idxmax()]
        params = json.loads(row.best_params)
        assert params["lr"] == best.param_lr and params.get("alpha") == (
            None if pd.isna(best.param_alpha) else best.param_alpha
        )
        assert (np.isnan(row.best_strength) and pd.isna(best.strength)) or row.best_strength == best.strength


def test_single_seed_has_no_ci_and_no_p():
    trials = pd.DataFrame([
        dict(study="s", phase="final", status="completed", cell_id=c, trial_id=c, dataset="d", model="m",
             regularizer=r, noise_setting="none", noise_kind="none", noise_rate=0.0, seed=0, strength=None,
             best_value=None, direction="maximize")
        for c, r in (("a", "ce"), ("b", "maxsup"))
    ])  # fmt: skip
    evals = pd.DataFrame({"trial_id": ["a", "b"], "split": "test", "condition": "clean", "severity": np.nan,
                          "metric": "accuracy", "value": [0.5, 0.7]})  # fmt: skip
    s = summarize(trials, evals).set_index("cell_id")
    assert s.loc["b", "n"] == 1 and np.isnan(s.loc["b", "ci_low"]) and np.isnan(s.loc["b", "p_value"])
    assert s.loc["b", "delta_vs_ce"] == pytest.approx(0.2)
    assert not s["significant"].any()


def test_minimize_direction_and_bad_alpha():
    trials = pd.DataFrame([
        dict(study="s", phase="search", status="completed", cell_id="a", trial_id=f"t{i}", dataset="d",
             model="m", regularizer="ce", noise_setting="none", noise_kind="none", noise_rate=0.0, seed=0,
             strength=float(i), best_value=v, direction="minimize", param_lr=0.1 * (i + 1))
        for i, v in enumerate([0.3, 0.1, 0.2])
    ])  # fmt: skip
    from reports.stats import best_trials

    assert best_trials(trials).iloc[0]["strength"] == 1.0
    with pytest.raises(ValueError, match="alpha must be"):
        summarize(trials, pd.DataFrame(columns=["trial_id"]), alpha=1.5)
