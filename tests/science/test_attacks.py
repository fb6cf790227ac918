"""Adversarial attacks on a small MLP trained for a second on sklearn's 8x8 digits scaled to [0, 1]."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from study.robustness.attacks import (
    ATTACKS,
    accuracy,
    adversarial_accuracy,
    dlr_loss,
    eps_for_data,
    fgsm,
    gradient_masking_flag,
    masking_gaps,
    pgd,
    robustness_rows,
    validate_attack,
)

CLAMP = (0.0, 1.0)
EPS = 0.1  # digits in [0, 1]: at 0.1 PGD leaves ~25% accuracy, FGSM ~30% (clean ~97%)


class Scaled(nn.Module):
    """Multiplies a model's logits by a constant: what LS-family training does to logit scale, exaggerated."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.scale


def _mlp(seed: int, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(dropout), nn.Linear(64, 10))


def _train(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    model = _mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):  # full batch: the sharpest (least robust) model for the budget, ~0.5 s
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1300], perm[1300:]
    model = _train(x[tr], y[tr], seed=0)
    source = _train(x[tr], y[tr], seed=1)
    return model, source, x[te], y[te]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_validation_messages():
    with pytest.raises(ValueError, match=r"attack must be one of .*but got 'pgd'"):
        validate_attack("pgd")
    assert validate_attack("pgd_dlr") == "pgd_dlr"
    model = nn.Linear(4, 3)
    x, y = torch.rand(2, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"eps must be .*>= 0.*but got -0.1"):
        fgsm(model, x, y, -0.1, clamp=None)
    with pytest.raises(ValueError, match=r"eps must be .*but got nan"):
        pgd(model, x, y, float("nan"))
    with pytest.raises(ValueError, match=r"loss must be one of \('ce', 'dlr'\).*but got 'mse'"):
        pgd(model, x, y, 0.1, loss="mse")
    with pytest.raises(ValueError, match="source_model must be given"):
        adversarial_accuracy(model, x, y, "transfer", 0.1)
    with pytest.raises(ValueError, match="attack must be one of"):
        robustness_rows(model, x, y, eps_list=[0.1], attacks=["cw"])


def test_dlr_matches_hand_computation():
    # z = [3, 1, 2, 0]: sorted 3, 2, 1. y = 0: -(3 - 2) / (3 - 1); y = 2: -(2 - 3) / (3 - 1).
    z = torch.tensor([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0]])
    torch.testing.assert_close(dlr_loss(z, torch.tensor([0, 2])), torch.tensor([-0.5, 0.5]))
    # Random logits against a numpy loop over the definition.
    zr = torch.randn(50, 6, generator=_gen(3), dtype=torch.float64)
    yr = torch.randint(0, 6, (50,), generator=_gen(4))
    expected = []
    for row, t in zip(zr.numpy(), yr.numpy(), strict=True):
        s = np.sort(row)[::-1]
        expected.append(-(row[t] - np.delete(row, t).max()) / (s[0] - s[2] + 1e-12))
    out = dlr_loss(zr, yr)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), np.array(expected), rtol=1e-5, atol=1e-6)
    # Shift- and scale-invariant (the point of DLR); computed in float32 even for bf16 logits.
    torch.testing.assert_close(dlr_loss(zr.float() * 1e3 + 7, yr), out, rtol=1e-4, atol=1e-5)
    assert dlr_loss(zr.bfloat16(), yr).dtype == torch.float32
    with pytest.raises(ValueError, match="K >= 3"):
        dlr_loss(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))


