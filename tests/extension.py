"""A user's extension, as a pytest plugin: one regularizer, one noise kind, one metric and one dataset,
registered at start-up the way docs/architecture.md's "Where to add things" says, with no edit to the
package or its tests. ``pytest -p extension`` (tests/ on the path) runs the registry-parametrised tests
on them too; tests/test_architecture.py checks that they do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from native_files import NATIVE_FILES
from torch import Tensor

from study import data, noise, regularizers, vocabulary
from study.data._readers import RawSplits

NAMES = ("tilted_ce", "to_zero", "my_margin", "blobs")


class TiltedCE(regularizers.Regularizer):
    """CE plus ``weight`` times the mean logit's distance to the target's (a toy penalty)."""

    def __init__(self, weight: Any = 0.1) -> None:
        super().__init__("tilted_ce", PARAMS, weight=weight)

    def _per_sample(self, z: Tensor, targets: Tensor) -> Tensor:
        gap = z.gather(1, targets.long()[:, None])[:, 0] - z.mean(dim=1)
        return F.cross_entropy(z, targets.long(), reduction="none") - self.param("weight") * gap


PARAMS = {"weight": regularizers.ParamSpec(default=0.1, low=0.0, high=1.0, schedulable=True, neutral=0.0)}


def _flip_to_zero(rng: np.random.Generator, y: np.ndarray, k: int, r: float, inputs: Any) -> tuple:
    noisy = y.copy()
    noisy[rng.random(len(y)) < r] = 0
    return noisy, "to class 0"


def _load_blobs(root: Path, download: bool) -> RawSplits:
    arrays = np.load(Path(root) / "blobs.npz")
    return RawSplits(*(torch.from_numpy(arrays[k]) for k in ("x_train", "y_train", "x_test", "y_test")))


def _write_blobs(root: Path) -> dict[str, Any]:
    """Two Gaussian blobs as 1x8 uint8 signals in one .npz (the dataset's native format)."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", 120), ("test", 40)):
        y = np.arange(n) % 2
        out[f"x_{split}"] = np.clip(rng.normal(100 + 60 * y[:, None, None], 20, (n, 1, 8)), 0, 255).astype(
            np.uint8
        )
        out[f"y_{split}"] = y.astype(np.int64)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "blobs.npz", **out)
    return {}


def register() -> None:
    regularizers.register(
        regularizers.RegularizerInfo(
            "tilted_ce", TiltedCE, "CE minus a logit-gap bonus", PARAMS, strength="weight", vmappable=True
        )
    )
    noise.NOISE_REGISTRY.register(noise.NoiseKind("to_zero", _flip_to_zero, "flip to class 0"))
    vocabulary.NOISE_KINDS["to_zero"] = "zero"
    metric = vocabulary.Metric("my_margin", "my margin", vocabulary.HIGHER, vocabulary.Q_CALIBRATION)
    vocabulary.METRICS = (*vocabulary.METRICS, metric)
    vocabulary.METRIC_BY_NAME[metric.name] = metric
    data.DATASETS.register(data.DatasetEntry("blobs", _load_blobs, "signal", 2, "two blobs (.npz)"))
    NATIVE_FILES["blobs"] = _write_blobs


register()  # at import, before the test modules (and their parametrisations) are collected
