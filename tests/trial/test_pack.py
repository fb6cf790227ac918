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
from study.trial.fit import PreparedData
from study.trial.loop import fit
from study.trial.pack import fit_pack, pack_key
from study.trial.packed_net import PackedNet, fast_path_supported
from study.trial.packed_optim import PackedOptimizer
from study.trial.run import prepare_data

SMALL = {"max_train": 1000, "max_test": 300}
TOL = 1e-5  # the acceptance
REGISTERED = regularizers.list_regularizers()  # every registered regularizer, its defaults
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> data.DatasetBundle:
    return data.load_dataset("mnist1d", root=tmp_path_factory.mktemp("pack_cache"), **SMALL)


@pytest.fixture(scope="module")
def prep(bundle: data.DatasetBundle) -> PreparedData:
    return prepare_data(make_cfg(), bundle)


def make_cfg(reg: str = "ce", seed: int = 0, lr: float = 0.03, wd: float = 0.0, **kw: Any) -> TrialConfig:
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
    rows = evaluate_model(fitted.model, prep, cfg, CPU).rows
    return {(r["split"], r["condition"], r["metric"], r["severity"]): r["value"] for r in rows}


def assert_eval_match(got: dict[tuple, float], want: dict[tuple, float]) -> None:
    assert got.keys() == want.keys() and len(want) > 20
    for key, w in want.items():
        assert abs(got[key] - w) <= TOL * max(1.0, abs(w)), (key, got[key], w)


# ---------------------------------------------------------------------------------------------- equivalence


def test_every_regularizer_in_one_pack_equals_alone_rows_weights_state_and_test_metrics(prep):
    cfgs = [
        make_cfg(reg, seed=i, lr=0.02 + 0.0025 * i, wd=(0.0, 1e-4, 5e-4)[i % 3], evaluate={})
        for i, reg in enumerate(REGISTERED)
    ]
    packed = fit_pack([(cfg.regularizer.name, cfg, prep, None) for cfg in cfgs])
    assert list(packed) == REGISTERED
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
        cnn = {"name": "cnn", "options": {"width": 4}}
        train = {"epochs": 2, "batch_size": 16, "augment": True}
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


def test_scheduled_strengths_and_a_warmup_multistep_lr_follow_each_members_own_progress(prep):
    train = {"schedule": "multistep", "warmup_epochs": 1, "milestones": [0.5], "gamma": 0.3}
    cosine = {"schedule": "cosine", "start": 0.1, "end": 0.2}
    cfgs = [
        make_cfg("label_smoothing", seed=0, params={"alpha": {"start": 0.0, "end": 0.3}}, train=train),
        make_cfg("maxsup", seed=1, lr=0.02, params={"alpha": cosine}, train=train),
        make_cfg("disturb_label", seed=2, lr=0.04, params={"rate": {"start": 0.2, "end": 0.0}}, train=train),
    ]  # fmt: skip
    packed = fit_pack([(str(i), cfg, prep, None) for i, cfg in enumerate(cfgs)])
    for i, cfg in enumerate(cfgs):
        alone = fit(cfg, prep)
        assert_rows_match(packed[str(i)].epoch_rows, alone.epoch_rows)
        assert_weights_match(packed[str(i)].model, alone.model)
        assert alone.epoch_rows[0]["lr"] != alone.epoch_rows[-1]["lr"]


def test_final_seeds_with_their_own_noise_and_split_each_equal_alone(bundle):
    noise = {"kind": "symmetric", "rate": 0.3}
    cfgs = [
        make_cfg("label_smoothing", seed=s, noise_seed=s, noise=noise, evaluate={}, train={"epochs": 2})
        for s in range(3)
    ]
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
    settings = (("a", "ce", 0, 0.03), ("b", "maxsup", 1, 0.02), ("c", "focal", 2, 0.025))
    cfgs = {k: make_cfg(reg, seed=s, lr=lr) for k, reg, s, lr in settings}
    calls: list[tuple[str, int]] = []

    def report(key: str, row: dict) -> bool:
        calls.append((key, row["epoch"]))
        return key == "b"

    def on_end(key: str, fitted) -> None:
        calls.append((f"{key} ended {fitted.status}", len(fitted.epoch_rows)))

    packed = fit_pack([(k, cfg, prep, None) for k, cfg in cfgs.items()], report, on_end=on_end)
    assert packed["b"].status == "pruned" and len(packed["b"].epoch_rows) == 1
    # A member's end is told at once (a study tells Optuna), not when the whole pack ends.
    assert calls == [
        ("a", 1), ("b", 1), ("c", 1), ("b ended pruned", 1), ("a", 2), ("c", 2), ("a", 3), ("c", 3),
        ("a ended completed", 3), ("c ended completed", 3),
    ]  # fmt: skip
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