def test_eps_zero_changes_nothing(setup):
    model, source, x, y = setup
    assert torch.equal(fgsm(model, x, y, 0.0, clamp=CLAMP), x)
    assert torch.equal(pgd(model, x, y, 0.0, loss="dlr", clamp=CLAMP, generator=_gen()), x)
    clean = accuracy(model, x, y)
    assert clean > 0.9
    rows = robustness_rows(model, x, y, eps_list=[0.0, EPS], attacks=ATTACKS, source_model=source, steps=3)
    assert [(r["condition"], r["severity"]) for r in rows] == [(a, e) for a in ATTACKS for e in (0.0, EPS)]
    assert all(r["metric"] == "accuracy" for r in rows)
    assert all(r["value"] == clean for r in rows if r["severity"] == 0.0)
    assert all(r["value"] < clean - 0.3 for r in rows if r["severity"] == EPS)


def test_pgd_at_most_fgsm_at_most_clean(setup):
    model, _, x, y = setup
    clean = accuracy(model, x, y)
    acc_fgsm = adversarial_accuracy(model, x, y, "fgsm", EPS, clamp=CLAMP)
    acc_pgd = adversarial_accuracy(model, x, y, "pgd_ce", EPS, clamp=CLAMP, generator=_gen())
    assert acc_pgd <= acc_fgsm <= clean
    assert acc_pgd < clean - 0.5  # the attack really works, not just "does not increase accuracy"


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_perturbation_stays_in_ball_and_range(setup, loss):
    model, _, x, y = setup
    x = x[:200]
    y = y[:200]
    x_adv = pgd(model, x, y, EPS, loss=loss, steps=5, step_size=0.07, clamp=CLAMP, generator=_gen())
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    # Without clamp the digits' zero background is pushed below 0, by at most eps.
    free = pgd(model, x, y, EPS, loss=loss, steps=5, step_size=0.07, clamp=None, generator=_gen())
    assert (free - x).abs().max() <= EPS + 1e-6 and free.min() < 0.0
    # FGSM moves every input coordinate with a nonzero gradient by exactly eps.
    x_f = fgsm(model, x, y, EPS, clamp=None)
    moved = (x_f - x).abs()
    assert torch.allclose(moved[moved > 0], torch.tensor(EPS), atol=1e-6)
    assert (moved > 0).float().mean() > 0.5


def test_dlr_survives_logit_scaling_that_saturates_ce(setup):
    """Observed here: with logits x1e3, softmax saturates in float32 (exp(-104) underflows), CE input
    gradients are exactly zero for confident samples and PGD-CE collapses to its random start (accuracy
    ~0.96 vs ~0.25 unscaled at eps 0.1). DLR is scale-invariant, so PGD-DLR is unaffected."""
    model, _, x, y = setup
    scaled = Scaled(model, 1e3)
    clean = accuracy(model, x, y)
    assert accuracy(scaled, x, y) == clean
    dlr = adversarial_accuracy(model, x, y, "pgd_dlr", EPS, clamp=CLAMP, generator=_gen())
    dlr_scaled = adversarial_accuracy(scaled, x, y, "pgd_dlr", EPS, clamp=CLAMP, generator=_gen())
    assert abs(dlr_scaled - dlr) <= 0.02
    assert dlr_scaled < clean - 0.5
    ce = adversarial_accuracy(model, x, y, "pgd_ce", EPS, clamp=CLAMP, generator=_gen())
    ce_scaled = adversarial_accuracy(scaled, x, y, "pgd_ce", EPS, clamp=CLAMP, generator=_gen())
    assert ce_scaled > ce + 0.3  # deterministic IEEE underflow, so this does reliably happen
    # ... and the masking flag catches it on real rows, but not for the unscaled model.
    kw = dict(eps_list=[EPS], attacks=["pgd_ce", "pgd_dlr"], clamp=CLAMP)
    assert gradient_masking_flag(robustness_rows(scaled, x, y, **kw))
    assert not gradient_masking_flag(robustness_rows(model, x, y, **kw))


def test_transfer(setup):
    model, source, x, y = setup
    clean = accuracy(model, x, y)
    transfer = adversarial_accuracy(
        model, x, y, "transfer", EPS, source_model=source, clamp=CLAMP, generator=_gen()
    )
    white = adversarial_accuracy(model, x, y, "pgd_ce", EPS, clamp=CLAMP, generator=_gen())
    assert white <= transfer < clean - 0.3
    # Transfer from the model itself is white-box PGD-CE.
    self_transfer = adversarial_accuracy(
        model, x, y, "transfer", EPS, source_model=model, clamp=CLAMP, generator=_gen()
    )
    assert self_transfer == white


