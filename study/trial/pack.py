"""Fitting a pack: K trials of one cell trained in one process as one batched model.

Each member stays its own trial: its seed (initial weights), data order (its own generator), learning
rate and weight decay, regularizer instance (stateful ones such as online label smoothing and
DisturbLabel keep their own state), noise seed and split (a cell's final seeds each have theirs), epoch
rows, best value, pruning, divergence and checkpoint: a ``Member`` of study/trial/loop.py, created,
trained epoch by epoch and ended by the same code as the trial alone. Only the data batching, the
forward/backward pass and the optimizer update are the pack's own (``_Pack``'s step, over
study/trial/packed_net.py and packed_optim.py). A member's checkpoint has the format of the same trial
trained alone, so either resumes the other.

A member that ends (completed, pruned, diverged) leaves the pack at the end of its epoch; ``refill``
may hand in new members for the free slots, which start at their own epoch 0 next to the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from study import data as data_lib
from study import regularizers
from study.spec import TrainSpec
from study.trial.config import TrialConfig
from study.trial.fit import Fitted, PreparedData, augments_images, make_optimizer, resolve_device, uses_bf16
from study.trial.loop import Member, MemberReport, Trainer, after_epoch
from study.trial.packed_net import PackedNet
from study.trial.packed_optim import PackedOptimizer

# (member key, epoch row) -> True to prune that member.
PackReport = MemberReport
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


class _Pack(Trainer):
    """The active members and their stacked model, optimizer and data; the step is one batched
    forward/backward and one per-member update."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.net: PackedNet | None = None
        self.opt: PackedOptimizer | None = None
        self.param_groups: dict[str, list[dict[str, Any]]] = {}  # each member's alone optimizer's

    def restack(self, members: list[Member]) -> None:
        """Re-build the stacked model and optimizer for `members` (after some left or joined)."""
        self._sync()
        self.members = members
        if not members:
            self.net = self.opt = None
            return
        for m in members:  # the torch-format param groups of a member's checkpoint
            if m.key not in self.param_groups:
                self.param_groups[m.key] = make_optimizer(m.cfg, m.model).state_dict()["param_groups"]
        self.net = PackedNet([m.model for m in members])
        train = members[0].cfg.train
        decay = [m.cfg.weight_decay for m in members]
        self.opt = PackedOptimizer(train.optimizer, self.net.parameters(), decay, train.momentum)
        for k, m in enumerate(members):
            if m.optimizer_state is not None:
                self.opt.load_member_state_dict(k, m.optimizer_state)
        self.bf16 = uses_bf16(members[0].cfg, self.device)
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
            m.optimizer_state = self.opt.member_state_dict(k, self.param_groups[m.key], m.last_lr)

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
        for i in range(self.steps_per_epoch()):
            idx = orders[:, i * bs : (i + 1) * bs]
            yield b.to_float(self.x[rows, idx]), self.y[rows, idx]

    def steps_per_epoch(self) -> int:
        return -(-self.x.shape[1] // self.members[0].cfg.train.batch_size)

    def train_mode(self) -> None:
        assert self.net is not None
        self.net.train(True)

    def step(self, xb: Tensor, yb: Tensor, lrs: list[float]) -> tuple[Tensor, Tensor, Tensor]:
        assert self.net is not None and self.opt is not None
        with (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        ):
            logits = self.net(xb)
        losses = member_losses(self.members, logits.float(), yb)
        self.opt.zero_grad()
        losses.sum().backward()  # member k's gradient is that of its own loss alone
        self.opt.step(lrs)
        return logits.detach(), yb, losses.detach()

    @torch.no_grad()
    def val_logits(self, batch_size: int = 1024) -> Tensor:
        assert self.net is not None
        self.net.train(False)
        to_float = self.members[0].prep.bundle.to_float
        parts = [
            self.net(to_float(self.x_val[:, i : i + batch_size])).float().cpu()
            for i in range(0, self.x_val.shape[1], batch_size)
        ]
        return torch.cat(parts, dim=1)

    def finite(self) -> list[bool]:
        assert self.net is not None
        return self.net.all_finite().tolist()

    def states(self, k: int) -> tuple[dict[str, Any], dict[str, Any]]:
        assert self.net is not None and self.opt is not None
        m = self.members[k]
        return self.net.member_state(k), self.opt.member_state_dict(k, self.param_groups[m.key], m.last_lr)


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
        fresh = [Member.create(key, cfg, prep, ckpt, device) for key, cfg, prep, ckpt in joining]
        # Members whose checkpoint says they have ended leave at once: their slots are free too.
        ended = [m for m in fresh if m.status != "running"]
        active = pack.members + [m for m in fresh if m.status == "running"]
        if len({pack_key(m.cfg) for m in active}) > 1:
            raise ValueError("members of a pack must share data, model, batch size, epochs and optimizer")
        if [m.key for m in active] != [m.key for m in pack.members] or pack.net is None:
            pack.restack(active)
        if pack.members:
            trained_out = after_epoch(pack, pack.train_epoch(), report)
            if trained_out:
                pack.restack([m for m in pack.members if m.status == "running"])  # syncs their weights too
            ended += trained_out
        for m in ended:
            done[m.key] = m.fitted(device)
            on_end(m.key, done[m.key])
        free = capacity - len(pack.members)
        joining = refill(free) if (refill is not None and free > 0 and ended) else []
    return done
