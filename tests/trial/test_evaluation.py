"""study.evaluation's attack rows: the spec's `evaluate.pgd_step_size` reaches PGD in the units of eps.

Each check compares the accuracy row that the evaluation computes from a spec's `evaluate:` block with a PGD
written out here from its definition (reference.md: random start in the eps-ball, steps of size alpha,
projection after every step) on a logistic-regression model, whose input gradient is analytic:
d/dx CE(Wx + b, y) = (softmax(Wx + b) - onehot(y)) W. No autograd, no study.attacks in the expected values.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from study import data
from study.spec import EvaluateSpec, SpecError, parse_spec
from study.trial import evaluate as evaluation
from study.trial.config import TrialConfig
from study.trial.run import prepare_data

CPU = torch.device("cpu")
EPS = 0.5  # signals, as the user writes it: in units of the data std
EPS_IMAGE = 0.1  # digits in [0, 1]: pixel units
STD = 3.0  # std of the synthetic signals, far from 1 so that a missing conversion shows


def _signal_bundle() -> data.DatasetBundle:
    """4 Gaussian classes of length-12 signals scaled to std ~3: standardised-signal data (no valid range)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 1, 12, generator=g)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 4, (n,), generator=g)
        return STD * (mu[y] + 0.8 * torch.randn(n, 1, 12, generator=g)), y

    (x_tr, y_tr), (x_te, y_te) = split(300), split(200)
    mean, std = float(x_tr.mean()), float(x_tr.std(unbiased=False))
    return data.DatasetBundle(
        name="synthetic", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, num_classes=4,
        input_shape=(1, 12), kind="signal", value_range=None, mean=(mean,), std=(std,), data_std=std,
    )  # fmt: skip


@pytest.fixture(scope="module")
def signal() -> data.DatasetBundle:
    return _signal_bundle()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> data.DatasetBundle:
    return data.load_dataset("digits", root=tmp_path_factory.mktemp("cache"), max_train=600, max_test=300)


def _linear(bundle: data.DatasetBundle, seed: int) -> nn.Sequential:
    """Logistic regression fitted full-batch (~0.1 s): accurate enough that attacks have work to do."""
    torch.manual_seed(seed)
    d = int(torch.tensor(bundle.input_shape).prod())
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, bundle.num_classes))
    x = bundle.to_float(bundle.x_train)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), bundle.y_train).backward()
        opt.step()
    return model.eval()


def _pgd_by_hand(
    model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
    seed: int, clamp: tuple[float, float] | None,
) -> torch.Tensor:  # fmt: skip
    """PGD-CE from its definition; random start drawn like the study draws it (torch.rand, seeded)."""
    layer = model[1]
    w, b = layer.weight.detach().double(), layer.bias.detach().double()

    def clip(v: torch.Tensor) -> torch.Tensor:
        return v if clamp is None else v.clamp(*clamp)

    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
    x_adv = clip(x + (2 * u - 1) * eps)
    for _ in range(steps):
        p = torch.softmax(x_adv.flatten(1).double() @ w.T + b, dim=1)
        grad = ((p - nn.functional.one_hot(y, w.shape[0]).double()) @ w).view_as(x)
        x_adv = x_adv + alpha * grad.sign().float()
        x_adv = clip(torch.minimum(torch.maximum(x_adv, x - eps), x + eps))
    return x_adv


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum()) / len(y)


def _evaluate_block(dataset: str, **evaluate) -> EvaluateSpec:
    """The evaluate block a final trial gets (Cell.trial_config: the spec's own EvaluateSpec)."""
    raw = {"name": "t", "dataset": {"name": dataset}, "models": ["mlp"], "regularizers": ["ce"]}
    spec = parse_spec(yaml.safe_dump({**raw, "evaluate": evaluate}))
    return spec.evaluate


def _pgd_row(model, bundle, evaluate: EvaluateSpec, seed: int) -> float:
    cfg = TrialConfig(dataset={"name": bundle.name}, seed=seed, train={"device": "cpu"}, evaluate=evaluate)
    rows = evaluation.robustness_rows(model, prepare_data(cfg, bundle), cfg, CPU)
    (value,) = [r["value"] for r in rows if r["condition"] == "pgd_ce" and r["metric"] == "accuracy"]
    assert [r["severity"] for r in rows if r["condition"] == "pgd_ce" and r["metric"] == "accuracy"] == [EPS]
    return value


