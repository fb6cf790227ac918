"""Out-of-fold reference class probabilities for the adversarial label-flip noise kind.

The attacker ranks training points by the margin of a model trained on CLEAN labels. In-sample
probabilities are ~100% confident on every point (the model memorises), so each point's probability
comes from a model that did not see it (k-fold). The result is cached on disk per dataset, model and
seed, under a file lock so that parallel trials compute it once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from study import data as data_lib
from study import noise as noise_lib
from study.spec import DatasetSpec, ModelSpec, TrainSpec
from study.trial.config import TrialConfig
from study.trial.fit import PreparedData, predict
from study.trial.loop import fit


def _cache_dir() -> Path:
    return Path(os.environ.get("REGSTUDY_CACHE", Path.home() / ".cache" / "regstudy")) / "oof"


def reference_probabilities(
    bundle: data_lib.DatasetBundle,
    model: str,
    model_options: dict[str, Any],
    *,
    seed: int,
    folds: int = 5,
    epochs: int = 15,
    lr: float = 2e-2,
    batch_size: int = 32,
) -> torch.Tensor:
    """(N_train, K) out-of-fold softmax probabilities of a CE model on the clean training labels."""
    key = json.dumps(
        {
            "d": bundle.name,
            "n": len(bundle.y_train),
            "m": model,
            "o": model_options,
            "s": seed,
            "f": folds,
            "e": epochs,
            "lr": lr,
            "b": batch_size,
        },
        sort_keys=True,
    )
    path = _cache_dir() / f"{bundle.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            return torch.load(path, weights_only=True)
        probs = _compute(
            bundle, model, model_options, seed=seed, folds=folds, epochs=epochs, lr=lr, batch_size=batch_size
        )
        tmp = path.with_suffix(".tmp")
        torch.save(probs, tmp)
        os.replace(tmp, path)
        return probs


def _compute(
    bundle: data_lib.DatasetBundle,
    model: str,
    model_options: dict[str, Any],
    *,
    seed: int,
    folds: int,
    epochs: int,
    lr: float,
    batch_size: int,
) -> torch.Tensor:
    n = len(bundle.y_train)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    probs = torch.zeros(n, bundle.num_classes)
    for k in range(folds):
        held = order[k::folds]
        mask = torch.ones(n, dtype=torch.bool)
        mask[held] = False
        train_idx = mask.nonzero().squeeze(1)
        clean = noise_lib.corrupt(bundle.y_train[train_idx], bundle.num_classes, "none", 0.0, seed)
        prep = PreparedData(
            bundle=bundle,
            x_train=bundle.x_train[train_idx],
            y_train=bundle.y_train[train_idx],
            y_train_clean=bundle.y_train[train_idx],
            flipped=clean.flipped,
            x_val=bundle.x_train[held],
            y_val=bundle.y_train[held],
            noisy=clean,
        )
        # The reference protocol's own settings (5-fold CE, 15 epochs), not the study's.
        cfg = TrialConfig(
            dataset=DatasetSpec(name=bundle.name),
            model=ModelSpec(name=model, options=model_options),
            seed=seed + k,
            train=TrainSpec(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=1e-4),
        )
        fitted = fit(cfg, prep)
        logits, _ = predict(fitted.model, bundle.x_train[held], bundle.to_float, fitted.device)
        probs[held] = torch.softmax(logits, dim=1)
    return probs
