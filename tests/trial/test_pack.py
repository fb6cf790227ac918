"""Trial fusion (study.trial.pack): a member trained in a pack is the same trial trained alone.

Every test trains for real on a 1000/300-sample slice of MNIST-1D (or a tiny synthetic image set for
the vmap path) and compares against ``fit`` alone: epoch rows, weights, regularizer state and test
metrics. The acceptance tolerance is 1e-5 (relative above magnitude 1: LogitNorm's val_nll is ~150);
measured here: mlp/SGD with all nine regularizers over 3 epochs within 2.5e-7, cnn1d/AdamW over 2
epochs within 1e-6. Longer AdamW runs drift further by float rounding amplified on near-dead units,
which a 1-member pack shows too, so they are not compared.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from study import data, models, regularizers
from study.data._readers import RawSplits
from study.trial.config import TrialConfig
from study.trial.evaluate import evaluate_model
from study.trial.fit import PreparedData, fit, make_optimizer
from study.trial.pack import fit_pack, pack_key
from study.trial.packed_net import PackedNet, fast_path_supported
from study.trial.packed_optim import PackedOptimizer
from study.trial.run import prepare_data

SMALL = {"max_train": 1000, "max_test": 300}
TOL = 1e-5  # the acceptance
NINE = [
    "ce", "label_smoothing", "maxsup", "online_label_smoothing", "disturb_label", "focal", "logitnorm",
    "confidence_penalty", "logit_penalty",
]  # fmt: skip
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> data.DatasetBundle:
    return data.load_dataset("mnist1d", root=tmp_path_factory.mktemp("pack_cache"), **SMALL)


@pytest.fixture(scope="module")
def prep(bundle: data.DatasetBundle) -> PreparedData:
    return prepare_data(make_cfg(), bundle)


def make_cfg(
    reg: str = "ce", seed: int = 0, lr: float = 0.03, wd: float = 0.0, **kw: Any
) -> TrialConfig:
    train = {"epochs": 3, "batch_size": 64, "optimizer": "sgd", "device": "cpu", "precision": "fp32"}
    train.update(kw.pop("train", {}))
    return TrialConfig(
        dataset=kw.pop("dataset", {"name": "mnist1d", "options": SMALL}),
        model=kw.pop("model", {"name": "mlp"}),
        regularizer={"name": reg, "params": kw.pop("params", {})},
        seed=seed,
        train={**train, "lr": lr, "weight_decay": wd},
        **kw,
    )


def assert_rows_match(got: list[dict], want: list[dict], tol: float = TOL) -> None:
    """Same epochs, same keys, every value (but wall time) within tol (relative above magnitude 1)."""
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        for key in w:
            if key != "wall_s":
                assert abs(g[key] - w[key]) <= tol * max(1.0, abs(w[key])), (w["epoch"], key, g[key], w[key])


def assert_weights_match(got: torch.nn.Module, want: torch.nn.Module, tol: float = TOL) -> None:
    torch.testing.assert_close(got.state_dict(), want.state_dict(), rtol=tol, atol=tol)


def eval_values(fitted: Any, prep: PreparedData, cfg: TrialConfig) -> dict[tuple, float]:
    rows = evaluate_model(fitted.model, prep, cfg, CPU)
    return {(r["split"], r["condition"], r["metric"], r["severity"]): r["value"] for r in rows}


def assert_eval_match(got: dict[tuple, float], want: dict[tuple, float]) -> None:
    assert got.keys() == want.keys() and len(want) > 20
    for key, w in want.items():
        assert abs(got[key] - w) <= TOL * max(1.0, abs(w)), (key, got[key], w)


# ---------------------------------------------------------------------------------------------- equivalence


def test_nine_regularizers_in_one_pack_equal_alone_rows_weights_state_and_test_metrics(prep):
    cfgs = [
        make_cfg(reg, seed=i, lr=0.02 + 0.0025 * i, wd=(0.0, 1e-4, 5e-4)[i % 3], evaluate={})
        for i, reg in enumerate(NINE)
    ]
    packed = fit_pack([(cfg.regularizer.name, cfg, prep, None) for cfg in cfgs])
    assert list(packed) == NINE
    for cfg in cfgs:
        alone, member = fit(cfg, prep), packed[cfg.regularizer.name]
        assert member.status == alone.status == "completed"
        assert_rows_match(member.epoch_rows, alone.epoch_rows)
        assert member.best[1] == alone.best[1]
        assert_weights_match(member.model, alone.model)
        # Stateful regularizers kept their own state: OLS's soft labels, DisturbLabel's generator.
        torch.testing.assert_close(member.regularizer.state_dict(), alone.regularizer.state_dict())
        assert_eval_match(eval_values(member, prep, cfg), eval_values(alone, prep, cfg))
    ols = packed["online_label_smoothing"].regularizer.state_dict()
    assert any(t.numel() > 0 and t.abs().sum() > 0 for t in ols.values() if isinstance(t, torch.Tensor))


def test_cnn1d_fast_path_with_adamw_and_mixed_lr_equals_alone(prep):
    cfgs = [
        make_cfg(seed=s, lr=lr, wd=wd, model={"name": "cnn1d"}, train={"epochs": 2, "optimizer": "adamw"})
        for s, lr, wd in ((0, 2e-3, 0.0), (1, 1e-2, 1e-2), (2, 5e-3, 1e-3))
    ]
    model = models.create_model("cnn1d", prep.bundle.input_shape, 10)
    assert fast_path_supported(model) and PackedNet([model]).fast
    packed = fit_pack([(str(i), cfg, prep, None) for i, cfg in enumerate(cfgs)])
    for i, cfg in enumerate(cfgs):
        alone = fit(cfg, prep)
        assert_rows_match(packed[str(i)].epoch_rows, alone.epoch_rows)
        assert_weights_match(packed[str(i)].model, alone.model)
        x = prep.bundle.x_test
        torch.testing.assert_close(packed[str(i)].model.eval()(x), alone.model.eval()(x), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("name", ["mlp", "cnn1d", "cnn"])
def test_packed_forward_both_paths_equal_each_model(name):
    shape = (1, 8, 8) if name == "cnn" else (1, 40)
    torch.manual_seed(0)
    nets = [models.create_model(name, shape, 5, **({"width": 4} if name == "cnn" else {})) for _ in range(3)]
    x = torch.randn(3, 7, *shape)
    want = torch.stack([m.eval()(x[k]) for k, m in enumerate(nets)])
    for fast in (True, False):
        net = PackedNet(nets, fast=fast)
        assert net.fast == (fast and name != "cnn")
        net.train(False)
        torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-6)


def _tiny_images(root: Path, download: bool, n: int = 96) -> RawSplits:
    """Three classes of 24x24 uint8 images (bright quadrant = class), noisy: big enough to augment."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(2 * n) % 3
    x = torch.randint(0, 90, (2 * n, 1, 24, 24), generator=g)
    for c in range(3):
        x[y == c, :, (c // 2) * 12 : (c // 2) * 12 + 12, (c % 2) * 12 : (c % 2) * 12 + 12] += 120
    x = x.to(torch.uint8)
    return RawSplits(x[:n], y[:n], x[n:], y[n:])


def test_vmap_path_with_batchnorm_and_augmentation_equals_alone():
    data.DATASETS.register(data.DatasetEntry("tiny_images", _tiny_images, "image", 3, "test images", ("n",)))
    try:
        cnn, train = {"name": "cnn", "options": {"width": 4}}, {"epochs": 2, "batch_size": 16, "augment": True}
        cfgs = [
            make_cfg(reg, seed=s, lr=lr, dataset={"name": "tiny_images"}, model=cnn, train=train)
            for reg, s, lr in (("ce", 0, 0.05), ("online_label_smoothing", 1, 0.02), ("focal", 2, 0.03))
        ]
        prep = prepare_data(cfgs[0], data.load_dataset("tiny_images"))
        packed = fit_pack([(str(i), cfg, prep, None) for i, cfg in enumerate(cfgs)])
        for i, cfg in enumerate(cfgs):
            alone, member = fit(cfg, prep), packed[str(i)]
            assert_rows_match(member.epoch_rows, alone.epoch_rows)
            assert_weights_match(member.model, alone.model)  # BatchNorm running stats included
            state = member.model.state_dict()
            assert not torch.equal(state["body.1.running_mean"], torch.zeros(4))  # the stats moved
            assert int(state["body.1.num_batches_tracked"]) == 2 * -(-len(prep.y_train) // 16)
    finally:
        data.DATASETS.remove("tiny_images")


def test_final_seeds_with_their_own_noise_and_split_each_equal_alone(bundle):
    cfgs = [
        make_cfg("label_smoothing", seed=s, noise_seed=s, noise={"kind": "symmetric", "rate": 0.3}, evaluate={},
                 train={"epochs": 2})
        for s in range(3)
    ]  # fmt: skip
    preps = [prepare_data(cfg, bundle) for cfg in cfgs]
    assert not torch.equal(preps[0].y_train, preps[1].y_train)  # own noise, own split
    packed = fit_pack([(str(s), cfg, p, None) for s, (cfg, p) in enumerate(zip(cfgs, preps, strict=True))])
    for s, (cfg, p) in enumerate(zip(cfgs, preps, strict=True)):
        alone = fit(cfg, p)
        assert_rows_match(packed[str(s)].epoch_rows, alone.epoch_rows)
        got, want = eval_values(packed[str(s)], p, cfg), eval_values(alone, p, cfg)
        assert ("train", "clean", "memorisation_rate", None) in want  # the member's own flipped labels
        assert_eval_match(got, want)


# ---------------------------------------------------------------------------------------------- life cycle


def test_a_pruned_member_leaves_and_the_others_go_on_equal_to_alone(prep):
    cfgs = {k: make_cfg(reg, seed=s, lr=lr) for k, reg, s, lr in
            (("a", "ce", 0, 0.03), ("b", "maxsup", 1, 0.02), ("c", "focal", 2, 0.025))}  # fmt: skip
    calls: list[tuple[str, int]] = []

    def report(key: str, row: dict) -> bool:
        calls.append((key, row["epoch"]))
        return key == "b"

    packed = fit_pack([(k, cfg, prep, None) for k, cfg in cfgs.items()], report)
    assert packed["b"].status == "pruned" and len(packed["b"].epoch_rows) == 1
    assert calls == [("a", 1), ("b", 1), ("c", 1), ("a", 2), ("c", 2), ("a", 3), ("c", 3)]
    for k, cfg in cfgs.items():
        alone = fit(cfg, prep)
        assert_rows_match(packed[k].epoch_rows, alone.epoch_rows[: len(packed[k].epoch_rows)])
        if k != "b":
            assert packed[k].status == "completed"
            assert_weights_match(packed[k].model, alone.model)


def test_refilled_members_start_at_their_own_epoch_zero_and_equal_alone(prep):
    first = [("a", make_cfg("ce", seed=0)), ("b", make_cfg("disturb_label", seed=1, lr=0.02))]
    later = [("c", make_cfg("online_label_smoothing", seed=2, lr=0.025))]
    asked: list[int] = []

    def refill(free: int) -> list:
        asked.append(free)
        return [(k, cfg, prep, None) for k, cfg in later] if len(asked) == 1 else []

    packed = fit_pack([(k, cfg, prep, None) for k, cfg in first], lambda k, r: k == "a", refill=refill)
    assert asked[0] == 1 and packed["a"].status == "pruned"
    for k, cfg in first[1:] + later:
        alone = fit(cfg, prep)
        assert packed[k].status == "completed"
        assert_rows_match(packed[k].epoch_rows, alone.epoch_rows)
        assert_weights_match(packed[k].model, alone.model)
        torch.testing.assert_close(packed[k].regularizer.state_dict(), alone.regularizer.state_dict())


def test_members_that_cannot_share_a_pack_raise(prep):
    base = make_cfg()
    assert pack_key(base) == pack_key(make_cfg("focal", seed=3, lr=0.1, wd=1e-3))  # searched values differ
    for other in (make_cfg(train={"batch_size": 32}), make_cfg(model={"name": "cnn1d"}), make_cfg(train={"epochs": 2})):
        assert pack_key(other) != pack_key(base)
        with pytest.raises(ValueError, match="share"):
            fit_pack([("a", base, prep, None), ("b", other, prep, None)])
    with pytest.raises(ValueError, match="unique"):
        fit_pack([("a", base, prep, None), ("a", make_cfg(seed=1), prep, None)])
    other = make_cfg(train={"epochs": 1})
    with pytest.raises(ValueError, match="share"):  # a refill joining running members is checked too
        fit_pack(
            [("a", base, prep, None), ("x", base, prep, None)],
            lambda key, row: key == "x",
            refill=lambda free: [("b", other, prep, None)],
        )
