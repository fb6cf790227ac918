"""The one training loop, for a trial alone (``fit``) and for a pack of trials (study/trial/pack.py).

A ``Member`` is one trial's own state: its seed (initial weights), data-order generator, regularizer,
optimizer state, epoch rows, best value, status and checkpoint. It is created, restored from its
checkpoint and ended the same way alone and in a pack, so either checkpoint resumes the other. A
``Trainer`` runs one epoch over its members; what differs is only the step (``Alone`` below: one model
and torch's optimizer; ``_Pack`` in pack.py: a batched model and a per-member optimizer) and how the
data is batched. ``after_epoch`` is the per-epoch end of every member: divergence, best value, pruning,
checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from study import data as data_lib
from study import regularizers
from study.trial.config import TrialConfig
from study.trial.fit import (
    Fitted,
    PreparedData,
    Report,
    augments_images,
    build_model,
    checkpoint_state,
    exploded,
    lr_factor,
    make_optimizer,
    predict,
    resolve_device,
    save_checkpoint,
    tracks_progress,
    update_best,
    uses_bf16,
    validation_metrics,
)

# (member key, epoch row) -> True to prune that member.
MemberReport = Callable[[str, dict[str, Any]], "bool | None"]


@dataclass
class Member:
    """One trial, alone or in a pack: what is its own, and how far it has come."""

    key: str
    cfg: TrialConfig
    prep: PreparedData
    model: nn.Module  # its weights (a pack writes them back whenever it re-stacks, and at the end)
    reg: regularizers.Regularizer
    gen: torch.Generator  # its data order and augmentation
    checkpoint: Path | None
    reference_loss: float  # the scale `exploded` compares against: log K until the first batch's loss
    tracks_progress: bool
    epoch: int = 0  # epochs trained
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: tuple[float | None, int | None] = (None, None)
    status: str = "running"
    optimizer_state: dict[str, Any] | None = None  # torch format, from its checkpoint or its pack
    last_lr: float = 0.0

    @classmethod
    def create(
        cls, key: str, cfg: TrialConfig, prep: PreparedData, ckpt: Path | None, device: torch.device
    ) -> Member:
        """The trial initialised from its seed, then restored from `ckpt` when that exists. A checkpoint
        that cannot be read (truncated, garbled) restarts the trial from epoch 0, with one line on
        stderr: its epochs are trained again rather than the trial ending failed."""
        member = cls._initial(key, cfg, prep, ckpt, device)
        if ckpt is not None and ckpt.exists():
            try:
                member.restore(torch.load(ckpt, map_location=device, weights_only=True))
            except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, train afresh
                print(
                    f"study: {ckpt} cannot be read ({type(exc).__name__}); training from epoch 0",
                    file=sys.stderr,
                )
                member = cls._initial(key, cfg, prep, ckpt, device)
        if member.status == "running" and member.epoch >= cfg.train.epochs:
            member.status = "completed"
        return member

    @classmethod
    def _initial(
        cls, key: str, cfg: TrialConfig, prep: PreparedData, ckpt: Path | None, device: torch.device
    ) -> Member:
        torch.manual_seed(cfg.train_seed)  # the initial weights depend on the (derived) seed only
        model = build_model(cfg, prep.bundle).to(device)
        reg = regularizers.create(cfg.regularizer.name, **cfg.regularizer.params).to(device)
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.train_seed)
        reference = math.log(prep.bundle.num_classes)
        return cls(key, cfg, prep, model, reg, gen, ckpt, reference, tracks_progress(reg))

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint (``checkpoint_state``); one that ended pruned or diverged stays so."""
        self.model.load_state_dict(state["model"])
        self.reg.load_state_dict(state["regularizer"])
        # Generator states are CPU byte tensors whatever map_location did to them.
        self.gen.set_state(state["batch_rng"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        self.optimizer_state = state["optimizer"]
        self.epoch, self.rows, self.best = state["epoch"], state["epoch_rows"], tuple(state["best"])
        self.reference_loss = state.get("reference_loss", self.reference_loss)
        self.status = state.get("status") or "running"

    def end_epoch(self, row: dict[str, Any], finite: bool, report: MemberReport | None) -> None:
        """After an epoch: its row; diverged (the loss exploded or a weight is no longer finite: a loss
        can stay finite a while), else the best value and the pruner's word; completed at the last."""
        self.rows.append(row)
        self.epoch += 1
        if exploded(row["train_loss"], self.reference_loss) or not finite:
            self.status = "diverged"
        else:
            self.best = update_best(self.best, row, self.epoch, self.cfg.metric)
            if report is not None and report(self.key, row):
                self.status = "pruned"
        if self.status == "running" and self.epoch >= self.cfg.train.epochs:
            self.status = "completed"

    def save(self, model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        if self.checkpoint is not None:
            save_checkpoint(
                self.checkpoint,
                checkpoint_state(
                    model_state, optimizer_state, self.reg, self.gen, epoch=self.epoch, rows=self.rows,
                    best=self.best, status=self.status, reference_loss=self.reference_loss,
                ),
            )  # fmt: skip

    def fitted(self, device: torch.device) -> Fitted:
        return Fitted(self.model, self.reg, device, self.status, self.rows, self.best)


class Trainer:
    """One epoch over `members`. A subclass gives the batches, the step and the per-member states; the
    rest of an epoch is this one loop: each member's progress and learning rate, the untrained
    model's reference loss, the sums of loss, accuracy and regularizer terms, validation, the rows."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.members: list[Member] = []

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def step(self, xb: Tensor, yb: Tensor, lrs: list[float]) -> tuple[Tensor, Tensor, Tensor]:
        """Forward, backward and update, member k at learning rate ``lrs[k]``: detached logits
        (K, B, classes), labels (K, B) and batch-mean losses (K,)."""
        raise NotImplementedError

    def val_logits(self) -> Tensor:
        """(K, N_val, classes) float32 logits on the CPU, in eval mode."""
        raise NotImplementedError

    def finite(self) -> list[bool]:
        """Per member: every weight still finite."""
        raise NotImplementedError

    def states(self, k: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Member k's model and optimizer state dicts, in the format of the trial trained alone."""
        raise NotImplementedError

    def train_mode(self) -> None:
        raise NotImplementedError

    def train_epoch(self) -> list[dict[str, Any]]:
        """One pass over the training batches; each member's epoch row (validation metrics included)."""
        members, dev = self.members, self.device
        t_epoch = time.perf_counter()
        self.train_mode()
        for m in members:
            m.reg.train()
        steps = self.steps_per_epoch()
        total_steps = steps * members[0].cfg.train.epochs  # members share batch size and epochs
        loss_sum, correct = torch.zeros(len(members), device=dev), torch.zeros(len(members), device=dev)
        terms: list[dict[str, Tensor]] = [{} for _ in members]
        seen, n_terms, lrs = 0, 0, [m.last_lr for m in members]
        for i, (xb, yb) in enumerate(self.batches()):
            lrs = []
            for m in members:
                step = m.epoch * steps + i
                if m.tracks_progress:
                    m.reg.set_progress(step / max(total_steps - 1, 1))
                lrs.append(m.cfg.lr * lr_factor(m.cfg.train, step, total_steps))
            logits, y, losses = self.step(xb, yb, lrs)
            if i == 0 and any(m.epoch == 0 for m in members):  # the untrained models' losses: one sync
                for m, loss in zip(members, losses.tolist(), strict=True):
                    if m.epoch == 0:
                        m.reference_loss = max(m.reference_loss, loss)
            seen += y.shape[1]
            # Accumulate on the device: a .item() per step would be a CPU-GPU sync point.
            loss_sum += losses * y.shape[1]
            correct += (logits.argmax(2) == y).sum(1)
            if i % 4 == 0:  # the decomposition is a diagnostic: a subsample of steps is enough
                n_terms += 1
                for k, m in enumerate(members):
                    for name, v in m.reg.terms(logits[k].float(), y[k]).items():
                        terms[k][name] = terms[k].get(name, torch.zeros((), device=dev)) + v.detach()
        for m, lr in zip(members, lrs, strict=True):
            m.last_lr = lr
            m.reg.on_epoch_end()
        val = self.val_logits()
        wall = time.perf_counter() - t_epoch
        return [
            {
                "epoch": m.epoch + 1,
                "lr": m.last_lr,
                "train_loss": float(loss_sum[k]) / max(seen, 1),
                "train_acc": float(correct[k]) / max(seen, 1),
                **validation_metrics(val[k], m.prep.y_val),
                # A member's share of its pack's epoch: summed over a study, it is the compute spent.
                "wall_s": wall / len(members),
                **{f"term_{name}": float(v) / max(n_terms, 1) for name, v in terms[k].items()},
            }
            for k, m in enumerate(members)
        ]


def after_epoch(trainer: Trainer, rows: list[dict[str, Any]], report: MemberReport | None) -> list[Member]:
    """Every member's end of the epoch (``Member.end_epoch``), each checkpointed before the next is
    asked; returns the members that have ended."""
    finite = trainer.finite()
    for k, m in enumerate(trainer.members):
        m.end_epoch(rows[k], finite[k], report)
        if m.checkpoint is not None:
            m.save(*trainer.states(k))
    return [m for m in trainer.members if m.status != "running"]


class Alone(Trainer):
    """One member, one model, torch's optimizer: device-resident batches picked by its generator."""

    def __init__(self, member: Member, device: torch.device) -> None:
        super().__init__(device)
        self.members = [member]
        cfg, b = member.cfg, member.prep.bundle
        self.channels_last = device.type == "cuda" and b.kind == "image"
        if self.channels_last:
            member.model = member.model.to(memory_format=torch.channels_last)
        self.use_bf16 = uses_bf16(cfg, device)
        self.opt = make_optimizer(cfg, member.model)
        if member.optimizer_state is not None:
            self.opt.load_state_dict(member.optimizer_state)
        self.data = data_lib.DeviceBatches(
            member.prep.x_train.to(device),
            member.prep.y_train.to(device),
            cfg.train.batch_size,
            shuffle=True,
            generator=member.gen,
            augment="crop_flip" if augments_images(cfg, b) else None,
            to_float=b.to_float,
        )
        self.x_val = member.prep.x_val.to(device)

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self.data)

    def steps_per_epoch(self) -> int:
        return len(self.data)

    def train_mode(self) -> None:
        self.members[0].model.train()

    def step(self, xb: Tensor, yb: Tensor, lrs: list[float]) -> tuple[Tensor, Tensor, Tensor]:
        m, opt = self.members[0], self.opt
        for g in opt.param_groups:
            g["lr"] = lrs[0]
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else None
        with autocast or contextlib.nullcontext():
            logits = m.model(xb)
        loss = m.reg(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return logits.detach().unsqueeze(0), yb.unsqueeze(0), loss.detach().unsqueeze(0)

    def val_logits(self) -> Tensor:
        m = self.members[0]
        return predict(m.model, self.x_val, m.prep.bundle.to_float, self.device)[0].unsqueeze(0)

    def finite(self) -> list[bool]:
        params = self.members[0].model.parameters()
        return [bool(torch.stack([p.detach().isfinite().all() for p in params]).all())]

    def states(self, k: int) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.members[0].model.state_dict(), self.opt.state_dict()


def fit(
    cfg: TrialConfig,
    prep: PreparedData,
    report: Report | None = None,
    *,
    checkpoint: Path | None = None,
) -> Fitted:
    """Train `cfg` on `prep`; `report(epoch_row)` returning True stops the fit as pruned.

    Resumes from `checkpoint` when it exists (a fit that ended pruned or diverged stays so; one that
    cannot be read starts again) and writes it after every epoch. A training loss that is NaN/inf or
    exploded (``exploded``) or a non-finite weight ends the fit as "diverged" instead of raising.
    """
    device = resolve_device(cfg.train.device)
    member = Member.create("", cfg, prep, checkpoint, device)
    if member.status == "running":
        alone = Alone(member, device)
        keyed = (lambda key, row: report(row)) if report is not None else None
        while member.status == "running":
            after_epoch(alone, alone.train_epoch(), keyed)
    return member.fitted(device)
