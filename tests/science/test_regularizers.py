"""Values of every regularizer against the formulas of reference.md, computed independently here
(numpy float64), plus the properties shared by the whole registry: neutral strength == CE, batch-mean
reduction, finiteness in bf16 and at |z| ~ 1e4."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import log_softmax

from study.regularizers import create, get_info, list_regularizers
from study.regularizers._label_smoothing import ls_decomposition

FAST = settings(max_examples=25, deadline=None)


def batch(seed: int, b: int = 16, k: int = 5, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(b, k, generator=g), torch.randint(k, (b,), generator=g)


def np_of(z: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return z.double().numpy(), y.numpy()


def np_ce(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -log_softmax(z, axis=1)[np.arange(len(y)), y]


def np_entropy(z: np.ndarray) -> np.ndarray:
    p = np.exp(log_softmax(z, axis=1))
    return -(p * np.log(np.clip(p, 1e-300, None))).sum(1)


def close(actual: torch.Tensor, expected: float | np.ndarray, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(actual.detach().double().numpy(), expected, rtol=rtol, atol=atol)


NEUTRAL_NAMES = [
    n
    for n in list_regularizers()
    if get_info(n).strength is None or get_info(n).params[get_info(n).strength].neutral is not None
]


# ---------------------------------------------------------------- registry-wide properties


def test_only_logitnorm_lacks_a_neutral_strength() -> None:
    assert set(list_regularizers()) - set(NEUTRAL_NAMES) == {"logitnorm"}
    z, y = batch(0)
    # tau rescales normalized logits; no tau gives CE (here: not even the default).
    assert not torch.allclose(create("logitnorm")(z, y), F.cross_entropy(z, y))


@pytest.mark.parametrize("k", [2, 3, 10])
@pytest.mark.parametrize("name", NEUTRAL_NAMES)
def test_neutral_strength_equals_cross_entropy(name: str, k: int) -> None:
    info = get_info(name)
    params = {} if info.strength is None else {info.strength: info.params[info.strength].neutral}
    loss_fn = create(name, **params).train()
    for seed in range(3):
        z, y = batch(seed, b=12, k=k)
        close(loss_fn(z, y), F.cross_entropy(z, y).item(), rtol=1e-6)
    loss_fn.on_epoch_end()  # OLS: S changes, but with alpha = 1 its weight is 0
    close(loss_fn(z, y), F.cross_entropy(z, y).item(), rtol=1e-6)


def _ready(name: str) -> torch.nn.Module:
    """A regularizer at a non-neutral strength, deterministic (eval mode) and with non-trivial state."""
    params = {"threshold": 1.0} if name == "confidence_penalty" else {}
    loss_fn = create(name, **params)
    if name == "online_label_smoothing":
        z, y = batch(99, b=64, k=5)
        loss_fn(z, y)
        loss_fn.on_epoch_end()
    return loss_fn.eval()


@pytest.mark.parametrize("name", list_regularizers())
def test_batch_loss_is_mean_of_single_sample_losses(name: str) -> None:
    # Catches sum-instead-of-mean and mean-over-(B, K) reductions.
    loss_fn = _ready(name)
    z, y = batch(1, b=7, k=5)
    singles = torch.stack([loss_fn(z[i : i + 1], y[i : i + 1]) for i in range(len(y))])
    batch_loss = loss_fn(z, y)
    assert batch_loss.ndim == 0 and batch_loss.dtype == torch.float32
    close(batch_loss, singles.mean().item(), rtol=1e-6)
    close(loss_fn.per_sample_loss(z, y), singles.detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", list_regularizers())
@pytest.mark.parametrize("case", ["bf16", "huge", "huge_bf16"])
def test_loss_and_gradient_are_finite(name: str, case: str) -> None:
    variants = [{}]
    if name == "focal":
        variants += [{"gamma": 0.5}, {"adaptive": True}]
    if name == "confidence_penalty":
        variants += [{"threshold": 0.5}]
    if name == "label_smoothing":
        variants += [{"alpha": -5.0}]
    z0, y = batch(2, b=8, k=6, scale=1e4 if case.startswith("huge") else 3.0)
    # Make some targets the argmax so that p_y rounds to exactly 1 at this scale.
    y[:4] = z0[:4].argmax(1)
    for params in variants:
        loss_fn = create(name, **params).train()
        z = (z0.bfloat16() if case.endswith("bf16") else z0.clone()).requires_grad_(True)
        loss = loss_fn(z, y)
        loss.backward()
        assert torch.isfinite(loss), (params, loss)
        assert torch.isfinite(z.grad.float()).all(), params
        assert all(torch.isfinite(v) for v in loss_fn.terms(z, y).values())


@pytest.mark.parametrize("name", list_regularizers())
def test_terms_are_detached_batch_means_with_ce(name: str) -> None:
    loss_fn = _ready(name)
    z, y = batch(3)
    z.requires_grad_(True)
    terms = loss_fn.terms(z, y)
    assert all(v.ndim == 0 and not v.requires_grad for v in terms.values())
    close(terms["ce"], F.cross_entropy(z, y).item())


# ---------------------------------------------------------------- label smoothing


@FAST
@given(alpha=st.floats(0.0, 1.0, exclude_max=True), seed=st.integers(0, 10**6), k=st.integers(2, 12))
def test_label_smoothing_matches_pytorch(alpha: float, seed: int, k: int) -> None:
    z, y = batch(seed, k=k)
    close(create("label_smoothing", alpha=alpha)(z, y), F.cross_entropy(z, y, label_smoothing=alpha).item())


@FAST
@given(alpha=st.floats(-10.0, 1.0, exclude_max=True), seed=st.integers(0, 10**6), k=st.integers(2, 12))
def test_label_smoothing_equals_ce_plus_logit_gap(alpha: float, seed: int, k: int) -> None:
    z, y = batch(seed, k=k)
    zn, yn = np_of(z, y)
    z_gt = zn[np.arange(len(yn)), yn]
    expected = np.mean(np_ce(zn, yn) + alpha * (z_gt - zn.mean(1)))
    close(create("label_smoothing", alpha=alpha)(z, y), expected, rtol=1e-5, atol=1e-4)


def ls_split_loop(z: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The MaxSup paper's split of alpha (z_gt - z_mean), written as explicit loops."""
    k = z.shape[1]
    reg, amp = np.zeros(len(y)), np.zeros(len(y))
    for i in range(len(y)):
        gt = z[i, y[i]]
        for j in range(k):
            if z[i, j] < gt:
                reg[i] += alpha / k * (gt - z[i, j])
            elif z[i, j] > gt:
                amp[i] += alpha / k * (gt - z[i, j])
    return reg, amp


