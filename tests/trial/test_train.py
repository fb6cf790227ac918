"""One trial end to end (study.train): determinism, checkpoint/resume, divergence, pruning, paired label
noise, evaluation rows checked against study.metrics, LS decomposition terms, adversarial noise budget.

Everything runs on a 400/200-sample slice of MNIST-1D for a few epochs, so the whole file takes seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from study import data, metrics, regularizers
from study import noise as noise_lib
from study.spec import TrainSpec
from study.trial.config import TrialConfig
from study.trial.fit import DIVERGENCE_FACTOR, build_model, exploded
from study.trial.reference import reference_probabilities
from study.trial.run import finish_trial, prepare_data, run_trial, train_trial

SMALL = {"max_train": 400, "max_test": 200}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("regstudy_cache")


@pytest.fixture(autouse=True)
def _cache_env(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The out-of-fold probabilities (adversarial noise) are cached under $REGSTUDY_CACHE.
    monkeypatch.setenv("REGSTUDY_CACHE", str(cache_dir))


@pytest.fixture(scope="module")
def bundle(cache_dir: Path) -> data.DatasetBundle:
    return data.load_dataset("mnist1d", root=cache_dir, **SMALL)


def _nested(flat: dict) -> dict:
    """Flat test shorthands (epochs=2, noise_kind=..., reg_params=...) -> TrialConfig fields."""
    out: dict = {}
    for k, v in flat.items():
        if k in TrainSpec.model_fields:
            out.setdefault("train", {})[k] = v
        elif k.startswith("dataset_") or k in ("val_fraction", "clean_validation"):
            out.setdefault("dataset", {})[k.removeprefix("dataset_")] = v
        elif k.startswith("noise_") and k != "noise_seed":
            out.setdefault("noise", {})[k.removeprefix("noise_")] = v
        elif k == "regularizer":
            out.setdefault("regularizer", {})["name"] = v
        elif k == "reg_params":
            out.setdefault("regularizer", {})["params"] = v
        else:
            out[k] = v
    return out


def updated(cfg: TrialConfig, **flat) -> TrialConfig:
    data = cfg.model_dump()
    for k, v in _nested(flat).items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    return TrialConfig.model_validate(data)


def make_cfg(**kw) -> TrialConfig:
    base = TrialConfig(
        dataset={"name": "mnist1d", "options": SMALL},
        train={"epochs": 2, "batch_size": 64, "lr": 1e-2, "device": "cpu"},
        evaluate={},
    )
    return updated(base, **kw)


def without_wall(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def _run_killed_in_epoch_3(cfg: TrialConfig, bundle: data.DatasetBundle) -> None:
    """Run `cfg` until its epoch-3 report raises (a process killed mid-trial)."""

    def crash(row: dict) -> None:
        if row["epoch"] == 3:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        run_trial(cfg, crash, bundle=bundle)


def clean_metrics(rows: list[dict]) -> dict[tuple[str, str], float]:
    return {
        (r["split"], r["metric"]): r["value"]
        for r in rows
        if r["condition"] == "clean" and not r["metric"].startswith("bin_")
    }


def test_same_config_twice_gives_identical_rows(bundle):
    cfg = make_cfg(epochs=2)
    a, b = run_trial(cfg, bundle=bundle), run_trial(cfg, bundle=bundle)
    assert a.status == b.status == "completed"
    assert a.epochs_run == 2 and [r["epoch"] for r in a.epoch_rows] == [1, 2]
    assert without_wall(a.epoch_rows) == without_wall(b.epoch_rows)
    assert a.eval_rows and a.eval_rows == b.eval_rows
    # No label noise: nothing is flipped, so no memorisation row.
    assert ("train", "memorisation_rate") not in clean_metrics(a.eval_rows)
    # A different training seed gives a different run (the test above can fail).
    c = run_trial(updated(cfg, seed=1), bundle=bundle)
    assert without_wall(c.epoch_rows) != without_wall(a.epoch_rows)


@pytest.mark.parametrize(
    ("regularizer", "params"),
    [("online_label_smoothing", {}), ("disturb_label", {"rate": 0.2})],
)
def test_resume_after_crash_matches_uninterrupted(bundle, tmp_path, regularizer, params):
    # Stateful (soft-label matrix) and random (per-batch label disturbance) regularizers: their state and
    # every RNG must survive the checkpoint for the resumed run to be bit-identical.
    cfg = make_cfg(epochs=4, regularizer=regularizer, reg_params=params)
    reference = run_trial(cfg, bundle=bundle)
    ck = updated(cfg, checkpoint_dir=str(tmp_path / "ck"))

    _run_killed_in_epoch_3(ck, bundle)
    # The report of epoch 3 never went through, so the newest checkpoint is the one of epoch 2.
    assert torch.load(tmp_path / "ck" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    seen: list[int] = []
    resumed = run_trial(ck, lambda row: seen.append(row["epoch"]), bundle=bundle)
    assert seen == [3, 4]
    assert resumed.status == "completed" and resumed.epochs_run == 4
    assert without_wall(resumed.epoch_rows) == without_wall(reference.epoch_rows)
    assert resumed.eval_rows == reference.eval_rows
    # A finished checkpoint trains nothing more and evaluates the same model again.
    seen.clear()
    again = run_trial(ck, lambda row: seen.append(row["epoch"]), bundle=bundle)
    assert seen == [] and again.eval_rows == reference.eval_rows


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_an_unreadable_checkpoint_restarts_its_trial_from_epoch_0(bundle, tmp_path, capsys, damage):
    # A checkpoint cut short (a full disk, a copy interrupted) or overwritten with garbage: the trial
    # trains again from epoch 0, as if there were none, with one line saying so; it does not fail.
    cfg = make_cfg(epochs=2)
    reference = run_trial(cfg, bundle=bundle)
    ck = updated(cfg, checkpoint_dir=str(tmp_path / "ck"))
    path = tmp_path / "ck" / "checkpoint.pt"
    run_trial(ck, bundle=bundle)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\x00 not a checkpoint" * 64)
    capsys.readouterr()
    seen: list[int] = []
    result = run_trial(ck, lambda row: seen.append(row["epoch"]), bundle=bundle)
    assert seen == [1, 2] and result.status == "completed" and result.epochs_run == 2
    assert without_wall(result.epoch_rows) == without_wall(reference.epoch_rows)
    assert result.eval_rows == reference.eval_rows
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "training from epoch 0" in err[0], err
    assert torch.load(path, weights_only=True)["epoch"] == 2  # written anew


def test_diverging_run_ends_with_status_diverged(bundle, tmp_path):
    cfg = make_cfg(epochs=3, optimizer="sgd", lr=1e4, checkpoint_dir=str(tmp_path / "ck"))
    reported: list[int] = []
    result = run_trial(cfg, lambda row: reported.append(row["epoch"]), bundle=bundle)
    assert result.status == "diverged"
    assert result.epochs_run == 1 and not math.isfinite(result.epoch_rows[0]["train_loss"])
    assert reported == []  # a diverged epoch is not reported to the pruner
    assert result.eval_rows == [] and result.best_value is None
    # Resuming a diverged trial does not train again.
    again = run_trial(cfg, lambda row: reported.append(row["epoch"]), bundle=bundle)
    assert again.status == "diverged" and reported == []


def test_exploding_loss_without_nan_is_diverged(bundle, tmp_path):
    """AdamW at lr 1e3: loss ~1e15 at chance accuracy and no NaN, recorded `completed` before."""
    cfg = make_cfg(epochs=3, optimizer="adamw", lr=1e3, checkpoint_dir=str(tmp_path / "ck"))
    reported: list[int] = []
    result = run_trial(cfg, lambda row: reported.append(row["epoch"]), bundle=bundle)
    assert result.status == "diverged" and result.epochs_run == 1
    loss = result.epoch_rows[0]["train_loss"]
    assert math.isfinite(loss) and loss > DIVERGENCE_FACTOR * math.log(10)
    assert reported == [] and result.eval_rows == [] and result.best_value is None
    again = run_trial(cfg, lambda row: reported.append(row["epoch"]), bundle=bundle)
    assert again.status == "diverged" and reported == []


def test_exploded_rule():
    assert exploded(math.nan, 2.3) and exploded(math.inf, 2.3) and exploded(231.0, 2.3)
    assert not exploded(229.0, 2.3) and not exploded(-50.0, 2.3)


@pytest.mark.parametrize("name", regularizers.list_regularizers())
def test_normal_runs_of_every_regularizer_stay_completed(bundle, name):
    """The divergence rule never fires on a healthy run: every regularizer at its defaults, at the
    default recipe's lr (full MNIST-1D, 30 epochs, every regularizer at its default and its strongest
    setting: the largest epoch loss was at most 1.0x the reference, 100x would fire)."""
    result = run_trial(make_cfg(epochs=3, lr=2e-2, regularizer=name, evaluate=None), bundle=bundle)
    assert result.status == "completed" and result.epochs_run == 3
    # At least 10x below where the rule fires (LogitNorm's 1/tau scale puts it highest: ~6 here).
    assert max(r["train_loss"] for r in result.epoch_rows) < DIVERGENCE_FACTOR * math.log(10) / 10


def test_report_returning_true_prunes(bundle, tmp_path):
    cfg = make_cfg(epochs=4, checkpoint_dir=str(tmp_path / "ck"))
    result = run_trial(cfg, lambda row: row["epoch"] == 2, bundle=bundle)
    assert result.status == "pruned" and result.epochs_run == 2
    assert result.eval_rows == []
    assert result.best_value == max(r["val_accuracy"] for r in result.epoch_rows)
    calls: list[int] = []
    again = run_trial(cfg, lambda row: calls.append(row["epoch"]), bundle=bundle)
    assert again.status == "pruned" and calls == []


def test_noise_is_paired_across_regularizers_and_seeds(bundle):
    base = make_cfg(noise_kind="symmetric", noise_rate=0.4, noise_seed=7)
    a = prepare_data(base, bundle)
    other = updated(base, regularizer="label_smoothing", reg_params={"alpha": 0.1}, seed=3)
    b = prepare_data(other, bundle)
    for name in ("x_train", "y_train", "flipped", "x_val", "y_val"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # The labels are noise.corrupt of the whole clean training set, then split with the noise seed.
    full = noise_lib.corrupt(bundle.y_train, bundle.num_classes, "symmetric", 0.4, 7, dataset="mnist1d")
    train_idx, val_idx = data.split_train_val(len(bundle.y_train), base.dataset.val_fraction, seed=7)
    assert torch.equal(a.y_train, full.labels[train_idx])
    assert torch.equal(a.y_train_clean, bundle.y_train[train_idx])
    assert torch.equal(a.flipped, a.y_train != a.y_train_clean)
    # The validation split carries the same noise (rate ~0.4 on 80 samples) ...
    assert torch.equal(a.y_val, full.labels[val_idx])
    assert 0.25 < (a.y_val != bundle.y_train[val_idx]).float().mean() < 0.55
    # ... unless clean_validation is set; the training labels do not change then.
    oracle = prepare_data(updated(base, clean_validation=True), bundle)
    assert torch.equal(oracle.y_val, bundle.y_train[val_idx])
    assert torch.equal(oracle.y_train, a.y_train)
    # Another noise seed gives other noisy labels.
    c = prepare_data(updated(base, noise_seed=8), bundle)
    assert not torch.equal(c.y_train, a.y_train)


def test_eval_rows_match_metrics_on_the_models_test_logits(bundle):
    cfg = make_cfg(epochs=2, noise_kind="symmetric", noise_rate=0.3)
    _, fitted = train_trial(cfg, bundle=bundle)
    result = finish_trial(cfg, prepare_data(cfg, bundle), fitted)
    got = clean_metrics(result.eval_rows)
    model = fitted.model.eval()
    prep = prepare_data(cfg, bundle)
    with torch.no_grad():
        x_test = bundle.to_float(bundle.x_test)
        z, feats = model(x_test), model.features(x_test)
        z_val = model(bundle.to_float(prep.x_val))
        z_train = model(bundle.to_float(prep.x_train))
    y = bundle.y_test
    approx = lambda v: pytest.approx(v, rel=1e-5, abs=1e-6)  # noqa: E731
    # Independent formulas first, then study.metrics for the binned/fitted ones.
    assert got[("test", "accuracy")] == approx((z.argmax(1) == y).float().mean().item())
    assert got[("test", "nll")] == approx(F.cross_entropy(z, y).item())
    assert got[("test", "ece")] == approx(metrics.ece(z, y))
    t = metrics.fit_temperature(z_val, prep.y_val)
    assert got[("test", "temperature")] == approx(t)
    assert got[("test", "ece_ts")] == approx(metrics.ece(z / t, y))
    sep = metrics.feature_separation(feats, y)
    assert got[("test", "d_within")] == approx(sep["d_within"])
    assert got[("test", "r2")] == approx(sep["r2"])
    flipped = prep.flipped
    assert flipped.any()
    memorised = (z_train.argmax(1)[flipped] == prep.y_train[flipped]).float().mean().item()
    assert got[("train", "memorisation_rate")] == approx(memorised)
    recovered = (z_train.argmax(1)[flipped] == prep.y_train_clean[flipped]).float().mean().item()
    assert got[("train", "clean_label_recovery")] == approx(recovered)
    # Reliability bins: 15 bins + the degenerate [1, 1] bin; counts cover the test set, and
    # sum_b n_b |acc_b - conf_b| / N is the ECE (empty bins have no accuracy/confidence row).
    bins: dict[str, dict[float, float]] = {}
    for r in result.eval_rows:
        if r["metric"].startswith("bin_"):
            bins.setdefault(r["metric"], {})[r["severity"]] = r["value"]
    assert len(bins["bin_count"]) == 16 and sum(bins["bin_count"].values()) == len(y)
    ece_from_bins = sum(
        bins["bin_count"][b] * abs(bins["bin_accuracy"][b] - bins["bin_confidence"][b])
        for b in bins["bin_accuracy"]
    ) / len(y)
    assert ece_from_bins == approx(got[("test", "ece")])


def test_label_smoothing_terms_are_logged_per_epoch(bundle):
    alpha = 0.2
    # One full batch per epoch: the first logged step is the initial model on the whole training split.
    cfg = make_cfg(epochs=1, batch_size=10_000, regularizer="label_smoothing", reg_params={"alpha": alpha})
    prep = prepare_data(cfg, bundle)
    torch.manual_seed(cfg.seed)  # run_trial seeds, then builds the model: same initial weights
    model0 = build_model(cfg, bundle)
    with torch.no_grad():
        z = model0(bundle.to_float(prep.x_train))
    y, k = prep.y_train, bundle.num_classes
    gap = z.gather(1, y[:, None]) - z  # z_gt - z_k
    expected_reg = (alpha / k * gap.clamp(min=0).sum(1)).mean().item()
    expected_amp = (alpha / k * gap.clamp(max=0).sum(1)).mean().item()
    row = run_trial(cfg, prepared=prep).epoch_rows[0]
    assert row["term_regularization"] == pytest.approx(expected_reg, rel=1e-4)
    assert row["term_error_amplification"] == pytest.approx(expected_amp, rel=1e-4)
    assert row["term_ce"] == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-5)
    assert row["train_loss"] == pytest.approx(F.cross_entropy(z, y, label_smoothing=alpha).item(), rel=1e-5)
    # Several epochs: both terms in every row with the signs of the decomposition.
    rows = run_trial(make_cfg(epochs=3, regularizer="label_smoothing"), bundle=bundle).epoch_rows
    assert all(r["term_regularization"] >= 0 >= r["term_error_amplification"] for r in rows)
    # A scheduled alpha follows training progress step by step: 0 at the first step, 0.5 at the last.
    ramp = {"schedule": "linear", "start": 0.0, "end": 0.5}
    sched = updated(cfg, epochs=2, reg_params={"alpha": ramp})
    first, last = run_trial(sched, prepared=prep).epoch_rows
    assert first["term_regularization"] == 0.0 and last["term_regularization"] > 0.0
    ce_rows = run_trial(make_cfg(epochs=1), bundle=bundle).epoch_rows
    assert "term_regularization" not in ce_rows[0] and "term_ce" in ce_rows[0]


def test_reference_probabilities_are_cached_distributions(bundle, cache_dir):
    probs = reference_probabilities(bundle, "cnn1d", {}, seed=0, folds=2, epochs=2)
    assert probs.shape == (len(bundle.y_train), bundle.num_classes)
    assert torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-5)
    assert list((cache_dir / "oof").glob("mnist1d-*.pt"))
    assert torch.equal(reference_probabilities(bundle, "cnn1d", {}, seed=0, folds=2, epochs=2), probs)


def test_adversarial_noise_flips_the_per_class_budget(bundle):
    rate = 0.2
    cfg = make_cfg(noise_kind="adversarial", noise_rate=rate, noise_mode="confident")
    noisy = prepare_data(cfg, bundle).noisy
    probs = reference_probabilities(bundle, cfg.model.name, {}, seed=cfg.noise_seed)  # cached by prepare_data
    y = bundle.y_train
    others = probs.clone()
    others[torch.arange(len(y)), y] = -1.0
    runner_up = others.argmax(1)
    margin = probs.gather(1, y[:, None]).squeeze(1) - others.max(1).values
    for c in range(bundle.num_classes):
        in_c = y == c
        flipped_c = noisy.flipped & in_c
        assert int(flipped_c.sum()) == math.floor(rate * int(in_c.sum()))
        assert torch.equal(noisy.labels[flipped_c], runner_up[flipped_c])
        # "confident": the flipped points are the highest-margin ones of their class.
        kept = in_c & ~noisy.flipped
        assert margin[flipped_c].min() >= margin[kept].max()


def test_dataset_is_loaded_once_per_process_and_never_modified(bundle, cache_dir):
    from study.trial import run as train

    train._BUNDLE_CACHE.clear()
    cfg = make_cfg(dataset_root=str(cache_dir), noise_kind="symmetric", noise_rate=0.4, epochs=1)
    first = train.load_bundle(cfg)
    assert train.load_bundle(cfg) is first  # a re-used Ray worker does not read the dataset again
    before = (first.x_train.clone(), first.y_train.clone())
    cached = run_trial(cfg)  # through the cache, with label noise
    assert torch.equal(first.x_train, before[0]) and torch.equal(first.y_train, before[1])
    fresh = run_trial(cfg, bundle=data.load_dataset("mnist1d", root=cache_dir, **SMALL))
    assert without_wall(cached.epoch_rows) == without_wall(fresh.epoch_rows)
    # Other dataset options are another key: the entry is replaced, not served stale.
    other = train.load_bundle(make_cfg(dataset_root=str(cache_dir), dataset_options={"max_train": 300}))
    assert len(other.y_train) == 300 and train.load_bundle(cfg) is not first


def test_optimizer_is_fused_on_cuda_only():
    from study.trial.fit import make_optimizer

    for name in ("sgd", "adamw"):
        cpu = make_optimizer(make_cfg(optimizer=name), torch.nn.Linear(3, 2))
        assert not cpu.defaults.get("fused")  # CPU: the default foreach path, results unchanged
        if torch.cuda.is_available():
            gpu = make_optimizer(make_cfg(optimizer=name), torch.nn.Linear(3, 2).cuda())
            assert gpu.defaults["fused"] is True


@pytest.mark.gpu
def test_cuda_trial_learns_and_resumes(bundle, tmp_path):
    # bf16 autocast + fused optimizer on CUDA: the run learns, and a run killed in epoch 3 resumes from
    # the checkpoint of epoch 2 (its rows restored exactly, training continued on the GPU).
    cfg = make_cfg(device="cuda", epochs=4, batch_size=32, lr=2e-2)
    full = run_trial(cfg, bundle=bundle)
    assert full.status == "completed" and full.device.startswith("cuda")
    assert full.epoch_rows[-1]["train_loss"] < 0.8 * full.epoch_rows[0]["train_loss"]
    assert full.epoch_rows[-1]["train_acc"] > 0.3  # chance is 0.1
    ck = updated(cfg, checkpoint_dir=str(tmp_path / "ck"))

    _run_killed_in_epoch_3(ck, bundle)
    first_two = torch.load(tmp_path / "ck" / "checkpoint.pt", weights_only=True)["epoch_rows"]
    seen: list[int] = []
    resumed = run_trial(ck, lambda row: seen.append(row["epoch"]), bundle=bundle)
    assert seen == [3, 4] and resumed.status == "completed"
    assert resumed.epoch_rows[:2] == first_two and len(first_two) == 2
    # cuDNN's backward kernels are not bit-deterministic: same run up to float noise.
    assert resumed.epoch_rows[-1]["train_loss"] == pytest.approx(full.epoch_rows[-1]["train_loss"], rel=0.1)


def test_study_seed_and_replica_redraw_noise_split_and_weights_shared_by_regularizers(bundle):
    base = make_cfg(noise_kind="symmetric", noise_rate=0.4, epochs=1)
    prep = {
        (s, r): prepare_data(updated(base, study_seed=s, replica=r), bundle)
        for s, r in [(0, 0), (7, 0), (0, 1), (7, 1)]
    }
    flips = {k: p.flipped for k, p in prep.items()}
    vals = {k: p.x_val for k, p in prep.items()}
    for a in prep:
        for b in prep:
            if a < b:  # every replication draws its own noise and its own split
                assert not torch.equal(flips[a], flips[b]) and not torch.equal(vals[a], vals[b]), (a, b)
    # Study seed 0, replica 0: the streams of before (noise_seed itself).
    old = noise_lib.corrupt(bundle.y_train, bundle.num_classes, "symmetric", 0.4, 0)
    assert torch.equal(prep[0, 0].noisy.labels, old.labels)
    # Another regularizer at the same study seed and replica sees the same labels and initial weights.
    ls = updated(base, study_seed=7, replica=1, regularizer="label_smoothing", reg_params={"alpha": 0.1})
    assert torch.equal(prepare_data(ls, bundle).y_train, prep[7, 1].y_train)
    weights = {}
    for s in (0, 7):
        torch.manual_seed(updated(base, study_seed=s).train_seed)
        weights[s] = next(build_model(base, bundle).parameters()).detach().clone()
    assert not torch.equal(weights[0], weights[7])
