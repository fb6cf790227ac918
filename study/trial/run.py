"""One trial: data + label noise + fit + evaluation -> a TrialResult (what the sweep records).

Composes the trial layer: ``prepare_data`` supplies each noise kind the inputs its registry entry asks
for (coarse labels, features, out-of-fold reference probabilities), ``fit`` trains, ``evaluate_model``
measures a completed final trial on the clean test set.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study import data as data_lib
from study import noise as noise_lib
from study.spec import DatasetSpec, NoiseSetting
from study.trial.config import TrialConfig
from study.trial.evaluate import evaluate_model
from study.trial.fit import Fitted, PreparedData, Report, save_checkpoint
from study.trial.loop import fit
from study.trial.pack import PackReport, fit_pack
from study.trial.reference import reference_probabilities


@dataclass
class TrialResult:
    status: str
    epochs_run: int
    best_value: float | None
    best_epoch: int | None
    epoch_rows: list[dict[str, Any]] = field(default_factory=list)
    eval_rows: list[dict[str, Any]] = field(default_factory=list)
    projection: list[dict[str, float]] = field(default_factory=list)
    realized_noise_rate: float = 0.0
    noise_note: str = ""
    wall_s: float = 0.0
    device: str = "cpu"
    error: str | None = None

    def metric(self, name: str, split: str = "test", condition: str = "clean") -> float | None:
        for row in self.eval_rows:
            if row["metric"] == name and row["split"] == split and row["condition"] == condition:
                return row["value"]
        return None


# The last dataset this process loaded: a Ray worker re-used across trials (reuse_actors) reads and
# decodes its dataset once, not per trial (CIFAR from its pickles takes about a second). One entry
# keeps memory bounded; trials only ever index the bundle's tensors, never write into them.
_BUNDLE_CACHE: dict[str, data_lib.DatasetBundle] = {}


def load_bundle(cfg: TrialConfig) -> data_lib.DatasetBundle:
    d = cfg.dataset
    key = json.dumps([d.name, d.root, d.download, d.options], sort_keys=True, default=str)
    bundle = _BUNDLE_CACHE.get(key)
    if bundle is None:
        bundle = data_lib.load_dataset(d.name, root=d.root, download=d.download, **d.options)
        _BUNDLE_CACHE.clear()
        _BUNDLE_CACHE[key] = bundle
    return bundle


# How the trial provides each input a noise kind can ask for (study.noise.NoiseInputs fields); None
# leaves the field's default.
_NOISE_INPUTS: dict[str, Callable[[TrialConfig, data_lib.DatasetBundle], Any]] = {
    "dataset": lambda cfg, b: b.name,
    "coarse_labels": lambda cfg, b: b.coarse_train,
    "features": lambda cfg, b: b.to_float(b.x_train).flatten(1),
    "probs": lambda cfg, b: reference_probabilities(b, cfg.model.name, cfg.model.options, seed=cfg.data_seed),
    "mode": lambda cfg, b: cfg.noise.mode,
    "given_labels": lambda cfg, b: given_labels(cfg.noise, cfg.dataset, b),
}


def noise_inputs(cfg: TrialConfig, bundle: data_lib.DatasetBundle) -> noise_lib.NoiseInputs:
    """The inputs the trial's noise kind declares (and only those: a reference model is trained only
    for a kind that reads ``probs``)."""
    given = {name: _NOISE_INPUTS[name](cfg, bundle) for name in noise_lib.noise_inputs(cfg.noise.kind)}
    return noise_lib.NoiseInputs(**{name: v for name, v in given.items() if v is not None})


def given_labels(ns: NoiseSetting, dataset: DatasetSpec, bundle: data_lib.DatasetBundle) -> Any:
    """The noisy training labels of a ``human`` (CIFAR-N, under the dataset root) or ``file`` setting.

    Raises ``noise.LabelFileError`` (one line naming the file and the expected shape); ``study run``
    calls this before Ray starts, so a bad file is a bad input (exit 2), not N failed trials.
    """
    if ns.kind == "human":
        root = dataset.root if dataset.root is not None else data_lib.cache_root()
        return noise_lib.load_human_labels(
            ns.dataset_labels, ns.label_set, bundle.y_train, bundle.num_classes, root=root,
            download=dataset.download,
        )  # fmt: skip
    return noise_lib.load_label_file(ns.path, len(bundle.y_train), bundle.num_classes)


def prepare_data(cfg: TrialConfig, bundle: data_lib.DatasetBundle | None = None) -> PreparedData:
    """Split train/val and corrupt the training labels.

    Noise is applied to the whole training set before the split, from `noise_seed` only, so every
    regularizer (and every training seed sharing the noise seed) sees exactly the same noisy labels.
    The validation split carries the same noise unless `clean_validation` is set (oracle studies).
    """
    bundle = bundle or load_bundle(cfg)
    y_clean = bundle.y_train
    inputs = noise_inputs(cfg, bundle)
    noisy = noise_lib.corrupt_setting(y_clean, bundle.num_classes, cfg.noise, cfg.data_seed, inputs)
    train_idx, val_idx = data_lib.split_train_val(len(y_clean), cfg.dataset.val_fraction, seed=cfg.data_seed)
    y_val = (y_clean if cfg.dataset.clean_validation else noisy.labels)[val_idx]
    return PreparedData(
        bundle=bundle,
        x_train=bundle.x_train[train_idx],
        y_train=noisy.labels[train_idx],
        y_train_clean=y_clean[train_idx],
        flipped=noisy.flipped[train_idx],
        x_val=bundle.x_train[val_idx],
        y_val=y_val,
        noisy=noisy,
    )


def run_trial(
    cfg: TrialConfig,
    report: Report | None = None,
    *,
    bundle: data_lib.DatasetBundle | None = None,
    prepared: PreparedData | None = None,
) -> TrialResult:
    """Train one configuration; `report(epoch_row)` returning True stops the trial as pruned.

    A NaN/inf training loss ends the trial with status "diverged" instead of raising. A completed trial
    with an ``evaluate`` block is evaluated on the clean test set; with ``save_model`` and a checkpoint
    dir its weights are kept as ``model.pt`` (the post phase reads them).
    """
    t_start = time.perf_counter()
    prep, fitted = train_trial(cfg, report, bundle=bundle, prepared=prepared)
    result = finish_trial(cfg, prep, fitted)
    result.wall_s = time.perf_counter() - t_start
    return result


def train_trial(
    cfg: TrialConfig,
    report: Report | None = None,
    *,
    bundle: data_lib.DatasetBundle | None = None,
    prepared: PreparedData | None = None,
) -> tuple[PreparedData, Fitted]:
    """``run_trial`` up to its trained model: the prepared data and the fit (resumed from the config's
    checkpoint dir), without evaluation."""
    prep = prepared or prepare_data(cfg, bundle)
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    return prep, fit(cfg, prep, report, checkpoint=ckpt_dir / "checkpoint.pt" if ckpt_dir else None)


def finish_trial(cfg: TrialConfig, prep: PreparedData, fitted: Fitted) -> TrialResult:
    """A fitted trial's result: the full evaluation of a completed final trial, and its kept model."""
    result = TrialResult(
        status=fitted.status,
        epochs_run=len(fitted.epoch_rows),
        best_value=fitted.best[0],
        best_epoch=fitted.best[1],
        epoch_rows=fitted.epoch_rows,
        realized_noise_rate=prep.noisy.realized_rate,
        noise_note=prep.noisy.note,
        device=str(fitted.device),
    )
    if fitted.status == "completed" and cfg.evaluate is not None:
        evaluation = evaluate_model(fitted.model, prep, cfg, fitted.device)
        result.eval_rows, result.projection = evaluation.rows, evaluation.projection
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if fitted.status == "completed" and cfg.save_model and ckpt_dir is not None:
        save_checkpoint(
            ckpt_dir / "model.pt", {"model": fitted.model.state_dict(), "config": cfg.model_dump(mode="json")}
        )
    return result


