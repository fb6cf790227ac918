"""Values of temperature scaling, feature separation and the label-noise metrics."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from study import metrics as M


def _scaled_logits(t_true: float, n: int = 4000, k: int = 10, seed: int = 0):
    """Labels drawn from softmax(clean); the model reports t_true * clean, so the best T is ~t_true."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n, k, generator=g) * 2.0
    y = torch.multinomial(torch.softmax(clean, dim=1), 1, generator=g).squeeze(1)
    return t_true * clean, y


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_fit_temperature_recovers_scaling_and_lowers_nll(t_true):
    z, y = _scaled_logits(t_true, seed=int(10 * t_true))
    t = M.fit_temperature(z, y)
    # Independent optimiser on the same objective: the MLE of T, which sampling noise moves off t_true.
    ref = minimize_scalar(
        lambda s: float(F.cross_entropy(z.double() / s, y)), bounds=(0.05, 20), method="bounded"
    ).x
    assert t == pytest.approx(ref, rel=1e-3)
    assert t == pytest.approx(t_true, rel=0.1)
    assert M.nll(z / t, y) <= M.nll(z, y)
    # Chunked objective and gradient give the same fit.
    assert M.fit_temperature(z, y, chunk_size=333) == pytest.approx(t, rel=1e-4)


def test_calibration_after_temperature_scores_test_logits_divided_by_fitted_t():
    val_z, val_y = _scaled_logits(2.5, seed=1)
    test_z, test_y = _scaled_logits(2.5, n=1500, seed=2)
    out = M.calibration_after_temperature(val_z, val_y, test_z, test_y)
    assert set(out) == {"temperature", "ece_ts", "nll_ts", "adaptive_ece_ts", "brier_ts"}
    t = out["temperature"]
    assert t == pytest.approx(M.fit_temperature(val_z, val_y))
    scaled = test_z / t
    assert out["ece_ts"] == pytest.approx(M.ece(scaled, test_y), abs=1e-6)
    assert out["nll_ts"] == pytest.approx(M.nll(scaled, test_y), abs=1e-6)
    assert out["adaptive_ece_ts"] == pytest.approx(M.adaptive_ece(scaled, test_y), abs=1e-6)
    assert out["brier_ts"] == pytest.approx(M.brier(scaled, test_y), abs=1e-6)
    assert out["ece_ts"] < M.ece(test_z, test_y)  # overconfident by 2.5x before scaling
    with pytest.raises(ValueError, match="K = 10"):
        M.calibration_after_temperature(val_z, val_y, test_z[:, :5], test_y % 5)


def test_fit_temperature_rejects_bad_arguments():
    z, y = _scaled_logits(1.0, n=50)
    for kwargs in ({"max_iter": 0}, {"max_iter": -1}, {"max_iter": True}, {"max_iter": 2.0}):
        with pytest.raises(ValueError):
            M.fit_temperature(z, y, **kwargs)


def _brute_force_separation(x: torch.Tensor, y: torch.Tensor, include_self: bool) -> tuple[float, float]:
    """O(N^2) Kornblith et al. sums over explicit pair distances 1 - cos (per class-pair blocks)."""
    u = F.normalize(x.double(), dim=1)
    dist = 1 - u @ u.T
    classes = y.unique().tolist()
    blocks = {}
    for a in classes:
        for b in classes:
            block = dist[y == a][:, y == b]
            if a == b and not include_self:
                m = block.shape[0]
                blocks[a, b] = float(block.sum() - block.diagonal().sum()) / (m * (m - 1))
            else:
                blocks[a, b] = float(block.mean())
    d_within = float(np.mean([blocks[a, a] for a in classes]))
    d_total = float(np.mean(list(blocks.values())))
    return d_within, d_total


@pytest.mark.parametrize("include_self", [True, False])
def test_feature_separation_matches_brute_force(include_self):
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 5 + [2] * 17 + [5] * 9 + [3] * 2)  # unbalanced, label ids with gaps
    x = torch.randn(len(y), 8, generator=g) + 1.5 * F.one_hot(y, 8).float()
    x[3] = 0.0  # a zero row: cosine 0 with everything
    out = M.feature_separation(x, y, include_self_pairs=include_self, chunk_size=4)
    d_within, d_total = _brute_force_separation(x, y, include_self)
    assert out["d_within"] == pytest.approx(d_within, abs=1e-5)
    assert out["d_total"] == pytest.approx(d_total, abs=1e-5)
    assert out["r2"] == pytest.approx(1 - d_within / d_total, abs=1e-5)
    whole = M.feature_separation(x, y, include_self_pairs=include_self, chunk_size=10**6)
    assert whole == pytest.approx(out, abs=1e-9)
    assert M.feature_separation(x.bfloat16(), y)["r2"] == pytest.approx(
        M.feature_separation(x.bfloat16().float(), y)["r2"], abs=1e-9
    )


def test_feature_separation_r2_is_high_for_separated_and_low_for_collapsed_clusters():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(10).repeat_interleave(30)
    separated = F.one_hot(y, 16).float() * 5 + 0.3 * torch.randn(300, 16, generator=g)
    mixed = 5 + torch.randn(300, 16, generator=g)  # same distribution for every class
    r2_sep = M.feature_separation(separated, y)["r2"]
    r2_mix = M.feature_separation(mixed, y)["r2"]
    assert r2_sep > 0.8 and abs(r2_mix) < 0.05
    # shrinking within-class spread (what LS does) lowers d_within and raises r2
    tight = F.one_hot(y, 16).float() * 5 + 0.1 * torch.randn(300, 16, generator=g)
    assert M.feature_separation(tight, y)["d_within"] < M.feature_separation(separated, y)["d_within"]
    with pytest.raises(ValueError, match=">= 2 samples"):
        M.feature_separation(separated[:31], y[:31], include_self_pairs=False)
    with pytest.raises(ValueError):
        M.feature_separation(separated, y[:-1])


def test_memorisation_and_clean_label_recovery_on_hand_built_example():
    pred = torch.tensor([1, 2, 0, 0, 1, 3])
    logits = F.one_hot(pred, 4).float() * 3
    clean = torch.tensor([0, 1, 0, 0, 1, 3])
    noisy = torch.tensor([1, 0, 2, 0, 1, 3])  # rows 0, 1, 2 flipped
    flipped = noisy != clean
    # flipped rows: 0 predicted noisy (1); 1 predicted neither (2); 2 predicted clean (0)
    assert M.memorisation_rate(logits, noisy, flipped) == pytest.approx(1 / 3)
    assert M.clean_label_recovery(logits, clean, flipped) == pytest.approx(1 / 3)
    assert M.memorisation_rate(logits, noisy, flipped, chunk_size=1) == pytest.approx(1 / 3)
    assert math.isnan(M.memorisation_rate(logits, noisy, torch.zeros(6, dtype=torch.bool)))
    assert math.isnan(M.clean_label_recovery(logits, clean, torch.zeros(6, dtype=torch.bool)))
    assert M.memorisation_rate(logits.bfloat16(), noisy, flipped) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="flipped"):
        M.memorisation_rate(logits, noisy, flipped.long())
    with pytest.raises(ValueError):
        M.memorisation_rate(logits, noisy[:5], flipped)
