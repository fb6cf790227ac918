"""Evaluations that need two trained models of the final phase: transfer attacks and distillation.

Each function takes the TrialConfig dicts of finished final-phase trials (their checkpoint dirs hold
`model.pt`) and returns long-format eval rows for the trial they are about. tune.py runs them as Ray
tasks after the final phase.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from study import data as data_lib
from study import metrics
from study.spec import DistillSpec, ModelSpec
from study.trial.config import TrialConfig
from study.trial.evaluate import attack_rows, eval_subset
from study.trial.fit import build_model, predict, resolve_device
from study.trial.run import prepare_data


def load_trained(cfg: TrialConfig, device: torch.device, bundle: Any = None) -> tuple[torch.nn.Module, Any]:
    """The final model of a finished trial (and its prepared data: same split and noisy labels)."""
    prep = prepare_data(cfg, bundle)
    model = build_model(cfg, prep.bundle).to(device)
    state = torch.load(Path(cfg.checkpoint_dir) / "model.pt", map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()
    return model, prep


def transfer_rows(target: dict[str, Any], source: dict[str, Any]) -> list[dict[str, Any]]:
    """PGD-CE crafted on `source` (the ce model of the same cell and seed), evaluated on `target`.

    LS-family losses can mask white-box CE gradients (Fu et al. 2020); a transfer attack does not
    depend on the target's gradients, so transfer accuracy far below white-box accuracy flags masking.
    """
    tcfg, scfg = TrialConfig.model_validate(target), TrialConfig.model_validate(source)
    device = resolve_device(tcfg.train.device)
    model, prep = load_trained(tcfg, device)
    source_model, _ = load_trained(scfg, device, prep.bundle)
    x, y = eval_subset(prep, tcfg, device)
    if tcfg.evaluate is None:
        return []
    return attack_rows(
        model,
        prep.bundle,
        tcfg.evaluate,
        x,
        y,
        attack_names=["transfer"],
        source_model=source_model,
        seed=tcfg.train_seed,
    )


def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton et al. 2015 soft-target loss: T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * t * t


def _train_student(
    scfg: TrialConfig, prep: Any, targets: torch.Tensor, loss_fn: Any, epochs: int, device: torch.device
) -> torch.nn.Module:
    """A student of `scfg`'s model on the training inputs against `targets` (teacher logits or labels),
    seeded by the trial's seed: AdamW with a one-cycle schedule at the trial's lr."""
    b = prep.bundle
    torch.manual_seed(scfg.train_seed)
    student = build_model(scfg, b).to(device)
    gen = torch.Generator(device=device).manual_seed(scfg.train_seed)
    batches = data_lib.DeviceBatches(
        prep.x_train.to(device),
        targets.to(device),
        scfg.train.batch_size,
        shuffle=True,
        generator=gen,
        to_float=b.to_float,
    )
    opt = torch.optim.AdamW(student.parameters(), lr=scfg.lr, weight_decay=scfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=scfg.lr, total_steps=epochs * len(batches))
    for _ in range(epochs):
        student.train()
        for xb, tb in batches:
            loss = loss_fn(student(xb), tb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return student


def distill_rows(teacher: dict[str, Any], distill: dict[str, Any]) -> list[dict[str, Any]]:
    """Train a student on the teacher's soft targets (Hinton et al. 2015) and, as its baseline, the same
    student on the training labels alone (same seed, epochs and optimizer); report the accuracies, the
    gain distillation brings over the baseline and the teacher-student gap.

    Reproduces the Mueller et al. 2019 experiment: teachers trained with label smoothing erase the
    information in their non-target logits and make worse students than hard-target teachers.
    """
    t0 = time.perf_counter()
    tcfg = TrialConfig.model_validate(teacher)
    spec = DistillSpec.model_validate(distill)
    device = resolve_device(tcfg.train.device)
    teacher_model, prep = load_trained(tcfg, device)
    b = prep.bundle
    teacher_logits, _ = predict(teacher_model, prep.x_train, b.to_float, device)
    scfg = tcfg.model_copy(update={"model": ModelSpec(name=spec.student, options=spec.student_options)})
    epochs = spec.epochs or tcfg.train.epochs
    soft = lambda s, t: distill_loss(s, t, spec.temperature)  # noqa: E731
    student = _train_student(scfg, prep, teacher_logits, soft, epochs, device)
    baseline = _train_student(scfg, prep, prep.y_train, F.cross_entropy, epochs, device)
    test_student, _ = predict(student, b.x_test, b.to_float, device)
    test_baseline, _ = predict(baseline, b.x_test, b.to_float, device)
    test_teacher, _ = predict(teacher_model, b.x_test, b.to_float, device)
    acc = {
        "student": metrics.accuracy(test_student, b.y_test),
        "baseline": metrics.accuracy(test_baseline, b.y_test),
        "teacher": metrics.accuracy(test_teacher, b.y_test),
    }
    row = {"split": "test", "condition": "distill", "severity": None}  # temperature: in the spec
    return [
        {**row, "metric": "student_accuracy", "value": acc["student"]},
        {**row, "metric": "teacher_accuracy", "value": acc["teacher"]},
        {**row, "metric": "baseline_student_accuracy", "value": acc["baseline"]},
        {**row, "metric": "distill_gain", "value": acc["student"] - acc["baseline"]},
        {**row, "metric": "teacher_student_gap", "value": acc["teacher"] - acc["student"]},
        {**row, "metric": "student_ece", "value": metrics.ece(test_student, b.y_test)},
        {**row, "metric": "distill_wall_s", "value": time.perf_counter() - t0},
    ]