def run_pack(
    members: list[tuple[str, TrialConfig]],
    report: PackReport | None = None,
    *,
    on_result: Callable[[str, TrialResult], None] = lambda key, result: None,
    refill: Callable[[int], list[tuple[str, TrialConfig]]] | None = None,
) -> dict[str, TrialResult]:
    """Train trials (key, config) as one pack (study/trial/pack.py), then finish each like ``run_trial``.

    `report(key, epoch_row)` returning True prunes that member alone. Members sharing a noise setting
    and seed share one PreparedData (one split in memory). `on_result(key, result)` is called as each
    member's result is ready; `refill(free)` may hand in new members when some have ended. A member's
    ``wall_s`` is its share of the pack's epochs plus its evaluation.
    """
    prepared: dict[str, PreparedData] = {}
    entries: dict[str, tuple[str, TrialConfig, PreparedData, Path | None]] = {}

    def entry(key: str, cfg: TrialConfig) -> tuple[str, TrialConfig, PreparedData, Path | None]:
        # What prepare_data reads: the data, the noise, its seeds (and the model, for OOF references).
        data_key = cfg.model_dump_json(
            include={"dataset", "noise", "noise_seed", "study_seed", "replica", "model"}
        )
        if data_key not in prepared:
            prepared[data_key] = prepare_data(cfg)
        ckpt = Path(cfg.checkpoint_dir) / "checkpoint.pt" if cfg.checkpoint_dir else None
        entries[key] = (key, cfg, prepared[data_key], ckpt)
        return entries[key]

    results: dict[str, TrialResult] = {}

    def ended(key: str, fitted: Fitted) -> None:  # as each member ends, not when the pack does
        _, cfg, prep, _ = entries[key]
        t_eval = time.perf_counter()
        result = finish_trial(cfg, prep, fitted)
        result.wall_s = sum(r.get("wall_s", 0.0) for r in result.epoch_rows) + time.perf_counter() - t_eval
        results[key] = result
        on_result(key, result)

    more = (lambda free: [entry(k, c) for k, c in refill(free)]) if refill is not None else None
    fit_pack([entry(k, c) for k, c in members], report, refill=more, on_end=ended)
    return results
