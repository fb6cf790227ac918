"""Values checked against independent references where the first versions were slightly off: focal
gradients at large logits (float64 autograd), temperature scaling's optimum (scipy), CIFAR-100 coarse
labels for exactly 100 samples, online label smoothing's update for a class with no correct prediction.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from study import metrics as M
from study.noise import corrupt
from study.regularizers import create


def _focal_float64(z: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """-(1 - p_y)^gamma log p_y written out, in float64."""
    log_p = torch.log_softmax(z, 1).gather(1, y[:, None]).squeeze(1)
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()


@pytest.mark.parametrize("offset", [1e3, -1e3, 0.0])
@pytest.mark.parametrize("gamma", [0.5, 2.0, 5.0])
def test_focal_gradient_matches_float64_at_large_logits(offset: float, gamma: float) -> None:
    g = torch.Generator().manual_seed(0)
    z = offset + 3.0 * torch.randn(256, 10, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    a = z.clone().requires_grad_(True)
    create("focal", gamma=gamma)(a, y).backward()
    b = z.double().requires_grad_(True)
    _focal_float64(b, y, gamma).backward()
    err = float((a.grad.double() - b.grad).abs().max() / b.grad.abs().max())
    # float32 arithmetic on O(1) shifted logits: ~1e-6. Unshifted at |z| ~ 1e3 this was 2e-4 to 3e-3.
    assert err < 2e-5, err


def _scaled_logits(t_true: float, n: int = 4000, k: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n, k, generator=g) * 2.0
    y = torch.multinomial(torch.softmax(clean, dim=1), 1, generator=g).squeeze(1)
    return t_true * clean, y


@pytest.mark.parametrize("t_true", [0.02, 0.3, 1.0, 1.5, 8.0, 100.0])
def test_fit_temperature_reaches_the_nll_optimum(t_true: float) -> None:
    """t_true 1.0: the old LBFGS (lr 0.01 from T = 1.5) stopped 0.43% short of the optimal T."""
    z, y = _scaled_logits(t_true)
    t = M.fit_temperature(z, y)

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(z.double() * math.exp(-log_t), y))

    ref = minimize_scalar(
        nll, bounds=(math.log(1e-3), math.log(1e3)), method="bounded", options={"xatol": 1e-10}
    )
    assert t == pytest.approx(math.exp(ref.x), rel=1e-6)
    assert nll(math.log(t)) <= ref.fun + 1e-12
    assert M.fit_temperature(z, y, chunk_size=333) == pytest.approx(t, rel=1e-9)


def test_fit_temperature_at_its_bounds_and_on_nan():
    y = torch.arange(10).repeat(20)
    separable = 5.0 * F.one_hot(y, 10).float()  # NLL falls all the way to T -> 0
    assert M.fit_temperature(separable, y) == pytest.approx(M.T_MIN)
    uninformative = torch.randn(200, 10, generator=torch.Generator().manual_seed(1))  # best T -> inf
    assert M.fit_temperature(uninformative, torch.randint(0, 10, (200,))) > 1.0
    with pytest.raises(RuntimeError, match="not finite"):
        M.fit_temperature(torch.full((20, 10), math.nan), y[:20])


def test_cifar100_coarse_labels_of_exactly_100_samples_are_read_per_sample():
    """N = K = 100: the per-sample coarse labels were taken for the fine->coarse vector."""
    rng = np.random.default_rng(7)
    coarse_of_fine = rng.permutation(np.repeat(np.arange(20), 5))
    y = rng.permutation(100)  # every fine class once, not in index order
    per_sample = coarse_of_fine[y]
    # rate 1: every sample moves to the next fine class of its superclass (members sorted, cyclic).
    expected = []
    for f in y:
        members = sorted(np.flatnonzero(coarse_of_fine == coarse_of_fine[f]).tolist())
        expected.append(members[(members.index(f) + 1) % len(members)])
    res = corrupt(y, 100, "asymmetric", 1.0, seed=0, dataset="cifar100", coarse_labels=per_sample)
    assert res.labels.tolist() == expected
    assert np.all(coarse_of_fine[res.labels.numpy()] == per_sample)
    # With any other N the fine->coarse vector still works.
    y2 = np.tile(np.arange(100), 3)
    res2 = corrupt(y2, 100, "asymmetric", 1.0, seed=0, dataset="cifar100", coarse_labels=coarse_of_fine)
    assert res2.labels[:100].tolist() == [expected[list(y).index(f)] for f in range(100)]


def test_ols_class_without_correct_prediction_keeps_its_previous_column():
    """Documented choice (the authors' code zeroes the column): epoch 2 without a correct prediction of
    class 0 keeps the column learned in epoch 1, not the initial one and not zeros."""
    ols = create("online_label_smoothing", alpha=0.5).train()
    y = torch.tensor([0, 0, 1, 2])
    right = torch.tensor([[4.0, 1.0, 0.0], [3.0, 0.0, 1.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    ols(right, y)
    ols.on_epoch_end()
    learned = ols.soft_labels[:, 0].clone()
    np.testing.assert_allclose(learned.numpy(), torch.softmax(right[:2], 1).mean(0).numpy(), rtol=1e-6)
    wrong = right.clone()
    wrong[:2] = torch.tensor([0.0, 6.0, 0.0])  # class 0 now never predicted correctly
    ols(wrong, y)
    ols.on_epoch_end()
    assert torch.equal(ols.soft_labels[:, 0], learned)
    assert ols.soft_labels[:, 0].sum().item() == pytest.approx(1.0)