def test_a_refilled_member_that_already_ended_frees_its_slot_for_the_next(prep, tmp_path):
    # A resumed study hands in trials whose checkpoints say they are done: the pack must ask again.
    cfgs = {k: make_cfg(seed=s, train={"epochs": 1}) for s, k in enumerate("abc")}
    fit(cfgs["b"], prep, checkpoint=tmp_path / "b.pt")
    for first, queue in (
        (
            [("a", cfgs["a"], prep, None)],
            [[("b", cfgs["b"], prep, tmp_path / "b.pt")], [("c", cfgs["c"], prep, None)]],
        ),
        (
            [("b", cfgs["b"], prep, tmp_path / "b.pt")],
            [[("c", cfgs["c"], prep, None)]],
        ),  # ended from the start
    ):
        packed = fit_pack(first, refill=lambda free, q=queue: q.pop(0) if q else [])
        assert not queue and packed["c"].status == "completed" and len(packed["c"].epoch_rows) == 1
        assert packed["b"].status == "completed" and len(packed["b"].epoch_rows) == 1


def test_members_that_cannot_share_a_pack_raise(prep):
    base = make_cfg()
    assert pack_key(base) == pack_key(make_cfg("focal", seed=3, lr=0.1, wd=1e-3))  # searched values differ
    for other in (
        make_cfg(train={"batch_size": 32}),
        make_cfg(model={"name": "cnn1d"}),
        make_cfg(train={"epochs": 2}),
    ):
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


class _Interrupt(Exception):
    pass


def test_an_interrupted_pack_resumes_per_member_without_repeating_or_losing_an_epoch(prep, tmp_path):
    # AdamW: its step count (bias correction) must survive; OLS and DisturbLabel: their own state.
    adamw = {"optimizer": "adamw"}
    settings = (
        ("a", "ce", 0, 3e-3),
        ("b", "online_label_smoothing", 1, 2e-3),
        ("c", "disturb_label", 2, 4e-3),
    )
    cfgs = {k: make_cfg(reg, seed=s, lr=lr, wd=1e-3, train=adamw) for k, reg, s, lr in settings}
    paths = {k: tmp_path / k / "checkpoint.pt" for k in cfgs}
    whole = fit_pack([(k, cfg, prep, None) for k, cfg in cfgs.items()])

    def interrupt(key: str, row: dict) -> None:
        if (key, row["epoch"]) == ("b", 2):  # "a" has saved epoch 2, "b" and "c" only epoch 1
            raise _Interrupt

    with pytest.raises(_Interrupt):
        fit_pack([(k, cfg, prep, paths[k]) for k, cfg in cfgs.items()], interrupt)
    saved = {k: torch.load(p, weights_only=True)["epoch"] for k, p in paths.items()}
    assert saved == {"a": 2, "b": 1, "c": 1}
    shutil.copy(paths["c"], tmp_path / "c_epoch1.pt")
    seen: list[tuple[str, int]] = []
    resumed = fit_pack(
        [(k, cfg, prep, paths[k]) for k, cfg in cfgs.items()], lambda k, r: seen.append((k, r["epoch"]))
    )
    assert sorted(seen) == [("a", 3), ("b", 2), ("b", 3), ("c", 2), ("c", 3)]  # members at their own epochs
    for k in cfgs:
        assert resumed[k].status == "completed"
        assert_rows_match(resumed[k].epoch_rows, whole[k].epoch_rows, tol=1e-6)
        assert_weights_match(resumed[k].model, whole[k].model, tol=1e-6)
        torch.testing.assert_close(resumed[k].regularizer.state_dict(), whole[k].regularizer.state_dict())
    # A completed member's checkpoint resumes as completed, without training.
    again = fit_pack([("a", cfgs["a"], prep, paths["a"])], lambda k, r: pytest.fail("trained again"))
    assert again["a"].status == "completed" and len(again["a"].epoch_rows) == 3

    # The formats are one: a member's pack checkpoint resumes alone, an alone checkpoint in a pack.
    alone_c = fit(cfgs["c"], prep, checkpoint=tmp_path / "c_epoch1.pt")
    assert_rows_match(alone_c.epoch_rows, whole["c"].epoch_rows, tol=1e-6)
    assert_weights_match(alone_c.model, whole["c"].model, tol=1e-6)
    alone_path = tmp_path / "alone_b.pt"
    with pytest.raises(_Interrupt):
        fit(cfgs["b"], prep, lambda row: interrupt("b", row), checkpoint=alone_path)
    from_alone = fit_pack([("b", cfgs["b"], prep, alone_path), ("a", cfgs["a"], prep, None)])
    assert_rows_match(from_alone["b"].epoch_rows, whole["b"].epoch_rows, tol=1e-6)
    assert_weights_match(from_alone["b"].model, whole["b"].model, tol=1e-6)
    torch.testing.assert_close(from_alone["b"].regularizer.state_dict(), whole["b"].regularizer.state_dict())


def test_a_pruned_members_checkpoint_stays_pruned(prep, tmp_path):
    path = tmp_path / "b.pt"
    cfg = make_cfg("focal", seed=1)
    fit_pack([("a", make_cfg(), prep, None), ("b", cfg, prep, path)], lambda k, r: k == "b")
    again = fit_pack([("b", cfg, prep, path)], lambda k, r: pytest.fail("trained again"))
    assert again["b"].status == "pruned" and len(again["b"].epoch_rows) == 1
    assert fit(cfg, prep, checkpoint=path).status == "pruned"  # alone reads it the same way