@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_label_smoothing_decomposition(alpha: float) -> None:
    z, y = batch(4, b=32, k=7)
    zn, yn = np_of(z, y)
    reg, amp = ls_split_loop(zn, yn, alpha)
    parts = ls_decomposition(z, y, alpha)
    close(parts["regularization"], reg)
    close(parts["error_amplification"], amp)
    assert (reg >= 0).all() and (amp <= 0).all()
    correct = zn.argmax(1) == yn
    assert correct.any() and (~correct).any()
    assert (amp[correct] == 0).all() and (amp[~correct] < 0).all()
    gap = alpha * (zn[np.arange(len(yn)), yn] - zn.mean(1))
    np.testing.assert_allclose(reg + amp, gap, atol=1e-5)
    terms = create("label_smoothing", alpha=alpha).terms(z, y)
    close(terms["regularization"], reg.mean())
    close(terms["error_amplification"], amp.mean())
    close(terms["regularization"] + terms["error_amplification"], gap.mean())


# ---------------------------------------------------------------- maxsup


@FAST
@given(alpha=st.floats(0.0, 1.0), seed=st.integers(0, 10**6), k=st.integers(2, 12))
def test_maxsup_value(alpha: float, seed: int, k: int) -> None:
    z, y = batch(seed, k=k)
    zn, yn = np_of(z, y)
    expected = np.mean(np_ce(zn, yn) + alpha * (zn.max(1) - zn.mean(1)))
    close(create("maxsup", alpha=alpha)(z, y), expected, atol=1e-4)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_maxsup_gradient(k: int) -> None:
    alpha, b = 0.2, 9
    z, y = batch(5, b=b, k=k)
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    create("maxsup", alpha=alpha)(z1, y).backward()
    F.cross_entropy(z2, y).backward()
    expected = torch.full((b, k), -alpha / k, dtype=torch.float64)
    expected[torch.arange(b), z.argmax(1)] = alpha * (1 - 1 / k)
    close(z1.grad - z2.grad, (expected / b).numpy(), atol=1e-6)  # / b: batch mean


