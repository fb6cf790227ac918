"""On a CUDA device: a trial with full evaluation (attacks, every corruption), then the transfer attack
and distillation of the post phase, all on the GPU; the same configuration on the CPU as reference."""

from __future__ import annotations

import math

import pytest

from study.trial import post
from study.trial.config import TrialConfig
from study.trial.run import run_trial

pytestmark = pytest.mark.gpu

EVAL = {
    "attacks": ["fgsm", "pgd_ce", "pgd_dlr", "transfer"],
    "eps": [0.05, 0.1],
    "pgd_steps": 5,
    "corruptions": "all",
    "severities": [1, 3],
    "max_samples": 300,
}


def _config(tmp_path, device: str, regularizer: str, params: dict) -> dict:
    return {
        "dataset": {"name": "digits"},  # bundled with scikit-learn: 8x8 images, no download
        "model": {"name": "resnet20"},
        "regularizer": {"name": regularizer, "params": params},
        "noise": {"kind": "symmetric", "rate": 0.2},
        "train": {"epochs": 4, "batch_size": 64, "lr": 2e-2, "device": device},
        "evaluate": EVAL,
        "save_model": True,
        "checkpoint_dir": str(tmp_path / f"{device}-{regularizer}"),
    }


def _clean_accuracy(rows: list[dict]) -> float:
    key = ("test", "clean", "accuracy")
    (acc,) = [r["value"] for r in rows if (r["split"], r["condition"], r["metric"]) == key]
    return acc


def test_trial_evaluation_transfer_and_distillation_on_cuda(tmp_path):
    results = {}
    for device in ("cuda", "cpu"):
        ce = _config(tmp_path, device, "ce", {})
        maxsup = _config(tmp_path, device, "maxsup", {"alpha": 0.1})
        runs = {name: run_trial(TrialConfig(**cfg)) for name, cfg in (("ce", ce), ("maxsup", maxsup))}
        for run in runs.values():
            assert run.status == "completed" and run.device.startswith(device)
            assert all(math.isfinite(r["value"]) for r in run.eval_rows)
        conditions = {r["condition"] for r in runs["maxsup"].eval_rows}
        expected = {"clean", "fgsm", "pgd_ce", "pgd_dlr", "jpeg", "gaussian_noise", "corruption_mean"}
        assert expected <= conditions
        transfer = post.transfer_rows(maxsup, ce)
        distill = post.distill_rows(maxsup, {"student": "mlp", "temperature": 4.0, "epochs": 3})
        assert {r["severity"] for r in transfer} == {0.05, 0.1}
        metrics = {r["metric"]: r["value"] for r in distill}
        assert metrics["teacher_accuracy"] == pytest.approx(_clean_accuracy(runs["maxsup"].eval_rows))
        results[device] = {
            "clean": _clean_accuracy(runs["maxsup"].eval_rows),
            "transfer": {r["severity"]: r["value"] for r in transfer},
            "student": metrics["student_accuracy"],
        }
    # Same recipe on both devices (bf16 on the GPU): the numbers agree up to training noise.
    assert results["cuda"]["clean"] > 0.85 and abs(results["cuda"]["clean"] - results["cpu"]["clean"]) < 0.05
    assert abs(results["cuda"]["student"] - results["cpu"]["student"]) < 0.1
    for eps in (0.05, 0.1):
        assert abs(results["cuda"]["transfer"][eps] - results["cpu"]["transfer"][eps]) < 0.15
