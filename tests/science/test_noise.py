"""Tests of study.noise against the definitions in reference.md ("Label noise").

Expected values are derived here from the definitions (maps typed in from reference.md, transition
matrices counted with an independent loop, Xia et al.'s per-sample loop re-implemented, adversarial
choices known by construction or recomputed by a plain sort).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from study.noise import (
    ADVERSARIAL_MODES,
    NOISE_KINDS,
    NoisyLabels,
    asymmetric_map,
    corrupt,
    instance_probabilities,
    synthetic_kinds,
    validate_noise,
)

N = 50_000
K = 10
Y10 = np.tile(np.arange(K), N // K)  # balanced: 5000 per class

# Typed in from reference.md (Patrini et al. 2017), not imported from the module under test.
CIFAR10_PAIRS = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
# Kinds drawn at a rate (human / file labels are given: tests/science/test_given_noise.py).
SYNTHETIC = synthetic_kinds()
MNIST_PAIRS = {2: 7, 3: 8, 7: 1, 5: 6, 6: 5}


def tol(p: float, n: int) -> float:
    """Six binomial standard deviations of a proportion p estimated from n draws (plus float slack)."""
    return 6.0 * math.sqrt(p * (1.0 - p) / n) + 1e-9


def reference_transition(clean: np.ndarray, noisy: np.ndarray, k: int) -> np.ndarray:
    counts = np.zeros((k, k))
    for a, b in zip(clean.tolist(), noisy.tolist(), strict=True):
        counts[a, b] += 1
    t = np.eye(k)
    for i in range(k):
        if counts[i].sum() > 0:
            t[i] = counts[i] / counts[i].sum()
    return t


def make_extra(kind: str, y: np.ndarray, k: int, seed: int = 0) -> dict:
    """Side inputs a kind needs: features for instance, probabilities for adversarial."""
    rng = np.random.default_rng(1000 + seed)
    if kind == "instance":
        return {"features": rng.normal(size=(len(y), 2, 3))}
    if kind == "adversarial":
        return {"probs": rng.dirichlet(np.ones(k), size=len(y))}
    return {}


# ----------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kind", "rate", "mode", "fragments"),
    [
        ("gaussian", 0.2, None, ["kind", "'gaussian'", *NOISE_KINDS]),
        ("symmetric", -0.1, None, ["rate", "-0.1", "[0, 1]"]),
        ("symmetric", 1.5, None, ["rate", "1.5"]),
        ("symmetric", float("nan"), None, ["rate", "nan"]),
        ("symmetric", "0.2", None, ["rate", "'0.2'"]),
        ("adversarial", 0.2, "far", ["mode", "'far'", *ADVERSARIAL_MODES]),
    ],
)
def test_validate_noise_names_field_value_and_allowed(kind, rate, mode, fragments):
    with pytest.raises(ValueError) as err:
        validate_noise(kind, rate, mode=mode)
    for fragment in fragments:
        assert fragment in str(err.value)
    # corrupt() applies the same check before touching the labels.
    with pytest.raises(ValueError, match=fragments[0]):
        corrupt(Y10[:20], K, kind, rate, 0, mode=mode or "confident")


@pytest.mark.parametrize("kind", SYNTHETIC)
@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_validate_noise_accepts_valid_settings(kind, rate):
    validate_noise(kind, rate)
    validate_noise(kind, rate, mode="boundary")


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: corrupt([0, 1, 10], K, "symmetric", 0.1, 0), "labels must lie in \\[0, num_classes=10\\)"),
        (lambda: corrupt([0, -1, 2], K, "symmetric", 0.1, 0), "but got -1"),
        (lambda: corrupt(np.zeros((2, 3), dtype=int), K, "symmetric", 0.1, 0), "1-D"),
        (lambda: corrupt(np.array([0.0, 1.0]), K, "symmetric", 0.1, 0), "integer dtype"),
        (lambda: corrupt([0, 0], 1, "symmetric", 0.1, 0), "num_classes must be an integer >= 2"),
        (lambda: corrupt([0, 1], K, "symmetric", 0.1, -3), "seed must be a non-negative integer"),
        (lambda: corrupt([0, 1], K, "instance", 0.1, 0), "features must be given"),
        (
            lambda: corrupt([0, 1], K, "instance", 0.1, 0, features=np.ones((3, 4))),
            "features must have shape",
        ),
        (lambda: corrupt([0, 1], K, "adversarial", 0.1, 0), "probs must be given"),
        (lambda: corrupt([0, 1], K, "adversarial", 0.1, 0, probs=np.full((2, 3), 0.1)), "shape \\(N, K\\)"),
        (
            lambda: corrupt([0, 1], 2, "adversarial", 0.1, 0, probs=np.array([[3.0, -1], [0, 2]])),
            "not logits",
        ),
        (lambda: corrupt(np.arange(100), 100, "asymmetric", 0.1, 0, dataset="cifar100"), "coarse_labels"),
        (
            lambda: corrupt(
                np.arange(100), 100, "asymmetric", 0.1, 0, dataset="cifar100", coarse_labels=[0] * 7
            ),
            "length num_classes=100",
        ),
        (lambda: corrupt([0, 1], 9, "asymmetric", 0.1, 0, dataset="cifar10"), "num_classes must be 10"),
    ],
)
def test_corrupt_rejects_bad_inputs_with_clear_messages(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


# ---------------------------------------------------------------------------------- symmetric, pairflip


def test_symmetric_rate_transition_and_uniform_other_class():
    r = 0.3
    res = corrupt(Y10, K, "symmetric", r, seed=1)
    noisy = res.labels.numpy()
    # r, not r(K-1)/K = 0.27: a flip never returns the true class.
    assert abs(res.realized_rate - r) < tol(r, N)
    assert "OTHER" in res.note
    t = res.transition.numpy()
    np.testing.assert_allclose(t, reference_transition(Y10, noisy, K), atol=1e-6)
    np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-6)
    n_c = N // K
    off = ~np.eye(K, dtype=bool)
    assert np.all(np.abs(np.diag(t) - (1 - r)) < tol(r, n_c))
    assert np.all(np.abs(t[off] - r / (K - 1)) < tol(r / (K - 1), n_c))
    # Flips are uniform over the K-1 other classes: overall offsets and every (source, target) cell.
    f = res.flipped.numpy()
    offsets = (noisy[f] - Y10[f]) % K
    assert offsets.min() >= 1
    assert stats.chisquare(np.bincount(offsets, minlength=K)[1:]).pvalue > 1e-4
    counts = np.zeros((K, K))
    np.add.at(counts, (Y10[f], noisy[f]), 1)
    assert np.all(np.diag(counts) == 0)
    assert stats.chisquare(counts[off]).pvalue > 1e-4


def test_pairflip_rate_and_transition():
    r = 0.45
    res = corrupt(Y10, K, "pairflip", r, seed=2)
    noisy, f = res.labels.numpy(), res.flipped.numpy()
    assert abs(res.realized_rate - r) < tol(r, N)
    np.testing.assert_array_equal(noisy[f], (Y10[f] + 1) % K)
    t = res.transition.numpy()
    np.testing.assert_allclose(t, reference_transition(Y10, noisy, K), atol=1e-6)
    expected = (1 - r) * np.eye(K) + r * np.roll(np.eye(K), 1, axis=1)
    assert np.abs(t - expected).max() < tol(r, N // K)


# ------------------------------------------------------------------------------------------ asymmetric


@pytest.mark.parametrize(
    ("dataset", "pairs"), [("cifar10", CIFAR10_PAIRS), ("mnist", MNIST_PAIRS), ("CIFAR-10", CIFAR10_PAIRS)]
)
def test_asymmetric_published_maps(dataset, pairs):
    r = 0.4
    assert asymmetric_map(dataset, K) == pairs
    res = corrupt(Y10, K, "asymmetric", r, seed=3, dataset=dataset)
    noisy, f = res.labels.numpy(), res.flipped.numpy()
    assert set(zip(Y10[f].tolist(), noisy[f].tolist(), strict=True)) == set(pairs.items())
    for c in range(K):
        rate_c = f[np.equal(Y10, c)].mean()
        if c in pairs:
            assert abs(rate_c - r) < tol(r, N // K)
        else:
            assert rate_c == 0.0
    # Five of ten balanced classes are sources: overall r/2.
    assert abs(res.realized_rate - r / 2) < tol(r / 2, N)
    assert "fell back" not in res.note


def _scattered_superclasses() -> np.ndarray:
    """A length-100 fine->coarse vector with 20 superclasses of 5 members that are NOT index blocks."""
    coarse = np.random.default_rng(7).permutation(np.repeat(np.arange(20), 5))
    assert any(len(set(coarse[b : b + 5].tolist())) > 1 for b in range(0, 100, 5))
    return coarse


def test_asymmetric_cifar100_next_member_of_real_superclass():
    coarse = _scattered_superclasses()
    expected = {}
    for f in range(100):
        members = sorted(g for g in range(100) if coarse[g] == coarse[f])
        expected[f] = members[(members.index(f) + 1) % len(members)]
    assert asymmetric_map("cifar100", 100, coarse) == expected

    y = np.tile(np.arange(100), 500)
    r = 0.35
    res = corrupt(y, 100, "asymmetric", r, seed=4, dataset="cifar100", coarse_labels=coarse)
    noisy, f = res.labels.numpy(), res.flipped.numpy()
    assert np.all(coarse[noisy] == coarse[y])
    np.testing.assert_array_equal(noisy[f], [expected[c] for c in y[f]])
    assert abs(res.realized_rate - r) < tol(r, len(y))
    # Per-sample coarse labels (as stored in the CIFAR-100 pickle) give the same map and the same labels.
    res2 = corrupt(
        y, 100, "asymmetric", r, seed=4, dataset="cifar100", coarse_labels=torch.from_numpy(coarse[y])
    )
    assert torch.equal(res.labels, res2.labels)
    bad = coarse[y].copy()
    bad[0] = (bad[0] + 1) % 20  # fine class 0 now has two superclasses
    with pytest.raises(ValueError, match="one superclass per fine class"):
        corrupt(y, 100, "asymmetric", r, seed=4, dataset="cifar100", coarse_labels=bad)


@pytest.mark.parametrize("dataset", ["fashion_mnist", "digits", None])
def test_asymmetric_without_map_falls_back_to_pairflip(dataset):
    assert asymmetric_map(dataset, K) is None
    res = corrupt(Y10, K, "asymmetric", 0.3, seed=5, dataset=dataset)
    assert f"no class map for dataset {dataset!r}; fell back to pairflip" in res.note
    assert res.kind == "asymmetric"
    assert torch.equal(res.labels, corrupt(Y10, K, "pairflip", 0.3, seed=5).labels)


# -------------------------------------------------------------------------------------------- instance


def test_instance_mean_rate_matches_truncated_normal_mean():
    r, std = 0.3, 0.1
    feats = np.random.default_rng(0).normal(size=(N, 2, 4)).astype(np.float32)
    res = corrupt(Y10, K, "instance", r, seed=6, features=feats)
    mean_q = stats.truncnorm.mean(-r / std, (1 - r) / std, loc=r, scale=std)
    assert abs(res.realized_rate - mean_q) < tol(mean_q, N)
    np.testing.assert_allclose(
        res.transition.numpy(), reference_transition(Y10, res.labels.numpy(), K), atol=1e-6
    )


def test_instance_probabilities_match_xia_per_sample_loop():
    """Re-implements Xia et al.'s loop (torch softmax, A[y] = -inf) with the documented draw order."""
    n, k, r, std, seed = 60, 4, 0.35, 0.1, 11
    data_rng = np.random.default_rng(3)
    y = data_rng.integers(0, k, size=n)
    x = data_rng.normal(loc=5.0, scale=3.0, size=(n, 3, 2))
    rng = np.random.default_rng(seed)
    q = stats.truncnorm.rvs(-r / std, (1 - r) / std, loc=r, scale=std, size=n, random_state=rng)
    w = torch.from_numpy(np.stack([rng.standard_normal((6, k)) for _ in range(k)]))
    flat = x.reshape(n, -1)
    z = torch.from_numpy((flat - flat.mean(0)) / flat.std(0))
    expected = np.zeros((n, k))
    for i in range(n):
        a = z[i].view(1, -1).mm(w[y[i]]).squeeze(0)
        a[y[i]] = -math.inf
        p = q[i] * torch.softmax(a, dim=0)
        p[y[i]] += 1 - q[i]
        expected[i] = p.numpy()
    got = instance_probabilities(y, k, r, seed, x, instance_std=std)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.sum(axis=1), 1.0)