def test_gradient_masking_flag_on_hand_rows():
    def rows(ce, dlr=None, transfer=None, eps=0.03):
        out = [{"condition": "pgd_ce", "severity": eps, "metric": "accuracy", "value": ce}]
        if dlr is not None:
            out.append({"condition": "pgd_dlr", "severity": eps, "metric": "accuracy", "value": dlr})
        if transfer is not None:
            out.append({"condition": "transfer", "severity": eps, "metric": "accuracy", "value": transfer})
        return out

    assert gradient_masking_flag(rows(0.75, dlr=0.10))  # Fu et al.: LS "robust" under PGD-CE only
    assert gradient_masking_flag(rows(0.50, transfer=0.40))
    assert not gradient_masking_flag(rows(0.50, dlr=0.46, transfer=0.55))  # gap 0.04 <= margin
    assert gradient_masking_flag(rows(0.50, dlr=0.46), margin=0.03)
    assert not gradient_masking_flag(rows(0.20, dlr=0.30, transfer=0.60))  # stronger white-box: fine
    assert not gradient_masking_flag(rows(0.9))  # nothing to compare against
    # Comparisons only within the same eps; other metrics and conditions ignored.
    mixed = (
        rows(0.6, eps=0.01)
        + rows(0.2, dlr=0.16, eps=0.03)
        + [
            {"condition": "pgd_dlr", "severity": 0.01, "metric": "ece", "value": 0.0},
            {"condition": "fgsm", "severity": 0.01, "metric": "accuracy", "value": 0.0},
        ]
    )
    assert masking_gaps(mixed) == pytest.approx({0.03: 0.04})
    assert not gradient_masking_flag(mixed)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        gradient_masking_flag([], margin=-1)


def test_deterministic_with_generator_and_batching(setup):
    model, _, x, y = setup
    a = pgd(model, x, y, EPS, generator=_gen(5))
    assert torch.equal(a, pgd(model, x, y, EPS, generator=_gen(5)))
    assert not torch.equal(a, pgd(model, x, y, EPS, generator=_gen(6)))
    kw = dict(eps_list=[0.05, EPS], attacks=["fgsm", "pgd_ce"], clamp=CLAMP, seed=3)
    assert robustness_rows(model, x, y, **kw) == robustness_rows(model, x, y, **kw)
    # Without random draws the batch size cannot matter.
    by_batch = {adversarial_accuracy(model, x, y, "fgsm", EPS, batch_size=b, clamp=CLAMP) for b in (64, 1000)}
    assert len(by_batch) == 1


def test_no_parameter_grads_and_mode_restored(setup):
    _, _, x, y = setup
    model, source = _mlp(seed=2, dropout=0.5).train(), _mlp(seed=3).train()
    first = adversarial_accuracy(model, x, y, "transfer", EPS, source_model=source, generator=_gen())
    # Dropout was off during the attack: a second run with the same generator gives the same answer.
    assert first == adversarial_accuracy(model, x, y, "transfer", EPS, source_model=source, generator=_gen())
    for attack in ("fgsm", "pgd_dlr"):
        adversarial_accuracy(model, x, y, attack, EPS, generator=_gen())
    fgsm(model, x, y, EPS, clamp=None)
    assert model.training and source.training
    assert all(p.grad is None for p in [*model.parameters(), *source.parameters()])
    assert all(p.requires_grad for p in model.parameters())