def test_maxsup_terms() -> None:
    alpha = 0.15
    z, y = batch(6, b=20, k=6)
    zn, _ = np_of(z, y)
    terms = create("maxsup", alpha=alpha).terms(z, y)
    # z_gt -> z_max in the LS split: every k has z_k <= z_max, so all of it is "regularization".
    close(terms["regularization"], np.mean(alpha * (zn.max(1) - zn.mean(1))))
    assert terms["error_amplification"].item() == 0.0


# ---------------------------------------------------------------- confidence penalty


@FAST
@given(beta=st.floats(0.0, 10.0), seed=st.integers(0, 10**6), k=st.integers(2, 12))
def test_confidence_penalty_value(beta: float, seed: int, k: int) -> None:
    z, y = batch(seed, k=k)
    zn, yn = np_of(z, y)
    close(
        create("confidence_penalty", beta=beta)(z, y),
        np.mean(np_ce(zn, yn) - beta * np_entropy(zn)),
        atol=1e-4,
    )
    close(create("confidence_penalty").terms(z, y)["entropy"], np_entropy(zn).mean())


@pytest.mark.parametrize("threshold", [0.0, 0.3, 1.0, 5.0])
def test_confidence_penalty_hinge(threshold: float) -> None:
    beta = 0.5
    z, y = batch(7, b=32, k=5)
    zn, yn = np_of(z, y)
    h = np_entropy(zn)
    expected = np.mean(np_ce(zn, yn) + beta * np.maximum(0.0, threshold - h))
    close(create("confidence_penalty", beta=beta, threshold=threshold)(z, y), expected)
    if 0.0 < threshold < 1.0:
        assert (h < threshold).any() and (h > threshold).any()  # both hinge branches exercised


def test_confidence_penalty_hinge_above_max_entropy_has_plain_gradient() -> None:
    # With G > log K the hinge is always active: CE - b H + b G, i.e. the plain penalty shifted.
    z, y = batch(8, k=5)
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    hinge = create("confidence_penalty", beta=0.3, threshold=2.0)(z1, y)
    plain = create("confidence_penalty", beta=0.3)(z2, y)
    close(hinge, plain.item() + 0.3 * 2.0)
    hinge.backward()
    plain.backward()
    close(z1.grad, z2.grad.numpy(), atol=1e-7)


# ---------------------------------------------------------------- logit penalty, logitnorm, focal


@FAST
@given(beta=st.floats(0.0, 1.0), seed=st.integers(0, 10**6))
def test_logit_penalty_value(beta: float, seed: int) -> None:
    z, y = batch(seed)
    zn, yn = np_of(z, y)
    sq = (zn**2).sum(1)
    close(create("logit_penalty", beta=beta)(z, y), np.mean(np_ce(zn, yn) + beta / 2 * sq), atol=1e-4)
    close(create("logit_penalty").terms(z, y)["logit_norm_sq"], sq.mean(), rtol=1e-5)


@FAST
@given(tau=st.floats(0.005, 10.0), seed=st.integers(0, 10**6))
def test_logitnorm_value(tau: float, seed: int) -> None:
    z, y = batch(seed)
    zn, yn = np_of(z, y)
    normalized = zn / (tau * np.linalg.norm(zn, axis=1, keepdims=True))
    close(create("logitnorm", tau=tau)(z, y), np.mean(np_ce(normalized, yn)), rtol=1e-4, atol=1e-4)


def np_focal(z: np.ndarray, y: np.ndarray, gamma: float | np.ndarray) -> np.ndarray:
    p_y = np.exp(log_softmax(z, axis=1))[np.arange(len(y)), y]
    return -((1 - p_y) ** gamma) * np.log(p_y)


@FAST
@given(gamma=st.floats(0.0, 10.0), seed=st.integers(0, 10**6), k=st.integers(2, 12))
def test_focal_value(gamma: float, seed: int, k: int) -> None:
    z, y = batch(seed, k=k)
    zn, yn = np_of(z, y)
    close(create("focal", gamma=gamma)(z, y), np.mean(np_focal(zn, yn, gamma)), atol=1e-5)


