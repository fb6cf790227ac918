"""Values of the classification and calibration metrics against torchmetrics, formulas and loops."""

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

from study import metrics as M
from study import vocabulary


def _calibrated_ish(n: int, k: int, seed: int, temp: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose labels are drawn from softmax(temp * logits): some bins over-, some underconfident."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 2.5
    y = torch.multinomial(torch.softmax(temp * z, dim=1), 1, generator=g).squeeze(1)
    return z, y


def _with_exact_confidences(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows plus rows whose softmax max is exactly 1.0, 1/2, 1/4 or 1/5 (bin edges for many n_bins)."""
    z, y = _calibrated_ish(600, 10, seed)
    g = torch.Generator().manual_seed(seed + 1)
    special = []
    for m in (1, 1, 1, 2, 2, 4, 4, 5, 5, 5):
        row = torch.full((10,), -1e4)
        row[torch.randperm(10, generator=g)[:m]] = 3.0
        special.append(row)
    sat = torch.zeros(20, 10)
    sat[torch.arange(20), torch.randint(0, 10, (20,), generator=g)] = 200.0  # float32 softmax -> 1.0
    z = torch.cat([z, torch.stack(special), sat])
    y = torch.cat([y, torch.randint(0, 10, (len(special) + 20,), generator=g)])
    return z, y


@pytest.mark.parametrize("n_bins", [1, 2, 4, 10, 15, 20])
def test_ece_and_mce_match_torchmetrics_including_confidence_one_and_edges(n_bins):
    z, y = _with_exact_confidences(seed=n_bins)
    p = torch.softmax(z, dim=1)
    conf = p.max(dim=1).values
    assert (conf == 1.0).sum() >= 20
    edges = torch.linspace(0, 1, n_bins + 1)
    if n_bins in (2, 4, 10, 20):  # the test really exercises samples sitting on an inner edge
        assert torch.isin(conf, edges[1:-1]).any()
    # probabilities (not logits) go to torchmetrics so its logits-detection heuristic plays no role
    expected_ece = multiclass_calibration_error(p, y, num_classes=10, n_bins=n_bins, norm="l1")
    expected_mce = multiclass_calibration_error(p, y, num_classes=10, n_bins=n_bins, norm="max")
    assert M.ece(z, y, n_bins) == pytest.approx(float(expected_ece), abs=1e-6)
    assert M.mce(z, y, n_bins) == pytest.approx(float(expected_mce), abs=1e-6)


def _binned_gaps(conf: list[float], hit: list[float], bin_of) -> list[tuple[int, float]]:
    """(bin size, |acc_b - conf_b|) per non-empty bin, samples assigned by bin_of(confidence)."""
    bins: dict[int, list[int]] = {}
    for i, c in enumerate(conf):
        bins.setdefault(bin_of(c), []).append(i)
    return [(len(ix), abs(sum(hit[i] - conf[i] for i in ix)) / len(ix)) for ix in bins.values()]


def test_ece_hand_computed_with_confidence_one_in_its_own_top_bin():
    # Probabilities away from the edges 1/3, 2/3 (n_bins = 3), plus one saturated row (conf == 1.0).
    probs = torch.tensor(
        [[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.95, 0.03, 0.02], [0.6, 0.3, 0.1], [0.45, 0.35, 0.2]]
    )
    z = torch.cat([probs.log(), torch.tensor([[0.0, 200.0, 0.0]])])
    y = torch.tensor([0, 0, 0, 0, 2, 0])  # the saturated row is wrong
    conf = torch.softmax(z, dim=1).max(dim=1).values.double().tolist()
    hit = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert conf[-1] == 1.0
    # torchmetrics' rule: bin b = [b/3, (b+1)/3), conf == 1.0 in an extra bin 3 -> bin = floor(3 c).
    gaps = _binned_gaps(conf, hit, lambda c: math.floor(3 * c))
    expected = sum(size / 6 * gap for size, gap in gaps)
    assert M.ece(z, y, n_bins=3) == pytest.approx(expected, abs=1e-7)
    assert M.mce(z, y, n_bins=3) == pytest.approx(max(gap for _, gap in gaps), abs=1e-7)
    # Merging conf == 1.0 into [2/3, 1] would give another value: the test pins the convention down.
    merged = _binned_gaps(conf, hit, lambda c: min(math.floor(3 * c), 2))
    assert abs(sum(size / 6 * gap for size, gap in merged) - expected) > 1e-3


@pytest.mark.parametrize(("n", "n_bins"), [(7, 15), (100, 3), (1001, 15)])
def test_adaptive_ece_matches_loop(n, n_bins):
    z, y = _calibrated_ish(n, 5, seed=n)
    p = torch.softmax(z, dim=1).numpy().astype(np.float64)
    conf, hit = p.max(axis=1), (p.argmax(axis=1) == y.numpy()).astype(np.float64)
    expected = 0.0
    for ix in np.array_split(np.argsort(conf, kind="stable"), n_bins):
        if len(ix):
            expected += len(ix) / n * abs(hit[ix].mean() - conf[ix].mean())
    assert M.adaptive_ece(z, y, n_bins) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("n_bins", [4, 15])
def test_classwise_ece_matches_loop(n_bins):
    z, y = _calibrated_ish(800, 6, seed=3)
    z[:5] = 0.0
    z[torch.arange(5), torch.arange(5)] = 200.0  # p_k == 1.0 and p_k == 0.0 rows
    p = torch.softmax(z, dim=1).numpy().astype(np.float64)
    n, k = p.shape
    expected = 0.0
    for c in range(k):
        bins = np.floor(p[:, c] * n_bins).astype(int)  # == 1.0 -> bin n_bins, as in torchmetrics
        for b in np.unique(bins):
            m = bins == b
            expected += m.sum() / n * abs((y.numpy()[m] == c).mean() - p[m, c].mean())
    expected /= k
    assert M.classwise_ece(z, y, n_bins) == pytest.approx(expected, abs=1e-6)


def test_accuracy_nll_brier_overconfidence_match_direct_formulas():
    z, y = _calibrated_ish(500, 7, seed=11)
    p = torch.softmax(z.double(), dim=1)
    onehot = F.one_hot(y, 7).double()
    assert M.accuracy(z, y) == pytest.approx(float((z.argmax(1) == y).double().mean()), abs=1e-12)
    assert M.nll(z, y) == pytest.approx(float(F.cross_entropy(z.double(), y)), abs=1e-5)
    brier = float(((p - onehot) ** 2).sum(dim=1).mean())
    assert 0 <= M.brier(z, y) <= 2
    assert M.brier(z, y) == pytest.approx(brier, abs=1e-6)
    wrong = z.argmax(1) != y
    assert M.overconfidence_on_errors(z, y) == pytest.approx(float(p.max(1).values[wrong].mean()), abs=1e-6)
    # Brier of a certain wrong prediction is 2 (not divided by K); no error -> NaN overconfidence.
    assert M.brier(torch.tensor([[0.0, 200.0, 0.0]]), torch.tensor([0])) == pytest.approx(2.0)
    assert math.isnan(M.overconfidence_on_errors(torch.eye(3) * 5, torch.arange(3)))


def test_classification_metrics_agrees_with_single_functions():
    z, y = _calibrated_ish(300, 5, seed=5)
    out = M.classification_metrics(z, y, n_bins=10)
    # Every key is a metric the report knows; each one with a function of its own name equals it.
    assert set(out) <= set(vocabulary.METRIC_BY_NAME), set(out) - set(vocabulary.METRIC_BY_NAME)
    singles = [name for name in out if callable(getattr(M, name, None))]
    assert {"accuracy", "nll", "brier", "ece", "mce", "adaptive_ece", "classwise_ece"} <= set(singles)
    for name in singles:
        binned = "n_bins" in inspect.signature(getattr(M, name)).parameters
        assert out[name] == (getattr(M, name)(z, y, 10) if binned else getattr(M, name)(z, y)), name
    assert out["mean_confidence"] == pytest.approx(float(torch.softmax(z, 1).max(1).values.mean()), abs=1e-6)


def test_reliability_bins_per_bin_values_and_ece_reconstruction():
    z, y = _with_exact_confidences(seed=2)
    rb = M.reliability_bins(z, y, n_bins=10)
    assert all(v.shape == (11,) for v in rb.values())
    p = torch.softmax(z, 1)
    conf, pred = p.max(1)
    idx = torch.bucketize(conf, torch.linspace(0, 1, 11), right=True) - 1
    for b in range(11):
        m = idx == b
        assert rb["count"][b] == m.sum()
        if m.any():
            assert rb["accuracy"][b] == pytest.approx(float((pred[m] == y[m]).double().mean()), abs=1e-6)
            assert rb["confidence"][b] == pytest.approx(float(conf[m].double().mean()), abs=1e-6)
        else:
            assert math.isnan(rb["accuracy"][b]) and math.isnan(rb["confidence"][b])
    assert rb["count"][10] == (conf == 1.0).sum() > 0
    filled = rb["count"] > 0
    gap = (rb["count"] * (rb["accuracy"] - rb["confidence"]).abs())[filled].sum() / len(y)
    assert float(gap) == pytest.approx(M.ece(z, y, 10), abs=1e-9)


def test_results_do_not_depend_on_chunk_size(monkeypatch):
    z, y = _with_exact_confidences(seed=4)
    one = M.classification_metrics(z, y, chunk_size=10**9)
    tiny = M.classification_metrics(z, y, chunk_size=7)
    for key, value in one.items():
        assert tiny[key] == pytest.approx(value, abs=1e-6), key
    rb_one, rb_tiny = M.reliability_bins(z, y, chunk_size=10**9), M.reliability_bins(z, y, chunk_size=3)
    for key in rb_one:
        torch.testing.assert_close(rb_one[key], rb_tiny[key], equal_nan=True, atol=1e-6, rtol=0)
    monkeypatch.setattr(M, "CHUNK_SIZE", 5)  # the module-level default is read at call time
    assert M.classification_metrics(z, y) == pytest.approx(one, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_upcast(dtype):
    z, y = _calibrated_ish(200, 10, seed=6)
    low = z.to(dtype)
    out = M.classification_metrics(low, y)
    assert all(math.isfinite(v) for v in out.values())
    assert out == M.classification_metrics(low.float(), y)


def test_invalid_inputs_raise_value_error():
    z, y = _calibrated_ish(10, 3, seed=0)
    bad = [
        (torch.empty(0, 3), torch.empty(0, dtype=torch.long)),  # N = 0
        (z, y[:-1]),  # mismatched N
        (z[0], y),  # 1-D logits
        (z, y.float()),  # float labels
        (z, y + 3),  # label >= K
        (z.long(), y),  # integer logits
    ]
    for logits, labels in bad:
        for fn in (M.accuracy, M.nll, M.brier, M.ece, M.classification_metrics, M.fit_temperature):
            with pytest.raises(ValueError):
                fn(logits, labels)
    with pytest.raises(ValueError, match="n_bins"):
        M.ece(z, y, n_bins=0)
    with pytest.raises(ValueError, match="chunk_size"):
        M.nll(z, y, chunk_size=0)