def test_instance_labels_are_draws_from_p_and_scale_invariant():
    # Six clusters of identical inputs (two per class): within a cluster only q_i varies, so the label
    # counts follow the summed rows of P.
    k, n = 3, 30_000
    cluster = np.arange(n) % 6
    y = cluster // 2
    protos = np.random.default_rng(8).normal(size=(6, 5))
    x = protos[cluster] + 0.0
    r = 0.4
    res = corrupt(y, k, "instance", r, seed=9, features=x)
    p = instance_probabilities(y, k, r, 9, x)
    noisy = res.labels.numpy()
    for c in range(6):
        m = cluster == c
        observed = np.bincount(noisy[m], minlength=k)
        assert stats.chisquare(observed, p[m].sum(axis=0)).pvalue > 1e-4
    # Features are standardised per dimension, so the pixel scale does not matter.
    same = corrupt(y, k, "instance", r, seed=9, features=torch.from_numpy(x * 255.0 + 17.0))
    assert torch.equal(res.labels, same.labels)


# ----------------------------------------------------------------------------------------- adversarial


def _hand_probs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K=3, N=30, y = i % 3 (10 per class). p_y = m, runner-up t gets 0.7(1-m), the third 0.3(1-m), so
    the margin 1.7 m - 0.7 increases with m. Positions j (index 3j + c) with m = 0.9 tie at the top,
    m = 0.4 and 0.45 are the three smallest."""
    m_by_pos = [0.5, 0.9, 0.6, 0.9, 0.4, 0.9, 0.7, 0.45, 0.4, 0.9]
    n, k = 30, 3
    y = np.arange(n) % k
    probs = np.zeros((n, k))
    runner = np.zeros(n, dtype=int)
    for i in range(n):
        m = m_by_pos[i // 3]
        t = (y[i] + 1 + (i // 3) % 2) % k  # alternate which other class is the runner-up
        third = 3 - y[i] - t
        probs[i, y[i]], probs[i, t], probs[i, third] = m, 0.7 * (1 - m), 0.3 * (1 - m)
        runner[i] = t
    return y, probs, runner


@pytest.mark.parametrize(("mode", "positions"), [("confident", (1, 3, 5)), ("boundary", (4, 8, 7))])
def test_adversarial_hand_built(mode, positions):
    y, probs, runner = _hand_probs()
    res = corrupt(y, 3, "adversarial", 0.3, seed=0, probs=probs, mode=mode)
    # Budget floor(0.3 * 10) = 3 per class. confident: the four m = 0.9 points tie, the lowest three
    # indices (positions 1, 3, 5) win; boundary: m = 0.4 at positions 4, 8, then m = 0.45 at position 7.
    expected_idx = sorted(3 * j + c for c in range(3) for j in positions)
    assert np.flatnonzero(res.flipped.numpy()).tolist() == expected_idx
    noisy = res.labels.numpy()
    np.testing.assert_array_equal(noisy[expected_idx], runner[expected_idx])
    assert np.bincount(y[res.flipped.numpy()], minlength=3).tolist() == [3, 3, 3]
    # Deterministic: the seed is accepted but unused.
    assert torch.equal(res.labels, corrupt(y, 3, "adversarial", 0.3, seed=99, probs=probs, mode=mode).labels)


def test_adversarial_class_tie_goes_to_lower_index_and_budget_is_floor():
    probs = np.array([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5], [0.3, 0.4, 0.3]])
    res = corrupt([0, 2, 1], 3, "adversarial", 1.0, seed=0, probs=probs)
    assert res.labels.tolist() == [1, 0, 0]
    sizes = [10, 7, 13]
    y = np.repeat(np.arange(3), sizes)
    p = np.random.default_rng(1).dirichlet(np.ones(3), size=len(y))
    for mode in ADVERSARIAL_MODES:
        res = corrupt(y, 3, "adversarial", 0.29, seed=0, probs=torch.from_numpy(p), mode=mode)
        # floor(0.29 * n_c) with decimal arithmetic (0.29 * 100 would be 28.999... in floats).
        assert np.bincount(y[res.flipped.numpy()], minlength=3).tolist() == [2, 2, 3]


def reference_adversarial(y: list[int], probs: list[list[float]], rate_pct: int, mode: str) -> list[int]:
    n, k = len(probs), len(probs[0])
    noisy = list(y)
    for c in range(k):
        members = [i for i in range(n) if y[i] == c]
        budget = math.floor(Fraction(rate_pct, 100) * len(members))
        info = []
        for i in members:
            others = [(probs[i][j], -j) for j in range(k) if j != c]
            best_p, neg_j = max(others)  # highest prob, lowest index on ties
            info.append((probs[i][c] - best_p, i, -neg_j))
        sign = -1 if mode == "confident" else 1
        for _, i, target in sorted(info, key=lambda t: (sign * t[0], t[1]))[:budget]:
            noisy[i] = target
    return noisy


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 5),
    n=st.integers(1, 60),
    rate_pct=st.integers(0, 100),
    mode=st.sampled_from(ADVERSARIAL_MODES),
    seed=st.integers(0, 2**16),
    coarse=st.booleans(),
)
def test_adversarial_matches_reference_sort(k, n, rate_pct, mode, seed, coarse):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    probs = rng.dirichlet(np.ones(k), size=n)
    if coarse:  # many exact ties in margins and in runner-up classes
        probs = np.round(probs * 4) / 4
    res = corrupt(y, k, "adversarial", rate_pct / 100, seed=0, probs=probs, mode=mode)
    assert res.labels.tolist() == reference_adversarial(y.tolist(), probs.tolist(), rate_pct, mode)


# ------------------------------------------------------------------------------- properties, all kinds


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(SYNTHETIC),
    k=st.integers(2, 6),
    n=st.integers(0, 80),
    rate=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_output_invariants(kind, k, n, rate, seed):
    y = np.random.default_rng(seed).integers(0, k - 1, size=n)  # class k-1 is always absent
    res = corrupt(y, k, kind, rate, seed, **make_extra(kind, y, k, seed))
    assert isinstance(res, NoisyLabels)
    assert res.labels.dtype == torch.int64 and res.labels.shape == (n,) and res.labels.device.type == "cpu"
    noisy = res.labels.numpy()
    assert np.all((noisy >= 0) & (noisy < k))
    np.testing.assert_array_equal(res.flipped.numpy(), noisy != y)
    assert res.flipped.dtype == torch.bool
    assert res.realized_rate == pytest.approx(float((noisy != y).mean()) if n else 0.0)
    t = res.transition.numpy()
    assert t.shape == (k, k) and res.transition.dtype == torch.float32
    np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(t, reference_transition(y, noisy, k), atol=1e-6)
    np.testing.assert_array_equal(t[k - 1], np.eye(k)[k - 1])
    assert (res.kind, res.rate) == (kind, rate)
    if kind == "pairflip":
        np.testing.assert_array_equal(noisy[res.flipped.numpy()], (y[res.flipped.numpy()] + 1) % k)
    if kind == "none":
        assert not res.flipped.any()


@pytest.mark.parametrize("kind", SYNTHETIC)
def test_rate_zero_flips_nothing(kind):
    res = corrupt(Y10, K, kind, 0.0, seed=12, dataset="cifar10", **make_extra(kind, Y10, K))
    assert not res.flipped.any() and res.realized_rate == 0.0
    np.testing.assert_array_equal(res.transition.numpy(), np.eye(K))


@pytest.mark.parametrize("kind", SYNTHETIC)
def test_seeded_and_independent_of_global_rng(kind):
    y = Y10[:5000]
    extra = make_extra(kind, y, K)

    def run(seed: int, global_seed: int) -> torch.Tensor:
        np.random.seed(global_seed)
        torch.manual_seed(global_seed)
        np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
        out = corrupt(y, K, kind, 0.4, seed, dataset="cifar10", **extra).labels
        # The global generators are neither read nor advanced.
        assert np.array_equal(np.random.get_state()[1], np_state)
        assert torch.equal(torch.get_rng_state(), torch_state)
        return out

    a = run(seed=1, global_seed=0)
    assert torch.equal(a, run(seed=1, global_seed=12345))
    if kind not in ("none", "adversarial"):
        assert not torch.equal(a, run(seed=2, global_seed=0))


@pytest.mark.parametrize("as_tensor", [True, False])
def test_input_labels_are_not_modified(as_tensor):
    y_np = Y10[:1000].copy()
    labels = torch.from_numpy(y_np.copy()) if as_tensor else y_np.copy()
    res = corrupt(labels, K, "symmetric", 1.0, seed=0)
    assert res.flipped.all()
    np.testing.assert_array_equal(np.asarray(labels), y_np)
    res.labels.zero_()  # the result owns its memory
    np.testing.assert_array_equal(np.asarray(labels), y_np)
