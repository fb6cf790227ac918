"""Final evaluation of a trained model on the clean test set, as long-format rows for evals.parquet."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from study import metrics
from study.robustness import attacks, corruptions
from study.spec import EvaluateSpec
from study.trial.config import TrialConfig
from study.trial.fit import PreparedData, predict


def _row(
    split: str, condition: str, metric: str, value: float, severity: float | None = None
) -> dict[str, Any]:
    return {
        "split": split,
        "condition": condition,
        "severity": severity,
        "metric": metric,
        "value": float(value),
    }


@dataclass
class Evaluation:
    """What ``evaluate_model`` measures: long-format rows (evals.parquet) and the feature projection."""

    rows: list[dict[str, Any]]
    projection: list[dict[str, float]] = field(default_factory=list)


def evaluate_model(
    model: torch.nn.Module,
    prep: PreparedData,
    cfg: TrialConfig,
    device: torch.device,
    *,
    source_model: torch.nn.Module | None = None,
) -> Evaluation:
    """Clean-test metrics, temperature scaling, reliability bins, feature geometry, memorisation,
    and the attacks/corruptions the spec's `evaluate:` block asks for; with 3 classes or more, the
    template-plane projection of the test features (classes 0, 1, 2)."""
    b = prep.bundle
    rows: list[dict[str, Any]] = []
    test_logits, test_feats = predict(model, b.x_test, b.to_float, device, features=True)
    y_test = b.y_test
    clean = metrics.classification_metrics(test_logits, y_test)
    # Signed calibration next to ECE: > 0 overconfident, < 0 underconfident (strong LS).
    clean["calibration_gap"] = clean["mean_confidence"] - clean["accuracy"]
    for name, value in clean.items():
        rows.append(_row("test", "clean", name, value))
    val_logits, _ = predict(model, prep.x_val, b.to_float, device)
    for name, value in metrics.calibration_after_temperature(
        val_logits, prep.y_val, test_logits, y_test
    ).items():
        rows.append(_row("test", "clean", name, value))
    bins = metrics.reliability_bins(test_logits, y_test)
    for i in range(len(bins["count"])):
        for key in ("accuracy", "confidence", "count"):
            rows.append(_row("test", "clean", f"bin_{key}", float(bins[key][i]), severity=float(i)))
    projection = metrics.project_features(test_feats, y_test, model.head.weight) if b.num_classes >= 3 else []
    for name, value in metrics.feature_separation(test_feats, y_test).items():
        rows.append(_row("test", "clean", name, value))
    if bool(prep.flipped.any()):
        train_logits, _ = predict(model, prep.x_train, b.to_float, device)
        rows.append(
            _row(
                "train",
                "clean",
                "memorisation_rate",
                metrics.memorisation_rate(train_logits, prep.y_train, prep.flipped),
            )
        )
        rows.append(
            _row(
                "train",
                "clean",
                "clean_label_recovery",
                metrics.clean_label_recovery(train_logits, prep.y_train_clean, prep.flipped),
            )
        )
        rows.append(
            _row(
                "train",
                "clean",
                "train_accuracy_clean_labels",
                metrics.accuracy(train_logits, prep.y_train_clean),
            )
        )
    rows += robustness_rows(model, prep, cfg, device, source_model=source_model)
    kept = [
        r
        for r in rows
        if r["value"] is not None and not (isinstance(r["value"], float) and math.isnan(r["value"]))
    ]
    return Evaluation(kept, projection)


def eval_subset(
    prep: PreparedData, cfg: TrialConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (float, device-resident) test inputs used for attacks and corruptions, capped by max_samples."""
    b = prep.bundle
    n = (cfg.evaluate.max_samples if cfg.evaluate else None) or len(b.y_test)
    return b.to_float(b.x_test[:n].to(device)), b.y_test[:n].to(device)


def attack_rows(
    model: torch.nn.Module,
    bundle: Any,
    evaluate: EvaluateSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack_names: list[str],
    source_model: torch.nn.Module | None,
    seed: int,
) -> list[dict[str, Any]]:
    """Attack accuracy rows; `severity` is the eps the user wrote (in std units for standardised data),
    not the eps the attack used after scaling.

    `evaluate` is the spec's `evaluate:` block (eps, pgd_steps and pgd_step_size are read here).
    ``pgd_step_size`` is written in the same units as eps and converted the same way
    (`attacks.eps_for_data`: as given for images in [0, 1], times the data std for standardised data);
    missing or None keeps PGD's eps / 4 for each eps. Used by the final evaluation and the transfer post
    phase, so both attack with the same steps.
    """

    def to_input_units(value: float) -> float:
        return attacks.eps_for_data(value, data_std=bundle.data_std, value_range=bundle.value_range)

    eps_user = evaluate.eps
    eps_list = [to_input_units(e) for e in eps_user]
    step_user = evaluate.pgd_step_size
    step_size = None if step_user is None else to_input_units(step_user)
    user_eps = dict(zip(eps_list, eps_user, strict=True))
    rows = attacks.robustness_rows(
        model,
        x,
        y,
        eps_list=eps_list,
        attacks=attack_names,
        source_model=source_model,
        steps=evaluate.pgd_steps,
        step_size=step_size,
        clamp=bundle.value_range,
        seed=seed,
    )
    return [{"split": "test", **r, "severity": user_eps.get(r["severity"], r["severity"])} for r in rows]


def gradient_masking_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """1.0 when a transfer or DLR attack beats white-box PGD-CE clearly (attacks.gradient_masking_flag)."""
    acc = [r for r in rows if r["metric"] == "accuracy" and r["condition"] in attacks.ATTACKS]
    return _row("test", "pgd_ce", "gradient_masking", float(attacks.gradient_masking_flag(acc)))


def robustness_rows(
    model: torch.nn.Module,
    prep: PreparedData,
    cfg: TrialConfig,
    device: torch.device,
    *,
    source_model: torch.nn.Module | None = None,
) -> list[dict[str, Any]]:
    spec = cfg.evaluate
    b = prep.bundle
    rows: list[dict[str, Any]] = []
    if spec is None:
        return rows
    attack_names = [a for a in spec.attacks if a != "transfer" or source_model is not None]
    if not attack_names and not spec.corruptions:
        return rows
    model.eval()
    x, y = eval_subset(prep, cfg, device)
    if attack_names and spec.eps:
        rows += attack_rows(
            model, b, spec, x, y, attack_names=attack_names, source_model=source_model, seed=cfg.train_seed
        )
        rows.append(gradient_masking_row(rows))
    names = spec.corruptions
    if names:
        kind = b.kind
        for r in corruptions.corruption_rows(
            model,
            x,
            y,
            kind=kind,
            names=None if names == "all" else names,
            severities=tuple(spec.severities),
            seed=cfg.train_seed,
        ):
            rows.append({"split": "test", **r})
    return rows