def test_eps_for_data():
    assert eps_for_data(8 / 255, data_std=None, value_range=(0.0, 1.0)) == 8 / 255
    assert eps_for_data(8 / 255, data_std=0.3, value_range=(0.0, 1.0)) == 8 / 255
    assert eps_for_data(0.1, data_std=2.5, value_range=None) == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"data_std must be > 0 .*but got None"):
        eps_for_data(0.1, data_std=None, value_range=None)
    with pytest.raises(ValueError, match=r"eps must be .*but got -1"):
        eps_for_data(-1, data_std=1.0, value_range=None)


def _linear_ce_grad(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/dx of sum_i CE(W x_i + b, y_i) = (softmax(W x + b) - onehot(y)) W, in float64 (no autograd)."""
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    p = torch.softmax(x.double() @ w.T + b, dim=1)
    return (p - nn.functional.one_hot(y, w.shape[0]).double()) @ w


@pytest.mark.parametrize("eps,step", [(1.0, 0.05), (1.0, 0.3), (0.02, 0.05)])
def test_one_pgd_step_moves_each_coordinate_by_the_step_size(eps, step):
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    with torch.no_grad():
        layer.weight[:, 0] = 0.0  # input coordinate 0 does not matter: its gradient is exactly 0
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    sign = _linear_ce_grad(layer, x, y).sign().float()
    assert (sign[:, 0] == 0).all() and (sign[:, 1:] != 0).all()
    x_adv = pgd(layer, x, y, eps, steps=1, step_size=step, random_start=False, clamp=None)
    # From x itself (no random start) one step is x + step * sign(grad), then projected onto the eps-ball.
    moved = min(step, eps)
    torch.testing.assert_close(x_adv, x + moved * sign, rtol=0, atol=1e-6)
    assert torch.equal(x_adv[:, 0], x[:, 0])
    # Only the default step is eps / 4.
    x_default = pgd(layer, x, y, eps, steps=1, random_start=False, clamp=None)
    torch.testing.assert_close(x_default, x + eps / 4 * sign, rtol=0, atol=1e-6)


def test_step_size_validation():
    model, x, y = nn.Linear(4, 3), torch.rand(2, 4), torch.tensor([0, 1])
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"step_size must be a finite number > 0 .*but got {bad}"):
            pgd(model, x, y, 0.1, step_size=bad)
        with pytest.raises(ValueError, match="step_size must be"):
            robustness_rows(model, x, y, eps_list=[0.1], attacks=["pgd_ce"], step_size=bad)


def test_robustness_rows_pass_the_step_size_to_pgd(setup):
    model, source, x, y = setup
    attacks = ["fgsm", "pgd_ce", "pgd_dlr", "transfer"]
    kw = dict(eps_list=[EPS], attacks=attacks, source_model=source, steps=3, batch_size=len(x), seed=7)
    for step in (1e-4, 0.05):
        rows = {r["condition"]: r["value"] for r in robustness_rows(model, x, y, step_size=step, **kw)}
        direct = {
            "pgd_ce": pgd(model, x, y, EPS, steps=3, step_size=step, generator=_gen(7)),
            "pgd_dlr": pgd(model, x, y, EPS, steps=3, step_size=step, loss="dlr", generator=_gen(7)),
            "fgsm": fgsm(model, x, y, EPS, clamp=None),  # FGSM's step is eps whatever step_size says
        }
        for name, x_adv in direct.items():
            assert rows[name] == accuracy(model, x_adv, y), name
        crafted = pgd(source, x, y, EPS, steps=3, step_size=step, generator=_gen(7))
        assert rows["transfer"] == accuracy(model, crafted, y)
    # The step really changed the attack: a tiny step leaves PGD at its random start's accuracy, far
    # above the default eps / 4 steps.
    start = x + (2 * torch.rand(x.shape, generator=_gen(7)) - 1) * EPS
    tiny = {r["condition"]: r["value"] for r in robustness_rows(model, x, y, step_size=1e-7, **kw)}
    default = {r["condition"]: r["value"] for r in robustness_rows(model, x, y, **kw)}
    assert tiny["pgd_ce"] == accuracy(model, start, y)
    assert default["pgd_ce"] < tiny["pgd_ce"] - 0.3
