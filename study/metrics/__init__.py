"""Pure functions over tensors: accuracy, NLL, Brier, calibration (ECE family, reliability bins,
temperature scaling), memorisation of flipped labels and feature geometry.

``_scores`` holds the metrics, ``_calibration`` the shared binning and input checks, ``_projection``
the template-plane projection of penultimate features (Mueller et al. 2019).
"""

from study.metrics._projection import project_features, template_plane_basis
from study.metrics._scores import (
    CHUNK_SIZE,
    T_MAX,
    T_MIN,
    accuracy,
    adaptive_ece,
    brier,
    calibration_after_temperature,
    classification_metrics,
    classwise_ece,
    clean_label_recovery,
    ece,
    feature_separation,
    fit_temperature,
    mce,
    memorisation_rate,
    nll,
    overconfidence_on_errors,
    reliability_bins,
)

__all__ = [
    "CHUNK_SIZE",
    "T_MAX",
    "T_MIN",
    "accuracy",
    "adaptive_ece",
    "brier",
    "calibration_after_temperature",
    "classification_metrics",
    "classwise_ece",
    "clean_label_recovery",
    "ece",
    "feature_separation",
    "fit_temperature",
    "mce",
    "memorisation_rate",
    "nll",
    "overconfidence_on_errors",
    "project_features",
    "reliability_bins",
    "template_plane_basis",
]
