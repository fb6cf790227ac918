"""One trial: data + label noise + model + regularizer -> per-epoch reports, checkpoints, evaluation.

The trial is the unit Ray Tune runs many times, so the hot path has no DataLoader: the whole dataset
lives on the training device and batches are slices picked by a device-side permutation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from study import data as data_lib
from study import metrics, models, regularizers
from study import noise as noise_lib
from study.spec import METRICS
from study.trial.reference import reference_probabilities

STATUSES = ("completed", "pruned", "failed", "diverged")


class TrialConfig(BaseModel):
    """Everything one trial needs; the Ray trainable turns its dict into this on its first line."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "mnist1d"
    dataset_root: str | None = None
    download: bool = False
    dataset_options: dict[str, Any] = Field(default_factory=dict)
    val_fraction: float = 0.2
    clean_validation: bool = False
    model: str = "cnn1d"
    model_options: dict[str, Any] = Field(default_factory=dict)
    regularizer: str = "ce"
    reg_params: dict[str, Any] = Field(default_factory=dict)
    noise_kind: str = "none"
    noise_rate: float = 0.0
    noise_mode: str | None = None
    noise_seed: int = 0
    seed: int = 0
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    milestones: list[float] = Field(default_factory=lambda: [0.3, 0.6, 0.8])
    gamma: float = 0.2
    warmup_epochs: int = 0
    augment: bool = True
    device: str = "auto"
    precision: str = "auto"
    checkpoint_dir: str | None = None
    metric: str = "val_accuracy"
    full_eval: bool = True
    evaluate: dict[str, Any] = Field(default_factory=dict)
    save_model: bool = False


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# The last dataset this process loaded: a Ray worker re-used across trials (reuse_actors) reads and
# decodes its dataset once, not per trial (CIFAR from its pickles takes about a second). One entry
# keeps memory bounded; trials only ever index the bundle's tensors, never write into them.
_BUNDLE_CACHE: dict[str, data_lib.DatasetBundle] = {}


def load_bundle(cfg: TrialConfig) -> data_lib.DatasetBundle:
    key = json.dumps(
        [cfg.dataset, cfg.dataset_root, cfg.download, cfg.dataset_options], sort_keys=True, default=str
    )
    bundle = _BUNDLE_CACHE.get(key)
    if bundle is None:
        bundle = data_lib.load_dataset(
            cfg.dataset, root=cfg.dataset_root, download=cfg.download, **cfg.dataset_options
        )
        _BUNDLE_CACHE.clear()
        _BUNDLE_CACHE[key] = bundle
    return bundle


def prepare_data(cfg: TrialConfig, bundle: data_lib.DatasetBundle | None = None) -> PreparedData:
    """Split train/val and corrupt the training labels.

    Noise is applied to the whole training set before the split, from `noise_seed` only, so every
    regularizer (and every training seed sharing the noise seed) sees exactly the same noisy labels.
    The validation split carries the same noise unless `clean_validation` is set (oracle studies).
    """
    bundle = bundle or load_bundle(cfg)
    y_clean = bundle.y_train
    kw: dict[str, Any] = {"dataset": bundle.name}
    if cfg.noise_kind == "asymmetric" and bundle.coarse_train is not None:
        kw["coarse_labels"] = bundle.coarse_train
    if cfg.noise_kind == "instance":
        kw["features"] = bundle.to_float(bundle.x_train).flatten(1)
    if cfg.noise_kind == "adversarial":
        kw["probs"] = reference_probabilities(bundle, cfg.model, cfg.model_options, seed=cfg.noise_seed)
        kw["mode"] = cfg.noise_mode or "confident"
    noisy = noise_lib.corrupt(
        y_clean, bundle.num_classes, cfg.noise_kind, cfg.noise_rate, cfg.noise_seed, **kw
    )
    train_idx, val_idx = data_lib.split_train_val(len(y_clean), cfg.val_fraction, seed=cfg.noise_seed)
    y_val = (y_clean if cfg.clean_validation else noisy.labels)[val_idx]
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


def build_model(cfg: TrialConfig, bundle: data_lib.DatasetBundle) -> models.Classifier:
    return models.create_model(
        cfg.model,
        bundle.input_shape,
        bundle.num_classes,
        mean=bundle.mean,
        std=bundle.std,
        **cfg.model_options,
    )