@pytest.mark.parametrize("step", [None, 1e-6, 0.05, 0.3])
def test_signal_step_size_is_in_std_units_like_eps(signal, step):
    model = _linear(signal, seed=0)
    evaluate = _evaluate_block("mnist1d", attacks=["pgd_ce"], eps=[EPS], pgd_steps=2, pgd_step_size=step)
    assert evaluate.pgd_step_size == step  # the field travels in the trial's evaluate block
    got = _pgd_row(model, signal, evaluate, seed=3)
    x, y = signal.x_test, signal.y_test
    eps_in = EPS * signal.data_std
    alpha = eps_in / 4 if step is None else step * signal.data_std
    expected = _acc(model, _pgd_by_hand(model, x, y, eps=eps_in, alpha=alpha, steps=2, seed=3, clamp=None), y)
    assert got == expected
    if step == 1e-6:  # a negligible step: PGD stays where its random start put it
        start = _pgd_by_hand(model, x, y, eps=eps_in, alpha=0.0, steps=0, seed=3, clamp=None)
        assert got == _acc(model, start, y)
    if step == 0.3:  # the conversion matters here: the same number read in input units attacks differently
        unconverted = _pgd_by_hand(model, x, y, eps=eps_in, alpha=step, steps=2, seed=3, clamp=None)
        assert got != _acc(model, unconverted, y)


def test_step_size_changes_what_the_evaluation_computes(signal):
    model = _linear(signal, seed=0)
    values = {
        step: _pgd_row(model, signal, _evaluate_block("mnist1d", attacks=["pgd_ce"], eps=[EPS],
                                                      pgd_steps=2, pgd_step_size=step), seed=3)
        for step in (None, 1e-6)
    }  # fmt: skip
    clean = _acc(model, signal.x_test, signal.y_test)
    # Default eps / 4 steps break many samples; a 1e-6 step leaves accuracy near clean (only the random
    # start, uniform in the ball, acts).
    assert values[None] < values[1e-6] - 0.1
    assert abs(values[1e-6] - clean) < abs(values[None] - clean)


@pytest.mark.parametrize("step", [None, 0.02])
def test_image_step_size_is_in_pixel_units_and_transfer_uses_it(digits, step):
    model, source = _linear(digits, seed=0), _linear(digits, seed=1)
    evaluate = _evaluate_block("digits", attacks=["pgd_ce", "transfer"], eps=[EPS_IMAGE], pgd_steps=2,
                               pgd_step_size=step)  # fmt: skip
    x, y = digits.to_float(digits.x_test), digits.y_test
    alpha = EPS_IMAGE / 4 if step is None else step  # images: no std scaling, 8/255 means 8 grey levels
    kw = dict(eps=EPS_IMAGE, alpha=alpha, steps=2, seed=5, clamp=(0.0, 1.0))
    # Same helper as the final evaluation and the transfer post phase (study.post.transfer_rows).
    rows = evaluation.attack_rows(
        model, digits, evaluate, x, y, attack_names=["pgd_ce", "transfer"], source_model=source, seed=5
    )
    got = {r["condition"]: r["value"] for r in rows}
    assert got["pgd_ce"] == _acc(model, _pgd_by_hand(model, x, y, **kw), y)
    assert got["transfer"] == _acc(model, _pgd_by_hand(source, x, y, **kw), y)
    assert all(r["severity"] == EPS_IMAGE and r["split"] == "test" for r in rows)
    if step is not None:  # scaling the step by the data std (the signal rule) would give another answer
        scaled = _pgd_by_hand(model, x, y, **{**kw, "alpha": step * digits.data_std})
        assert got["pgd_ce"] != _acc(model, scaled, y)


@pytest.mark.parametrize("bad", [0, -0.01])
def test_spec_rejects_a_non_positive_step_size(bad):
    with pytest.raises(SpecError) as exc:
        _evaluate_block("mnist1d", attacks=["pgd_ce"], eps=[0.1], pgd_step_size=bad)
    msg = str(exc.value)
    assert "\n" not in msg and "evaluate.pgd_step_size" in msg and "greater than 0" in msg
