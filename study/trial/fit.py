"""Fitting one model: the leaf of the trial layer (config + prepared data -> trained model, epoch rows).

The trial is the unit Ray Tune runs many times, so the hot path has no DataLoader: the whole dataset
lives on the training device and batches are slices picked by a device-side permutation. Nothing here
knows about label-noise kinds or evaluation (study/trial/run.py composes those).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
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


class _Loop:
    """The training state of one fit: model, optimizer, regularizer, batches and their RNG."""

    def __init__(self, cfg: TrialConfig, prep: PreparedData, device: torch.device) -> None:
        b = prep.bundle
        self.cfg, self.prep, self.device = cfg, prep, device
        torch.manual_seed(cfg.seed)  # the model's initial weights depend on the seed only
        self.model = build_model(cfg, b).to(device)
        self.channels_last = device.type == "cuda" and b.kind == "image"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.use_bf16 = uses_bf16(cfg, device)
        self.reg = regularizers.create(cfg.regularizer.name, **cfg.regularizer.params).to(device)
        self.opt = make_optimizer(cfg, self.model)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(cfg.seed)
        image_aug = augments_images(cfg, b)
        self.batches = data_lib.DeviceBatches(
            prep.x_train.to(device),
            prep.y_train.to(device),
            cfg.train.batch_size,
            shuffle=True,
            generator=self.gen,
            augment="crop_flip" if image_aug else None,
            to_float=b.to_float,
        )
        self.x_val = prep.x_val.to(device)
        # The scale `exploded` compares against: log K until the first batch's loss is known.
        self.reference_loss = math.log(b.num_classes)
        self.total_steps = len(self.batches) * cfg.train.epochs
        self.tracks_progress = tracks_progress(self.reg)

    def state(self, epoch: int, rows: list[dict[str, Any]], best: tuple, status: str) -> dict[str, Any]:
        return checkpoint_state(
            self.model.state_dict(), self.opt.state_dict(), self.reg, self.gen,
            epoch=epoch, rows=rows, best=best, status=status, reference_loss=self.reference_loss,
        )  # fmt: skip

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.reg.load_state_dict(state["regularizer"])
        # Generator states are CPU byte tensors whatever map_location did to them.
        self.gen.set_state(state["batch_rng"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        self.reference_loss = state.get("reference_loss", self.reference_loss)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training batches; the epoch's row (validation metrics included)."""
        cfg, model, reg, opt, device = self.cfg, self.model, self.reg, self.opt, self.device
        model.train()
        reg.train()
        t_epoch = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        terms_sum: dict[str, torch.Tensor] = {}
        seen = 0
        steps_per_epoch = len(self.batches)
        for i, (xb, yb) in enumerate(self.batches):
            step = epoch * steps_per_epoch + i
            if self.tracks_progress:
                reg.set_progress(step / max(self.total_steps - 1, 1))
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(cfg.train, step, self.total_steps)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if self.use_bf16 else None
            with autocast or contextlib.nullcontext():
                logits = model(xb)
            loss = reg(logits.float(), yb)
            if step == 0:  # the untrained model's loss: one sync per fit
                self.reference_loss = max(self.reference_loss, float(loss.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n = len(yb)
            seen += n
            # Accumulate on the device: a .item() per step would be a CPU-GPU sync point.
            loss_sum += loss.detach() * n
            correct += (logits.detach().argmax(1) == yb).sum()
            if i % 4 == 0:  # the decomposition is a diagnostic: a subsample of steps is enough
                for k, v in reg.terms(logits.detach().float(), yb).items():
                    terms_sum[k] = terms_sum.get(k, torch.zeros((), device=device)) + v.detach()
                terms_sum["_n"] = terms_sum.get("_n", torch.zeros((), device=device)) + 1
        reg.on_epoch_end()
        val_logits, _ = predict(model, self.x_val, self.prep.bundle.to_float, device)
        y_val = self.prep.y_val
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": float(loss_sum) / max(seen, 1),
            "train_acc": float(correct) / max(seen, 1),
            **validation_metrics(val_logits, y_val),
            "wall_s": time.perf_counter() - t_epoch,
        }
        n_terms = float(terms_sum.pop("_n", torch.ones(())))
        row.update({f"term_{k}": float(v) / n_terms for k, v in terms_sum.items()})
        return row

    def diverged(self, row: dict[str, Any]) -> bool:
        """The epoch's loss exploded, or a weight is no longer finite (a loss can stay finite a while)."""
        finite = torch.stack([p.detach().isfinite().all() for p in self.model.parameters()]).all()
        return exploded(row["train_loss"], self.reference_loss) or not bool(finite)


def update_best(best: tuple, row: dict[str, Any], epoch: int, metric: str) -> tuple:
    value = row[metric]
    if not math.isfinite(value):
        return best
    maximize = METRICS[metric] == "maximize"
    if best[0] is None or (value > best[0] if maximize else value < best[0]):
        return (value, epoch)
    return best


def fit(
    cfg: TrialConfig,
    prep: PreparedData,
    report: Report | None = None,
    *,
    checkpoint: Path | None = None,
) -> Fitted:
    """Train `cfg` on `prep`; `report(epoch_row)` returning True stops the fit as pruned.

    Resumes from `checkpoint` when it exists (a fit that ended pruned or diverged stays so) and writes
    it after every epoch. A training loss that is NaN/inf or exploded (``exploded``) or a non-finite
    weight ends the fit as "diverged" instead of raising.
    """
    device = resolve_device(cfg.train.device)
    loop = _Loop(cfg, prep, device)
    start_epoch, rows, best = 0, [], (None, None)
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        loop.restore(state)
        start_epoch, rows, best = state["epoch"], state["epoch_rows"], tuple(state["best"])
        if state.get("status") in ("diverged", "pruned"):
            return Fitted(loop.model, loop.reg, device, state["status"], rows, best)
    status = "completed"
    for epoch in range(start_epoch, cfg.train.epochs):
        row = loop.train_epoch(epoch)
        rows.append(row)
        if loop.diverged(row):
            status = "diverged"
        else:
            best = update_best(best, row, epoch + 1, cfg.metric)
            if report is not None and report(row):
                status = "pruned"
        if checkpoint is not None:
            save_checkpoint(checkpoint, loop.state(epoch + 1, rows, best, status))
        if status != "completed":
            break
    return Fitted(loop.model, loop.reg, device, status, rows, best)
