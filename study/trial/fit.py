"""The parts of fitting a model: the leaf of the trial layer (prepared data, model, optimizer, learning
rate schedule, divergence rule, checkpoint format, prediction). The loop that uses them, alone and packed,
is study/trial/loop.py.

The trial is the unit Ray Tune runs many times, so the hot path has no DataLoader: the whole dataset
lives on the training device and batches are slices picked by a device-side permutation. Nothing here
knows about label-noise kinds or evaluation (study/trial/run.py composes those).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from study import data as data_lib
from study import metrics, models, regularizers
from study import noise as noise_lib
from study.spec import METRICS, TrainSpec
from study.trial.config import TrialConfig

Report = Callable[[dict[str, Any]], "bool | None"]


@dataclass
class PreparedData:
    bundle: data_lib.DatasetBundle
    x_train: torch.Tensor
    y_train: torch.Tensor  # possibly noisy
    y_train_clean: torch.Tensor
    flipped: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    noisy: noise_lib.NoisyLabels


@dataclass
class Fitted:
    """What fitting leaves: the model and regularizer, how it ended, and its per-epoch rows."""

    model: models.Classifier
    regularizer: regularizers.Regularizer
    device: torch.device
    status: str
    epoch_rows: list[dict[str, Any]] = field(default_factory=list)
    best: tuple[float | None, int | None] = (None, None)


# A training loss this many times above its reference has exploded (see `exploded`).
DIVERGENCE_FACTOR = 100.0


def exploded(train_loss: float, reference: float) -> bool:
    """Whether an epoch's mean training loss says the fit blew up.

    ``reference`` is max(the loss of the first batch at initialisation, log K): what the untrained
    model scores, so a regularizer whose loss is large by construction (LogitNorm at a small tau) sets
    its own scale. Healthy runs stay below a few times it (worst measured over every regularizer on
    MNIST-1D: see tests/trial/test_train.py); AdamW at lr 1e3 reaches ~1e15 in its first epoch, at
    chance accuracy and without a NaN. NaN and infinities count as exploded.
    """
    return not math.isfinite(train_loss) or train_loss > DIVERGENCE_FACTOR * reference


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(cfg: TrialConfig, bundle: data_lib.DatasetBundle) -> models.Classifier:
    return models.create_model(
        cfg.model.name,
        bundle.input_shape,
        bundle.num_classes,
        mean=bundle.mean,
        std=bundle.std,
        **cfg.model.options,
    )


def make_optimizer(cfg: TrialConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # On CUDA the fused kernels update every parameter in one launch: small models there are bound by
    # kernel launches (bench/bench_gpu.md), not by arithmetic. The CPU keeps the default (foreach) path.
    params = list(model.parameters())
    fused = (bool(params) and all(p.is_cuda for p in params)) or None
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.train.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=True,
            fused=fused,
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def lr_factor(train: TrainSpec, step: int, total: int) -> float:
    """Learning-rate multiplier at optimizer step `step` of `total` (per-step, so short runs anneal too)."""
    warm = train.warmup_epochs * total / max(train.epochs, 1)
    if warm and step < warm:
        return (step + 1) / warm
    progress = step / max(total, 1)
    if train.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if train.schedule == "multistep":
        return train.gamma ** sum(progress >= m for m in train.milestones)
    return 1.0


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    x: torch.Tensor,
    to_float: Callable,
    device: torch.device,
    batch_size: int = 1024,
    features: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (N,K) float32 on CPU, and penultimate features (N,D) when asked."""
    model.eval()
    logits, feats = [], []
    for i in range(0, len(x), batch_size):
        xb = to_float(x[i : i + batch_size].to(device, non_blocking=True))
        if features:
            f = model.features(xb)
            feats.append(f.float().cpu())
            logits.append(model.head(f).float().cpu())
        else:
            logits.append(model(xb).float().cpu())
    return torch.cat(logits), (torch.cat(feats) if features else None)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    # Write-then-rename: a trial killed mid-save leaves the previous checkpoint intact.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def uses_bf16(cfg: TrialConfig, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast: on CUDA unless the config asks for fp32."""
    return device.type == "cuda" and cfg.train.precision in ("auto", "bf16")


def augments_images(cfg: TrialConfig, bundle: data_lib.DatasetBundle) -> bool:
    """Whether training batches get random crops and flips (images of 24 pixels or more)."""
    return bool(cfg.train.augment and bundle.kind == "image" and bundle.input_shape[-1] >= 24)


def tracks_progress(reg: regularizers.Regularizer) -> bool:
    """Whether `reg` needs ``set_progress`` every step: a schedule varies or the module listens.

    set_progress checks its argument and re-evaluates every schedule (~65 us, 2% of a batch-32 cnn1d
    step on a CPU core), so the loops call it only when this says so.
    """
    return type(reg).set_progress is not regularizers.Regularizer.set_progress or any(
        s.kind != "constant" and s.start != s.end for s in reg.schedules().values()
    )


def validation_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The validation columns of an epoch row."""
    return {
        "val_accuracy": metrics.accuracy(logits, labels),
        "val_nll": metrics.nll(logits, labels),
        "val_ece": metrics.ece(logits, labels),
    }


def checkpoint_state(
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    reg: regularizers.Regularizer,
    gen: torch.Generator,
    *,
    epoch: int,
    rows: list[dict[str, Any]],
    best: tuple,
    status: str,
    reference_loss: float,
) -> dict[str, Any]:
    """A trial's checkpoint after `epoch` epochs: one format for a trial trained alone or in a pack
    (study/trial/pack.py), so either resumes the other. `status` is kept only when the trial ended
    pruned or diverged."""
    return {
        "model": model_state,
        "optimizer": optimizer_state,
        "regularizer": reg.state_dict(),
        "batch_rng": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "epoch": epoch,
        "epoch_rows": rows,
        "best": list(best),
        "status": status if status in ("pruned", "diverged") else None,
        "reference_loss": reference_loss,
    }


def update_best(best: tuple, row: dict[str, Any], epoch: int, metric: str) -> tuple:
    value = row[metric]
    if not math.isfinite(value):
        return best
    maximize = METRICS[metric] == "maximize"
    if best[0] is None or (value > best[0] if maximize else value < best[0]):
        return (value, epoch)
    return best
