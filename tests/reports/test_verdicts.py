"""Verdicts (reports/verdicts.py) against their formulas (shared/reference.md, "Comparing regularizers")
and against planted truths in simulated studies that carry the search's own variance."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from reports import verdicts
from reports.compare import compare, per_seed
from reports.synthetic import replicated_comparisons
from study import vocabulary as vocab


def _tost_equivalent(d: np.ndarray, margin: float) -> bool:
    """Two one-sided t-tests at 5% with scipy: d > -margin and d < +margin."""
    lower = sps.ttest_1samp(d, -margin, alternative="greater").pvalue
    upper = sps.ttest_1samp(d, margin, alternative="less").pvalue
    return bool(max(lower, upper) < 0.05)


@pytest.mark.parametrize("seed", range(40))
def test_decide_matches_holm_and_two_one_sided_tests(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    d = rng.normal(rng.normal(0, 0.01), rng.uniform(0.002, 0.02), size=n)
    p = sps.ttest_1samp(d, 0.0).pvalue
    p_adj = min(1.0, p * rng.choice([1, 2, 3]))  # as Holm would scale it in a family
    margin, better = 0.01, int(rng.choice([1, -1]))
    word = verdicts.decide(d.mean(), d.std(ddof=1), n, p_adj, margin, better)[0]
    if p_adj < 0.05:
        assert word == ("better" if d.mean() * better > 0 else "worse")
    elif _tost_equivalent(d, margin):
        assert word == "equivalent"
    else:
        assert word == "undecided"


def test_decide_directionless_metrics_and_missing_margin_or_units():
    words = verdicts.decide(
        diff=[0.3, -0.3, 0.001, 0.001, 0.5],
        sd=[0.01, 0.01, 0.001, 0.001, np.nan],
        n=[5, 5, 10, 10, 1],
        p_adjusted=[1e-4, 1e-4, 0.4, 0.4, np.nan],
        margin=[np.nan, np.nan, 0.01, np.nan, 0.01],
        better=[0, 0, 1, 1, 1],
    )
    assert list(words) == ["higher", "lower", "equivalent", "undecided", "undecided"]


def test_holm_interval_excludes_zero_exactly_when_the_adjusted_p_is_below_alpha():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(3, 10))
        d = rng.normal(0.01, 0.02, size=n)
        p = sps.ttest_1samp(d, 0.0).pvalue
        p_adj = min(1.0, p * rng.uniform(1, 4))
        low, high = verdicts.holm_interval(d.mean(), d.std(ddof=1), n, p, p_adj)
        assert (low > 0 or high < 0) == (p_adj < 0.05)
        if p_adj == p:  # one comparison in its family: the plain 95% t-interval
            ci = sps.t.interval(0.95, n - 1, loc=d.mean(), scale=sps.sem(d))
            assert np.allclose([low, high], ci)


def test_units_needed_is_the_power_formula():
    # Reference: n = (2.80 s / |d|)^2 at least 3 (two-sided 5%, power 0.8).
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    assert verdicts.units_needed(0.02, 0.05, np.nan) == np.ceil((z * 0.05 / 0.02) ** 2) == 50
    assert verdicts.units_needed(0.5, 0.05, np.nan) == 3
    # Closer to equivalence than to a difference: ((z_.95 + z_.8) s / (margin - |d|))^2.
    z_eq = sps.norm.ppf(0.95) + sps.norm.ppf(0.8)
    assert verdicts.units_needed(0.001, 0.01, 0.01) == np.ceil((z_eq * 0.01 / 0.009) ** 2)
    assert np.isnan(verdicts.units_needed(0.0, 0.01, np.nan))


def test_probability_of_improvement_and_its_bootstrap_interval():
    a = np.array([0.81, 0.80, 0.79, 0.83, 0.80])
    b = np.array([0.80, 0.80, 0.80, 0.80, 0.78])
    d = a - b
    point, low, high = verdicts.probability_of_improvement(
        [d, -d, d], np.array([1, 1, -1]), resamples=500, seed=3
    )
    # mean of 1{A > B} + 0.5 1{A = B}: wins at units 0, 3, 4, a tie at unit 1.
    assert point[0] == pytest.approx(3.5 / 5) and point[1] == pytest.approx(1.5 / 5)
    assert point[2] == pytest.approx(1.5 / 5)  # lower is better: A "beats" B where it is lower
    # The percentile bootstrap, written out: the same unit indices resampled.
    idx = np.random.default_rng(3).integers(0, 5, size=(500, 5))
    wins = (d > 0) + 0.5 * (d == 0)
    boot = wins[idx].mean(axis=1)
    assert (low[0], high[0]) == tuple(np.percentile(boot, [2.5, 97.5]))
    assert low[0] <= point[0] <= high[0]


def test_compare_carries_verdict_columns_consistent_with_its_tests():
    rng = np.random.default_rng(7)
    trials, evals = replicated_comparisons(
        30, 0.02, replicas=5, seeds=2, search_sd=0.01, seed_sd=0.01, rng=rng
    )
    comp = compare(per_seed(trials, evals), reference="ce")
    assert len(comp) == 30 and (comp["n_units"] == 5).all()  # unit = replica, its 2 seeds averaged
    assert set(comp["verdict"]) <= set(vocab.VERDICTS)
    assert (comp["margin"] == vocab.margin_of("accuracy")).all()
    decided = comp["verdict"].isin(["better", "worse"])
    assert (decided == (comp["p_adjusted"] < 0.05)).all()
    assert ((comp["adj_ci_low"] > 0) | (comp["adj_ci_high"] < 0)).eq(decided).all()
    assert comp["p_improve"].between(comp["p_improve_low"], comp["p_improve_high"]).all()
    # Overrides from the spec replace the vocabulary's margin.
    wide = compare(per_seed(trials, evals), reference="ce", margins={"accuracy": 0.5})
    assert (wide["margin"] == 0.5).all()
    assert set(wide.loc[~decided.to_numpy(), "verdict"]) <= {"equivalent"}


N_STUDIES = 1000
# One comparison per study: a false better/worse rate of exactly 5% is what a 5% test should give, so
# the null's rate is measured over more studies, and allowed its Monte Carlo error (2 sd).
N_NULL_STUDIES = 4000
SLACK = 2 * np.sqrt(0.05 * 0.95 / N_NULL_STUDIES)


def _verdicts(effect: float, *, replicas: int, seeds: int, seed: int, studies: int = N_STUDIES):
    trials, evals = replicated_comparisons(
        studies, effect, replicas=replicas, seeds=seeds, search_sd=0.01, seed_sd=0.01,
        rng=np.random.default_rng(seed),
    )  # fmt: skip
    # label_smoothing - ce: the planted effect is `effect`.
    return compare(per_seed(trials, evals), reference="ce").query("regularizer == 'label_smoothing'")


def test_planted_nulls_are_rarely_called_better_or_worse():
    comp = _verdicts(0.0, replicas=6, seeds=2, seed=11, studies=N_NULL_STUDIES)
    false_calls = comp["verdict"].isin(["better", "worse"]).mean()
    assert false_calls <= 0.05 + SLACK, false_calls


def test_planted_effects_of_three_margins_are_decided():
    comp = _verdicts(3 * vocab.margin_of("accuracy"), replicas=6, seeds=2, seed=12)
    assert (comp["verdict"] == "better").mean() >= 0.80
    assert (comp["verdict"] == "worse").mean() == 0.0


def test_replica_intervals_cover_the_planted_effect_and_seed_intervals_do_not():
    effect = 0.01
    with_replicas = _verdicts(effect, replicas=6, seeds=2, seed=13)
    covered = (with_replicas["diff_ci_low"] <= effect) & (effect <= with_replicas["diff_ci_high"])
    assert covered.mean() >= 0.93, covered.mean()
    # The same budget of 12 final trials as one configuration retrained over seeds: the search's luck
    # is in no interval, and the 95% intervals miss the truth far more than 5% of the time.
    seeds_only = _verdicts(effect, replicas=1, seeds=12, seed=13)
    assert (seeds_only["n_units"] == 12).all()
    covered = (seeds_only["diff_ci_low"] <= effect) & (effect <= seeds_only["diff_ci_high"])
    assert covered.mean() < 0.7, covered.mean()
