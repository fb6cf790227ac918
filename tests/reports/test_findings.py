"""Findings and paired comparisons on results with planted effects, checked against scipy."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from reports.caveats import realized_rates, warnings
from reports.compare import compare, per_seed
from reports.findings import findings
from reports.stats import summarize

SEEDS = [1, 2, 3, 4, 5, 6]


def planted(effects: dict[str, dict[str, float]], noise: float = 0.01, seed: int = 0) -> tuple:
    """trials + evals: per noise setting, regularizer -> planted accuracy shift over ce's per-seed
    values (shared seed effects make the comparison paired), plus small independent noise."""
    rng = np.random.default_rng(seed)
    trials, evals = [], []
    for setting, regs in effects.items():
        base = 0.8 + rng.normal(0, 0.05, len(SEEDS))  # large seed-to-seed spread, shared by all regs
        for reg, shift in regs.items():
            cell = f"d/m/{reg}/{setting}"
            for i, s in enumerate(SEEDS):
                tid = f"{cell}#{s}"
                trials.append(dict(study="t", phase="final", cell_id=cell, trial_id=tid, dataset="d",
                                   model="m", regularizer=reg, noise_setting=setting,
                                   noise_kind=setting.split(":")[0], noise_rate=0.0, seed=s,
                                   status="completed", strength=None, best_value=np.nan,
                                   direction="maximize"))  # fmt: skip
                value = base[i] + shift + rng.normal(0, noise)
                evals.append(dict(trial_id=tid, split="test", condition="clean", severity=np.nan,
                                  metric="accuracy", value=value))  # fmt: skip
    return pd.DataFrame(trials), pd.DataFrame(evals)


def test_findings_name_the_planted_winner_with_its_ci_and_the_null_is_not_significant():
    trials, evals = planted({"none": {"ce": 0.0, "label_smoothing": 0.05, "maxsup": 0.0},
                             "symmetric:0.4": {"ce": 0.0, "maxsup": 0.002}})  # fmt: skip
    found = {(f.noise_setting, f.metric): f for f in findings(trials, evals)}
    win = found[("none", "accuracy")]
    assert win.a == "label_smoothing" and win.b == "ce" and win.n == len(SEEDS)
    assert win.ci_low < 0.05 < win.ci_high and win.ci_low > 0
    levels = evals.merge(trials, on="trial_id").groupby(["noise_setting", "regularizer"])["value"].mean()
    assert (win.a_level, win.b_level) == pytest.approx(
        (levels["none", "label_smoothing"], levels["none", "ce"])
    )
    head = f"LS {100 * win.a_level:.1f}% vs CE {100 * win.b_level:.1f}% +{100 * win.diff:.1f} ["
    assert win.verdict == "better" and win.sentence().startswith(head)
    null = found[("symmetric:0.4", "accuracy")]
    assert null.verdict in ("undecided", "equivalent") and null.ci_low < 0 < null.ci_high
    assert null.sentence().endswith(null.verdict_text())


def test_all_pairs_equal_scipy_ttest_rel_and_holm():
    trials, evals = planted({"none": {"ce": 0.0, "label_smoothing": 0.01, "maxsup": 0.004, "focal": -0.003}},
                            noise=0.01)  # fmt: skip
    comp = compare(per_seed(trials, evals), reference=None)
    values = {r: evals.merge(trials[trials.regularizer == r], on="trial_id").sort_values("seed")["value"]
              for r in trials.regularizer.unique()}  # fmt: skip
    pairs = sorted(itertools.combinations(sorted(values), 2))
    raw = {(a, b): stats.ttest_rel(values[a].to_numpy(), values[b].to_numpy()).pvalue for a, b in pairs}
    # Holm over the 6 unordered pairs, by hand.
    order = sorted(raw, key=raw.get)
    adj, running = {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * raw[key]))
        adj[key] = running
    assert len(comp) == 12  # both directions
    for _, r in comp.iterrows():
        key = tuple(sorted((r["regularizer"], r["reference"])))
        assert r["p_value"] == pytest.approx(raw[key], rel=1e-9)
        assert r["p_adjusted_pairs"] == pytest.approx(adj[key], rel=1e-9)
        d = values[r["regularizer"]].to_numpy() - values[r["reference"]].to_numpy()
        assert r["diff"] == pytest.approx(d.mean()) and r["effect_size_dz"] == pytest.approx(
            d.mean() / d.std(ddof=1)
        )
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        assert (r["diff_ci_low"], r["diff_ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))


def test_any_reference_in_the_summary():
    trials, evals = planted({"none": {"ce": 0.0, "label_smoothing": 0.05, "maxsup": 0.02}})
    by_ls = summarize(trials, evals, reference="label_smoothing")
    assert set(by_ls["reference"]) == {"label_smoothing"}
    row = by_ls[by_ls["regularizer"] == "maxsup"].iloc[0]
    ms = evals.merge(trials, on="trial_id").pivot_table(index="seed", columns="regularizer", values="value")
    assert row["p_value"] == pytest.approx(stats.ttest_rel(ms["maxsup"], ms["label_smoothing"]).pvalue)
    assert row["diff"] == pytest.approx((ms["maxsup"] - ms["label_smoothing"]).mean())
    # delta_vs_ce keeps its meaning whatever the reference.
    assert row["delta_vs_ce"] == pytest.approx(ms["maxsup"].mean() - ms["ce"].mean())
    pairs = summarize(trials, evals, all_pairs=True)
    # Every cell once per reference (its own cell included, with no comparison): any reference is a filter.
    assert len(pairs) == 9 and set(zip(pairs.regularizer, pairs.reference, strict=True)) == {
        (a, b) for a in ms.columns for b in ms.columns
    }
    assert pairs[pairs.regularizer == pairs.reference]["p_value"].isna().all()
    pairs_only = ["p_adjusted_pairs", "verdict_pairs", "correction"]
    same = pairs[pairs.reference == "label_smoothing"].drop(columns=pairs_only)
    pd.testing.assert_frame_equal(
        same.reset_index(drop=True), by_ls.drop(columns=pairs_only).reset_index(drop=True)
    )


def test_warnings_for_few_seeds_and_outlier_seeds():
    trials, evals = planted({"none": {"ce": 0.0, "maxsup": 0.0}}, noise=0.001)
    assert not [w for w in warnings(trials, evals, None) if "fewer than 3 seeds" in w]
    evals.loc[evals["trial_id"] == "d/m/maxsup/none#3", "value"] += 0.3  # one seed far off
    out = warnings(trials, evals, None)
    assert any("outlier" in w and "d/m/maxsup/none seed 3" in w for w in out)
    two = trials[trials["seed"] <= 2]
    assert any("fewer than 3 seeds (n=2)" in w for w in warnings(two, evals, None))


def test_findings_lines_show_the_realised_noise_rate():
    from reports.answer import Section, terminal_lines

    trials, evals = planted({"symmetric:0.4": {"ce": 0.0, "maxsup": 0.01}})
    trials["realized_noise_rate"] = np.where(trials["seed"] % 2 == 0, 0.39, 0.41)
    rates = realized_rates(trials)
    assert rates == {"symmetric:0.4": pytest.approx(0.40)}
    lines = terminal_lines(Section("t", findings(trials, evals), {}, rates))
    assert ("group", "d / m, noise symmetric:0.4 (realised 40.0% flipped)") in lines


def test_matched_strengths_contrast_each_pair_at_each_value_against_scipy_and_holm():
    """Arms at matched strengths (name@alpha=v): each value is its own family of pairs; the names
    (`--compare label_smoothing:maxsup`) select one pair at every value, in increasing order."""
    from reports.findings import matched_findings, pair_findings

    regs = {"ce": 0.0, "label_smoothing@alpha=0.1": 0.0, "maxsup@alpha=0.1": 0.03,
            "label_smoothing@alpha=0.3": 0.0, "maxsup@alpha=0.3": 0.0}  # fmt: skip
    trials, evals = planted({"symmetric:0.4": regs})
    found = matched_findings(trials, evals)
    assert len(found) == 2 and (found[0].a, found[0].b) == ("maxsup@alpha=0.1", "label_smoothing@alpha=0.1")
    assert {found[1].a, found[1].b} == {"maxsup@alpha=0.3", "label_smoothing@alpha=0.3"}  # no ce: no pair
    values = evals.merge(trials, on="trial_id").pivot_table(
        index="seed", columns="regularizer", values="value"
    )
    for f in found:
        d = (values[f.a] - values[f.b]).to_numpy()
        assert f.diff == pytest.approx(d.mean())
        # one pair per value: Holm over one comparison leaves p unchanged
        assert f.p == pytest.approx(stats.ttest_rel(values[f.a], values[f.b]).pvalue) and f.p_adj == f.p
    assert found[0].verdict == "better" and found[0].b_level < found[0].a_level
    assert found[1].verdict != "better"
    named = pair_findings(trials, evals, pair=("label_smoothing", "maxsup"))
    assert [(f.a, f.b) for f in named] == [
        ("label_smoothing@alpha=0.1", "maxsup@alpha=0.1"),
        ("label_smoothing@alpha=0.3", "maxsup@alpha=0.3"),
    ]
    assert named[0].verdict == "worse" and named[0].diff == pytest.approx(-found[0].diff)


def test_a_finding_says_when_its_two_strengths_are_more_than_2x_apart():
    trials, evals = planted({"none": {"label_smoothing": 0.05, "maxsup": 0.0}})
    strength = trials["regularizer"].map({"label_smoothing": 0.34, "maxsup": 0.005})
    trials = trials.assign(strength=strength, strength_param="alpha", phase="final")
    from reports.findings import pair_findings

    (f,) = pair_findings(trials, evals)
    assert f.strength_ratio == pytest.approx(0.34 / 0.005)
    assert f.verdict_text().endswith("(strengths 68x apart)")
    trials = trials.assign(strength=trials["regularizer"].map({"label_smoothing": 0.2, "maxsup": 0.1}))
    (f,) = pair_findings(trials, evals)
    assert "apart" not in f.verdict_text()