def test_focal_flsd53_switches_gamma_at_p_0_2() -> None:
    z, y = batch(9, b=64, k=10, scale=2.0)
    zn, yn = np_of(z, y)
    p_y = np.exp(log_softmax(zn, axis=1))[np.arange(len(yn)), yn]
    assert (p_y < 0.2).any() and (p_y >= 0.2).any()
    gamma = np.where(p_y < 0.2, 5.0, 3.0)
    loss_fn = create("focal", adaptive=True, gamma=1.0)  # gamma is ignored when adaptive
    close(loss_fn(z, y), np.mean(np_focal(zn, yn, gamma)), atol=1e-6)
    close(loss_fn.per_sample_loss(z, y), np_focal(zn, yn, gamma), atol=1e-6)


# ---------------------------------------------------------------- online label smoothing


def test_ols_initial_matrix_and_loss() -> None:
    k, eps, alpha = 6, 0.2, 0.3
    loss_fn = create("online_label_smoothing", alpha=alpha, eps=eps)
    z, y = batch(10, b=24, k=k)
    soft_ce_before = loss_fn.terms(z, y)["soft_ce"]  # terms() alone must not create the state
    assert loss_fn.soft_labels.numel() == 0
    loss = loss_fn(z, y)
    s = loss_fn.soft_labels.double().numpy()
    expected_s = np.full((k, k), eps / (k - 1))
    np.fill_diagonal(expected_s, 1 - eps)
    np.testing.assert_allclose(s, expected_s, rtol=1e-6)
    np.testing.assert_allclose(s.sum(0), 1.0, rtol=1e-6)
    zn, yn = np_of(z, y)
    soft_ce = -(expected_s[:, yn].T * log_softmax(zn, axis=1)).sum(1)
    close(loss, np.mean(alpha * np_ce(zn, yn) + (1 - alpha) * soft_ce))
    close(soft_ce_before, soft_ce.mean())
    close(loss_fn.terms(z, y)["soft_ce"], soft_ce.mean())


def test_ols_epoch_update_uses_correct_predictions_only() -> None:
    k, alpha = 4, 0.5
    loss_fn = create("online_label_smoothing", alpha=alpha).train()
    batches = [batch(s, b=16, k=k) for s in (11, 12, 13)]
    # Class 3 never classified correctly: its column must stay at the initial one.
    batches = [(z.index_fill(1, torch.tensor([3]), -50.0), y) for z, y in batches]
    for z, y in batches:
        loss_fn(z, y)
    initial = loss_fn.initial_soft_labels(k).double().numpy()
    np.testing.assert_allclose(loss_fn.soft_labels.double().numpy(), initial)  # no update before epoch end
    loss_fn.on_epoch_end()
    s = loss_fn.soft_labels.double().numpy()
    zs = np.concatenate([np_of(z, y)[0] for z, y in batches])
    ys = np.concatenate([np_of(z, y)[1] for z, y in batches])
    p = np.exp(log_softmax(zs, axis=1))
    correct = p.argmax(1) == ys
    for c in range(k):
        mask = correct & (ys == c)
        if c == 3:
            assert not mask.any()
            np.testing.assert_allclose(s[:, c], initial[:, c])
        else:
            assert mask.any()
            np.testing.assert_allclose(s[:, c], p[mask].mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s.sum(0), 1.0, rtol=1e-5)
    # The next loss uses the updated S[:, y]; eval mode does not accumulate.
    z, y = batches[0]
    zn, yn = np_of(z, y)
    soft_ce = -(s[:, yn].T * log_softmax(zn, axis=1)).sum(1)
    loss_fn.eval()
    close(loss_fn(z, y), np.mean(alpha * np_ce(zn, yn) + (1 - alpha) * soft_ce))
    assert loss_fn.correct_count.sum().item() == 0
    loss_fn.on_epoch_end()
    np.testing.assert_allclose(loss_fn.soft_labels.double().numpy(), s)


def test_ols_state_dict_round_trip_into_fresh_instance() -> None:
    trained = create("online_label_smoothing", alpha=0.4)
    z, y = batch(14, b=32, k=5)
    trained(z, y)
    trained.on_epoch_end()
    fresh = create("online_label_smoothing", alpha=0.4)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.soft_labels, trained.soft_labels)
    assert torch.equal(fresh.eval()(z, y), trained.eval()(z, y))
    with pytest.raises(ValueError, match="must have 5 classes"):
        fresh(torch.randn(2, 3), torch.tensor([0, 1]))


