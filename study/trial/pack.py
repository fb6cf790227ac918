"""Fitting a pack: K trials of one cell trained in one process as one batched model.

Each member stays its own trial: its seed (initial weights), data order (its own generator), learning
rate and weight decay, regularizer instance (stateful ones such as online label smoothing and
DisturbLabel keep their own state), noise seed and split (a cell's final seeds each have theirs), epoch
rows, best value, pruning, divergence and checkpoint. Only the forward/backward pass and the optimizer
update are batched (study/trial/packed_net.py, packed_optim.py). A member's checkpoint has the format
of the same trial trained alone (study/trial/fit.py), so either resumes the other.

A member that ends (completed, pruned, diverged) leaves the pack at the end of its epoch; ``refill``
may hand in new members for the free slots, which start at their own epoch 0 next to the others.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from study import data as data_lib
from study import regularizers
from study.spec import TrainSpec
from study.trial.config import TrialConfig
from study.trial.fit import (
    Fitted,
    PreparedData,
    augments_images,
    build_model,
    checkpoint_state,
    exploded,
    lr_factor,
    make_optimizer,
    resolve_device,
    save_checkpoint,
    tracks_progress,
    update_best,
    uses_bf16,
    validation_metrics,
)
from study.trial.packed_net import PackedNet
from study.trial.packed_optim import PackedOptimizer

# (member key, epoch row) -> True to prune that member.
PackReport = Callable[[str, dict[str, Any]], "bool | None"]
# Free slots -> new members (key, config, prepared data, checkpoint path or None) to train next to the rest.
Refill = Callable[[int], list[tuple[str, TrialConfig, PreparedData, "Path | None"]]]

# What members of one pack must share; the rest (lr, weight decay, regularizer params, seeds) is theirs.
_TRAIN_SHARED = tuple(n for n in TrainSpec.model_fields if n not in TrainSpec.SEARCHABLE)


def pack_key(cfg: TrialConfig) -> str:
    """Configs with equal keys can share a pack: same data, architecture, batch/epochs/optimizer/device."""
    train = cfg.train.model_dump(mode="json", include=set(_TRAIN_SHARED))
    return repr(
        (cfg.dataset.model_dump(mode="json"), cfg.model.model_dump(mode="json"), sorted(train.items()))
    )


@dataclass
class Member:
    """One trial inside a pack."""

    key: str
    cfg: TrialConfig
    prep: PreparedData
    model: nn.Module  # holds the member's weights whenever the pack is re-stacked, and at the end
    reg: regularizers.Regularizer
    gen: torch.Generator
    checkpoint: Path | None
    param_groups: list[dict[str, Any]]  # the alone optimizer's, for torch-format checkpoints
    reference_loss: float
    tracks_progress: bool
    epoch: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: tuple[float | None, int | None] = (None, None)
    status: str = "running"
    optimizer_state: dict[str, Any] | None = None
    last_lr: float = 0.0


def _new_member(
    key: str, cfg: TrialConfig, prep: PreparedData, ckpt: Path | None, device: torch.device
) -> Member:
    """A member initialised exactly as ``fit`` initialises the trial alone, or from its checkpoint."""
    torch.manual_seed(cfg.seed)  # the model's initial weights depend on the seed only
    model = build_model(cfg, prep.bundle).to(device)
    reg = regularizers.create(cfg.regularizer.name, **cfg.regularizer.params).to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    member = Member(
        key, cfg, prep, model, reg, gen, ckpt, make_optimizer(cfg, model).state_dict()["param_groups"],
        reference_loss=math.log(prep.bundle.num_classes), tracks_progress=tracks_progress(reg),
    )  # fmt: skip
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        reg.load_state_dict(state["regularizer"])
        gen.set_state(state["batch_rng"].cpu())
        member.optimizer_state = state["optimizer"]
        member.epoch, member.rows, member.best = state["epoch"], state["epoch_rows"], tuple(state["best"])
        member.reference_loss = state.get("reference_loss", member.reference_loss)
        member.status = state.get("status") or "running"
        if member.status == "running" and member.epoch >= cfg.train.epochs:
            member.status = "completed"
    return member


def member_losses(members: list[Member], z: Tensor, y: Tensor) -> Tensor:
    """(K,) batch-mean losses of logits z (K, B, classes) and targets y (K, B), member k with its own
    regularizer (its own parameter values, schedules included)."""
    out: list[Tensor | None] = [None] * len(members)
    groups: dict[str, list[int]] = {}
    for k, m in enumerate(members):
        if regularizers.get_info(m.cfg.regularizer.name).vmappable:
            groups.setdefault(m.cfg.regularizer.name, []).append(k)
        else:
            out[k] = m.reg(z[k], y[k])
    for idx in groups.values():
        template = members[idx[0]].reg
        values = {
            p: torch.tensor([members[k].reg.param(p) for k in idx], dtype=torch.float32, device=z.device)
            for p in template.current_params()
        }
        whole = len(idx) == len(members)
        sel = None if whole else torch.tensor(idx, device=z.device)
        zs, ys = (z, y) if sel is None else (z[sel], y[sel])
        res = torch.func.vmap(template.forward_with)(zs, ys, values)
        if whole:
            return res
        for j, k in enumerate(idx):
            out[k] = res[j]
    return torch.stack(out)  # type: ignore[arg-type]


class _Pack:
    """The active members and their stacked model, optimizer and data."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.members: list[Member] = []
        self.net: PackedNet | None = None
        self.opt: PackedOptimizer | None = None

    def restack(self, members: list[Member]) -> None:
        """Re-build the stacked model and optimizer for `members` (after some left or joined)."""
        self._sync()
        self.members = members
        if not members:
            self.net = self.opt = None
            return
        self.net = PackedNet([m.model for m in members])
        train = members[0].cfg.train
        decay = [m.cfg.weight_decay for m in members]
        self.opt = PackedOptimizer(train.optimizer, self.net.parameters(), decay, train.momentum)
        for k, m in enumerate(members):
            if m.optimizer_state is not None:
                self.opt.load_member_state_dict(k, m.optimizer_state)
        preps = [m.prep for m in members]
        if all(p is preps[0] for p in preps):  # search trials share one split: no copies
            x, x_val = (
                t.unsqueeze(0).expand(len(preps), *t.shape) for t in (preps[0].x_train, preps[0].x_val)
            )
        else:  # final seeds: each its own noise seed, hence its own split
            x, x_val = torch.stack([p.x_train for p in preps]), torch.stack([p.x_val for p in preps])
        self.x, self.x_val = x.to(self.device), x_val.to(self.device)
        self.y = torch.stack([p.y_train for p in preps]).to(self.device)

    def _sync(self) -> None:
        """Write the stacked weights and optimizer state back into each member (before re-stacking)."""
        if self.net is None or self.opt is None:
            return
        for k, m in enumerate(self.members):
            m.model.load_state_dict(self.net.member_state(k))
            m.optimizer_state = self.opt.member_state_dict(k, m.param_groups, m.last_lr)

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of (K, B, ...) inputs and (K, B) labels, each member in its own order."""
        m0 = self.members[0]
        b, bs = m0.prep.bundle, m0.cfg.train.batch_size
        n = self.x.shape[1]
        if augments_images(m0.cfg, b):  # per-member augmentation draws from each member's generator, as alone
            iters = [
                iter(data_lib.DeviceBatches(self.x[k], self.y[k], bs, shuffle=True, generator=m.gen,
                                            augment="crop_flip", to_float=b.to_float))
                for k, m in enumerate(self.members)
            ]  # fmt: skip
            for parts in zip(*iters, strict=True):
                yield torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
            return
        orders = torch.stack([data_lib.epoch_order(n, m.gen, self.device) for m in self.members])
        rows = torch.arange(len(self.members), device=self.device).unsqueeze(1)
        for i in range(-(-n // bs)):
            idx = orders[:, i * bs : (i + 1) * bs]
            yield b.to_float(self.x[rows, idx]), self.y[rows, idx]

    # Long: one training pass over all members; its parts mirror fit._Loop.train_epoch line by line.
    def train_epoch(self) -> tuple[list[dict[str, Any]], float]:
        """One epoch of every member; each member's training part of its epoch row, and the wall time."""
        assert self.net is not None and self.opt is not None
        members, net, opt, dev = self.members, self.net, self.opt, self.device
        t0 = time.perf_counter()
        net.train(True)
        for m in members:
            m.reg.train()
        train = members[0].cfg.train  # batch size and epochs are the pack's (pack_key)
        steps = -(-self.x.shape[1] // train.batch_size)
        total_steps = steps * train.epochs
        k_members = len(members)
        bf16 = uses_bf16(members[0].cfg, dev)
        loss_sum, correct = torch.zeros(k_members, device=dev), torch.zeros(k_members, device=dev)
        terms: list[dict[str, Tensor]] = [{} for _ in members]
        seen, n_terms = 0, 0
        for i, (xb, yb) in enumerate(self.batches()):
            lrs = []
            for m in members:
                step = m.epoch * steps + i
                if m.tracks_progress:
                    m.reg.set_progress(step / max(total_steps - 1, 1))
                lrs.append(m.cfg.lr * lr_factor(m.cfg.train, step, total_steps))
            with torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                logits = net(xb)
            losses = member_losses(members, logits.float(), yb)
            if i == 0 and any(m.epoch == 0 for m in members):  # the untrained models' losses
                first = losses.detach().tolist()
                for k, m in enumerate(members):
                    if m.epoch == 0:
                        m.reference_loss = max(m.reference_loss, first[k])
            opt.zero_grad()
            losses.sum().backward()  # member k's gradient is that of its own loss alone
            opt.step(lrs)
            seen += yb.shape[1]
            loss_sum += losses.detach() * yb.shape[1]
            correct += (logits.detach().argmax(2) == yb).sum(1)
            if i % 4 == 0:  # the decomposition is a diagnostic: a subsample of steps, as alone
                n_terms += 1
                for k, m in enumerate(members):
                    for name, v in m.reg.terms(logits[k].detach().float(), yb[k]).items():
                        terms[k][name] = terms[k].get(name, torch.zeros((), device=dev)) + v.detach()
        for m, lr in zip(members, lrs, strict=True):
            m.last_lr = lr
            m.reg.on_epoch_end()
        losses_mean, acc = (loss_sum / max(seen, 1)).tolist(), (correct / max(seen, 1)).tolist()
        rows = [
            {"lr": m.last_lr, "train_loss": losses_mean[k], "train_acc": acc[k],
             **{f"term_{name}": float(v) / max(n_terms, 1) for name, v in terms[k].items()}}
            for k, m in enumerate(members)
        ]  # fmt: skip
        return rows, time.perf_counter() - t0

    @torch.no_grad()
    def val_logits(self, batch_size: int = 1024) -> Tensor:
        """(K, N_val, classes) float32 logits on the CPU, every member in eval mode."""
        assert self.net is not None
        self.net.train(False)
        to_float = self.members[0].prep.bundle.to_float
        parts = [
            self.net(to_float(self.x_val[:, i : i + batch_size])).float().cpu()
            for i in range(0, self.x_val.shape[1], batch_size)
        ]
        return torch.cat(parts, dim=1)

    def member_checkpoint(self, k: int) -> dict[str, Any]:
        assert self.net is not None and self.opt is not None
        m = self.members[k]
        return checkpoint_state(
            self.net.member_state(k), self.opt.member_state_dict(k, m.param_groups, m.last_lr), m.reg, m.gen,
            epoch=m.epoch, rows=m.rows, best=m.best, status=m.status, reference_loss=m.reference_loss,
        )  # fmt: skip


def _end_epoch(pack: _Pack, train_rows: list[dict[str, Any]], wall: float, report: PackReport | None) -> None:
    """Validation, divergence, best value, pruning and checkpoint of every member after one epoch."""
    assert pack.net is not None
    val = pack.val_logits()
    finite = pack.net.all_finite().tolist()
    for k, m in enumerate(pack.members):
        y_val = m.prep.y_val
        row = {
            "epoch": m.epoch + 1,
            **{key: train_rows[k][key] for key in ("lr", "train_loss", "train_acc")},
            **validation_metrics(val[k], y_val),
            # The member's share of the pack's epoch: summed over a study, it is the compute spent.
            "wall_s": wall / len(pack.members),
            **{key: v for key, v in train_rows[k].items() if key.startswith("term_")},
        }
        m.rows.append(row)
        m.epoch += 1
        if exploded(row["train_loss"], m.reference_loss) or not finite[k]:
            m.status = "diverged"
        else:
            m.best = update_best(m.best, row, m.epoch, m.cfg.metric)
            if report is not None and report(m.key, row):
                m.status = "pruned"
        if m.status == "running" and m.epoch >= m.cfg.train.epochs:
            m.status = "completed"
        if m.checkpoint is not None:
            save_checkpoint(m.checkpoint, pack.member_checkpoint(k))


def _fitted(m: Member, device: torch.device) -> Fitted:
    return Fitted(m.model, m.reg, device, m.status, m.rows, m.best)


def fit_pack(
    members: list[tuple[str, TrialConfig, PreparedData, Path | None]],
    report: PackReport | None = None,
    *,
    refill: Refill | None = None,
    on_end: Callable[[str, Fitted], None] = lambda key, fitted: None,
) -> dict[str, Fitted]:
    """Train every member (key, config, prepared data, checkpoint path) in one batched model.

    `report(key, epoch_row)` returning True prunes that member alone; the others go on. A member whose
    checkpoint exists resumes from it (one that ended pruned or diverged stays so). `refill(free)` is
    asked for new members whenever members have left, including members that join already ended (their
    checkpoint says so: a resumed study), so an empty pack still asks before it stops. `on_end(key,
    fitted)` is called as each member ends (its result need not wait for the rest of the pack: a study
    tells Optuna, so later trials are pruned against it). Returns each member's Fitted, by key.

    Raises:
        ValueError: If the members cannot share a pack (``pack_key`` differs) or keys repeat.
    """
    if not members:
        return {}
    device = resolve_device(members[0][1].train.device)
    capacity, done = len(members), {}
    pack = _Pack(device)
    joining = list(members)
    while joining or pack.members:
        keys = [m.key for m in pack.members] + [j[0] for j in joining]
        if len(set(keys) | set(done)) != len(keys) + len(done):
            raise ValueError(f"member keys of a pack must be unique, but got {keys}")
        fresh = [_new_member(key, cfg, prep, ckpt, device) for key, cfg, prep, ckpt in joining]
        # Members whose checkpoint says they have ended leave at once: their slots are free too.
        ended = [m for m in fresh if m.status != "running"]
        active = pack.members + [m for m in fresh if m.status == "running"]
        if len({pack_key(m.cfg) for m in active}) > 1:
            raise ValueError("members of a pack must share data, model, batch size, epochs and optimizer")
        if [m.key for m in active] != [m.key for m in pack.members] or pack.net is None:
            pack.restack(active)
        if pack.members:
            rows, wall = pack.train_epoch()
            _end_epoch(pack, rows, wall, report)
            trained_out = [m for m in pack.members if m.status != "running"]
            if trained_out:
                pack.restack([m for m in pack.members if m.status == "running"])  # syncs their weights too
            ended += trained_out
        for m in ended:
            done[m.key] = _fitted(m, device)
            on_end(m.key, done[m.key])
        free = capacity - len(pack.members)
        joining = refill(free) if (refill is not None and free > 0 and ended) else []
    return done