def test_a_member_whose_checkpoint_cannot_be_read_trains_from_epoch_0(prep, tmp_path, capsys):
    cfgs = {"a": make_cfg("ce", seed=0), "b": make_cfg("label_smoothing", seed=1, params={"alpha": 0.1})}
    whole = fit_pack([(k, cfg, prep, None) for k, cfg in cfgs.items()])
    path = tmp_path / "b.pt"
    path.write_bytes(b"not a checkpoint")
    got = fit_pack([("a", cfgs["a"], prep, None), ("b", cfgs["b"], prep, path)])
    for k in cfgs:
        assert got[k].status == "completed"
        assert_rows_match(got[k].epoch_rows, whole[k].epoch_rows, tol=1e-6)
    assert "training from epoch 0" in capsys.readouterr().err
    assert torch.load(path, weights_only=True)["epoch"] == 3


def test_a_diverging_member_ends_diverged_and_leaves_its_neighbours_untouched(prep):
    adamw = {"optimizer": "adamw", "epochs": 2}
    cfgs = {"ok": make_cfg(lr=3e-3, train=adamw), "boom": make_cfg(seed=1, lr=1e3, train=adamw)}
    packed = fit_pack([(k, cfg, prep, None) for k, cfg in cfgs.items()])
    alone = {k: fit(cfg, prep) for k, cfg in cfgs.items()}
    assert packed["boom"].status == alone["boom"].status == "diverged"
    assert len(packed["boom"].epoch_rows) == len(alone["boom"].epoch_rows) == 1
    assert packed["ok"].status == "completed"
    assert_rows_match(packed["ok"].epoch_rows, alone["ok"].epoch_rows)


# ---------------------------------------------------------------------------------------------- optimizer


def _torch_optimizer(kind: str, params: list[torch.Tensor], wd: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1.0, momentum=0.9, weight_decay=wd, nesterov=True)
    return torch.optim.AdamW(params, lr=1.0, weight_decay=wd)


def _step(packed: PackedOptimizer, opts: list[torch.optim.Optimizer], lrs: list[float]) -> None:
    g = torch.Generator().manual_seed(len(lrs) * 1000 + int(sum(packed.steps)))
    for i, p in enumerate(packed.params):
        p.grad = torch.randn(p.shape, generator=g)
        for k, opt in enumerate(opts):
            opt.param_groups[0]["params"][i].grad = p.grad[k].clone()
    for k, opt in enumerate(opts):
        opt.param_groups[0]["lr"] = lrs[k]
        opt.step()
    packed.step(lrs)


def _assert_same(packed: PackedOptimizer, opts: list[torch.optim.Optimizer]) -> None:
    # SGD is bit-exact; AdamW's step size multiplies instead of torch's addcdiv(value=): about 1 ulp.
    tol = 0.0 if packed.kind == "sgd" else 1e-6
    for k, opt in enumerate(opts):
        for i, p in enumerate(opt.param_groups[0]["params"]):
            torch.testing.assert_close(packed.params[i][k], p, rtol=tol, atol=tol / 10)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_packed_optimizer_is_torchs_update_per_member_and_its_state_round_trips(kind):
    torch.manual_seed(0)
    shapes, decay = [(3, 6, 5), (3, 6)], [0.0, 1e-3, 5e-2]
    stacked = [torch.randn(s) for s in shapes]
    packed = PackedOptimizer(kind, [t.clone() for t in stacked], decay, momentum=0.9)
    alone = [[t[k].clone() for t in stacked] for k in range(3)]
    opts = [_torch_optimizer(kind, ps, decay[k]) for k, ps in enumerate(alone)]
    schedule = [[0.1, 0.03, 0.01], [0.05, 0.02, 0.2], [0.01, 0.01, 0.05], [0.07, 0.001, 0.1]]
    for lrs in schedule:
        _step(packed, opts, lrs)
        _assert_same(packed, opts)
    # member_state_dict is torch's format: a fresh torch optimizer loads it and goes on identically...
    for k in range(3):
        state = packed.member_state_dict(k, opts[k].state_dict()["param_groups"], lr=schedule[-1][k])
        ref = opts[k].state_dict()
        assert state["param_groups"] == ref["param_groups"] and state["state"].keys() == ref["state"].keys()
        for i, entry in ref["state"].items():
            torch.testing.assert_close(state["state"][i], entry, rtol=1e-6, atol=1e-7)
        fresh = _torch_optimizer(kind, opts[k].param_groups[0]["params"], decay[k])
        fresh.load_state_dict(state)
        opts[k] = fresh
    # ...and a fresh packed optimizer loads torch's state dicts and goes on identically.
    again = PackedOptimizer(kind, packed.params, decay, momentum=0.9)
    for k, opt in enumerate(opts):
        again.load_member_state_dict(k, opt.state_dict())
    assert again.steps == [len(schedule) if kind == "adamw" else 0] * 3  # only AdamW counts (bias correction)
    for lrs in schedule[:2]:
        _step(again, opts, lrs)
        _assert_same(again, opts)