def _optimizer(cfg: TrialConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # On CUDA the fused kernels update every parameter in one launch: small models there are bound by
    # kernel launches (bench/bench_gpu.md), not by arithmetic. The CPU keeps the default (foreach) path.
    params = list(model.parameters())
    fused = (bool(params) and all(p.is_cuda for p in params)) or None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=True,
            fused=fused,
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def _lr_factor(cfg: TrialConfig, step: int, total: int) -> float:
    """Learning-rate multiplier at optimizer step `step` of `total` (per-step, so short runs anneal too)."""
    warm = cfg.warmup_epochs * total / max(cfg.epochs, 1)
    if warm and step < warm:
        return (step + 1) / warm
    progress = step / max(total, 1)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(progress >= m for m in cfg.milestones)
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


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    # Write-then-rename: a trial killed mid-save leaves the previous checkpoint intact.
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def run_trial(
    cfg: TrialConfig,
    report: Callable[[dict[str, Any]], bool | None] | None = None,
    *,
    bundle: data_lib.DatasetBundle | None = None,
    prepared: PreparedData | None = None,
    model_sink: dict[str, torch.nn.Module] | None = None,
) -> TrialResult:
    """Train one configuration; `report(epoch_row)` returning True stops the trial as pruned.

    A NaN/inf training loss ends the trial with status "diverged" instead of raising.
    """
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    prep = prepared or prepare_data(cfg, bundle)
    b = prep.bundle
    model = build_model(cfg, b).to(device)
    use_bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
    if device.type == "cuda" and b.kind == "image":
        model = model.to(memory_format=torch.channels_last)
    reg = regularizers.create(cfg.regularizer, **cfg.reg_params).to(device)
    if model_sink is not None:
        model_sink["model"] = model
    opt = _optimizer(cfg, model)
    x_tr, y_tr = prep.x_train.to(device), prep.y_train.to(device)
    x_val = prep.x_val.to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    augment = "crop_flip" if (cfg.augment and b.kind == "image" and b.input_shape[-1] >= 24) else None
    batches = data_lib.DeviceBatches(
        x_tr, y_tr, cfg.batch_size, shuffle=True, generator=gen, augment=augment, to_float=b.to_float
    )
    steps_per_epoch = len(batches)
    total_steps = steps_per_epoch * cfg.epochs

    ckpt_path = Path(cfg.checkpoint_dir) / "checkpoint.pt" if cfg.checkpoint_dir else None
    start_epoch, epoch_rows, best = 0, [], (None, None)
    if ckpt_path and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        reg.load_state_dict(state["regularizer"])
        # Generator states are CPU byte tensors whatever map_location did to them.
        gen.set_state(state["batch_rng"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        start_epoch, epoch_rows, best = state["epoch"], state["epoch_rows"], tuple(state["best"])
        if state.get("status") in ("diverged", "pruned"):
            return _finish(cfg, prep, model, reg, device, state["status"], epoch_rows, best, t_start, None)

    # set_progress checks its argument and re-evaluates every schedule (~65 us, 2% of a batch-32 cnn1d
    # step on a CPU core): call it per step only when a schedule varies or a wrapped module listens.
    tracks_progress = type(reg).set_progress is not regularizers.Regularizer.set_progress or any(
        sch.kind != "constant" and sch.start != sch.end for sch in reg.schedules().values()
    )
    status = "completed"
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        reg.train()
        t_epoch = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        terms_sum: dict[str, torch.Tensor] = {}
        seen = 0
        for i, (xb, yb) in enumerate(batches):
            step = epoch * steps_per_epoch + i
            if tracks_progress:
                reg.set_progress(step / max(total_steps - 1, 1))
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(cfg, step, total_steps)
            if device.type == "cuda" and b.kind == "image":
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext():
                logits = model(xb)
            loss = reg(logits.float(), yb)
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
        train_loss = float(loss_sum) / max(seen, 1)
        val_logits, _ = predict(model, x_val, b.to_float, device)
        y_val_cpu = prep.y_val
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": train_loss,
            "train_acc": float(correct) / max(seen, 1),
            "val_accuracy": metrics.accuracy(val_logits, y_val_cpu),
            "val_nll": metrics.nll(val_logits, y_val_cpu),
            "val_ece": metrics.ece(val_logits, y_val_cpu),
            "wall_s": time.perf_counter() - t_epoch,
        }
        n_terms = float(terms_sum.pop("_n", torch.ones(())))
        row.update({f"term_{k}": float(v) / n_terms for k, v in terms_sum.items()})
        if not math.isfinite(train_loss):
            status = "diverged"
        epoch_rows.append(row)
        if status != "diverged":
            best = _update_best(best, row, epoch + 1, cfg.metric)
        stop = False
        if report is not None and status != "diverged":
            stop = bool(report(row))
        if stop:
            status = "pruned"
        if ckpt_path is not None:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            _save_checkpoint(
                ckpt_path,
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "regularizer": reg.state_dict(),
                    "batch_rng": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "epoch": epoch + 1,
                    "epoch_rows": epoch_rows,
                    "best": list(best),
                    "status": status if status != "completed" else None,
                },
            )
        if status != "completed":
            break
    return _finish(cfg, prep, model, reg, device, status, epoch_rows, best, t_start, ckpt_path)


def _update_best(best: tuple, row: dict[str, Any], epoch: int, metric: str) -> tuple:
    value = row[metric]
    if not math.isfinite(value):
        return best
    maximize = METRICS[metric] == "maximize"
    if best[0] is None or (value > best[0] if maximize else value < best[0]):
        return (value, epoch)
    return best


def _finish(
    cfg: TrialConfig,
    prep: PreparedData,
    model: torch.nn.Module,
    reg: torch.nn.Module,
    device: torch.device,
    status: str,
    epoch_rows: list[dict[str, Any]],
    best: tuple,
    t_start: float,
    ckpt_path: Path | None,
) -> TrialResult:
    result = TrialResult(
        status=status,
        epochs_run=len(epoch_rows),
        best_value=best[0],
        best_epoch=best[1],
        epoch_rows=epoch_rows,
        realized_noise_rate=prep.noisy.realized_rate,
        noise_note=prep.noisy.note,
        device=str(device),
    )
    if status == "completed" and cfg.full_eval:
        from study.trial.evaluate import evaluate_model

        extras: dict[str, Any] = {}
        result.eval_rows = evaluate_model(model, prep, cfg, device, extras=extras)
        result.projection = extras.get("projection", [])
    if status == "completed" and cfg.save_model and cfg.checkpoint_dir:
        path = Path(cfg.checkpoint_dir) / "model.pt"
        _save_checkpoint(path, {"model": model.state_dict(), "config": cfg.model_dump()})
    result.wall_s = time.perf_counter() - t_start
    return result


def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton et al. 2015 soft-target loss: T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * t * t