# ---------------------------------------------------------------- disturb label


@pytest.mark.parametrize(("rate", "k"), [(0.1, 10), (0.3, 4), (1.0, 2)])
def test_disturb_label_changes_rate_times_k_minus_1_over_k(rate: float, k: int) -> None:
    loss_fn = create("disturb_label", rate=rate, seed=3)
    n_batches, b = 200, 100
    y = torch.randint(k, (b,), generator=torch.Generator().manual_seed(0))
    changed = sum((loss_fn.disturb(y, k) != y).sum().item() for _ in range(n_batches))
    p, n = rate * (k - 1) / k, n_batches * b
    assert abs(changed / n - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_disturb_label_loss_is_ce_on_disturbed_labels_and_seeded() -> None:
    z, y = batch(15, b=64, k=5)
    a, b = create("disturb_label", rate=0.5, seed=7), create("disturb_label", rate=0.5, seed=7)
    twin = create("disturb_label", rate=0.5, seed=7)
    losses_a = [a(z, y) for _ in range(3)]
    losses_b = [b(z, y) for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(losses_a, losses_b, strict=True))
    for loss in losses_a:
        close(loss, F.cross_entropy(z, twin.disturb(y, 5)).item(), rtol=1e-6)
    other = create("disturb_label", rate=0.5, seed=8)
    assert not torch.equal(other(z, y), losses_a[0])
    assert not torch.allclose(losses_a[0], F.cross_entropy(z, y))


def test_disturb_label_eval_mode_and_rate_zero_are_ce() -> None:
    z, y = batch(16, b=64, k=5)
    ce = F.cross_entropy(z, y)
    assert torch.equal(create("disturb_label", rate=0.9).eval()(z, y), ce)
    assert torch.equal(create("disturb_label", rate=0.0).train()(z, y), ce)


def test_disturb_label_generator_state_round_trips() -> None:
    z, y = batch(17, b=64, k=5)
    a = create("disturb_label", rate=0.5, seed=1)
    a(z, y)
    b = create("disturb_label", rate=0.5, seed=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(z, y), b(z, y))
    c = create("disturb_label", rate=0.5, seed=3)
    c.generator.set_state(a.generator.get_state())  # the public generator is the one that draws
    assert torch.equal(a(z, y), c(z, y))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list_regularizers())
def test_cuda_matches_cpu(name: str) -> None:
    # Same values on the GPU (float32 compute), state kept on the logits' device, and DisturbLabel
    # draws the same labels on both devices (its generator lives on the CPU).
    z, y = batch(20, b=32, k=7)
    cpu, gpu = create(name).train(), create(name).train().cuda()
    for _ in range(2):
        expected = cpu(z, y)
        actual = gpu(z.cuda(), y.cuda())
        assert actual.device.type == "cuda"
        close(actual.cpu(), expected.item(), rtol=1e-5)
        cpu.on_epoch_end()
        gpu.on_epoch_end()
    assert torch.isfinite(gpu(z.cuda().bfloat16(), y.cuda()))


def test_forward_with_uses_the_given_values_and_keeps_the_current_ones():
    torch.manual_seed(0)
    z, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    reg = create("label_smoothing", alpha=0.1)
    other = create("label_smoothing", alpha=0.3)
    torch.testing.assert_close(reg.forward_with(z, y, {"alpha": 0.3}), other(z, y), rtol=0, atol=0)
    assert reg.param("alpha") == 0.1
    torch.testing.assert_close(reg(z, y), create("label_smoothing", alpha=0.1)(z, y))
    # Per-setting tensors under vmap: one instance evaluates several strengths at once.
    alphas = torch.tensor([0.0, 0.2, 0.4])
    batched = torch.func.vmap(reg.forward_with)(z.expand(3, 6, 4), y.expand(3, 6), {"alpha": alphas})
    expected = torch.stack([create("label_smoothing", alpha=a)(z, y) for a in (0.0, 0.2, 0.4)])
    torch.testing.assert_close(batched, expected, rtol=1e-6, atol=1e-7)
