"""Logit penalty: an L2 penalty on the logits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from study.regularizers._base import Regularizer
from study.regularizers._spec import ParamSpec, RegularizerInfo, register

PARAMS = {
    "beta": ParamSpec(
        default=2e-3,
        low=0.0,
        high=1.0,
        schedulable=True,
        neutral=0.0,
        description="weight of (1/2) ||z||^2",
    ),
}


class LogitPenalty(Regularizer):
    """``CE + (b/2) ||z||^2`` per sample (squared L2 norm over the K logits), batch mean.

    Logged term: ``logit_norm_sq`` (mean ||z||^2, unscaled).

    Args:
        beta: Weight in [0, 1], or a schedule.
    """

    def __init__(self, beta: float | Mapping[str, Any] = PARAMS["beta"].default) -> None:
        super().__init__("logit_penalty", PARAMS, beta=beta)

    def _per_sample(self, z: Tensor, targets: Tensor) -> Tensor:
        ce = F.cross_entropy(z, targets.long(), reduction="none")
        return ce + 0.5 * self.param("beta") * z.square().sum(1)

    def _terms(self, z: Tensor, targets: Tensor) -> dict[str, Tensor]:
        return {"logit_norm_sq": z.square().sum(1)}


INFO = RegularizerInfo(
    name="logit_penalty",
    factory=LogitPenalty,
    description="Logit penalty: CE + (b/2) ||z||^2.",
    params=PARAMS,
    strength="beta",
    reference="Baseline in Zhou et al., NeurIPS 2025 (MaxSup); see Dauphin & Cubuk, ICLR 2021",
    vmappable=True,
)
register(INFO)
